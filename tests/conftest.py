import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def base_checkpoint():
    """The embedded SmolLM2-135M-Instruct checkpoint as a transformers folder (converted once, cached)."""
    from hm_utils.models import provision

    return provision("smollm2-135m")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread: two threads on a CPU shared with other jobs run several times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

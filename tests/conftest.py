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

"""The streaming engine against mergekit 0.1.5 on the real SmolLM2-135M checkpoint.

A specialist is the real base plus seeded perturbations of every decoder weight (dense
noise plus a rank-4 term). Its embeddings and norms stay equal to the base. A TIES merge
of that one specialist without normalisation (model-wise pruning and scaling), with
per-layer densities and per-tensor weights, runs through mergekit and through the
engine. The mergekit output is then loaded with transformers. Several models, every method and
the random methods are compared end to end in test_merge_inputs.py on tiny models.
"""

import contextlib

import pytest
import torch

from hm_utils.merge import MergeConfig, load_state_dict, merge_checkpoints, run_mergekit, write_mergekit_config
from hm_utils.merge.plan import plan_tensor
from hm_utils.merge.synthetic import perturb_checkpoint

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def single_thread():
    # Two torch threads on a CPU shared with other jobs run several times slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def specialist(tmp_path_factory, base_checkpoint):
    root = tmp_path_factory.mktemp("specialists")
    with single_thread():
        return perturb_checkpoint(base_checkpoint, root / "specialist", seed=0)


@pytest.fixture(scope="module")
def ties_outputs(tmp_path_factory, base_checkpoint, specialist):
    root = tmp_path_factory.mktemp("ties")
    config = MergeConfig.from_arguments(
        "ties",
        base_checkpoint,
        [specialist],
        weights=[[{"filter": "mlp", "value": [0.9, 0.5]}, {"value": 0.8}]],
        densities=[[0.2, 0.6]],
        normalize=False,
    )
    path = write_mergekit_config(config, root / "ties.yml")
    with single_thread():
        theirs = run_mergekit(path, root / "mergekit")
        ours = merge_checkpoints(path, root / "engine", progress=False)
    return config, theirs, ours


def test_ties_matches_mergekit(ties_outputs, base_checkpoint, specialist):
    # Identical except where |delta| ties at a model's trim threshold: mergekit keeps the
    # members its unstable argsort puts first, the engine those of lowest flat index.
    config, theirs_dir, ours_dir = ties_outputs
    theirs = load_state_dict(theirs_dir)
    ours = load_state_dict(ours_dir)
    base = load_state_dict(base_checkpoint)
    inputs = [load_state_dict(specialist)]
    assert set(ours) == set(theirs)

    tied_total = 0
    for name in sorted(ours):
        differ = ours[name] != theirs[name]
        if not differ.any():
            continue
        item = plan_tensor(config, name, 30)
        ties = torch.zeros_like(differ)
        for state, density in zip(inputs, item.densities):
            magnitudes = (state[name] - base[name]).abs()
            k = max(1, int(density * magnitudes.numel()))
            threshold = torch.topk(magnitudes.reshape(-1), k).values[-1]
            ties |= magnitudes == threshold
        assert not torch.any(differ & ~ties), name
        tied_total += int(differ.sum())
    assert tied_total < 1000


def test_ties_output_has_config(ties_outputs):
    config, theirs_dir, ours_dir = ties_outputs
    assert MergeConfig.from_yaml(theirs_dir / "mergekit_config.yml") == config
    assert MergeConfig.from_yaml(ours_dir / "mergekit_config.yml") == config


def test_mergekit_output_loads(ties_outputs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, theirs_dir, _ = ties_outputs
    model = AutoModelForCausalLM.from_pretrained(theirs_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(theirs_dir)
    stored = load_state_dict(theirs_dir)
    state = model.state_dict()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    inputs = tokenizer("Aspirin inhibits", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()

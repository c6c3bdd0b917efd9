"""Reliability of merges and batch runs: bad inputs, output checks, interrupted writes, full disks.

The merge inputs are the tiny Llama folders of ``test_merge_inputs.py`` (3 layers, hidden
size 16, the real SmolLM2 tokenizer). The batch runs use the small notebooks and profiles
of ``test_runs.py``. A kill is a real SIGKILL of a child process. A full disk is an
``OSError(ENOSPC)`` raised from inside the writer after it has written part of a file.
"""

import contextlib
import errno
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from test_merge_inputs import (
    INTERMEDIATE,
    TINY_CONFIG,
    config_for,
    tiny,  # noqa: F401  (fixture)
    tiny_state,
    variant,
    write_model,
)
from test_runs import SECOND_BODY, executions, project, run_project, write_notebook  # noqa: F401  (project: fixture)

from hm_utils import files, runs
from hm_utils.merge import (
    MergeConfig,
    check_merge_inputs,
    load_state_dict,
    merge_checkpoints,
    merge_deltas,
    merge_with_mergekit_once,
    run_mergekit,
    save_state_dict,
    verify_output,
    write_mergekit_config,
)
from hm_utils.merge.__main__ import main as merge_main
from hm_utils.merge.checks import relative_deltas
from hm_utils.merge.io import SafetensorsStreamWriter, TensorReader, copy_auxiliary_files
from hm_utils.merge.task_vectors import TaskVectors
from hm_utils.models import resolve_model

REPO_ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reject_weight_reads(monkeypatch):
    def reject_read(*_args, **_kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(TensorReader, "read", reject_read)


def assert_same_tensors(first, second):
    ours, theirs = load_state_dict(first), load_state_dict(second)
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def task_arithmetic(tiny, models, **arguments):
    return MergeConfig.from_arguments("task_arithmetic", tiny["base"], models, weights=[1.0, 0.5], **arguments)


def noisy_copy(state, seed, scale=0.02):
    generator = torch.Generator().manual_seed(seed)
    return {name: tensor + scale * torch.randn(tensor.shape, generator=generator) for name, tensor in state.items()}


def siblings(path):
    return sorted(entry.name for entry in path.parent.iterdir() if entry.name != path.name)


# --- embeddings and output heads ------------------------------------------------------------


@pytest.mark.parametrize("rows", [66, 128], ids=["padded-rows", "extra-vocabulary"])
def test_vocabulary_size_rejected(tiny, monkeypatch, rows):
    folder = variant(tiny, f"vocab{rows}", state=tiny_state(1, vocab=rows), config=dict(TINY_CONFIG, vocab_size=rows))
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    reject_weight_reads(monkeypatch)
    with pytest.raises(ValueError) as raised:
        check_merge_inputs(merge)
    message = str(raised.value)
    assert f"vocab_size is {rows} in {folder} and 64 in {tiny['base']}" in message
    assert "resize_token_embeddings" in message


def test_padded_rows_config_unchanged(tiny, monkeypatch):
    # Rows padded in the weights while config.json still gives the old vocabulary size.
    folder = variant(tiny, "padded_weights", state=tiny_state(1, vocab=72))
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    reject_weight_reads(monkeypatch)
    with pytest.raises(ValueError) as raised:
        check_merge_inputs(merge)
    message = str(raised.value)
    assert "embedding matrix model.embed_tokens.weight is (72, 16)" in message
    assert "its config.json gives (64, 16)" in message


@pytest.fixture(scope="module")
def untied(tiny):
    """A base and two specialists with their own output heads (tie_word_embeddings: false)."""
    config = dict(TINY_CONFIG, tie_word_embeddings=False)
    base_state = dict(tiny["base_state"])
    base_state["lm_head.weight"] = torch.randn(64, 16, generator=torch.Generator().manual_seed(5)) * 0.1
    root = tiny["root"] / "untied"
    base = write_model(root / "base", base_state, config)
    specialists = [write_model(root / f"specialist{seed}", noisy_copy(base_state, seed), config) for seed in (11, 12)]
    return {"base": base, "specialists": specialists, "config": config, "base_state": base_state}


def test_untied_heads_merge(tiny, untied, tmp_path):
    out = merge_checkpoints(task_arithmetic(untied, untied["specialists"]), tmp_path / "merged", progress=False)
    merged = load_state_dict(out)
    base = untied["base_state"]
    first, second = (load_state_dict(folder) for folder in untied["specialists"])
    assert set(merged) == set(base)
    for name in base:
        # Task arithmetic: θ_F + (δ_1 + 0.5 δ_2), summed in the engine's order.
        expected = base[name] + ((first[name] - base[name]) + (second[name] - base[name]) * 0.5)
        assert torch.equal(merged[name], expected), name


def test_untied_missing_head_rejected(tiny, untied, monkeypatch):
    state = load_state_dict(untied["base"])
    del state["lm_head.weight"]
    folder = variant(tiny, "untied_headless", state=state, config=untied["config"])
    merge = MergeConfig.from_arguments("task_arithmetic", folder, untied["specialists"], weights=1.0)
    reject_weight_reads(monkeypatch)
    with pytest.raises(ValueError) as raised:
        check_merge_inputs(merge)
    message = str(raised.value)
    assert f"{folder} has no output head lm_head.weight" in message
    assert "tie_word_embeddings: false" in message


def test_tied_head_copy_ignored(tiny, tmp_path):
    # mergekit writes lm_head.weight for tied models; transformers ties it again on load.
    state = load_state_dict(tiny["specialists"][0])
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    folder = variant(tiny, "tied_with_head", state=state)
    with_copy = merge_checkpoints(task_arithmetic(tiny, [folder, tiny["specialists"][1]]), tmp_path / "copy", progress=False)
    without = merge_checkpoints(task_arithmetic(tiny, tiny["specialists"][:2]), tmp_path / "plain", progress=False)
    assert "lm_head.weight" not in load_state_dict(with_copy)
    assert_same_tensors(with_copy, without)


# --- specialist fine-tuned from another base -------------------------------------------------


@pytest.fixture(scope="module")
def other_base(tiny):
    """A model of the same architecture with independent weights, so not fine-tuned from the tiny base."""
    return write_model(tiny["root"] / "other_base", tiny_state(7), tokenizer_source=tiny["base"])


def test_relative_delta_values(tiny, other_base):
    summary = check_merge_inputs(task_arithmetic(tiny, [tiny["specialists"][0], other_base]))
    ratios = relative_deltas(summary)
    base = tiny["base_state"]
    names = [name for name in base if name.startswith("model.layers.") and base[name].dim() == 2]
    base_square = sum(float(base[name].double().norm()) ** 2 for name in names)
    for folder in (tiny["specialists"][0], other_base):
        state = load_state_dict(folder)
        delta_square = sum(float((state[name] - base[name]).double().norm()) ** 2 for name in names)
        assert ratios[folder] == pytest.approx(math.sqrt(delta_square / base_square), rel=1e-9)
    # Noise of 0.02 on weights of 0.1; two independent draws differ by about sqrt(2) times their norm.
    assert ratios[tiny["specialists"][0]] == pytest.approx(0.2, rel=0.05)
    assert ratios[other_base] == pytest.approx(math.sqrt(2), rel=0.05)


def test_other_base_rejected(tiny, other_base, tmp_path):
    config = task_arithmetic(tiny, [tiny["specialists"][0], other_base])
    ratio = relative_deltas(check_merge_inputs(config))[other_base]
    out = tmp_path / "merged"
    with pytest.raises(ValueError) as raised:
        merge_checkpoints(config, out, progress=False)
    message = str(raised.value)
    assert f"{other_base} differs from base model {tiny['base']} by {ratio:.2f} times" in message
    assert "fine-tuned from another base" in message
    assert "max_relative_delta" in message
    assert not out.exists()


def test_other_base_rejected_mergekit(tiny, other_base, tmp_path):
    path = write_mergekit_config(task_arithmetic(tiny, [tiny["specialists"][0], other_base]), tmp_path / "merge.yml")
    with pytest.raises(ValueError, match="fine-tuned from another base"):
        run_mergekit(path, tmp_path / "merged")
    assert siblings(tmp_path / "merged") == ["merge.yml"]


def test_other_base_override(tiny, other_base, tmp_path):
    config = task_arithmetic(tiny, [tiny["specialists"][0], other_base])
    path = write_mergekit_config(config, tmp_path / "merge.yml")
    assert merge_main([str(path), "--out", str(tmp_path / "cli"), "--max-relative-delta", "2"]) == 0
    merge_checkpoints(config, tmp_path / "api", progress=False, max_relative_delta=None)
    assert_same_tensors(tmp_path / "cli", tmp_path / "api")


# --- half precision overflow ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half(tiny):
    """float16 base and two specialists whose deltas of 20000 push one entry past 65504 when summed."""
    config = dict(TINY_CONFIG, dtype="float16")
    base_state = {name: tensor.half() for name, tensor in tiny["base_state"].items()}
    base_state["model.layers.1.mlp.down_proj.weight"][0, 0] = 40000.0
    root = tiny["root"] / "half"
    base = write_model(root / "base", base_state, config, tokenizer_source=tiny["base"])
    specialists = []
    for seed in (21, 22):
        state = {name: tensor.float() for name, tensor in base_state.items()}
        state = {name: tensor.half() for name, tensor in noisy_copy(state, seed).items()}
        state["model.layers.1.mlp.down_proj.weight"][0, 0] = 60000.0
        specialists.append(write_model(root / f"specialist{seed}", state, config, tokenizer_source=tiny["base"]))
    return {"base": base, "specialists": specialists}


def half_merge(half, **dtypes):
    return MergeConfig.from_arguments("task_arithmetic", half["base"], half["specialists"], weights=1.0, **dtypes)


@pytest.mark.parametrize("dtypes", [{"dtype": "float16"}, {"dtype": "float32", "out_dtype": "float16"}], ids=["compute", "output"])
def test_half_overflow_rejected(half, tmp_path, dtypes):
    out = tmp_path / "merged"
    merge_checkpoints(half_merge(half, dtype="float32"), out, progress=False)
    before = load_state_dict(out)
    with pytest.raises(ValueError) as raised:
        merge_checkpoints(half_merge(half, **dtypes), out, progress=False)
    message = str(raised.value)
    assert "model.layers.1.mlp.down_proj.weight" in message
    assert "overflows float16" in message
    assert "float32 or bfloat16" in message
    after = load_state_dict(out)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert siblings(out) == []


def test_half_overflow_rejected_mergekit(half, tmp_path):
    path = write_mergekit_config(half_merge(half, dtype="float16"), tmp_path / "merge.yml")
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight .* NaN or infinity"):
        run_mergekit(path, tmp_path / "merged")
    assert siblings(tmp_path / "merged") == ["merge.yml"]


# --- quantized, sharded and .bin inputs ------------------------------------------------------------


def test_float8_rejected(tiny, monkeypatch):
    state = load_state_dict(tiny["specialists"][0])
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    folder = variant(tiny, "float8", state=state)
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    reject_weight_reads(monkeypatch)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight .* is torch.float8_e4m3fn; merging needs float16"):
        check_merge_inputs(merge)


@pytest.fixture(scope="module")
def sharded(tiny):
    """The tiny base and first two specialists again, each split into several safetensors shards."""
    folders = {}
    for source in [tiny["base"], *tiny["specialists"][:2]]:
        folder = tiny["root"] / "sharded" / source.name
        folder.mkdir(parents=True, exist_ok=True)
        save_state_dict(load_state_dict(source), folder, max_shard_bytes=20_000)
        copy_auxiliary_files(source, folder)
        folders[source.name] = folder
    return folders


def test_sharded_inputs_same_merge(tiny, sharded, tmp_path):
    assert (sharded["base"] / "model.safetensors.index.json").is_file()
    single = config_for(tiny)
    split = MergeConfig.from_arguments(
        "ties", sharded["base"], [sharded["specialist0"], tiny["specialists"][1]], weights=[1.0, 0.5], densities=[0.5, 0.7]
    )
    assert_same_tensors(
        merge_checkpoints(single, tmp_path / "single", progress=False),
        merge_checkpoints(split, tmp_path / "sharded", progress=False),
    )


def test_sharded_inputs_same_merge_mergekit(tiny, sharded, tmp_path):
    single = write_mergekit_config(config_for(tiny), tmp_path / "single.yml")
    split = MergeConfig.from_arguments(
        "ties", sharded["base"], [sharded["specialist0"], sharded["specialist1"]], weights=[1.0, 0.5], densities=[0.5, 0.7]
    )
    split_path = write_mergekit_config(split, tmp_path / "sharded.yml")
    assert_same_tensors(run_mergekit(single, tmp_path / "single"), run_mergekit(split_path, tmp_path / "sharded"))


def test_bin_input_cli_names_fix(tiny, tmp_path, capsys):
    folder = tmp_path / "bin_model"
    folder.mkdir()
    torch.save(load_state_dict(tiny["specialists"][0]), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    path = write_mergekit_config(task_arithmetic(tiny, [folder, tiny["specialists"][1]]), tmp_path / "merge.yml")
    assert merge_main([str(path), "--out", str(tmp_path / "merged")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert f"{folder} stores .bin weights" in error
    assert "save_pretrained" in error
    assert not (tmp_path / "merged").exists()


# --- tokenizers ----------------------------------------------------------------------------------------------


def copy_model(source, folder, tokenizer=True):
    folder.mkdir(parents=True)
    for file in source.iterdir():
        if tokenizer or not file.name.startswith("tokenizer"):
            shutil.copy(file, folder / file.name)
    return folder


def test_tokenizer_from_specialist(tiny, tmp_path):
    base = copy_model(tiny["base"], tmp_path / "base", tokenizer=False)
    config = MergeConfig.from_arguments("task_arithmetic", base, tiny["specialists"][:2], weights=1.0)
    out = merge_checkpoints(config, tmp_path / "merged", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny["specialists"][0] / name).read_bytes(), name


def test_no_tokenizer_warns(tiny, tmp_path, caplog):
    base = copy_model(tiny["base"], tmp_path / "base", tokenizer=False)
    specialists = [copy_model(folder, tmp_path / folder.name, tokenizer=False) for folder in tiny["specialists"][:2]]
    with caplog.at_level("WARNING"):
        config = MergeConfig.from_arguments("task_arithmetic", base, specialists, weights=1.0)
        out = merge_checkpoints(config, tmp_path / "merged", progress=False)
    assert "no input has tokenizer files" in caplog.text
    assert not (out / "tokenizer.json").exists()
    assert (out / "model.safetensors").is_file()


def test_different_tokenizer_rejected(tiny, tmp_path, monkeypatch):
    folder = copy_model(tiny["specialists"][0], tmp_path / "retokenized")
    document = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocabulary = document["model"]["vocab"]
    first, second = list(vocabulary)[100:102]
    vocabulary[first], vocabulary[second] = vocabulary[second], vocabulary[first]
    (folder / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    reject_weight_reads(monkeypatch)
    with pytest.raises(ValueError) as raised:
        check_merge_inputs(task_arithmetic(tiny, [folder, tiny["specialists"][1]]))
    message = str(raised.value)
    assert f"the tokenizer of {folder} differs from that of {tiny['base']}" in message
    assert "2 vocabulary entries differ" in message


# --- model references ----------------------------------------------------------------------------------------


@pytest.fixture()
def models_folder(tiny, tmp_path, monkeypatch):
    """A working folder with models/base and models/specialist{0,1}, made the current folder."""
    for source in [tiny["base"], *tiny["specialists"][:2]]:
        shutil.copytree(source, tmp_path / "models" / source.name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


RELATIVE_YAML = """merge_method: task_arithmetic
base_model: models/base
models:
  - model: models/specialist0
    parameters: {weight: 1.0}
  - model: models/specialist1
    parameters: {weight: 0.5}
dtype: float32
"""


def test_relative_path_is_local(tiny, models_folder, monkeypatch):
    import huggingface_hub

    def reject_hub(*args, **_kwargs):
        raise AssertionError(f"hub lookup for {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", reject_hub)
    path = models_folder / "merge.yml"
    path.write_text(RELATIVE_YAML)
    assert merge_main([str(path), "--out", "merged"]) == 0
    assert merge_main([str(path), "--out", "merged_mergekit", "--engine", "mergekit"]) == 0
    expected = merge_checkpoints(task_arithmetic(tiny, tiny["specialists"][:2]), models_folder / "expected", progress=False)
    assert_same_tensors(models_folder / "merged", expected)
    assert_same_tensors(models_folder / "merged_mergekit", expected)
    saved = MergeConfig.from_yaml(models_folder / "merged" / "mergekit_config.yml")
    assert saved.base_model == str((models_folder / "models" / "base").resolve())


@pytest.mark.parametrize("reference", ["models/absent", "./absent", "../absent", "~/absent-hm-model", "/absent/model", "a/b/c"])
def test_missing_local_path_reported(tiny, models_folder, reference):
    merge = MergeConfig(merge_method="task_arithmetic", base_model=str(tiny["base"]), models=[{"model": reference, "parameters": {"weight": 1.0}}])
    with pytest.raises(FileNotFoundError) as raised:
        check_merge_inputs(merge)
    message = str(raised.value)
    assert f"local model folder {reference} does not exist" in message
    assert "hub" not in message


def test_missing_local_path_cli(tiny, models_folder, capsys):
    path = models_folder / "merge.yml"
    path.write_text(RELATIVE_YAML.replace("models/specialist1", "models/specialist9"))
    assert merge_main([str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"error: local model folder models/specialist9 does not exist (resolved to {models_folder / 'models' / 'specialist9'});"
        " check the path"
    )


def test_missing_local_path_from_arguments(models_folder):
    with pytest.raises(FileNotFoundError, match="local model folder 'models/absent' does not exist"):
        resolve_model("models/absent")


def test_hub_id_without_local_folder(tiny, models_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    merge = MergeConfig(merge_method="task_arithmetic", base_model=str(tiny["base"]), models=[{"model": "owner/name", "parameters": {"weight": 1.0}}])
    with pytest.raises(FileNotFoundError, match="model owner/name is neither a local folder nor found in the local hub cache"):
        check_merge_inputs(merge)


# --- typos and weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("merge_method: task_arithmetic", "merge_method: task_arithmetc", "unknown merge method 'task_arithmetc' (did you mean 'task_arithmetic'?); valid methods: linear, task_arithmetic"),
        ("{weight: 0.5}", "{wieght: 0.5}", "unknown parameters of"),
        ("base_model:", "base_modle:", "config keys ['base_modle'] are not supported here (did you mean 'base_model'?)"),
    ],
    ids=["method", "parameter", "key"],
)
def test_typo_lists_valid_names(models_folder, capsys, old, new, expected):
    path = models_folder / "merge.yml"
    path.write_text(RELATIVE_YAML.replace(old, new))
    assert merge_main([str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error
    if new.startswith("{wieght"):
        assert "(did you mean 'weight'?)" in error
        assert "valid parameters: int8_mask, normalize, rescale, lambda, weight, density" in error


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_zero_weight_sum_rejected(tiny, tmp_path, monkeypatch, method):
    base = None if method == "linear" else tiny["base"]
    config = MergeConfig.from_arguments(method, base, tiny["specialists"][:2], weights=[1.0, -1.0], normalize=True)
    reject_weight_reads(monkeypatch)
    with pytest.raises(ValueError) as raised:
        merge_checkpoints(config, tmp_path / "merged", progress=False)
    message = str(raised.value)
    assert "weights [1.0, -1.0] of model.embed_tokens.weight sum to zero and normalize is true" in message
    assert "set normalize: false" in message
    assert not (tmp_path / "merged").exists()


def test_zero_weight_sum_in_memory(tiny):
    task_vectors = TaskVectors.from_checkpoints(tiny["base"], tiny["specialists"][:2])
    with pytest.raises(ValueError, match="sum to zero and normalize is true"):
        merge_deltas(task_vectors, "task_arithmetic", [0.5, -0.5], normalize=True)


# --- in-memory merges against the streaming engine ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "arguments"),
    [
        ("ties", {"densities": [0.5, 0.7]}),
        ("dare_ties", {"densities": [0.5, 0.7]}),
        ("della", {"densities": [0.5, 0.6], "epsilon": 0.1}),
        ("breadcrumbs_ties", {"densities": [0.8, 0.9], "gamma": [0.05, 0.02]}),
    ],
    ids=["ties", "dare_ties", "della", "breadcrumbs_ties"],
)
def test_in_memory_matches_engine(tiny, tmp_path, method, arguments):
    # The engine overwrites its input buffers to save memory; merge_deltas must not touch the
    # task vectors. Both draw random masks from the global RNG in tensor-name order.
    task_vectors = TaskVectors.from_checkpoints(tiny["base"], tiny["specialists"][:2])
    before = [{name: tensor.clone() for name, tensor in delta.items()} for delta in task_vectors.deltas]
    torch.manual_seed(0)
    merged = merge_deltas(task_vectors, method, [1.0, 0.5], **arguments)
    config = MergeConfig.from_arguments(method, tiny["base"], tiny["specialists"][:2], weights=[1.0, 0.5], **arguments)
    torch.manual_seed(0)
    engine = load_state_dict(merge_checkpoints(config, tmp_path / "merged", progress=False))
    for name, delta in merged.items():
        assert torch.equal(engine[name], task_vectors.base[name] + delta), name
    for delta, saved in zip(task_vectors.deltas, before):
        assert all(torch.equal(delta[name], saved[name]) for name in saved)


# --- output checks -----------------------------------------------------------------------------------------


@pytest.fixture()
def summary(tiny):
    return check_merge_inputs(config_for(tiny))


def output_folder(tiny, folder, state):
    folder.mkdir()
    save_state_dict(state, folder)
    copy_auxiliary_files(tiny["base"], folder)
    return folder


def test_verify_output_accepts_complete(tiny, summary, tmp_path):
    verify_output(output_folder(tiny, tmp_path / "complete", dict(tiny["base_state"])), summary)


def test_verify_output_architecture(summary):
    assert summary.architecture.architecture == "LlamaForCausalLM"
    assert summary.architecture.shapes["model.layers.2.mlp.down_proj.weight"] == (16, INTERMEDIATE)
    assert summary.architecture.tied_copies == frozenset({"lm_head.weight"})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("drop", "lacks tensors \\['model.norm.weight'\\]"),
        ("shape", "merged tensor model.norm.weight is \\(15,\\), expected \\(16,\\)"),
        ("nan", "merged tensor model.norm.weight in .* contains NaN or infinity"),
        ("extra", "has unexpected tensors \\['model.extra.weight'\\]"),
    ],
    ids=["drop", "shape", "nan", "extra"],
)
def test_verify_output_rejects(tiny, summary, tmp_path, change, expected):
    state = dict(tiny["base_state"])
    if change == "drop":
        del state["model.norm.weight"]
    elif change == "shape":
        state["model.norm.weight"] = state["model.norm.weight"][:15].clone()
    elif change == "nan":
        state["model.norm.weight"] = state["model.norm.weight"].clone()
        state["model.norm.weight"][3] = float("nan")
    else:
        state["model.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=expected):
        verify_output(output_folder(tiny, tmp_path / change, state), summary)


def test_mergekit_incomplete_output_rejected(tiny, tmp_path, monkeypatch):
    import mergekit.merge

    real_run_merge = mergekit.merge.run_merge

    def run_merge_dropping_a_tensor(configuration, out_path, options):
        real_run_merge(configuration, out_path=out_path, options=options)
        state = load_state_dict(out_path)
        del state["model.layers.1.mlp.up_proj.weight"]
        for file in Path(out_path).glob("model*.safetensors*"):
            file.unlink()
        save_state_dict(state, out_path)

    monkeypatch.setattr(mergekit.merge, "run_merge", run_merge_dropping_a_tensor)
    path = write_mergekit_config(config_for(tiny), tmp_path / "merge.yml")
    with pytest.raises(ValueError, match="lacks tensors \\['model.layers.1.mlp.up_proj.weight'\\]"):
        run_mergekit(path, tmp_path / "merged")
    assert siblings(tmp_path / "merged") == ["merge.yml"]


def fail_mergekit_write(monkeypatch, error):
    """Make mergekit's shard writer write part of a file and then raise ``error``."""
    from mergekit.io.tensor_writer import TensorWriter

    def save_partially(self, shard_data, shard_path):
        Path(shard_path).write_bytes(b"\0" * 64)
        raise error

    monkeypatch.setattr(TensorWriter, "_save_st", save_partially)


def test_mergekit_failure_keeps_old_output(tiny, tmp_path, monkeypatch):
    out = merge_with_mergekit_once(config_for(tiny), tmp_path / "ties", random_seed=0)
    before = load_state_dict(out)
    record = (out / "hm_merge_run.json").read_text()
    with monkeypatch.context() as patch:
        fail_mergekit_write(patch, RuntimeError("writer failed"))
        with pytest.raises(RuntimeError, match="writer failed"):
            merge_with_mergekit_once(config_for(tiny, densities=[0.3, 0.3]), out, random_seed=0)
    after = load_state_dict(out)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert (out / "hm_merge_run.json").read_text() == record
    assert MergeConfig.from_yaml(out / "mergekit_config.yml") == config_for(tiny)
    assert siblings(out) == []


# --- interrupted merges --------------------------------------------------------------------------------------


# Runs the merge command line with a writer that stops after five tensors, writes the
# marker file given as first argument and waits to be killed.
STOPPING_MERGE = """
import sys, time
from hm_utils.merge.io import SafetensorsStreamWriter
from hm_utils.merge.__main__ import main

write = SafetensorsStreamWriter.write

def write_then_stop(self, name, tensor):
    write(self, name, tensor)
    if self._position == 5:
        for handle in self._files:
            handle.flush()
        with open(sys.argv[1], "w") as marker:
            marker.write(name)
        time.sleep(600)

SafetensorsStreamWriter.write = write_then_stop
sys.exit(main(sys.argv[2:]))
"""


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"process exited with {process.returncode} before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.2)


def test_killed_merge_rerun_same(tiny, tmp_path):
    path = write_mergekit_config(config_for(tiny), tmp_path / "merge.yml")
    out, marker = tmp_path / "merged", tmp_path / "writing"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", STOPPING_MERGE, str(marker), str(path), "--out", str(out)]
    with (tmp_path / "child.log").open("w") as log:
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(marker, process)
        finally:
            process.kill()
            process.wait()
    assert not out.exists()
    assert any(name.startswith(f".merged.tmp-{process.pid}-") for name in siblings(out))

    assert merge_main([str(path), "--out", str(out)]) == 0
    uninterrupted = merge_checkpoints(config_for(tiny), tmp_path / "uninterrupted", progress=False)
    assert_same_tensors(out, uninterrupted)
    assert sorted(siblings(out)) == ["child.log", "merge.yml", "uninterrupted", "writing"]


def test_writer_error_rerun_same(tiny, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    write = SafetensorsStreamWriter.write

    def write_then_fail(self, name, tensor):
        write(self, name, tensor)
        if self._position == 5:
            raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(SafetensorsStreamWriter, "write", write_then_fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            merge_checkpoints(config_for(tiny), out, progress=False)
    assert siblings(out) == []
    merge_checkpoints(config_for(tiny), out, progress=False)
    uninterrupted = merge_checkpoints(config_for(tiny), tmp_path / "uninterrupted", progress=False)
    assert_same_tensors(out, uninterrupted)


def test_merge_once_reruns_on_new_weights(tiny, tmp_path):
    specialist = copy_model(tiny["specialists"][0], tmp_path / "specialist")
    config = MergeConfig.from_arguments(
        "ties", tiny["base"], [specialist, tiny["specialists"][1]], weights=[1.0, 0.5], densities=[0.5, 0.7]
    )
    out = merge_with_mergekit_once(config, tmp_path / "ties", random_seed=0)
    first = load_state_dict(out)

    # The specialist is trained again into the same folder: same config text, new weights.
    retrained = noisy_copy(load_state_dict(tiny["base"]), 99)
    (specialist / "model.safetensors").unlink()
    save_state_dict(retrained, specialist)
    merge_with_mergekit_once(config, out, random_seed=0)
    fresh = run_mergekit(write_mergekit_config(config, tmp_path / "fresh.yml"), tmp_path / "fresh", random_seed=0)
    assert_same_tensors(out, fresh)
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"], load_state_dict(out)["model.layers.0.mlp.up_proj.weight"])


# --- full disk -------------------------------------------------------------------------------------------------


def full_disk_error():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_engine_one_line(tiny, tmp_path, monkeypatch, capsys):
    path = write_mergekit_config(config_for(tiny), tmp_path / "merge.yml")
    out = tmp_path / "merged"
    write = SafetensorsStreamWriter.write

    def write_until_full(self, name, tensor):
        if self._position == 3:
            self._files[0].write(b"\0" * 100)
            raise full_disk_error()
        write(self, name, tensor)

    monkeypatch.setattr(SafetensorsStreamWriter, "write", write_until_full)
    assert merge_main([str(path), "--out", str(out)]) == 1
    # The lines before the error are the progress bar.
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"error: [Errno {errno.ENOSPC}] no space left while writing {out} (No space left on device);"
        " free space on that file system or choose another output folder"
    )
    assert siblings(out) == ["merge.yml"]


def test_disk_full_mergekit(tiny, tmp_path, monkeypatch):
    path = write_mergekit_config(config_for(tiny), tmp_path / "merge.yml")
    fail_mergekit_write(monkeypatch, full_disk_error())
    with pytest.raises(OSError) as raised:
        run_mergekit(path, tmp_path / "merged")
    assert raised.value.errno == errno.ENOSPC
    assert f"no space left while writing {tmp_path / 'merged'}" in str(raised.value)
    assert "choose another output folder" in str(raised.value)
    assert siblings(tmp_path / "merged") == ["merge.yml"]


class FullDiskFile:
    """A text file whose first write stores part of the text and then raises ENOSPC."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()

    def write(self, text):
        self.handle.write(text[:10])
        self.handle.flush()
        raise full_disk_error()


def test_disk_full_runs_one_line(project, tmp_path, monkeypatch, capsys):
    full_os = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    full_os.fdopen = lambda fd, *args, **kwargs: FullDiskFile(os.fdopen(fd, *args, **kwargs))
    monkeypatch.setattr(files, "os", full_os)
    monkeypatch.setattr(runs, "run", functools.partial(runs.run, notebooks_dir=project["notebooks"], runs_root=project["runs"]))
    run_dir = tmp_path / "run"
    code = runs.main(["--profile", "smoke", "--profiles-file", str(project["profiles"]), "--run-dir", str(run_dir)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert error == (
        f"error: [Errno {errno.ENOSPC}] no space left while writing {run_dir} (No space left on device);"
        " free space on that file system or choose another output folder"
    )
    assert sorted(entry.name for entry in run_dir.iterdir()) == ["executed", "run.log"]


# --- interrupted notebook runs --------------------------------------------------------------------------------


# The second notebook stops before its work while HOLD_FILE is set, after writing its
# kernel's process id there, so a test can kill the run in the middle of the notebook.
HOLDING_BODY = """
import os, time
from pathlib import Path
if os.environ.get("HOLD_FILE"):
    Path(os.environ["HOLD_FILE"]).write_text(str(os.getpid()))
    time.sleep(600)
""" + SECOND_BODY

RUNNER = "import sys; from hm_utils import runs; runs.run('smoke', profiles_path=sys.argv[1], notebooks_dir=sys.argv[2], run_dir=sys.argv[3])"


def test_killed_notebook_run_resumes(project, tmp_path, monkeypatch):
    write_notebook(project["notebooks"] / "02_second.ipynb", 'run_dir = "x"\nseed = 0\nfail = False', HOLDING_BODY)
    monkeypatch.delenv("HOLD_FILE", raising=False)
    killed, hold = tmp_path / "killed", tmp_path / "hold"
    env = dict(os.environ, HOLD_FILE=str(hold), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", RUNNER, str(project["profiles"]), str(project["notebooks"]), str(killed)]
    with (tmp_path / "runner.log").open("w") as log:
        runner = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(hold, runner)
            kernel = int(hold.read_text())
        finally:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    # The kernel runs in its own session, so it is killed by its process id (unless it already exited).
    with contextlib.suppress(ProcessLookupError):
        os.kill(kernel, signal.SIGKILL)

    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["notebooks"]["01_first"]["status"] == "done"
    assert manifest["notebooks"]["02_second"]["status"] == "running"
    assert executions(killed) == ["01_first 5 common"]

    run_project(project, run_dir=killed, resume=True)
    uninterrupted = run_project(project, run_dir=tmp_path / "uninterrupted")
    assert executions(killed) == executions(uninterrupted)
    assert (killed / "01_first" / "value.json").read_text() == (uninterrupted / "01_first" / "value.json").read_text()
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["notebooks"]["02_second"]["status"] == "done"
    assert "finished" in manifest


def test_changed_source_reruns_downstream(project):
    run_dir = run_project(project)
    notebook = project["notebooks"] / "01_first.ipynb"
    notebook.write_text(notebook.read_text().replace("value * 2", "value * 3"))
    run_project(project, run_dir=run_dir, resume=True)
    assert executions(run_dir)[2:] == ["01_first 5 common", "02_second 15"]

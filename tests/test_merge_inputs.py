"""Merge configs, input checks, the streaming engine and the command line, on tiny Llama folders.

The tiny models (3 layers, hidden size 16) are written directly as safetensors plus
config.json, so mergekit 0.1.5 merges them in about a second. Every method is compared
end to end with mergekit here, which also covers gradients, filters and tensor order.
"""

import copy
import json
import math
import os
import shutil

import pytest
import torch
import yaml

from hm_utils.merge import (
    MergeConfig,
    check_merge_inputs,
    load_baselines,
    load_state_dict,
    merge_checkpoints,
    mergekit_yaml,
    run_mergekit,
    save_state_dict,
    write_mergekit_config,
)
from hm_utils.merge.__main__ import main as merge_main
from hm_utils.merge.io import TensorReader
from hm_utils.merge.plan import plan_tensor

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, KV = 16, 32, 3, 64, 8

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_state(seed, layers=LAYERS, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(shape, generator=generator) * 0.1

    state = {"model.embed_tokens.weight": normal(vocab, HIDDEN), "model.norm.weight": 1 + normal(HIDDEN)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        state[prefix + "input_layernorm.weight"] = 1 + normal(HIDDEN)
        state[prefix + "post_attention_layernorm.weight"] = 1 + normal(HIDDEN)
        state[prefix + "self_attn.q_proj.weight"] = normal(HIDDEN, HIDDEN)
        state[prefix + "self_attn.k_proj.weight"] = normal(KV, HIDDEN)
        state[prefix + "self_attn.v_proj.weight"] = normal(KV, HIDDEN)
        state[prefix + "self_attn.o_proj.weight"] = normal(HIDDEN, HIDDEN)
        state[prefix + "mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        state[prefix + "mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        state[prefix + "mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
    return state


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_model(folder, state, config=None, tokenizer_source=None):
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, folder)
    (folder / "config.json").write_text(json.dumps(config or TINY_CONFIG))
    # mergekit copies the base model's tokenizer; any real tokenizer serves here.
    for name in TOKENIZER_FILES if tokenizer_source is not None else ():
        shutil.copy(tokenizer_source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, base_checkpoint):
    """A tiny base and three specialists (base plus seeded noise), as model folders."""
    root = tmp_path_factory.mktemp("tiny")
    base_state = tiny_state(0)
    base = write_model(root / "base", base_state, tokenizer_source=base_checkpoint)
    specialists = []
    for index in range(3):
        generator = torch.Generator().manual_seed(100 + index)
        state = {name: tensor + 0.02 * torch.randn(tensor.shape, generator=generator) for name, tensor in base_state.items()}
        specialists.append(write_model(root / f"specialist{index}", state, tokenizer_source=base_checkpoint))
    return {"root": root, "base": base, "specialists": specialists, "base_state": base_state}


def config_for(tiny, method="ties", **overrides):
    base = None if method == "linear" else tiny["base"]
    arguments = {"weights": [1.0, 0.5], "densities": None if method == "linear" else [0.5, 0.7]}
    arguments.update(overrides)
    return MergeConfig.from_arguments(method, base, tiny["specialists"][:2], **arguments)


def variant(tiny, name, state=None, config=None):
    """A copy of specialist 0 with a changed state dict or config.json."""
    folder = tiny["root"] / name
    if folder.exists():
        shutil.rmtree(folder)
    source = tiny["specialists"][0]
    return write_model(folder, state if state is not None else load_state_dict(source), config)


# --- config and YAML ----------------------------------------------------------------------


def test_config_yaml_round_trip(tiny, tmp_path):
    config = config_for(tiny, densities=[[0.2, 0.8], 0.5], normalize=False)
    path = write_mergekit_config(config, tmp_path / "merge.yml")
    again = MergeConfig.from_yaml(path)
    assert again == config


def test_config_yaml_accepted_by_mergekit(tiny):
    from mergekit.config import MergeConfiguration

    config = config_for(tiny, densities=[[0.2, 0.8], [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]], **{"lambda": 0.9})
    parsed = MergeConfiguration.model_validate(yaml.safe_load(mergekit_yaml(config)))
    assert parsed.merge_method == "ties"
    assert parsed.parameters["lambda"] == 0.9


def test_config_paths_absolute(tiny, monkeypatch):
    monkeypatch.chdir(tiny["root"])
    config = MergeConfig.from_arguments("task_arithmetic", "base", ["specialist0"], weights=1.0)
    assert config.base_model == str(tiny["base"].resolve())
    assert config.models[0].model == str(tiny["specialists"][0].resolve())


def test_config_linear_has_no_base(tiny):
    text = mergekit_yaml(config_for(tiny, "linear"))
    assert "base_model" not in text


def test_config_rejects_unknown_method(tiny):
    with pytest.raises(ValueError, match="valid methods: linear, task_arithmetic, ties, dare_ties"):
        config_for(tiny, "slerp_plus")


def test_config_rejects_unknown_parameter(tiny):
    with pytest.raises(ValueError, match="valid parameters: int8_mask, normalize, rescale, lambda, weight, density"):
        config_for(tiny, temperature=0.5)


def test_config_rejects_shared_parameter_per_model(tiny):
    document = config_for(tiny).to_mergekit()
    document["models"][0]["parameters"]["normalize"] = False
    with pytest.raises(ValueError, match="move them to the global parameters"):
        MergeConfig.from_mergekit(document)


# --- input checks before weights load --------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_check_rejects_density(tiny, density):
    with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
        check_merge_inputs(config_for(tiny, densities=[density, 0.5]))


def test_check_rejects_density_in_gradient(tiny):
    with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
        check_merge_inputs(config_for(tiny, densities=[[0.5, 1.2], 0.5]))


def test_check_rejects_nan_weight(tiny):
    with pytest.raises(ValueError, match="non-finite"):
        check_merge_inputs(config_for(tiny, weights=[math.inf, 1.0]))


def test_check_rejects_quantized(tiny):
    config = dict(TINY_CONFIG, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    folder = variant(tiny, "quantized", config=config)
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder, tiny["specialists"][1]], weights=1.0, densities=0.5)
    with pytest.raises(ValueError, match="quantised \\(bitsandbytes\\)"):
        check_merge_inputs(merge)


def test_check_rejects_architecture(tiny):
    config = dict(TINY_CONFIG, architectures=["MistralForCausalLM"], model_type="mistral")
    folder = variant(tiny, "mistral", config=config)
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        check_merge_inputs(merge)


def test_check_rejects_layer_count(tiny):
    config = dict(TINY_CONFIG, num_hidden_layers=2)
    folder = variant(tiny, "two_layers", state=tiny_state(1, layers=2), config=config)
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    with pytest.raises(ValueError, match="num_hidden_layers is 2"):
        check_merge_inputs(merge)


def test_check_rejects_vocab_size(tiny):
    config = dict(TINY_CONFIG, vocab_size=80)
    folder = variant(tiny, "vocab80", state=tiny_state(1, vocab=80), config=config)
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    with pytest.raises(ValueError, match="vocab_size is 80"):
        check_merge_inputs(merge)


def test_check_rejects_embedding_shape(tiny):
    # config.json agrees, the stored embedding matrix does not.
    folder = variant(tiny, "embedding80", state=tiny_state(1, vocab=80))
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    with pytest.raises(ValueError, match="embedding matrix model.embed_tokens.weight is \\(80, 16\\)"):
        check_merge_inputs(merge)


def test_check_rejects_tied_and_untied(tiny):
    state = tiny_state(1)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    folder = variant(tiny, "untied", state=state, config=dict(TINY_CONFIG, tie_word_embeddings=False))
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    with pytest.raises(ValueError, match="tied and untied output heads"):
        check_merge_inputs(merge)


def test_check_rejects_missing_tensor(tiny):
    state = tiny_state(1)
    del state["model.layers.1.mlp.up_proj.weight"]
    folder = variant(tiny, "missing", state=state)
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    with pytest.raises(ValueError, match="missing \\['model.layers.1.mlp.up_proj.weight'\\]"):
        check_merge_inputs(merge)


def test_check_rejects_integer_tensor(tiny):
    state = tiny_state(1)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(INTERMEDIATE, HIDDEN, dtype=torch.int8)
    folder = variant(tiny, "int8", state=state)
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    with pytest.raises(ValueError, match="torch.int8"):
        check_merge_inputs(merge)


def test_check_rejects_missing_folder(tiny):
    merge = MergeConfig(merge_method="ties", base_model=str(tiny["base"]), models=[{"model": str(tiny["root"] / "absent"), "parameters": {"weight": 1.0}}])
    with pytest.raises(FileNotFoundError, match="absent"):
        check_merge_inputs(merge)


def test_check_loads_no_weights(tiny, monkeypatch):
    def reject_read(*_args, **_kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(TensorReader, "read", reject_read)
    summary = check_merge_inputs(config_for(tiny))
    assert summary.num_layers == LAYERS
    assert len(summary.tensors) == 2 + 9 * LAYERS


# --- streaming engine -------------------------------------------------------------------------------


def test_engine_rejects_nan_and_leaves_nothing(tiny, tmp_path):
    state = load_state_dict(tiny["specialists"][0])
    state["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    folder = variant(tiny, "nan", state=state)
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match="model.layers.2.mlp.down_proj.weight .* NaN or infinity"):
        merge_checkpoints(merge, out, progress=False)
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_engine_keeps_old_output_on_failure(tiny, tmp_path):
    out = tmp_path / "merged"
    merge_checkpoints(config_for(tiny), out, progress=False)
    before = load_state_dict(out)
    state = load_state_dict(tiny["specialists"][0])
    state["model.norm.weight"][0] = float("inf")
    folder = variant(tiny, "inf", state=state)
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    with pytest.raises(ValueError, match="NaN or infinity"):
        merge_checkpoints(merge, out, progress=False)
    after = load_state_dict(out)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_engine_output_folder(tiny, tmp_path):
    config = config_for(tiny)
    out = merge_checkpoints(config, tmp_path / "merged", progress=False)
    assert sorted(os.listdir(out)) == ["config.json", "mergekit_config.yml", "model.safetensors", *TOKENIZER_FILES]
    assert MergeConfig.from_yaml(out / "mergekit_config.yml") == config
    merged = load_state_dict(out)
    assert set(merged) == set(tiny["base_state"])
    for name, tensor in merged.items():
        assert tensor.shape == tiny["base_state"][name].shape


def test_engine_out_dtype(tiny, tmp_path):
    config = config_for(tiny, out_dtype="bfloat16")
    out = merge_checkpoints(config, tmp_path / "merged", progress=False)
    merged = load_state_dict(out)
    assert {tensor.dtype for tensor in merged.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def trim_ties(item, base, inputs, method):
    """Entries whose magnitude ties at a trim boundary of some model (see sparsify's tie rule)."""
    ties = torch.zeros_like(base, dtype=torch.bool)
    for tensor, density, gamma in zip(inputs, item.densities, item.gammas):
        magnitudes = (tensor - base).abs()
        n = magnitudes.numel()
        ascending = torch.sort(magnitudes.reshape(-1)).values
        if method == "ties":
            boundaries = [n - max(1, int(density * n))]
        else:
            keep = int(density * n)
            bottom = max(0, n - keep - int(gamma * n))
            boundaries = [bottom, bottom + keep - 1]
        for rank in boundaries:
            same = magnitudes == ascending[rank]
            if int(same.sum()) > 1:
                ties |= same
    return ties


MERGEKIT_CASES = [
    ("ties", {"densities": [[0.2, 0.9], 0.5], "weights": [[{"filter": "mlp", "value": [1.0, 0.2]}, {"value": 0.7}], 0.5]}),
    ("ties", {"densities": 0.3, "weights": [1.0, 0.8], "normalize": False, "lambda": 1.3}),
    ("task_arithmetic", {"densities": None, "weights": [[0.3, 0.9, 0.1], -0.4]}),
    ("breadcrumbs_ties", {"densities": [0.8, 0.9], "gamma": [0.05, 0.02]}),
    ("linear", {"weights": [[1.0, 3.0], 1.0]}),
    ("dare_ties", {"densities": [0.5, [0.3, 0.9]]}),
    ("dare_linear", {"densities": 0.4, "rescale": False}),
    ("della", {"densities": 0.5, "epsilon": 0.1}),
]


@pytest.mark.parametrize("method,arguments", MERGEKIT_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(MERGEKIT_CASES)])
def test_engine_matches_mergekit(tiny, tmp_path, method, arguments):
    # mergekit seeds torch with --random-seed and draws per tensor in name order, then
    # per model in config order. The engine seeded the same way draws identically.
    config = config_for(tiny, method, **arguments)
    path = write_mergekit_config(config, tmp_path / "merge.yml")
    theirs_dir = run_mergekit(path, tmp_path / "mergekit", random_seed=0)
    torch.manual_seed(0)
    ours_dir = merge_checkpoints(path, tmp_path / "engine", progress=False)

    theirs = load_state_dict(theirs_dir)
    ours = load_state_dict(ours_dir)
    assert set(ours) == set(theirs)
    base = load_state_dict(tiny["base"])
    inputs = [load_state_dict(folder) for folder in tiny["specialists"][:2]]
    for name in ours:
        if method in ("ties", "breadcrumbs_ties"):
            # Magnitude trims may keep different members of a tie at the threshold.
            ties = trim_ties(plan_tensor(config, name, LAYERS), base[name], [state[name] for state in inputs], method)
            assert torch.equal(ours[name][~ties], theirs[name][~ties]), name
        else:
            assert torch.equal(ours[name], theirs[name]), name


# --- command line ----------------------------------------------------------------------------------


def test_dry_run_prints_layers(tiny, tmp_path, capsys, monkeypatch):
    def reject_read(*_args, **_kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(TensorReader, "read", reject_read)
    config = config_for(tiny, densities=[[0.2, 0.6], 0.5], weights=[1.0, [{"filter": "mlp", "value": 0.25}, {"value": 0.75}]])
    path = write_mergekit_config(config, tmp_path / "merge.yml")
    assert merge_main([str(path), "--dry-run"]) == 0
    output = capsys.readouterr().out
    rows = [line.split() for line in output.splitlines()]
    header = next(row for row in rows if row[:2] == ["layer", "tensors"])
    assert header[2:] == ["m0.weight", "m0.density", "m1.weight", "m1.density"]
    values = {}
    for row in rows:
        if row and row[0] in {"0", "1", "2"}:
            values.setdefault(row[0], []).append(row[-4:])
    assert ["1", "0.2", "0.25", "0.5"] in values["0"]
    assert ["1", "0.4", "0.75", "0.5"] in values["1"]
    assert ["1", "0.6", "0.25", "0.5"] in values["2"]


def test_cli_merges(tiny, tmp_path):
    path = write_mergekit_config(config_for(tiny, "task_arithmetic", densities=None), tmp_path / "merge.yml")
    assert merge_main([str(path), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_sharded_output_reads_back(tiny, tmp_path):
    state = copy.deepcopy(tiny["base_state"])
    save_state_dict(state, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_state_dict(tmp_path)
    assert all(torch.equal(loaded[name], state[name]) for name in state)


def test_bin_checkpoint_loads(tiny, tmp_path):
    torch.save(tiny["base_state"], tmp_path / "pytorch_model.bin")
    loaded = load_state_dict(tmp_path)
    assert set(loaded) == set(tiny["base_state"])
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tiny["base_state"].items())


def test_check_rejects_bin_weights(tiny, tmp_path):
    folder = tmp_path / "bin_model"
    folder.mkdir()
    torch.save(tiny["base_state"], folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    merge = MergeConfig.from_arguments("ties", tiny["base"], [folder], weights=1.0, densities=0.5)
    with pytest.raises(ValueError, match="convert it to safetensors"):
        check_merge_inputs(merge)


# --- baselines file ------------------------------------------------------------------------------------


def test_baselines_file_names():
    baselines, settings = load_baselines()
    assert list(baselines) == ["model_soups", "task_arithmetic", "ties", "dare", "della", "breadcrumbs"]
    assert settings == {"dtype": "float32", "seed": 0}


@pytest.mark.parametrize("name", ["model_soups", "task_arithmetic", "ties", "dare", "della", "breadcrumbs"])
def test_baseline_merges(tiny, tmp_path, name):
    baselines, settings = load_baselines()
    config = baselines[name].config(tiny["base"], tiny["specialists"][:2], dtype=settings["dtype"])
    torch.manual_seed(settings["seed"])
    out = merge_checkpoints(config, tmp_path / name, progress=False)
    assert MergeConfig.from_yaml(out / "mergekit_config.yml").merge_method == baselines[name].method


def test_config_skips_listed_base(tiny):
    document = config_for(tiny).to_mergekit()
    document["models"].insert(0, {"model": document["base_model"]})
    assert MergeConfig.from_mergekit(document) == config_for(tiny)


def test_config_rejects_unsupported_key(tiny):
    document = config_for(tiny).to_mergekit()
    document["tokenizer_source"] = "union"
    with pytest.raises(ValueError, match="\\['tokenizer_source'\\] are not supported"):
        MergeConfig.from_mergekit(document)


def test_config_rejects_misspelled_model_key(tiny):
    document = config_for(tiny).to_mergekit()
    document["models"][0]["paramters"] = document["models"][0].pop("parameters")
    with pytest.raises(ValueError, match="unknown keys \\['paramters'\\] \\(did you mean 'parameters'\\?\\)"):
        MergeConfig.from_mergekit(document)


# --- merging once -------------------------------------------------------------------------


def test_merge_once_reuses_finished_output(tiny, tmp_path, monkeypatch):
    from hm_utils.merge import mergekit_runner

    config = config_for(tiny)
    out = mergekit_runner.merge_with_mergekit_once(config, tmp_path / "ties", random_seed=0)
    weights = (out / "model.safetensors").stat().st_mtime_ns

    calls = []
    monkeypatch.setattr(mergekit_runner, "run_mergekit", lambda *args, **kwargs: calls.append(args))
    assert mergekit_runner.merge_with_mergekit_once(config, out, random_seed=0) == out
    assert calls == []
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ties"]


def test_merge_once_reruns_on_change(tiny, tmp_path, monkeypatch):
    from hm_utils.merge import mergekit_runner

    out = mergekit_runner.merge_with_mergekit_once(config_for(tiny), tmp_path / "ties", random_seed=0)
    calls = []
    monkeypatch.setattr(mergekit_runner, "run_mergekit", lambda *args, **kwargs: calls.append(kwargs))
    mergekit_runner.merge_with_mergekit_once(config_for(tiny), out, random_seed=1)
    mergekit_runner.merge_with_mergekit_once(config_for(tiny, densities=[0.3, 0.3]), out, random_seed=0)
    assert [call["random_seed"] for call in calls] == [1, 0]


# --- command line -------------------------------------------------------------------------


def test_cli_missing_config_one_line(tmp_path, capsys):
    from hm_utils.merge.__main__ import main

    assert main([str(tmp_path / "absent.yml"), "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ")
    assert "absent.yml" in error
    assert "Traceback" not in error


def test_cli_unknown_method_one_line(tiny, tmp_path, capsys):
    from hm_utils.merge.__main__ import main

    path = write_mergekit_config(config_for(tiny), tmp_path / "merge.yml")
    path.write_text(path.read_text().replace("merge_method: ties", "merge_method: tiez"))
    assert main([str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ")
    assert "tiez" in error


def test_cli_dry_run_prints_layers(tiny, tmp_path, capsys):
    from hm_utils.merge.__main__ import main

    path = write_mergekit_config(config_for(tiny), tmp_path / "merge.yml")
    assert main([str(path), "--dry-run"]) == 0
    assert "density" in capsys.readouterr().out

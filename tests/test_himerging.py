"""Hi-Merging algorithm on small real tensors: stage-1 grid, TIES plans, conflict cases, iteration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hm_utils import himerging as H
from hm_utils.contribution import Contributions
from hm_utils.merge import TaskVectors, load_state_dict, run_mergekit, save_state_dict
from hm_utils.merge.io import copy_auxiliary_files

NAMES_2 = ("a", "b")


def toy_task_vectors(deltas_per_layer, names=NAMES_2):
    """Task vectors of a two-layer toy 'model' with one 4-entry tensor per layer and a 4-entry embedding.

    ``deltas_per_layer[m][l]`` is model m's delta at layer l; the embedding delta is layer 0's.
    """
    tensor_names = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.1.mlp.weight"]
    base = {name: torch.zeros(4) for name in tensor_names}
    deltas = []
    for per_layer in deltas_per_layer:
        values = [torch.tensor(per_layer[0]), torch.tensor(per_layer[0]), torch.tensor(per_layer[1])]
        deltas.append({name: value.float() for name, value in zip(tensor_names, values)})
    return TaskVectors(base, deltas, list(names))


A = [4.0, -3.0, 2.0, -1.0]
B = [-2.0, 1.0, 3.0, 0.5]
C3 = [1.0, 1.0, -4.0, 0.25]


def plan_of(settings, names=NAMES_2, num_layers=2):
    return H.initial_plan(names, [H.ModelSetting(*s) for s in settings], num_layers)


def contributions(specialist, merged, layers=(0, 1), tasks=NAMES_2):
    return Contributions(tuple(tasks), tuple(layers), np.asarray(specialist, float), np.asarray(merged, float))


# ---------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------


def test_grid_default():
    grid = H.setting_grid()
    assert len(grid) == 100
    assert grid[0] == H.ModelSetting(0.1, 0.1)
    assert grid[-1] == H.ModelSetting(1.0, 1.0)
    assert H.grid_values(0.1)[2] == 0.3


def test_grid_step_not_dividing():
    with pytest.raises(ValueError, match="does not divide 1"):
        H.grid_values(0.3)


def test_model_setting_bad_density():
    with pytest.raises(ValueError, match="density"):
        H.ModelSetting(0.0, 1.0)


def test_model_wise_delta_values():
    tv = toy_task_vectors([[A, A], [B, B]])
    delta = H.model_wise_delta(tv, "a", H.ModelSetting(0.5, 0.5))
    assert torch.equal(delta["model.layers.0.mlp.weight"], torch.tensor([2.0, -1.5, 0.0, 0.0]))
    assert torch.equal(delta["model.embed_tokens.weight"], torch.tensor([2.0, -1.5, 0.0, 0.0]))


def test_model_wise_deltas_match_single():
    generator = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.weight": torch.randn(64, 32, generator=generator)}
    delta = {"model.layers.0.mlp.weight": torch.randn(64, 32, generator=generator)}
    tv = TaskVectors(base, [delta], ["a"])
    grid = H.setting_grid(0.25)
    for setting, fast in H.model_wise_deltas(tv, "a", grid):
        reference = H.model_wise_delta(tv, "a", setting)
        assert torch.equal(fast["model.layers.0.mlp.weight"], reference["model.layers.0.mlp.weight"]), setting


def test_model_wise_config_mergekit():
    config = H.model_wise_config("/m/base", "/m/a", H.ModelSetting(0.1, 0.9)).to_mergekit()
    assert config["merge_method"] == "ties"
    assert config["models"] == [{"model": "/m/a", "parameters": {"weight": 0.9, "density": 0.1}}]
    assert config["parameters"] == {"normalize": False, "rescale": False}


def test_model_wise_configs_grid_order():
    configs = H.model_wise_configs("/m/base", "/m/a", H.setting_grid(0.5))
    assert [c.models[0].parameters for c in configs] == [
        {"weight": 0.5, "density": 0.5},
        {"weight": 1.0, "density": 0.5},
        {"weight": 0.5, "density": 1.0},
        {"weight": 1.0, "density": 1.0},
    ]


def test_select_setting_best():
    scores = {(0.1, 0.9): 60.55, (1.0, 1.0): 59.14, (0.1, 1.0): 59.84}
    assert H.select_setting(scores) == H.ModelSetting(0.1, 0.9)


def test_select_setting_tie_prefers_larger():
    scores = {H.ModelSetting(0.2, 0.5): 1.0, H.ModelSetting(0.4, 0.3): 1.0, H.ModelSetting(0.4, 0.2): 1.0}
    assert H.select_setting(scores) == H.ModelSetting(0.4, 0.3)


def test_select_setting_rejects_nan():
    with pytest.raises(ValueError, match="not finite"):
        H.select_setting({(0.1, 0.1): float("nan")})


def test_select_setting_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        H.select_setting({})


# ---------------------------------------------------------------------------------------------
# Stage 2 and plans
# ---------------------------------------------------------------------------------------------


def test_initial_merge_ties_values():
    tv = toy_task_vectors([[A, A], [B, B]])
    merged = H.merge_plan(tv, plan_of([(1.0, 1.0), (1.0, 1.0)]))
    # sum [2, -2, 5, -0.5]: A agrees everywhere, B only at entry 2.
    assert torch.equal(merged["model.layers.0.mlp.weight"], torch.tensor([4.0, -3.0, 5.0, -1.0]))


def test_initial_merge_pruned_scaled():
    tv = toy_task_vectors([[A, A], [B, B]])
    merged = H.merge_plan(tv, plan_of([(0.5, 1.0), (0.5, 0.5)]))
    # A -> [4, -3, 0, 0]; B -> 0.5 [-2, 0, 3, 0] = [-1, 0, 1.5, 0]; sum [3, -3, 1.5, 0].
    assert torch.equal(merged["model.layers.1.mlp.weight"], torch.tensor([4.0, -3.0, 1.5, 0.0]))


def test_merged_shares_sum():
    tv = toy_task_vectors([[A, A], [B, B]])
    plan = plan_of([(0.5, 1.0), (0.5, 0.5)])
    shares = H.merged_shares(tv, plan)
    name = "model.layers.1.mlp.weight"
    assert torch.equal(shares[0][name], torch.tensor([4.0, -3.0, 0.0, 0.0]))
    assert torch.equal(shares[1][name], torch.tensor([0.0, 0.0, 1.5, 0.0]))
    assert torch.equal(shares[0][name] + shares[1][name], H.merge_plan(tv, plan)[name])
    assert "model.embed_tokens.weight" not in shares[0]


def test_layer_filters_distinct():
    names = [f"model.layers.{i}.mlp.weight" for i in range(12)] + ["model.embed_tokens.weight"]
    filters = H.layer_filters(names, 12)
    assert filters[1] == "model.layers.1."
    assert [name for name in names if filters[1] in name] == ["model.layers.1.mlp.weight"]


def test_layer_filters_missing_layer():
    with pytest.raises(ValueError, match="no tensors of decoder layer 2"):
        H.layer_filters(["model.layers.0.w", "model.layers.1.w"], 3)


def test_plan_round_trip():
    plan = plan_of([(0.5, 0.9), (0.3, 1.0)]).with_layer(1, [0.0, 0.5], [0.5, 0.15])
    document = json.loads(json.dumps(plan.to_dict()))
    assert H.LayerPlan.from_dict(document) == plan
    assert document["weights"]["a"] == [0.9, 0.0]
    assert document["densities"]["b"] == [0.3, 0.15]


def test_plan_config_equals_memory(tmp_path):
    """mergekit run on the plan's YAML gives exactly base + merge_plan (tiny Llama on disk, 3 models)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base = load_state_dict(tmp_path / "base")
    generator = torch.Generator().manual_seed(1)
    names = ["a", "b", "c"]
    for name in names:
        (tmp_path / name).mkdir()
        save_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}, tmp_path / name)
        copy_auxiliary_files(tmp_path / "base", tmp_path / name)
    tv = TaskVectors.from_checkpoints(tmp_path / "base", [tmp_path / n for n in names], names)

    settings = [H.ModelSetting(0.5, 0.9), H.ModelSetting(0.3, 1.0), H.ModelSetting(0.7, 0.6)]
    plan = H.initial_plan(names, settings, tv.num_layers)
    plan = plan.with_layer(1, [0.0, 1.0, 0.3], [0.5, 0.3, 0.35]).with_layer(3, [0.45, 0.5, 0.6], [0.25, 0.15, 0.7])
    yaml_path = H.write_plan_config(
        H.mergekit_config(plan, tmp_path / "base", {n: tmp_path / n for n in names}, tv.tensor_names), tmp_path / "plan.yml"
    )
    run_mergekit(yaml_path, tmp_path / "out")
    merged = load_state_dict(tmp_path / "out")
    delta = H.merge_plan(tv, plan)

    assert set(merged) == set(base)
    for name in base:
        assert torch.equal(merged[name], base[name] + delta[name]), name


# ---------------------------------------------------------------------------------------------
# Conflict cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gamma", "case", "losers"),
    [
        ([0.2, 0.1], H.ConflictCase.SEVERE, (0, 1)),
        ([0.2, -0.1], H.ConflictCase.PARTIAL, (0,)),
        ([-0.2, 0.1], H.ConflictCase.PARTIAL, (1,)),
        ([0.2, 0.0], H.ConflictCase.PARTIAL, (0,)),
        ([-0.2, 0.0], H.ConflictCase.MUTUAL, ()),
        ([0.0, 0.0], H.ConflictCase.MUTUAL, ()),
        ([0.1, 0.2, 0.3], H.ConflictCase.SEVERE, (0, 1, 2)),
        ([0.1, -0.2, 0.3], H.ConflictCase.PARTIAL, (0, 2)),
        ([-0.1, -0.2, 0.0], H.ConflictCase.MUTUAL, ()),
    ],
)
def test_classify_conflict(gamma, case, losers):
    assert H.classify_conflict(gamma) == (case, losers)


def test_severe_keeps_larger_specialist():
    plan = plan_of([(0.5, 0.9), (0.3, 1.0)])
    new, case, losers, kept, changed = H.resolve_layer(plan, 1, [0.2, 0.1], [0.3, 0.5], [0.1, 0.4])
    assert case is H.ConflictCase.SEVERE
    assert kept == 1
    assert changed == (0,)
    assert new.weights == ((0.9, 0.0), (1.0, 1.0))
    assert new.densities == plan.densities


def test_severe_criterion_merged():
    plan = plan_of([(0.5, 0.9), (0.3, 1.0)])
    options = H.ResolutionOptions(severe_criterion="merged")
    _, _, _, kept, _ = H.resolve_layer(plan, 1, [0.2, 0.1], [0.3, 0.5], [0.4, 0.1], options)
    assert kept == 0


def test_severe_tie_uses_other_criterion():
    plan = plan_of([(0.5, 0.9), (0.3, 1.0)])
    _, _, _, kept, _ = H.resolve_layer(plan, 0, [0.2, 0.1], [0.5, 0.5], [0.1, 0.3])
    assert kept == 1


def test_severe_full_tie_first_model():
    plan = plan_of([(0.5, 0.9), (0.3, 1.0)])
    _, _, _, kept, _ = H.resolve_layer(plan, 0, [0.2, 0.1], [0.5, 0.5], [0.3, 0.3])
    assert kept == 0


def test_severe_merged_delta_is_survivor_only():
    tv = toy_task_vectors([[A, A], [B, B]])
    plan = plan_of([(0.5, 1.0), (0.5, 0.5)])
    new, *_ = H.resolve_layer(plan, 1, [0.2, 0.1], [0.1, 0.5], [0.0, 0.0])
    merged = H.merge_plan(tv, new)
    # Only B at layer 1: 0.5 * trim(B, 0.5) = [-1, 0, 1.5, 0]; layer 0 keeps the initial merge.
    assert torch.equal(merged["model.layers.1.mlp.weight"], torch.tensor([-1.0, 0.0, 1.5, 0.0]))
    assert torch.equal(merged["model.layers.0.mlp.weight"], torch.tensor([4.0, -3.0, 1.5, 0.0]))


def test_partial_halves_harming_model():
    plan = plan_of([(0.5, 0.9), (0.3, 1.0)])
    new, case, losers, kept, changed = H.resolve_layer(plan, 0, [0.2, -0.1], [0.3, 0.5], [0.1, 0.6])
    assert case is H.ConflictCase.PARTIAL
    assert losers == (0,)
    assert kept is None
    assert changed == (1,)
    assert new.weights == ((0.9, 0.9), (0.5, 1.0))
    assert new.densities == ((0.5, 0.5), (0.15, 0.3))


def test_partial_merged_delta_values():
    tv = toy_task_vectors([[A, A], [B, B]])
    plan = plan_of([(1.0, 1.0), (1.0, 1.0)])
    new, *_ = H.resolve_layer(plan, 1, [0.2, -0.1], [0.0, 0.0], [0.0, 0.0])
    merged = H.merge_plan(tv, new)
    # A at full strength; B pruned to density 0.5 and weight 0.5: [-1, 0, 1.5, 0]; sum [3, -3, 3.5, -1].
    assert torch.equal(merged["model.layers.1.mlp.weight"], torch.tensor([4.0, -3.0, 3.5, -1.0]))


def test_partial_custom_factors():
    plan = plan_of([(0.5, 0.9), (0.4, 1.0)])
    options = H.ResolutionOptions(layer_density_factor=0.25, layer_weight_factor=1.0)
    new, *_ = H.resolve_layer(plan, 0, [-0.2, 0.1], [0.0, 0.0], [0.0, 0.0], options)
    assert new.weights[0] == (0.9, 0.9)
    assert new.densities[0] == (0.125, 0.5)


def test_mutual_leaves_plan():
    plan = plan_of([(0.5, 0.9), (0.3, 1.0)])
    new, case, losers, kept, changed = H.resolve_layer(plan, 0, [-0.2, 0.0], [0.3, 0.5], [0.5, 0.5])
    assert case is H.ConflictCase.MUTUAL
    assert changed == ()
    assert new == plan


def test_three_models_partial():
    names = ("a", "b", "c")
    plan = plan_of([(0.5, 0.9), (0.3, 1.0), (0.8, 0.6)], names=names)
    new, case, losers, _, changed = H.resolve_layer(plan, 1, [0.2, -0.1, 0.0], [0.0] * 3, [0.0] * 3)
    assert case is H.ConflictCase.PARTIAL
    assert losers == (0,)
    assert changed == (1, 2)
    assert new.weights == ((0.9, 0.9), (1.0, 0.5), (0.6, 0.3))
    assert new.densities == ((0.5, 0.5), (0.3, 0.15), (0.8, 0.4))


def test_three_models_severe():
    names = ("a", "b", "c")
    tv = toy_task_vectors([[A, A], [B, B], [C3, C3]], names)
    plan = plan_of([(1.0, 1.0)] * 3, names=names)
    new, case, _, kept, changed = H.resolve_layer(plan, 0, [0.2, 0.1, 0.3], [0.1, 0.2, 0.7], [0.0] * 3)
    assert case is H.ConflictCase.SEVERE
    assert kept == 2
    assert changed == (0, 1)
    assert torch.equal(H.merge_plan(tv, new)["model.layers.0.mlp.weight"], torch.tensor(C3))


# ---------------------------------------------------------------------------------------------
# Iteration and stop rules
# ---------------------------------------------------------------------------------------------


def four_layer_case():
    """Γ per layer: 0.3, -0.3, 0.7, 0.1 (order 2, 0, 3); layer 2 severe (a kept), 0 and 3 partial, 1 mutual."""
    plan = plan_of([(0.5, 0.9), (0.3, 1.0)], num_layers=4)
    specialist = [[0.5, 0.0, 0.6, 0.2], [0.5, 0.0, 0.5, 0.0]]
    merged = [[0.2, 0.1, 0.1, 0.3], [0.5, 0.2, 0.3, -0.2]]
    return plan, contributions(specialist, merged, layers=(0, 1, 2, 3))


def test_iteration_visits_positive_in_order():
    plan, contrib = four_layer_case()
    result = H.resolve_conflicts(plan, contrib)
    assert [d.layer for d in result.decisions] == [2, 0, 3]
    assert [d.case for d in result.decisions] == [H.ConflictCase.SEVERE, H.ConflictCase.PARTIAL, H.ConflictCase.PARTIAL]
    assert result.stop_reason == "no layer left to visit"
    assert result.plan.weights[0] == (0.9, 0.9, 0.9, 0.45)
    assert result.plan.weights[1] == (0.5, 1.0, 0.0, 1.0)


def test_iteration_budget():
    plan, contrib = four_layer_case()
    result = H.resolve_conflicts(plan, contrib, H.ResolutionOptions(max_layers=2))
    assert [d.layer for d in result.decisions] == [2, 0]
    assert result.stop_reason == "budget of 2 layers reached"


def test_iteration_all_layers():
    plan, contrib = four_layer_case()
    result = H.resolve_conflicts(plan, contrib, H.ResolutionOptions(positive_only=False))
    assert [d.layer for d in result.decisions] == [2, 0, 3, 1]
    assert result.decisions[-1].case is H.ConflictCase.MUTUAL
    assert result.decisions[-1].accepted is False


def test_iteration_recompute_reranks():
    plan, contrib = four_layer_case()
    calls = []

    def recompute(new_plan):
        calls.append(new_plan)
        # After the first change layer 3 becomes the most conflicting, layer 0 loses its conflict.
        return np.array([[0.5, 0.1, 0.6, -0.8], [0.5, 0.2, 0.5, 0.0]])

    result = H.resolve_conflicts(plan, contrib, H.ResolutionOptions(recompute=True), recompute_merged=recompute)
    assert [d.layer for d in result.decisions] == [2, 3]
    assert len(calls) == 2
    assert calls[0].weights[1][2] == 0.0


def test_iteration_acceptance_rejects_drop():
    plan, contrib = four_layer_case()

    def objective(candidate):
        # Dropping model b at layer 2 lowers the objective; every other change keeps it.
        return -1.0 if candidate.weights[1][2] == 0.0 else 0.0

    result = H.resolve_conflicts(plan, contrib, H.ResolutionOptions(acceptance="no_drop"), objective=objective)
    assert [d.accepted for d in result.decisions] == [False, True, True]
    assert result.plan.weights[1][2] == 1.0
    assert result.decisions[1].objective_before == 0.0
    assert result.decisions[1].objective_after == 0.0


def test_result_to_dict_json():
    plan, contrib = four_layer_case()
    document = H.resolve_conflicts(plan, contrib).to_dict()
    text = json.dumps(document, allow_nan=False)
    assert json.loads(text)["decisions"][0]["case"] == "severe"


# ---------------------------------------------------------------------------------------------
# Bad inputs, rejected before any work
# ---------------------------------------------------------------------------------------------


def test_budget_zero_rejected():
    with pytest.raises(ValueError, match="max_layers 0"):
        H.ResolutionOptions(max_layers=0)


def test_budget_negative_rejected():
    with pytest.raises(ValueError, match="max_layers -1"):
        H.ResolutionOptions(max_layers=-1)


def test_factor_rejected():
    with pytest.raises(ValueError, match="layer_density_factor"):
        H.ResolutionOptions(layer_density_factor=0.0)


def test_recompute_needs_function():
    plan, contrib = four_layer_case()
    with pytest.raises(ValueError, match="recompute_merged"):
        H.resolve_conflicts(plan, contrib, H.ResolutionOptions(recompute=True))


def test_acceptance_needs_objective():
    plan, contrib = four_layer_case()
    with pytest.raises(ValueError, match="objective"):
        H.resolve_conflicts(plan, contrib, H.ResolutionOptions(acceptance="no_drop"))


def test_task_order_mismatch():
    plan, _ = four_layer_case()
    swapped = contributions(np.zeros((2, 4)), np.zeros((2, 4)), layers=(0, 1, 2, 3), tasks=("b", "a"))
    with pytest.raises(ValueError, match="task m must be the task of specialist m"):
        H.resolve_conflicts(plan, swapped)


def test_plan_model_mismatch():
    tv = toy_task_vectors([[A, A], [B, B]])
    plan = plan_of([(1.0, 1.0), (1.0, 1.0)], names=("x", "y"))
    with pytest.raises(ValueError, match="differ from the task vectors"):
        H.merge_plan(tv, plan)


# ---------------------------------------------------------------------------------------------
# Stage runs on a tiny Llama run folder: inputs, grid search, analysis, resolution, export, tables
# ---------------------------------------------------------------------------------------------

TASKS = ("defs", "quiz")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run on one thread: two OpenMP threads on tiny matrices are several times slower on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_metrics(path, model, metrics, test_ids=("t0", "t1"), methods=None):
    """Write a metrics.json as hm_utils.evaluate.evaluate_tasks does."""
    key = {
        "model": model,
        "tasks": {task: list(test_ids) for task in TASKS},
        "templates": {"defs": "en_qa_expert", "quiz": "en_mcq_plain"},
        "methods": methods or {"mcq": ["option", "nll"], "qa": ["generate", "nll"]},
        "max_new_tokens": {"mcq": 16, "qa": 48},
        "n_resamples": 100,
        "seed": 0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "metrics": metrics}), encoding="utf-8")
    return path


def metrics_of(accuracy, bleu, rouge):
    return {
        "quiz": {"acc_option_norm": accuracy, "acc_option_norm_ci_low": accuracy - 10, "acc_option_norm_ci_high": accuracy + 10},
        "defs": {
            "bleu-4": bleu, "bleu-4_ci_low": bleu - 1, "bleu-4_ci_high": bleu + 1,
            "rouge-l": rouge, "rouge-l_ci_low": rouge - 2, "rouge-l_ci_high": rouge + 2,
        },
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with stages 01-03 for a tiny Llama base and two perturbed specialists."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hm_utils.data import Example, write_split

    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128,
    )
    LlamaForCausalLM(config).save_pretrained(root / "base")
    base = load_state_dict(root / "base")
    generator = torch.Generator().manual_seed(1)
    finetune = root / "03_finetune"
    for task in TASKS:
        (finetune / task).mkdir(parents=True)
        perturbed = {k: v + 0.005 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        save_state_dict(perturbed, finetune / task)
        copy_auxiliary_files(root / "base", finetune / task)
    # Recorded as in another place, as after copying a run folder.
    (finetune / "checkpoints.json").write_text(json.dumps({task: f"/elsewhere/03_finetune/{task}" for task in TASKS}))

    (root / "01_data").mkdir()
    (root / "01_data" / "summary.json").write_text(json.dumps({"tasks": {task: {} for task in TASKS}}))
    examples = {
        "defs": [Example(f"d{i}", "toy", "en", "qa", "", f"term {i}", f"definition {i}") for i in range(5)],
        "quiz": [Example(f"q{i}", "toy", "en", "mcq", "", f"question {i}", "B", ("A", "B", "C"), 1) for i in range(5)],
    }
    for task, items in examples.items():
        for split in ("train", "validation", "test"):
            write_split(items, root / "01_data" / task / f"{split}.json")
    (root / "02_prompt_tuning").mkdir()
    (root / "02_prompt_tuning" / "prompts.json").write_text(json.dumps({"defs": "en_qa_expert", "quiz": "en_mcq_plain"}))
    return root


@pytest.fixture(scope="module")
def tiny_stage(tiny_run):
    """Stage inputs, the loaded tiny base, its task vectors and token-level probe sets."""
    from transformers import AutoModelForCausalLM

    from hm_utils.contribution import probe_set_from_tokens

    inputs = H.load_stage_inputs(tiny_run, str(tiny_run / "base"), validation_examples=3, test_examples=2)
    model = AutoModelForCausalLM.from_pretrained(inputs.base_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(2)
    probes = {}
    for task in TASKS:
        prompts = [torch.randint(1, 128, (n,), generator=generator).tolist() for n in (6, 9, 4)]
        answers = [torch.randint(1, 128, (n,), generator=generator).tolist() for n in (2, 3, 2)]
        probes[task] = probe_set_from_tokens(prompts, answers, pad_id=0, batch_size=2, name=task)
    return {"inputs": inputs, "model": model, "task_vectors": inputs.task_vectors(), "probes": probes}


def model_state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_read_checkpoints_relocated(tiny_run):
    folders = H.read_checkpoints(tiny_run / "03_finetune")
    assert folders == {task: (tiny_run / "03_finetune" / task).resolve() for task in TASKS}


def test_read_checkpoints_missing(tmp_path):
    (tmp_path / "checkpoints.json").write_text(json.dumps({"a": "/nowhere/a"}))
    with pytest.raises(FileNotFoundError, match="not found"):
        H.read_checkpoints(tmp_path)


def test_stage_inputs(tiny_stage, tiny_run):
    inputs = tiny_stage["inputs"]
    assert inputs.tasks == TASKS
    assert [e.id for e in inputs.validation["quiz"]] == ["q0", "q1", "q2"]
    assert [e.id for e in inputs.test["defs"]] == ["d0", "d1"]
    assert inputs.task_types == {"defs": "qa", "quiz": "mcq"}
    assert inputs.templates == {"defs": "en_qa_expert", "quiz": "en_mcq_plain"}
    assert inputs.base_dir == tiny_run / "base"


def test_stage_inputs_missing_template(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    for stage in ("01_data", "03_finetune"):
        shutil.copytree(tiny_run / stage, run / stage)
    (run / "02_prompt_tuning").mkdir()
    (run / "02_prompt_tuning" / "prompts.json").write_text(json.dumps({"defs": "en_qa_expert"}))
    with pytest.raises(ValueError, match=r"\['quiz'\] have no prompt template"):
        H.load_stage_inputs(run, str(tiny_run / "base"))


def test_model_wise_search_scores(tiny_stage):
    from hm_utils.contribution import score_model
    from hm_utils.merge import apply_delta_

    model, tv, probes = tiny_stage["model"], tiny_stage["task_vectors"], tiny_stage["probes"]
    before = model_state(model)
    search = H.model_wise_search(model, tv, probes, H.setting_grid(0.5), progress=False)
    after = model_state(model)

    assert list(search.scores.columns) == ["task", "p", "s", "score"]
    assert len(search.scores) == 8
    for name in before:
        assert torch.equal(after[name], before[name]), name
    assert search.base_scores["quiz"] == score_model(model, probes["quiz"])
    for row in search.scores.itertuples():
        apply_delta_(model, tv.base, H.model_wise_delta(tv, row.task, H.ModelSetting(row.p, row.s)))
        assert score_model(model, probes[row.task]) == row.score, row
    apply_delta_(model, tv.base, {})
    for task in TASKS:
        table = search.scores[search.scores.task == task]
        assert search.best[task] == H.select_setting({(r.p, r.s): r.score for r in table.itertuples()})
    assert search.grid("defs").shape == (2, 2)
    assert search.score_kinds == {"defs": "answer_logprob", "quiz": "answer_logprob"}


def test_model_wise_search_files(tmp_path):
    import pandas as pd

    scores = pd.DataFrame(
        [("a", 0.5, 1.0, -1.5), ("a", 1.0, 1.0, -1.25), ("b", 0.5, 0.5, -0.5), ("b", 1.0, 0.5, -0.75)],
        columns=["task", "p", "s", "score"],
    )
    search = H.ModelWiseSearch(scores, {"a": -2.0, "b": -1.0}, {"a": "answer_logprob", "b": "answer_logprob"})
    paths = search.write(tmp_path, settings={"grid_step": 0.5})

    assert json.loads(paths["best"].read_text()) == {"a": {"density": 1.0, "weight": 1.0}, "b": {"density": 0.5, "weight": 0.5}}
    assert H.read_best_settings(tmp_path) == {"a": H.ModelSetting(1.0, 1.0), "b": H.ModelSetting(0.5, 0.5)}
    assert pd.read_csv(paths["grid"]).equals(scores)
    summary = json.loads(paths["summary"].read_text())
    assert summary["best_scores"] == {"a": -1.25, "b": -0.5}
    assert summary["settings"] == {"grid_step": 0.5}


def test_model_wise_search_empty_grid(tiny_stage):
    with pytest.raises(ValueError, match="grid is empty"):
        H.model_wise_search(tiny_stage["model"], tiny_stage["task_vectors"], tiny_stage["probes"], [], progress=False)


def test_plan_contributions_own_share(tiny_stage):
    from hm_utils.contribution import contribution_analysis

    model, tv, probes = tiny_stage["model"], tiny_stage["task_vectors"], tiny_stage["probes"]
    plan = H.initial_plan(TASKS, [H.ModelSetting(0.5, 0.9), H.ModelSetting(0.7, 1.0)], tv.num_layers)
    result = H.plan_contributions(model, tv, plan, probes, [1, 3], "own_share", progress=False)
    expected = contribution_analysis(
        model, tv, H.merge_plan(tv, plan), probes, [1, 3], deletion="own_share",
        shares=H.merged_shares(tv, plan, [1, 3]), progress=False,
    )
    assert np.array_equal(result.specialist, expected.specialist)
    assert np.array_equal(result.merged, expected.merged)


def test_plan_objective_mean_score(tiny_stage):
    from hm_utils.contribution import score_model
    from hm_utils.merge import apply_delta_

    model, tv, probes = tiny_stage["model"], tiny_stage["task_vectors"], tiny_stage["probes"]
    plan = H.initial_plan(TASKS, [H.ModelSetting(0.5, 0.9), H.ModelSetting(0.7, 1.0)], tv.num_layers)
    value = H.plan_objective(model, tv, probes)(plan)
    base_score = score_model(model, probes["defs"])
    apply_delta_(model, tv.base, H.merge_plan(tv, plan))
    expected = float(np.mean([score_model(model, probes[task]) for task in TASKS]))
    apply_delta_(model, tv.base, {})

    assert value == expected
    assert score_model(model, probes["defs"]) == base_score


def test_run_hi_merging_recompute(tiny_stage):
    """With recompute and no_drop, the run's last contributions and objectives are those of its plans."""
    model, tv, probes = tiny_stage["model"], tiny_stage["task_vectors"], tiny_stage["probes"]
    plan = H.initial_plan(TASKS, [H.ModelSetting(0.5, 0.9), H.ModelSetting(0.7, 1.0)], tv.num_layers)
    first = H.plan_contributions(model, tv, plan, probes, None, progress=False)
    options = H.ResolutionOptions(positive_only=False, recompute=True, acceptance="no_drop")
    result = H.run_hi_merging(model, tv, plan, first, probes, options)
    objective = H.plan_objective(model, tv, probes)

    assert len(result.decisions) == tv.num_layers
    assert result.decisions[0].objective_before == objective(plan)
    assert result.decisions[-1].objective_before <= objective(result.plan) or not result.decisions[-1].accepted
    final = H.plan_contributions(model, tv, result.plan, probes, None, specialist_impacts=first.specialist_impacts, progress=False)
    assert np.array_equal(result.contributions.merged, final.merged)
    assert np.array_equal(result.contributions.specialist, first.specialist)


def test_tables_of_result():
    plan = plan_of([(0.5, 0.9), (0.3, 1.0)]).with_layer(1, [0.0, 1.0], [0.5, 0.3])
    first = contributions([[0.5, 0.3], [0.2, 0.4]], [[0.1, 0.2], [0.1, 0.1]])
    result = H.resolve_conflicts(plan_of([(0.5, 0.9), (0.3, 1.0)]), first)
    decisions = H.decisions_table(result)
    table = H.plan_table(plan)

    assert list(decisions["layer"]) == [0, 1]
    assert list(decisions["case"]) == ["severe", "severe"]
    assert list(decisions["gamma a"]) == pytest.approx([0.4, 0.1])
    assert list(decisions["kept"]) == ["a", "b"]
    assert list(table.columns) == ["a weight", "a density", "b weight", "b density"]
    assert table.loc[1, "a weight"] == 0.0
    assert table.loc[0, "b density"] == 0.3


def test_write_hi_merging(tmp_path):
    result = H.resolve_conflicts(plan_of([(0.5, 0.9), (0.3, 1.0)]), contributions([[0.5, 0.3], [0.2, 0.4]], [[0.1, 0.2], [0.1, 0.1]]))
    paths = H.write_hi_merging(result, tmp_path, "hm", settings={"recompute": False})
    document = json.loads(paths["json"].read_text())

    assert document["settings"] == {"recompute": False}
    assert H.LayerPlan.from_dict(document["plan"]) == result.plan
    assert len(document["decisions"]) == 2
    assert paths["decisions"].read_text().startswith("layer,case,Gamma")


def test_export_plan_reused(tiny_stage, tmp_path):
    inputs, tv = tiny_stage["inputs"], tiny_stage["task_vectors"]
    plan = H.initial_plan(TASKS, [H.ModelSetting(0.5, 0.9), H.ModelSetting(0.7, 1.0)], tv.num_layers)
    first = H.export_plan(plan, inputs, tv.tensor_names, tmp_path, "merge")
    again = H.export_plan(plan, inputs, tv.tensor_names, tmp_path, "merge")
    changed = H.export_plan(plan.with_layer(2, [0.0, 1.0], [0.5, 0.7]), inputs, tv.tensor_names, tmp_path, "merge")
    merged = load_state_dict(changed.model_dir)
    delta = H.merge_plan(tv, plan.with_layer(2, [0.0, 1.0], [0.5, 0.7]))

    assert first.config_path == tmp_path / "merge.yml"
    assert again.label == first.label
    assert changed.label != first.label
    assert first.label.startswith("merge-")
    for name in tv.base:
        assert torch.equal(merged[name], tv.base[name] + delta[name]), name


def test_export_plan_not_rerun(tiny_stage, tmp_path):
    inputs, tv = tiny_stage["inputs"], tiny_stage["task_vectors"]
    plan = H.initial_plan(TASKS, [H.ModelSetting(1.0, 1.0)] * 2, tv.num_layers)
    first = H.export_plan(plan, inputs, tv.tensor_names, tmp_path, "merge")
    stamp = next(first.model_dir.glob("*.safetensors")).stat().st_mtime_ns
    H.export_plan(plan, inputs, tv.tensor_names, tmp_path, "merge")
    assert next(first.model_dir.glob("*.safetensors")).stat().st_mtime_ns == stamp


def test_results_table_rows(tmp_path):
    (tmp_path / "04_baselines").mkdir()
    (tmp_path / "04_baselines" / "checkpoints.json").write_text(json.dumps({"ties": "x", "dare": "y"}))
    finetune = tmp_path / "03_finetune" / "eval"
    write_metrics(finetune / "base" / "metrics.json", "base", metrics_of(40.0, 10.0, 20.0))
    write_metrics(finetune / "defs" / "metrics.json", "defs", metrics_of(40.0, 20.0, 30.0))
    write_metrics(finetune / "quiz" / "metrics.json", "quiz", metrics_of(60.0, 8.0, 18.0))
    write_metrics(tmp_path / "04_baselines" / "eval" / "ties" / "metrics.json", "ties", metrics_of(55.0, 15.0, 25.0))
    sources = H.result_sources(tmp_path, TASKS)
    values, intervals = H.results_table(sources, {"defs": "qa", "quiz": "mcq"})

    assert list(sources) == ["base", "defs specialist", "quiz specialist", "ties"]
    assert list(values.columns) == ["defs bleu-4", "defs rouge-l", "quiz acc_option_norm"]
    assert values.loc["ties"].tolist() == [15.0, 25.0, 55.0]
    assert intervals.loc["base", "quiz acc_option_norm low"] == 30.0
    assert intervals.loc["defs specialist", "defs rouge-l high"] == 32.0
    assert values.index.name == "Method"


def test_results_table_other_examples(tmp_path):
    sources = {
        "base": write_metrics(tmp_path / "a.json", "base", metrics_of(40.0, 10.0, 20.0)),
        "merge": write_metrics(tmp_path / "b.json", "merge", metrics_of(50.0, 10.0, 20.0), test_ids=("t0", "t9")),
    }
    with pytest.raises(ValueError, match=r"row 'merge' was evaluated with other \['tasks'\]"):
        H.results_table(sources, {"defs": "qa", "quiz": "mcq"})


def test_results_table_missing_metric(tmp_path):
    sources = {"base": write_metrics(tmp_path / "a.json", "base", metrics_of(40.0, 10.0, 20.0))}
    with pytest.raises(KeyError, match="'rouge-1'"):
        H.results_table(sources, {"defs": "qa", "quiz": "mcq"}, {"qa": ["rouge-1"], "mcq": ["acc_option_norm"]})


def test_evaluation_settings_match(tiny_stage, tmp_path):
    reference = write_metrics(tmp_path / "metrics.json", "base", {}, test_ids=("d0", "d1"))
    document = json.loads(reference.read_text())
    document["key"]["tasks"] = {"defs": ["d0", "d1"], "quiz": ["q0", "q1"]}
    reference.write_text(json.dumps(document))
    methods = {"mcq": ["option", "nll"], "qa": ["generate", "nll"]}
    tokens = {"mcq": 16, "qa": 48}

    H.check_evaluation_settings(reference, tiny_stage["inputs"], methods, tokens, 100, 0)
    with pytest.raises(ValueError, match=r"\['n_resamples'\]"):
        H.check_evaluation_settings(reference, tiny_stage["inputs"], methods, tokens, 1000, 0)
    with pytest.raises(ValueError, match=r"\['methods'\]"):
        H.check_evaluation_settings(reference, tiny_stage["inputs"], {"mcq": ["option"]}, tokens, 100, 0)


def test_contribution_stage_stale(tmp_path):
    from hm_utils.contribution import ProbeSettings, write_contributions

    first = contributions([[0.5, 0.3], [0.2, 0.4]], [[0.1, 0.2], [0.1, 0.1]])
    analysed = {"a": H.ModelSetting(0.5, 1.0), "b": H.ModelSetting(1.0, 1.0)}
    settings = H.contribution_settings(ProbeSettings(4), [1, 0], "merged_delta", analysed)
    write_contributions(first, tmp_path / "06_contribution", settings)
    (tmp_path / "05_model_wise").mkdir()
    best_path = tmp_path / "05_model_wise" / "best_settings.json"
    best_path.write_text(json.dumps({"a": {"density": 0.5, "weight": 1.0}, "b": {"density": 1.0, "weight": 1.0}}))
    stage = H.read_contribution_stage(tmp_path)

    assert stage.layers == (0, 1)
    assert stage.probe.examples == 4
    assert stage.model_wise == analysed
    assert np.array_equal(stage.contributions.gamma, first.gamma)
    best_path.write_text(json.dumps({"a": {"density": 0.25, "weight": 1.0}, "b": {"density": 1.0, "weight": 1.0}}))
    with pytest.raises(ValueError, match="rerun 06_contribution"):
        H.read_contribution_stage(tmp_path)

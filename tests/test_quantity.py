"""Data-quantity study: fraction subsets, scaled settings, in-memory merges and the scores table."""

import json

import pandas as pd
import pytest
import torch

from hm_utils import himerging as H
from hm_utils import quantity as Q
from hm_utils.data import Example
from hm_utils.finetune import LoraSettings
from hm_utils.merge import Baseline, TaskVectors, load_baselines, merge_deltas
from hm_utils.merge.io import load_state_dict, save_state_dict

TASKS = ("defs", "quiz")


def test_check_fractions_sorts():
    assert Q.check_fractions([1.0, 0.2, 0.6]) == [0.2, 0.6, 1.0]


@pytest.mark.parametrize("fractions", [[], [0.0], [1.5], [float("nan")], [0.2, 0.2]])
def test_check_fractions_rejects(fractions):
    with pytest.raises(ValueError, match="fraction"):
        Q.check_fractions(fractions)


def test_fraction_name():
    assert Q.fraction_name(0.2) == "fraction_020"
    assert Q.fraction_name(1.0) == "fraction_100"


def test_fraction_name_rejects_non_percent():
    with pytest.raises(ValueError, match="whole percentage"):
        Q.fraction_name(0.125)


def test_fraction_examples_nested():
    examples = list(range(10))
    small = Q.fraction_examples(examples, 0.2)
    large = Q.fraction_examples(examples, 0.6)
    assert small == [0, 1]
    assert large[: len(small)] == small
    assert len(large) == 6


def test_fraction_examples_at_least_one():
    assert Q.fraction_examples([7, 8, 9], 0.1) == [7]


def test_fraction_examples_empty_rejected():
    with pytest.raises(ValueError, match="empty"):
        Q.fraction_examples([], 0.5)


def test_fraction_settings_scale_steps():
    settings = LoraSettings(max_steps=40)
    assert Q.fraction_settings(settings, 0.2).max_steps == 8
    assert Q.fraction_settings(settings, 0.01).max_steps == 1
    assert Q.fraction_settings(settings, 1.0) == settings


def test_fraction_settings_epochs_unchanged():
    settings = LoraSettings(epochs=2)
    assert Q.fraction_settings(settings, 0.4) == settings


def test_train_fractions_reuses_full(tmp_path, monkeypatch):
    calls = []

    def fake_train(base, examples, folder, settings, templates=None):
        calls.append((folder.parent.name, folder.name, len(examples), settings.max_steps))
        folder.mkdir(parents=True)
        return folder

    monkeypatch.setattr("hm_utils.finetune.train_specialist", fake_train)
    sets = {"defs": list(range(10)), "quiz": list(range(5))}
    full = {task: tmp_path / "full" / task for task in sets}
    for folder in full.values():
        folder.mkdir(parents=True)
    result = Q.train_fractions("base", sets, tmp_path / "quantity", LoraSettings(max_steps=10), [0.4, 1.0], full)
    assert calls == [("fraction_040", "defs", 4, 4), ("fraction_040", "quiz", 2, 4)]
    assert result[1.0] == full
    assert Q.read_fractions(tmp_path / "quantity") == result


def test_read_fractions_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="quantity_fractions"):
        Q.read_fractions(tmp_path)


def test_baseline_delta_soup_is_mean():
    generator = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=generator)}
    deltas = [{name: torch.randn(6, 4, generator=generator) for name in base} for _ in range(2)]
    task_vectors = TaskVectors(base, deltas, list(TASKS))
    baselines, _ = load_baselines()
    name = "model.layers.0.mlp.up_proj.weight"
    soup = Q.baseline_delta(task_vectors, baselines["model_soups"])[name]
    arithmetic = Q.baseline_delta(task_vectors, baselines["task_arithmetic"])[name]
    torch.testing.assert_close(soup, (deltas[0][name] + deltas[1][name]) / 2)
    torch.testing.assert_close(arithmetic, deltas[0][name] + deltas[1][name])


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """A tiny Llama base, two fractions with two perturbed specialists each, and stage inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("quantity")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    base = load_state_dict(root / "base")
    generator = torch.Generator().manual_seed(1)
    checkpoints = {}
    for fraction, scale in ((0.5, 0.02), (1.0, 0.05)):
        checkpoints[fraction] = {}
        for task in TASKS:
            folder = root / Q.fraction_name(fraction) / task
            folder.mkdir(parents=True)
            save_state_dict({k: v + scale * torch.randn(v.shape, generator=generator) for k, v in base.items()}, folder)
            (folder / "config.json").write_text((root / "base" / "config.json").read_text())
            checkpoints[fraction][task] = folder
    test = {
        "defs": [Example("d0", "toy", "en", "qa", "", "term", "definition")],
        "quiz": [Example("q0", "toy", "en", "mcq", "", "question", "B", ("A", "B"), 1)],
    }
    inputs = H.StageInputs(root, str(root / "base"), root / "base", TASKS, checkpoints[1.0],
                           {"defs": "en_qa_expert", "quiz": "en_mcq_plain"}, test, test)
    model = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    return {"root": root, "checkpoints": checkpoints, "inputs": inputs, "model": model, "base": base}


def snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_weights(state, base, delta):
    for name, tensor in base.items():
        expected = tensor + delta[name] if name in delta else tensor
        assert torch.equal(state[name], expected), name


def test_run_study_scores_each_merge(study_run, tmp_path, monkeypatch):
    seen = {}

    def fake_evaluate(model, tokenizer, tasks, templates, out_dir, *, model_name, **_):
        seen[model_name] = snapshot(model)
        return {task: {"score": float(len(seen)), "score_ci_low": 0.0, "score_ci_high": 1.0, "n": 1} for task in tasks}

    monkeypatch.setattr("hm_utils.evaluate.evaluate_tasks", fake_evaluate)
    baselines = {"model_soups": Baseline("model_soups", "linear"), "task_arithmetic": Baseline("task_arithmetic", "task_arithmetic")}
    plan = H.initial_plan(TASKS, [H.ModelSetting(0.5, 0.8), H.ModelSetting(0.7, 1.0)], 3)
    settings = Q.StudySettings(methods={"mcq": ["option"], "qa": ["nll"]})
    table = Q.run_study(study_run["model"], None, study_run["inputs"], study_run["checkpoints"], baselines, plan,
                        tmp_path, settings)

    assert len(seen) == 2 * (2 + 2 + 1)
    for fraction, folders in study_run["checkpoints"].items():
        task_vectors = TaskVectors.from_checkpoints(study_run["root"] / "base", [folders[t] for t in TASKS], list(TASKS))
        labels = {label.split("@")[0]: value for label, value in seen.items() if f"@{fraction}-" in label}
        assert_weights(labels["defs specialist"], task_vectors.base, task_vectors.deltas[0])
        assert_weights(labels["model_soups"], task_vectors.base, merge_deltas(task_vectors, "linear", 1.0, 1.0))
        assert_weights(labels[Q.HI_MERGING], task_vectors.base, H.merge_plan(task_vectors, plan))
    assert set(table["fraction"]) == {0.5, 1.0}
    assert set(table["model"]) == {"defs specialist", "quiz specialist", "model_soups", "task_arithmetic", Q.HI_MERGING}
    assert len(table) == 2 * 5 * 2
    assert (tmp_path / Q.SCORES_FILE).is_file()


def test_run_study_search_per_fraction(study_run, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "hm_utils.evaluate.evaluate_tasks",
        lambda model, tokenizer, tasks, *args, **kwargs: {task: {"score": 1.0} for task in tasks},
    )
    searched = []
    plan = H.initial_plan(TASKS, [H.ModelSetting(1.0, 1.0)] * 2, 3)

    def search(model, task_vectors):
        searched.append(task_vectors.names)
        return plan

    Q.run_study(study_run["model"], None, study_run["inputs"], study_run["checkpoints"], {}, plan, tmp_path,
                Q.StudySettings(methods={}), search=search)
    assert searched == [list(TASKS), list(TASKS)]


def test_run_study_rejects_plan_models(study_run, tmp_path):
    plan = H.initial_plan(("other", "quiz"), [H.ModelSetting(1.0, 1.0)] * 2, 3)
    with pytest.raises(ValueError, match="differ from the tasks"):
        Q.run_study(study_run["model"], None, study_run["inputs"], study_run["checkpoints"], {}, plan, tmp_path,
                    Q.StudySettings(methods={}))


def test_search_plan_leaves_base(study_run):
    from hm_utils.contribution import probe_set_from_tokens

    model = study_run["model"]
    task_vectors = TaskVectors.from_checkpoints(
        study_run["root"] / "base", [study_run["checkpoints"][1.0][t] for t in TASKS], list(TASKS)
    )
    generator = torch.Generator().manual_seed(3)
    probes = {}
    for task in TASKS:
        prompts = [torch.randint(1, 64, (n,), generator=generator).tolist() for n in (5, 7)]
        answers = [torch.randint(1, 64, (n,), generator=generator).tolist() for n in (2, 3)]
        probes[task] = probe_set_from_tokens(prompts, answers, pad_id=0, batch_size=2, name=task)
    plan = H.search_plan(model, task_vectors, probes, H.setting_grid(0.5), layers=[0, 2])
    assert plan.model_names == TASKS
    assert plan.num_layers == 3
    for name, tensor in model.state_dict().items():
        if name in task_vectors.base:
            assert torch.equal(tensor, task_vectors.base[name]), name


def test_curves_table_own_specialist():
    scores = pd.DataFrame([
        {"fraction": f, "model": m, "task": "defs", "metric": "answer_nll", "value": v}
        for f in (0.2, 1.0)
        for m, v in (("defs specialist", 1.0), ("quiz specialist", 3.0), ("model_soups", 2.0), (Q.HI_MERGING, 1.5))
    ])
    table = Q.quantity_curves_table(scores, "defs", "answer_nll")
    assert list(table.columns) == ["specialist", "model_soups", Q.HI_MERGING]
    assert list(table.index) == [0.2, 1.0]


def test_curves_table_missing_metric():
    scores = pd.DataFrame([{"fraction": 1.0, "model": "x", "task": "defs", "metric": "bleu-4", "value": 1.0}])
    with pytest.raises(ValueError, match="no 'rouge-l' scores"):
        Q.quantity_curves_table(scores, "defs", "rouge-l")


def test_scores_file_columns(study_run, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "hm_utils.evaluate.evaluate_tasks",
        lambda model, tokenizer, tasks, *args, **kwargs: {task: {"score": 2.5, "n": 1} for task in tasks},
    )
    plan = H.initial_plan(TASKS, [H.ModelSetting(1.0, 1.0)] * 2, 3)
    Q.run_study(study_run["model"], None, study_run["inputs"], {1.0: study_run["checkpoints"][1.0]}, {}, plan, tmp_path,
                Q.StudySettings(methods={}))
    written = pd.read_csv(tmp_path / Q.SCORES_FILE)
    assert list(written.columns) == ["fraction", "model", "task", "metric", "value", "ci_low", "ci_high"]
    assert written["value"].tolist() == [2.5] * 6


def test_read_fractions_relocated(tmp_path):
    stage = tmp_path / "03_finetune" / "quantity"
    (stage / "fraction_050" / "defs").mkdir(parents=True)
    (tmp_path / "03_finetune" / "defs").mkdir()
    document = {"fractions": {"0.5": {"defs": "/elsewhere/quantity/fraction_050/defs"}, "1.0": {"defs": "/elsewhere/defs"}}}
    (stage / Q.QUANTITY_FILE).write_text(json.dumps(document))
    folders = Q.read_fractions(stage)
    assert folders == {0.5: {"defs": stage / "fraction_050" / "defs"}, 1.0: {"defs": tmp_path / "03_finetune" / "defs"}}

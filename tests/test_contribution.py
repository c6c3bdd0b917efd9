"""Contribution analysis on the real SmolLM2 checkpoint with two synthetic specialists.

Why the cached sweep and the naive loop agree bit for bit: both build every probe's weights
as ``base + delta`` in float32 with the same ``torch.add`` (``apply_delta_``). mergekit forms
its output the same way (``base + merged_delta``, with ``delta = specialist - base`` in the
merge dtype). A layer whose delta is removed gets the base tensor itself. The replay calls each
decoder layer with the very tensors a full forward passes to it, in the same batches, so every
operation sees identical inputs. The specialists here are ``base + seeded noise`` and their
deltas are ``specialist - base``, as ``TaskVectors.from_checkpoints`` and mergekit compute them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hm_utils import contribution as C
from hm_utils import himerging as H
from hm_utils.data import Example
from hm_utils.merge import TaskVectors, apply_delta_, decoder_layer_of, load_state_dict, run_mergekit, save_state_dict
from hm_utils.merge.config import MergeConfig, ModelEntry, write_mergekit_config
from hm_utils.merge.io import copy_auxiliary_files
from hm_utils.prompts import PromptTemplate

QA_TEMPLATE = PromptTemplate(name="test_qa", language="en", task_type="qa", system="Be brief.", user="{input}")
MCQ_TEMPLATE = PromptTemplate(
    name="test_mcq", language="en", task_type="mcq", system="Be brief.", user="{input}\n{options}"
)
QA_EXAMPLES = [
    Example("qa0", "toy", "en", "qa", "", "What does the heart do?", "It pumps blood."),
    Example("qa1", "toy", "en", "qa", "", "What do lungs do?", "They exchange gases."),
    Example("qa2", "toy", "en", "qa", "", "What does insulin lower?", "Blood sugar."),
    Example("qa3", "toy", "en", "qa", "", "Where is the femur?", "In the thigh."),
]
MCQ_EXAMPLES = [
    Example("mc0", "toy", "en", "mcq", "", "Which organ pumps blood?", "Heart", ("Liver", "Heart", "Skin"), 1),
    Example("mc1", "toy", "en", "mcq", "", "Which bone is in the thigh?", "Femur", ("Femur", "Ulna", "Rib"), 0),
    Example(
        "mc2", "toy", "en", "mcq", "", "Which cells carry oxygen?", "Red cells", ("Neurons", "Fat cells", "Red cells"), 2
    ),
]
PERTURBED = {"qa": (1, 3), "mcq": (3, 28)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run on one thread: the probes are small, and it keeps them fast when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def setup(base_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    base = load_state_dict(base_checkpoint)

    generator = torch.Generator().manual_seed(0)
    specialists = []
    for layers in PERTURBED.values():
        state = {}
        for name, tensor in base.items():
            if decoder_layer_of(name) in layers:
                noise = torch.randn(tensor.shape, generator=generator)
                state[name] = tensor + 0.05 * tensor.std() * noise
            else:
                state[name] = tensor.clone()
        specialists.append(state)
    task_vectors = TaskVectors.from_checkpoints(base, specialists, list(PERTURBED))

    probe_sets = {
        "qa": C.build_probe_set(tokenizer, QA_EXAMPLES, QA_TEMPLATE, "answer_logprob", batch_size=8, name="qa"),
        "mcq": C.build_probe_set(tokenizer, MCQ_EXAMPLES, MCQ_TEMPLATE, "option_accuracy", batch_size=8, name="mcq"),
    }
    plan = H.initial_plan(task_vectors.names, [H.ModelSetting(0.5, 0.9), H.ModelSetting(0.3, 1.0)], task_vectors.num_layers)
    return {
        "merged": H.merge_plan(task_vectors, plan),
        "model": model,
        "tokenizer": tokenizer,
        "task_vectors": task_vectors,
        "specialists": specialists,
        "probe_sets": probe_sets,
        "plan": plan,
    }


def naive_impacts(model, base, delta, probe_set, layers, removable=None):
    """Build every probe model in full (all tensors written) and score it with full forward passes."""
    removable = delta if removable is None else removable

    def score(probe_delta):
        apply_delta_(model, base, probe_delta)
        return C.score_model(model, probe_set)

    score_model, score_base = score(delta), score({})
    without, only = [], []
    for layer in layers:
        names = {name for name in base if decoder_layer_of(name) == layer}
        deleted = {}
        for name, values in delta.items():
            if name not in names:
                deleted[name] = values
            elif removable is not delta:
                deleted[name] = values - removable[name] if name in removable else values
        without.append(score(deleted))
        only.append(score({name: removable[name] for name in names if name in removable}))
    alpha = score_model - np.asarray(without)
    beta = np.asarray(only) - score_base
    return alpha, beta


def test_specialist_sweep_equals_naive(setup):
    model, tv, probe = setup["model"], setup["task_vectors"], setup["probe_sets"]["qa"]
    layers = [0, 3, 29]
    qa_only = TaskVectors(tv.base, tv.deltas[:1], ["qa"])
    impacts = C.specialist_contributions(model, qa_only, {"qa": probe}, layers, progress=False)["qa"]
    alpha, beta = naive_impacts(model, tv.base, tv.deltas[0], probe, layers)

    assert impacts.layers == (0, 3, 29)
    assert np.array_equal(impacts.alpha, alpha)
    assert np.array_equal(impacts.beta, beta)
    assert np.array_equal(impacts.contribution, alpha + beta)
    # Layer 0 of this specialist has a zero delta, so both probes reproduce the unprobed models.
    assert impacts.alpha[0] == 0.0
    assert impacts.beta[0] == 0.0
    assert impacts.alpha[1] != 0.0


@pytest.mark.slow
def test_merged_sweep_equals_naive(setup):
    model, tv, probe_sets = setup["model"], setup["task_vectors"], setup["probe_sets"]
    merged = setup["merged"]
    layers = [3, 28]
    impacts = C.merged_contributions(model, tv, merged, probe_sets, layers, progress=False)

    for task in ("qa", "mcq"):
        alpha, beta = naive_impacts(model, tv.base, merged, probe_sets[task], layers)
        assert np.array_equal(impacts[task].alpha, alpha), task
        assert np.array_equal(impacts[task].beta, beta), task


def test_own_share_sweep_equals_naive(setup):
    model, tv, probe_sets = setup["model"], setup["task_vectors"], setup["probe_sets"]
    merged = setup["merged"]
    shares = H.merged_shares(tv, setup["plan"], layers=[3])
    qa_only = TaskVectors(tv.base, tv.deltas[:1], ["qa"])
    impacts = C.merged_contributions(
        model, qa_only, merged, {"qa": probe_sets["qa"]}, [3], deletion="own_share", shares=shares[:1], progress=False
    )["qa"]
    alpha, beta = naive_impacts(model, tv.base, merged, probe_sets["qa"], [3], removable=shares[0])

    assert np.array_equal(impacts.alpha, alpha)
    assert np.array_equal(impacts.beta, beta)


def test_analysis_shares_base_pass(setup):
    """contribution_analysis (one base pass for specialist and merge) equals the two separate sweeps."""
    model, tv, probe_sets = setup["model"], setup["task_vectors"], setup["probe_sets"]
    qa_only = TaskVectors(tv.base, tv.deltas[:1], ["qa"])
    qa_probe = {"qa": probe_sets["qa"]}
    combined = C.contribution_analysis(model, qa_only, setup["merged"], qa_probe, [27], progress=False)
    specialist = C.specialist_contributions(model, qa_only, qa_probe, [27], progress=False)["qa"]
    merged = C.merged_contributions(model, qa_only, setup["merged"], qa_probe, [27], progress=False)["qa"]

    assert np.array_equal(combined.specialist[0], specialist.contribution)
    assert np.array_equal(combined.merged[0], merged.contribution)
    assert combined.specialist_impacts["qa"].score_base == merged.score_base


def test_score_matches_evaluate(setup):
    from hm_utils.evaluate import answer_logprobs

    model, tv, tokenizer = setup["model"], setup["task_vectors"], setup["tokenizer"]
    apply_delta_(model, tv.base, tv.deltas[0])
    sums, counts = answer_logprobs(model, tokenizer, QA_EXAMPLES, QA_TEMPLATE, batch_size=8)

    assert C.score_model(model, setup["probe_sets"]["qa"]) == float(np.mean(sums / counts))


@pytest.mark.slow
def test_probe_through_mergekit(setup, base_checkpoint, tmp_path):
    """One deletion probe built by mergekit on disk, loaded and scored, equals the cached probe."""
    from transformers import AutoModelForCausalLM

    model, tv, probe = setup["model"], setup["task_vectors"], setup["probe_sets"]["qa"]
    base_dir = base_checkpoint
    specialist_dir = tmp_path / "qa"
    specialist_dir.mkdir()
    save_state_dict(setup["specialists"][0], specialist_dir)
    copy_auxiliary_files(base_dir, specialist_dir)

    # Task arithmetic with weight 1 everywhere except 0 at layer 3: base + delta, layer 3 = base.
    weight = [{"filter": "model.layers.3.", "value": 0.0}, {"value": 1.0}]
    config = MergeConfig("task_arithmetic", [ModelEntry(str(specialist_dir), {"weight": weight})], base_model=str(base_dir))
    run_mergekit(write_mergekit_config(config, tmp_path / "probe.yml"), tmp_path / "probe")
    probe_model = AutoModelForCausalLM.from_pretrained(tmp_path / "probe", dtype=torch.float32).eval()

    qa_only = TaskVectors(tv.base, tv.deltas[:1], ["qa"])
    impacts = C.specialist_contributions(model, qa_only, {"qa": probe}, [3], progress=False)["qa"]
    assert C.score_model(probe_model, probe) == impacts.score_without[0]


def tiny_model(architecture: str):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    torch.manual_seed(0)
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, **sizes))
    if architecture == "qwen2":
        config = Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1, **sizes)
        return Qwen2ForCausalLM(config)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    config = Gemma3TextConfig(
        num_hidden_layers=3, head_dim=16, sliding_window=4, layer_types=layer_types, final_logit_softcapping=30.0, **sizes
    )
    return Gemma3ForCausalLM(config)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma3"])
def test_replay_other_architectures(architecture):
    """Sliding-window layers, per-layer masks and logit soft-capping replay exactly."""
    model = tiny_model(architecture).eval()
    base = {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    generator = torch.Generator().manual_seed(1)
    delta = {
        name: 0.1 * torch.randn(tensor.shape, generator=generator)
        for name, tensor in base.items()
        if decoder_layer_of(name) is not None
    }
    lengths = [(5, 2), (9, 3), (12, 4), (7, 2), (10, 3)]
    prompts = [torch.randint(1, 64, (n,), generator=generator).tolist() for n, _ in lengths]
    answers = [torch.randint(1, 64, (n,), generator=generator).tolist() for _, n in lengths]
    probe = C.probe_set_from_tokens(prompts, answers, pad_id=0, batch_size=3, name="toy")

    impacts = C.layer_impacts(model, base, delta, {"toy": probe}, [0, 1, 2], progress=False)["toy"]
    alpha, beta = naive_impacts(model, base, delta, probe, [0, 1, 2])

    assert np.array_equal(impacts.alpha, alpha)
    assert np.array_equal(impacts.beta, beta)
    assert np.all(impacts.alpha != 0)


def test_contributions_records():
    tasks, layers = ("qa", "mcq"), (3, 28)
    specialist = np.array([[0.5, 0.125], [0.25, 0.0]])
    merged = np.array([[0.25, 0.375], [0.125, 0.0625]])
    contributions = C.Contributions(tasks, layers, specialist, merged)
    records = contributions.to_records()

    assert np.array_equal(contributions.gamma, np.array([[0.25, -0.25], [0.125, -0.0625]]))
    assert np.array_equal(contributions.total_conflict, np.array([0.375, -0.3125]))
    assert contributions.ranking() == [3]
    assert len(records) == 4
    assert records[0] == {"task": "qa", "layer": 3, "c_specialist": 0.5, "c_merged": 0.25, "gamma": 0.25, "Gamma": 0.375}
    json.dumps(records, allow_nan=False)


def test_rank_layers_order():
    gamma = np.array([[0.1, 0.4, -0.2, 0.3], [0.1, -0.1, -0.1, 0.0]])
    layers = [0, 5, 7, 9]

    assert C.rank_layers(gamma, layers) == [5, 9, 0]
    assert C.rank_layers(gamma, layers, positive_only=False) == [5, 9, 0, 7]


def test_rank_layers_ties_lower_first():
    assert C.rank_layers(np.array([[0.2, 0.2, 0.2]]), [4, 1, 2]) == [1, 2, 4]


def test_rank_layers_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        C.rank_layers(np.array([[np.nan]]), [0])


# ---------------------------------------------------------------------------------------------
# Bad inputs, rejected before any sweep
# ---------------------------------------------------------------------------------------------


def tiny_checkpoint(folder, num_layers=2, hidden=16, record_sha=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    if record_sha is not None:
        (folder / C.FINETUNE_RECORD).write_text(json.dumps({"key": {"base_model_sha256": record_sha}}))
    return folder


def test_specialists_layer_count_rejected(tmp_path):
    base = tiny_checkpoint(tmp_path / "base", num_layers=2)
    other = tiny_checkpoint(tmp_path / "other", num_layers=3)
    with pytest.raises(ValueError, match="3 decoder layers"):
        C.check_specialists(base, {"other": other})


def test_specialists_config_rejected(tmp_path):
    base = tiny_checkpoint(tmp_path / "base", hidden=16)
    other = tiny_checkpoint(tmp_path / "other", hidden=32)
    with pytest.raises(ValueError, match="hidden_size"):
        C.check_specialists(base, {"other": other})


def test_specialists_shapes_rejected(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    other = tiny_checkpoint(tmp_path / "other")
    state = load_state_dict(other)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(31, 16)
    (other / "model.safetensors").unlink()
    save_state_dict(state, other)
    with pytest.raises(ValueError, match="shapes"):
        C.check_specialists(base, {"other": other})


def test_specialists_base_hash_rejected(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    other = tiny_checkpoint(tmp_path / "other", record_sha="0" * 64)
    with pytest.raises(ValueError, match="another base"):
        C.check_specialists(base, {"other": other})


def test_specialists_base_hash_accepted(tmp_path):
    from hm_utils.finetune import fingerprint_model

    base = tiny_checkpoint(tmp_path / "base")
    other = tiny_checkpoint(tmp_path / "other", record_sha=fingerprint_model(base)["sha256"])
    C.check_specialists(base, [other])


def test_validation_split_missing():
    with pytest.raises(ValueError, match="no validation split"):
        C.check_validation_sets({"qa": QA_EXAMPLES}, ["qa", "mcq"])


@pytest.mark.parametrize("value", [None, []])
def test_validation_split_empty(value):
    with pytest.raises(ValueError, match="empty"):
        C.check_validation_sets({"qa": QA_EXAMPLES, "mcq": value}, ["qa", "mcq"])


def test_probe_set_empty(setup):
    with pytest.raises(ValueError, match="no validation examples"):
        C.build_probe_set(setup["tokenizer"], [], QA_TEMPLATE, name="qa")


def test_probe_set_option_accuracy_on_qa(setup):
    with pytest.raises(ValueError, match="multiple-choice"):
        C.build_probe_set(setup["tokenizer"], QA_EXAMPLES, QA_TEMPLATE, "option_accuracy")


def test_sweep_layer_count_rejected(setup):
    tv = setup["task_vectors"]
    shorter = TaskVectors(tv.base, tv.deltas, tv.names, num_layers=29)
    with pytest.raises(ValueError, match="29"):
        C.specialist_contributions(setup["model"], shorter, setup["probe_sets"], [0], progress=False)


def test_sweep_layer_outside_rejected(setup):
    tv = setup["task_vectors"]
    with pytest.raises(ValueError, match="outside"):
        C.specialist_contributions(setup["model"], tv, setup["probe_sets"], [30], progress=False)


def test_sweep_task_without_probe_set(setup):
    tv = setup["task_vectors"]
    with pytest.raises(ValueError, match="missing"):
        C.merged_contributions(setup["model"], tv, {}, {"qa": setup["probe_sets"]["qa"]}, [0], progress=False)


def test_own_share_needs_shares(setup):
    tv = setup["task_vectors"]
    with pytest.raises(ValueError, match="own_share"):
        C.merged_contributions(setup["model"], tv, {}, setup["probe_sets"], [0], deletion="own_share", progress=False)


def test_specialists_base_reference(tmp_path):
    """The recorded fingerprint is compared with base_reference, not with the folder of the base."""
    from hm_utils.finetune import fingerprint_model

    base = tiny_checkpoint(tmp_path / "base")
    reference = tiny_checkpoint(tmp_path / "reference", hidden=32)
    other = tiny_checkpoint(tmp_path / "other", record_sha=fingerprint_model(reference)["sha256"])
    C.check_specialists(base, {"other": other}, base_reference=reference)
    with pytest.raises(ValueError, match="another base"):
        C.check_specialists(base, {"other": other})


# ---------------------------------------------------------------------------------------------
# Stage files: probe settings, probe sets, contributions on disk
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"examples": 0}, "selects no example"),
        ({"examples": 2.5}, "positive integer or None"),
        ({"score": {"mcq": "accuracy"}}, "invalid score"),
        ({"score": {"qa": "option_accuracy"}}, "QA tasks"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_probe_settings_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        C.ProbeSettings(**arguments)


def test_probe_settings_round_trip():
    settings = C.ProbeSettings(6, {"mcq": "option_accuracy", "qa": "answer_logprob"}, 4)
    document = json.loads(json.dumps(settings.to_dict()))
    assert C.ProbeSettings.from_dict(document) == settings
    assert settings.score_of("mcq") == "option_accuracy"
    assert settings.score_of("other") == "answer_logprob"


def test_build_probe_sets(setup):
    settings = C.ProbeSettings(2, {"mcq": "option_accuracy", "qa": "answer_logprob"}, 8)
    probe_sets = C.build_probe_sets(
        setup["tokenizer"], {"qa": QA_EXAMPLES, "mcq": MCQ_EXAMPLES}, {"qa": QA_TEMPLATE, "mcq": MCQ_TEMPLATE}, settings
    )
    expected = C.build_probe_set(setup["tokenizer"], QA_EXAMPLES[:2], QA_TEMPLATE, "answer_logprob", 8, name="qa")

    assert probe_sets["qa"].n_examples == 2
    assert probe_sets["mcq"].n_examples == 2
    assert probe_sets["mcq"].score == "option_accuracy"
    assert probe_sets["mcq"].n_items == 6
    assert torch.equal(probe_sets["qa"].batches[0].input_ids, expected.batches[0].input_ids)


def test_build_probe_sets_missing_template(setup):
    with pytest.raises(ValueError, match=r"no prompt template for tasks \['mcq'\]"):
        C.build_probe_sets(setup["tokenizer"], {"qa": QA_EXAMPLES, "mcq": MCQ_EXAMPLES}, {"qa": QA_TEMPLATE})


def test_contributions_files(tmp_path):
    layers = (2, 5)
    impacts = {
        "qa": C.LayerImpacts("qa", layers, -1.5, -2.0, np.array([-1.75, -1.5]), np.array([-1.0, -2.25])),
        "mcq": C.LayerImpacts("mcq", layers, 50.0, 25.0, np.array([25.0, 50.0]), np.array([50.0, 25.0])),
    }
    merged = {task: C.LayerImpacts(task, layers, i.score_model - 0.5, i.score_base, i.score_without, i.score_only)
              for task, i in impacts.items()}
    contributions = C.Contributions(
        ("qa", "mcq"), layers,
        np.stack([impacts[t].contribution for t in ("qa", "mcq")]),
        np.stack([merged[t].contribution for t in ("qa", "mcq")]),
        impacts, merged,
    )
    paths = C.write_contributions(contributions, tmp_path, settings={"deletion": "merged_delta"})
    loaded, settings = C.read_contributions(tmp_path)
    ranking = json.loads(paths["ranking"].read_text())
    rows = paths["csv"].read_text().splitlines()

    assert settings == {"deletion": "merged_delta"}
    assert loaded.layers == layers
    assert np.array_equal(loaded.specialist, contributions.specialist)
    assert np.array_equal(loaded.merged, contributions.merged)
    assert np.array_equal(loaded.merged_impacts["mcq"].score_without, merged["mcq"].score_without)
    assert loaded.specialist_impacts["qa"].score_model == -1.5
    assert ranking["Gamma"] == {"2": 1.0, "5": 1.0}
    assert ranking["ranking"] == [2, 5]
    assert ranking["conflicting"] == [2, 5]
    assert rows[0] == "task,layer,c_specialist,c_merged,gamma,Gamma,alpha_specialist,beta_specialist,alpha_merged,beta_merged"
    assert len(rows) == 5


def test_read_contributions_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the contribution stage"):
        C.read_contributions(tmp_path)

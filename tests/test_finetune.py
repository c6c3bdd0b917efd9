import csv
import json
import os

import pytest
import torch
from matplotlib.figure import Figure
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hm_utils import finetune as ft
from hm_utils.data import Example
from hm_utils.prompts import PromptTemplate, default_template, render_prompt, render_target

# Short templates keep the sequences near 20 tokens, so a training step takes about a second.
SHORT_QA = PromptTemplate(name="test_short_qa", language="en", task_type="qa", system="", user="{input}")
SHORT_MCQ = PromptTemplate(name="test_short_mcq", language="en", task_type="mcq", system="", user="{input}\n{options}")
TEMPLATES = {"defs": SHORT_QA, "quiz": SHORT_MCQ}

DEFS = [
    Example("d1", "defs", "en", "qa", "Define the word.", "apple", "A round fruit of a tree."),
    Example("d2", "defs", "en", "qa", "Define the word.", "river", "A large stream of water."),
    Example("d3", "defs", "en", "qa", "Define the word.", "stone", "A hard piece of rock."),
    Example("d4", "defs", "en", "qa", "Define the word.", "cloud", "Water droplets in the sky."),
]
QUIZ = [
    Example("q1", "quiz", "en", "mcq", "Answer.", "Which organ pumps blood?", "Heart", ("Liver", "Heart"), 1),
    Example("q2", "quiz", "en", "mcq", "Answer.", "Which vitamin prevents scurvy?", "Vitamin C",
            ("Vitamin C", "Vitamin K"), 0),
]
TRAIN_SETTINGS = ft.LoraSettings(learning_rate=1e-3, batch_size=2, max_steps=24, warmup_ratio=0.1, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Parallel processes on a small shared CPU make two OpenMP threads several times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(base_checkpoint):
    return AutoTokenizer.from_pretrained(base_checkpoint)


@pytest.fixture(scope="module")
def trained(base_checkpoint, tmp_path_factory):
    """A mixed-data LoRA model trained for 24 steps on two tiny tasks, each example repeated twice."""
    out_dir = tmp_path_factory.mktemp("finetune") / "mixed"
    sets = {"defs": DEFS * 2, "quiz": QUIZ * 2}
    path = ft.train_mixed(base_checkpoint, sets, out_dir, TRAIN_SETTINGS, templates=TEMPLATES)
    return path


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def test_settings_defaults():
    settings = ft.LoraSettings()
    assert settings.rank == 8
    assert settings.alpha == 16
    assert settings.dropout == 0.01
    assert settings.learning_rate == 1e-4
    assert settings.target_modules == "all-linear"
    assert settings.max_grad_norm == 1.0
    assert settings.group_by_length is True


@pytest.mark.parametrize(
    "field, value",
    [
        ("rank", 0),
        ("rank", 2.5),
        ("alpha", -1.0),
        ("dropout", 1.0),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("epochs", 0),
        ("max_steps", 0),
        ("batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("max_length", 1),
        ("warmup_ratio", 1.0),
        ("weight_decay", -0.1),
        ("max_grad_norm", 0.0),
        ("base_dtype", "float16"),
        ("target_modules", "linear"),
        ("target_modules", ()),
        ("group_by_length", "yes"),
    ],
)
def test_settings_invalid(field, value):
    with pytest.raises(ValueError, match=field):
        ft.LoraSettings(**{field: value})


def test_settings_list_targets_become_tuple():
    settings = ft.LoraSettings(target_modules=["q_proj", "v_proj"])
    assert settings.target_modules == ("q_proj", "v_proj")


def test_settings_from_dict_unknown_key():
    with pytest.raises(ValueError, match="lora_rank"):
        ft.LoraSettings.from_dict({"lora_rank": 4})


def test_settings_dict_round_trip():
    settings = ft.LoraSettings(target_modules=("q_proj",), max_steps=5)
    assert ft.LoraSettings.from_dict(settings.to_dict()) == settings


# ----------------------------------------------------------------------------------------------
# Tokenisation, masking and truncation
# ----------------------------------------------------------------------------------------------


def test_labels_mask_prompt(tokenizer):
    example = DEFS[0]
    template = default_template("en", "qa")
    tokenized = ft.tokenize_example(tokenizer, example, template, max_length=1024)
    prompt_ids = tokenizer(render_prompt(tokenizer, example, template), add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(render_target(example), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(prompt_ids)

    assert list(tokenized.input_ids) == prompt_ids + target_ids
    assert all(label == -100 for label in tokenized.labels[:n_prompt])
    assert list(tokenized.labels[n_prompt:]) == target_ids
    assert tokenized.n_target_tokens == len(target_ids)
    assert not tokenized.prompt_truncated


def test_labels_mcq_target(tokenizer):
    tokenized = ft.tokenize_example(tokenizer, QUIZ[0], SHORT_MCQ, max_length=1024)
    answer = [token for token, label in zip(tokenized.input_ids, tokenized.labels) if label != -100]
    assert tokenizer.decode(answer) == "B. Heart<|im_end|>"


def test_truncation_keeps_target(tokenizer):
    long_input = "symptom " * 200
    long = Example("long", "defs", "en", "qa", "Define the word.", long_input, "A short answer.")
    data = ft.tokenize_examples(tokenizer, [long, DEFS[0], long], SHORT_QA, max_length=64)
    full = ft.tokenize_example(tokenizer, long, SHORT_QA, max_length=100_000)
    truncated = data.examples[0]
    n_target = full.n_target_tokens

    assert data.n_prompt_truncated == 2
    assert data.n_target_truncated == 0
    assert len(truncated.input_ids) == 64
    assert truncated.input_ids == full.input_ids[-64:]
    assert truncated.labels[-n_target:] == full.labels[-n_target:]
    assert truncated.n_target_tokens == n_target
    assert not data.examples[1].prompt_truncated


def test_truncation_long_target():
    result = ft.truncate_sequence(prompt_ids=[1, 2, 3, 4, 5, 6], target_ids=[10, 11, 12, 13, 14, 15, 16], max_length=6)
    assert result.input_ids == (4, 5, 6, 10, 11, 12)
    assert result.labels == (-100, -100, -100, 10, 11, 12)
    assert result.prompt_truncated
    assert result.target_truncated


def test_truncation_within_limit():
    result = ft.truncate_sequence([1, 2], [3, 4], max_length=4)
    assert result.input_ids == (1, 2, 3, 4)
    assert result.labels == (-100, -100, 3, 4)
    assert not result.prompt_truncated


def test_template_mapping_missing_dataset():
    with pytest.raises(ValueError, match="quiz"):
        ft.template_for(QUIZ[0], {"defs": SHORT_QA})


def test_template_mapping_by_name():
    assert ft.template_for(QUIZ[0], {"quiz": "en_mcq_expert"}).name == "en_mcq_expert"


# ----------------------------------------------------------------------------------------------
# Batching, mixing and the loss
# ----------------------------------------------------------------------------------------------


def test_batches_cover_every_index():
    lengths = [5, 50, 7, 48, 6, 52, 9, 45, 8]
    batches = ft.make_batches(lengths, batch_size=2, group_by_length=True, seed=3)
    flat = sorted(index for batch in batches for index in batch)
    assert flat == list(range(len(lengths)))
    assert all(len(batch) <= 2 for batch in batches)


def test_batches_grouped_by_length():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    batches = ft.make_batches(lengths, batch_size=2, group_by_length=True, seed=1)
    spreads = [max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in batches]
    assert max(spreads) <= 1


def test_batches_seeded():
    lengths = list(range(20))
    first = ft.make_batches(lengths, 4, group_by_length=False, seed=7)
    again = ft.make_batches(lengths, 4, group_by_length=False, seed=7)
    other = ft.make_batches(lengths, 4, group_by_length=False, seed=8)
    assert first == again
    assert first != other


def test_mix_union_shuffled():
    mixed = ft.mix_training_sets({"defs": DEFS, "quiz": QUIZ}, seed=0)
    reordered = ft.mix_training_sets({"quiz": QUIZ, "defs": DEFS}, seed=0)
    assert sorted(example.id for example in mixed) == sorted(example.id for example in DEFS + QUIZ)
    assert mixed == reordered
    assert mixed != ft.mix_training_sets({"defs": DEFS, "quiz": QUIZ}, seed=1)


def test_collate_pads_right():
    examples = [ft.TokenizedExample((1, 2, 3), (-100, 2, 3)), ft.TokenizedExample((4,), (4,))]
    batch = ft.collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_answer_loss_equals_full_loss(base_checkpoint, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32)
    data = ft.tokenize_examples(tokenizer, DEFS[:2] + QUIZ[:1], TEMPLATES, max_length=1024)
    batch = ft.collate(data.examples, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        loss_sum, n_targets = ft.answer_loss_sum(model, batch)
        full_sum, full_targets = ft.full_logits_loss_sum(model, batch)
        full = model(**batch).loss
    assert n_targets == data.n_target_tokens
    assert full_targets == n_targets
    assert torch.allclose(loss_sum / n_targets, full, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss_sum, full_sum, rtol=1e-5, atol=1e-5)


def _tiny_lora_model(settings):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return ft.add_lora(LlamaForCausalLM(config), settings, ["q_proj", "v_proj", "down_proj"])


TINY_DATA = ft.TokenizedSet(
    examples=tuple(
        ft.TokenizedExample(tuple(ids), tuple([-100] * 3 + ids[3:]))
        for ids in ([5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23], [30, 31, 32, 33, 34, 35])
    ),
    n_prompt_truncated=0,
    n_target_truncated=0,
)


def _tiny_run(**overrides):
    values = dict(learning_rate=1e-2, dropout=0.0, max_steps=3, warmup_ratio=0.0, group_by_length=False)
    settings = ft.LoraSettings(**{**values, **overrides})
    return ft.train_lora(_tiny_lora_model(settings), TINY_DATA, settings, pad_id=0)


def test_accumulation_matches_full_batch():
    full = _tiny_run(batch_size=4)
    accumulated = _tiny_run(batch_size=2, gradient_accumulation_steps=2)
    assert [entry.target_tokens for entry in accumulated] == [entry.target_tokens for entry in full]
    for one, other in zip(full, accumulated):
        assert one.loss == pytest.approx(other.loss, rel=1e-5)
        assert one.grad_norm == pytest.approx(other.grad_norm, rel=1e-4)


def test_checkpointing_same_losses():
    plain = _tiny_run(batch_size=2)
    checkpointed = _tiny_run(batch_size=2, gradient_checkpointing=True)
    assert [entry.loss for entry in checkpointed] == pytest.approx([entry.loss for entry in plain], rel=1e-5)


def test_training_moves_lora_b():
    settings = ft.LoraSettings(learning_rate=1e-2, dropout=0.0, max_steps=2, batch_size=2, warmup_ratio=0.0)
    model = _tiny_lora_model(settings)
    log = ft.train_lora(model, TINY_DATA, settings, pad_id=0)
    lora_b = [parameter for name, parameter in model.named_parameters() if "lora_B" in name]
    assert len(log) == 2
    assert all(parameter.dtype == torch.float32 for parameter in lora_b)
    assert all(torch.count_nonzero(parameter) > 0 for parameter in lora_b)


def test_plan_steps():
    settings = ft.LoraSettings(epochs=2, batch_size=3, gradient_accumulation_steps=2)
    assert ft.plan_steps(10, settings) == 4
    assert ft.plan_steps(10, ft.LoraSettings(max_steps=7)) == 7


# ----------------------------------------------------------------------------------------------
# Input checks raised before any training
# ----------------------------------------------------------------------------------------------


def test_reject_empty_training_set(base_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        ft.train_specialist(base_checkpoint, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reject_empty_mixed_sets(base_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no training examples"):
        ft.train_mixed(base_checkpoint, {"defs": [], "quiz": []}, tmp_path / "out")


def test_reject_unknown_target_module(base_checkpoint, tmp_path):
    settings = ft.LoraSettings(target_modules=("q_proj", "query"))
    with pytest.raises(ValueError, match="query") as error:
        ft.train_specialist(base_checkpoint, DEFS, tmp_path / "out", settings, templates=SHORT_QA)
    assert "q_proj" in str(error.value)
    assert "down_proj" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_reject_tokenizer_too_large(base_checkpoint, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    tokenizer.add_tokens(["<extra_token_a>", "<extra_token_b>"])
    with pytest.raises(ValueError, match="49154 tokens"):
        ft.train_specialist(base_checkpoint, DEFS, tmp_path / "out", templates=SHORT_QA, tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


def test_reject_tokenizer_other_eos(base_checkpoint, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    tokenizer.eos_token = "<|endoftext|>"
    with pytest.raises(ValueError, match="eos_token_id 0"):
        ft.train_specialist(base_checkpoint, DEFS, tmp_path / "out", templates=SHORT_QA, tokenizer=tokenizer)


def test_reject_tokenizer_other_bos(base_checkpoint, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    tokenizer.bos_token = "<|endoftext|>"
    with pytest.raises(ValueError, match="bos_token_id 0"):
        ft.train_specialist(base_checkpoint, DEFS, tmp_path / "out", templates=SHORT_QA, tokenizer=tokenizer)


def test_reject_foreign_out_dir(base_checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        ft.train_specialist(base_checkpoint, DEFS, tmp_path, templates=SHORT_QA)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_resolve_all_linear(base_checkpoint):
    from transformers import AutoConfig

    names = ft.linear_module_names(ft.build_meta_model(AutoConfig.from_pretrained(base_checkpoint)))
    expected = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert ft.resolve_target_modules("all-linear", names) == expected
    assert "lm_head" not in names


def test_merge_rejects_missing_adapter(base_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ft.merge_adapter(base_checkpoint, tmp_path, tmp_path / "merged")


# ----------------------------------------------------------------------------------------------
# End to end: one short training run shared by the tests below
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_lowers_loss(trained):
    losses = [row["loss"] for row in ft.load_training_log(trained)]
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < 0.5 * sum(losses[:6]) / 6


@pytest.mark.slow
def test_training_log_files(trained):
    rows = json.loads((trained / "train_log.json").read_text(encoding="utf-8"))
    with open(trained / "train_log.csv", newline="", encoding="utf-8") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == list(range(1, 25))
    assert len(csv_rows) == len(rows)
    assert float(csv_rows[-1]["loss"]) == pytest.approx(rows[-1]["loss"])
    assert rows[0]["learning_rate"] == 0.0
    assert max(row["learning_rate"] for row in rows) == pytest.approx(1e-3)


@pytest.mark.slow
def test_record_contents(trained):
    record = ft.read_record(trained)
    assert record["key"]["settings"] == TRAIN_SETTINGS.to_dict()
    assert record["key"]["data_sha256"] == ft.hash_examples(ft.mix_training_sets({"defs": DEFS * 2, "quiz": QUIZ * 2}, 0))
    assert record["key"]["base_dtype"] == "float32"
    assert record["n_examples"] == 12
    assert record["datasets"] == ["defs", "quiz"]
    assert record["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert record["merge"]["dtype"] == "float32"


@pytest.mark.slow
def test_merge_exact_one_layer(trained, base_checkpoint):
    prefix = "base_model.model.model.layers.3.mlp.down_proj"
    with safe_open(trained / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        lora_a = adapter.get_tensor(f"{prefix}.lora_A.weight")
        lora_b = adapter.get_tensor(f"{prefix}.lora_B.weight")
    with safe_open(base_checkpoint / "model.safetensors", "pt") as base:
        weight = base.get_tensor("model.layers.3.mlp.down_proj.weight")
    with safe_open(trained / "model.safetensors", "pt") as merged:
        merged_weight = merged.get_tensor("model.layers.3.mlp.down_proj.weight")
        untouched = merged.get_tensor("model.embed_tokens.weight")
    with safe_open(base_checkpoint / "model.safetensors", "pt") as base:
        base_embed = base.get_tensor("model.embed_tokens.weight")

    expected = weight + (lora_b @ lora_a) * (16.0 / 8)
    assert lora_a.shape == (8, 1536)
    assert merged_weight.dtype == torch.float32
    assert torch.count_nonzero(lora_b) > 0
    assert torch.equal(merged_weight, expected)
    assert torch.equal(untouched, base_embed)


@pytest.mark.slow
def test_merged_folder_loads(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert (trained / "tokenizer.json").is_file()
    assert (trained / "adapter" / "adapter_config.json").is_file()
    leftovers = [path.name for path in trained.parent.iterdir() if path.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_reuse_finished_checkpoint(trained, base_checkpoint):
    weights = trained / "model.safetensors"
    before = (os.stat(weights).st_mtime_ns, (trained / ft.RECORD_FILE).read_text())
    sets = {"quiz": QUIZ * 2, "defs": DEFS * 2}
    path = ft.train_mixed(base_checkpoint, sets, trained, TRAIN_SETTINGS, templates=TEMPLATES)
    assert path == trained
    assert (os.stat(weights).st_mtime_ns, (trained / ft.RECORD_FILE).read_text()) == before


@pytest.mark.slow
def test_changed_settings_not_finished(trained):
    key = dict(ft.read_record(trained)["key"])
    assert ft.is_finished(trained, key)
    key["settings"] = {**key["settings"], "learning_rate": 5e-4}
    assert not ft.is_finished(trained, key)


@pytest.mark.slow
def test_plot_training_curves(trained):
    figure = ft.plot_training_curves({"mixed": trained}, smooth=4)
    axes = figure.axes[0]
    assert isinstance(figure, Figure)
    assert len(axes.lines) == 2
    assert len(axes.lines[1].get_xdata()) == 24

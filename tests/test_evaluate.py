import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hm_utils import evaluate as ev
from hm_utils.data import Example
from hm_utils.prompts import default_template, get_template

EN_MCQ = [
    Example("q1", "toy", "en", "mcq", "Answer the question.", "Which organ pumps blood through the body?",
            "Heart", ("Liver", "Heart", "Kidney", "Lung"), 1),
    Example("q2", "toy", "en", "mcq", "Answer the question.", "Which vitamin deficiency causes scurvy?",
            "Vitamin C", ("Vitamin A", "Vitamin D", "Vitamin C", "Vitamin K"), 2),
    Example("q3", "toy", "en", "mcq", "Answer the question.", "Normal body temperature in Celsius?",
            "37", ("37", "40", "30"), 0),
]
ZH_MCQ = [
    Example("z1", "toy", "zh", "mcq", "请回答选择题。", "人体泵血的器官是？", "心脏",
            ("肝脏", "心脏", "肾脏", "肺"), 1),
    Example("z2", "toy", "zh", "mcq", "请回答选择题。", "坏血病缺乏哪种维生素？", "维生素C",
            ("维生素A", "维生素C", "维生素D"), 1),
]
ZH_QA = [
    Example("d1", "toy", "zh", "qa", "解释医学术语。", "贫血", "血液中健康红细胞不足的状态。"),
    Example("d2", "toy", "zh", "qa", "解释医学术语。", "发热", "体温高于正常范围。"),
]


# ----------------------------------------------------------------------------------------------
# Fixtures: the real tokenizer, a tiny random Llama on its vocabulary, and the real checkpoint
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(base_checkpoint):
    return AutoTokenizer.from_pretrained(base_checkpoint)


def _tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return _tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def silent_model(tokenizer):
    """A model whose output layer is zero, so greedy decoding always picks token 0, a special token."""
    model = _tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


@pytest.fixture(scope="module")
def smollm(base_checkpoint):
    # One thread: parallel processes on a small shared CPU make two OpenMP threads several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32).eval()
    yield model, AutoTokenizer.from_pretrained(base_checkpoint)
    torch.set_num_threads(threads)


class ForbiddenModel(torch.nn.Module):
    """Fails the test if evaluation reaches a model pass."""

    def forward(self, *args, **kwargs):
        raise AssertionError("the model ran before the input checks")


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer with an unknown token and a chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["[UNK]", "[PAD]", "which", "organ", "?", "heart", "liver", "answer", "A", "B", "."]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Answer normalisation and parsing
# ----------------------------------------------------------------------------------------------


def test_normalize_full_width():
    assert ev.normalize_answer("（Ｂ）　心脏。") == "b心脏"
    assert ev.normalize_answer("(b) 心脏") == "b心脏"


def test_normalize_case_and_space():
    assert ev.normalize_answer("  Vitamin   C! ") == "vitaminc"


OPTIONS = ("Liver", "Heart", "Heart failure", "Lung")
ZH_OPTIONS = ("肝脏", "心脏", "肾脏", "肺")


@pytest.mark.parametrize(
    ("prediction", "options", "expected"),
    [
        ("B", OPTIONS, 1),
        ("B. Heart", OPTIONS, 1),
        ("(D) Lung", OPTIONS, 3),
        ("Ｃ．心力衰竭", OPTIONS, 2),
        ("d", OPTIONS, None),  # a lower-case letter alone is not read as a choice
        ("The answer is C.", OPTIONS, 2),
        ("Answer: D", OPTIONS, 3),
        ("The answer is a heart condition", OPTIONS, 1),
        ("A patient with a weak heart failure history", OPTIONS, 2),
        ("heart failure", OPTIONS, 2),
        ("It is the liver.", OPTIONS, 0),
        ("Liver or lung", OPTIONS, None),
        ("E. Something", OPTIONS, None),
        ("", OPTIONS, None),
        ("答案是B", ZH_OPTIONS, 1),
        ("答案：Ｄ", ZH_OPTIONS, 3),
        ("心脏", ZH_OPTIONS, 1),
        ("选C", ZH_OPTIONS, 2),
        ("A. 肾脏", ZH_OPTIONS, 0),  # the leading letter wins over the text
    ],
)
def test_parse_choice(prediction, options, expected):
    assert ev.parse_choice(prediction, options) == expected


def test_parse_choice_no_options():
    with pytest.raises(ValueError, match="option"):
        ev.parse_choice("A", ())


# ----------------------------------------------------------------------------------------------
# QA metrics
# ----------------------------------------------------------------------------------------------


def test_qa_scores_hand_case():
    scores = ev.qa_scores("心脏在胸腔中", "心脏位于胸腔内")
    # Characters: 1-grams 4/6, 2-grams 2/5, 3-grams 0/4 -> 1/(2*4), 4-grams 0/3 -> 1/(4*3) (method3),
    # brevity penalty exp(1 - 7/6).
    bleu = math.exp(1 - 7 / 6) * (4 / 6 * 2 / 5 * 1 / 8 * 1 / 12) ** 0.25
    assert scores["bleu-4"] == round(bleu * 100, 4)
    # jieba: 心脏/在/胸腔/中 vs 心脏/位于/胸腔/内 -> 2 of 4 unigrams, no shared bigram, LCS 2.
    assert scores["rouge-1"] == 50.0
    assert scores["rouge-2"] == 0.0
    assert scores["rouge-l"] == 50.0


def test_qa_scores_identical():
    assert ev.qa_scores("the heart pumps blood", "the heart pumps blood") == {
        "bleu-4": 100.0,
        "rouge-1": 100.0,
        "rouge-2": 100.0,
        "rouge-l": 100.0,
    }


def test_qa_scores_match_libraries():
    prediction = "贫血是指红细胞数量减少的状态"
    reference = "血液中健康红细胞不足的状态。"
    import jieba

    rouge = Rouge().get_scores(" ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference)))[0]
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores = ev.qa_scores(prediction, reference)
    assert scores["bleu-4"] == round(bleu * 100, 4)
    assert scores["rouge-1"] == round(rouge["rouge-1"]["f"] * 100, 4)
    assert scores["rouge-2"] == round(rouge["rouge-2"]["f"] * 100, 4)
    assert scores["rouge-l"] == round(rouge["rouge-l"]["f"] * 100, 4)


def test_qa_scores_blank_hypothesis():
    scores = ev.qa_scores("   ", "the heart")
    assert scores["rouge-1"] == 0.0
    assert scores["rouge-l"] == 0.0


# ----------------------------------------------------------------------------------------------
# sequence_logprobs
# ----------------------------------------------------------------------------------------------


def test_sequence_logprobs_hand_case():
    # Vocabulary of 2: logits [0, log 3] give p = [1/4, 3/4].
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [0.0, 0.0]]])
    labels = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[False, True, True]])
    total, count = ev.sequence_logprobs(logits, labels, mask)
    # Token 1 (label 1) from position 0: log 3/4; token 2 (label 0) from position 1: log 1/4.
    assert total.item() == pytest.approx(math.log(3 / 4) + math.log(1 / 4), abs=1e-6)
    assert count.tolist() == [2]


def test_sequence_logprobs_matches_loop():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 6), generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    total, count = ev.sequence_logprobs(logits, labels, mask)
    logprobs = torch.log_softmax(logits, dim=-1)
    for b in range(3):
        expected = sum(logprobs[b, t - 1, labels[b, t]].item() for t in range(1, 6) if mask[b, t])
        assert total[b].item() == pytest.approx(expected, abs=1e-5)
    assert count.tolist() == [3, 5, 0]


def test_sequence_logprobs_bfloat16_in_float32():
    logits = torch.randn(1, 4, 7).bfloat16()
    total, _ = ev.sequence_logprobs(logits, torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1]]).bool())
    assert total.dtype == torch.float32


def test_sequence_logprobs_mask_at_zero():
    with pytest.raises(ValueError, match="position 0"):
        ev.sequence_logprobs(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3).bool())


def test_sequence_logprobs_shape_mismatch():
    with pytest.raises(ValueError, match="must match"):
        ev.sequence_logprobs(torch.zeros(1, 3, 5), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3).bool())


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------


def test_bootstrap_deterministic():
    values = np.random.default_rng(1).normal(size=50)
    assert ev.bootstrap_ci(values, seed=3) == ev.bootstrap_ci(values, seed=3)
    assert ev.bootstrap_ci(values, seed=3) != ev.bootstrap_ci(values, seed=4)


def test_bootstrap_constant_values():
    assert ev.bootstrap_ci([100.0] * 7) == (100.0, 100.0)


def test_bootstrap_contains_mean():
    values = np.random.default_rng(2).normal(loc=5.0, size=80)
    low, high = ev.bootstrap_ci(values)
    assert low < values.mean() < high


def test_bootstrap_coverage():
    # 95 % intervals of a Bernoulli(0.3) mean should contain 0.3 in roughly 95 % of 200 samples.
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(200):
        values = (rng.random(100) < 0.3).astype(float)
        low, high = ev.bootstrap_ci(values, n_resamples=400, seed=trial)
        hits += low <= 0.3 <= high
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        ev.bootstrap_ci([])


def test_bootstrap_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        ev.bootstrap_ci([1.0, math.nan])


def test_paired_bootstrap_shift():
    reference = np.random.default_rng(3).normal(size=40)
    result = ev.paired_bootstrap(reference + 5.0, reference)
    assert result["diff"] == pytest.approx(5.0)
    assert result["ci_low"] == pytest.approx(5.0)
    assert result["ci_high"] == pytest.approx(5.0)
    assert result["p_value"] == 0.0


def test_paired_bootstrap_identical():
    values = [0.0, 100.0, 100.0, 0.0]
    assert ev.paired_bootstrap(values, values) == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}


def test_paired_bootstrap_narrower_than_unpaired():
    rng = np.random.default_rng(4)
    reference = rng.normal(scale=10, size=100)
    candidate = reference + rng.normal(loc=1.0, scale=1.0, size=100)
    paired = ev.paired_bootstrap(candidate, reference)
    low_c, high_c = ev.bootstrap_ci(candidate)
    assert paired["ci_high"] - paired["ci_low"] < (high_c - low_c) / 3
    assert paired["ci_low"] > 0


def test_paired_bootstrap_length_mismatch():
    with pytest.raises(ValueError, match="equal-length"):
        ev.paired_bootstrap([1.0, 2.0], [1.0])


def test_paired_bootstrap_records():
    a = [{"id": "x", "acc": 100.0}, {"id": "y", "acc": 100.0}]
    b = [{"id": "y", "acc": 0.0}, {"id": "x", "acc": 100.0}]
    assert ev.paired_bootstrap_records(a, b, "acc")["diff"] == 50.0


def test_paired_bootstrap_records_unpaired():
    with pytest.raises(ValueError, match="different examples"):
        ev.paired_bootstrap_records([{"id": "x", "acc": 1.0}], [{"id": "y", "acc": 1.0}], "acc")


# ----------------------------------------------------------------------------------------------
# Letter calibration, JSONL
# ----------------------------------------------------------------------------------------------


def test_calibrate_letter_scores():
    scores = [np.array([-1.0, -3.0]), np.array([-1.0, -2.0, -5.0]), np.array([-4.0, -1.0])]
    calibrated = ev.calibrate_letter_scores(scores)
    # Means: A (-1 - 1 - 4) / 3 = -2, B (-3 - 2 - 1) / 3 = -2, C -5 (one question).
    np.testing.assert_allclose(calibrated[0], [1.0, -1.0])
    np.testing.assert_allclose(calibrated[1], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(calibrated[2], [-2.0, 1.0])


def test_jsonl_round_trip(tmp_path):
    records = [{"id": "z1", "prediction": "心脏", "score": 1.5}, {"id": "z2", "prediction": "", "score": 0.0}]
    path = ev.write_jsonl(records, tmp_path / "out" / "p.jsonl")
    assert ev.read_jsonl(path) == records
    assert "心脏" in path.read_text(encoding="utf-8")


def test_jsonl_non_finite_to_null(tmp_path):
    path = ev.write_jsonl([{"id": "a", "x": math.nan, "y": [1.0, math.inf]}], tmp_path / "p.jsonl")
    assert json.loads(path.read_text(encoding="utf-8")) == {"id": "a", "x": None, "y": [1.0, None]}


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_check_examples_empty():
    with pytest.raises(ValueError, match="no examples"):
        ev.check_examples([], default_template("en", "mcq"))


def test_check_examples_task_mismatch():
    with pytest.raises(ValueError, match="not 'qa' examples"):
        ev.check_examples(EN_MCQ, default_template("en", "qa"))


def test_check_examples_bad_answer_index():
    bad = [dataclasses.replace(EN_MCQ[0], answer_index=7)]
    with pytest.raises(ValueError, match="answer_index"):
        ev.check_examples(bad, default_template("en", "mcq"))


def test_encode_continuations_unknown_token(word_tokenizer):
    with pytest.raises(ValueError, match="unknown token") as error:
        ev.encode_continuations(word_tokenizer, ["heart", "kidney"], ["option A", "option B"])
    assert "option B" in str(error.value)
    assert "option A" not in str(error.value)


def test_encode_continuations_empty(word_tokenizer):
    with pytest.raises(ValueError, match="encodes to no tokens"):
        ev.encode_continuations(word_tokenizer, [""], ["option C"])


def test_letter_ids_unknown(word_tokenizer):
    assert ev.letter_token_ids(word_tokenizer, 2) == [8, 9]
    assert ev.letter_token_ids(word_tokenizer, 3) is None


def test_letter_ids_single_tokens(tokenizer):
    ids = ev.letter_token_ids(tokenizer, 4)
    assert [tokenizer.decode([i]) for i in ids] == ["A", "B", "C", "D"]


def test_evaluate_rejects_before_model(word_tokenizer):
    example = Example("w1", "toy", "en", "mcq", "answer", "which organ ?", "heart", ("heart", "kidney"), 0)
    with pytest.raises(ValueError, match="example w1 option B"):
        ev.evaluate_model(ForbiddenModel(), word_tokenizer, [example], default_template("en", "mcq"))


def test_letters_reject_qa(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="multiple-choice"):
        ev.letter_logprobs(tiny_model, tokenizer, ZH_QA, default_template("zh", "qa"))


def test_evaluate_invalid_continuation(tokenizer):
    with pytest.raises(ValueError, match="continuation"):
        ev.evaluate_model(
            ForbiddenModel(), tokenizer, ZH_MCQ, default_template("zh", "mcq"), option_continuation="letter"
        )


def test_evaluate_no_examples(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="no examples"):
        ev.evaluate_model(tiny_model, tokenizer, [], default_template("zh", "qa"))


def test_evaluate_invalid_method(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="invalid methods"):
        ev.evaluate_model(tiny_model, tokenizer, ZH_QA, default_template("zh", "qa"), methods=("option",))


# ----------------------------------------------------------------------------------------------
# Model passes on a tiny random Llama (padding must not change scores)
# ----------------------------------------------------------------------------------------------


def _full_sequence_logprob(model, prompt, continuation):
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logits = model(ids).logits
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(prompt) :] = True
    total, _ = ev.sequence_logprobs(logits, ids, mask)
    return total.item()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]
CONTINUATIONS = [[40, 41], [42, 43, 44, 45], [46]]


def test_score_continuations_padding(tiny_model):
    sums, counts = ev.score_continuations(tiny_model, PROMPTS, CONTINUATIONS, batch_size=3)
    for i, (prompt, continuation) in enumerate(zip(PROMPTS, CONTINUATIONS)):
        assert sums[i] == pytest.approx(_full_sequence_logprob(tiny_model, prompt, continuation), abs=1e-4)
    assert counts.tolist() == [2, 4, 1]


def test_groups_match_pairs(tiny_model):
    groups = [[[40, 41], [50]], [[42, 43, 44, 45]], [[46], [47, 48], [49, 50, 51]]]
    results = ev.score_continuation_groups(tiny_model, PROMPTS, groups, batch_size=2)
    for prompt, group, (sums, counts) in zip(PROMPTS, groups, results):
        for k, continuation in enumerate(group):
            assert sums[k] == pytest.approx(_full_sequence_logprob(tiny_model, prompt, continuation), abs=1e-4)
            assert counts[k] == len(continuation)


def test_next_token_logprobs_padding(tiny_model):
    table = ev.next_token_logprobs(tiny_model, PROMPTS, [40, 41], batch_size=3)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_model(torch.tensor([prompt])).logits[0, -1], dim=-1)
        np.testing.assert_allclose(table[i], logprobs[[40, 41]].numpy(), atol=1e-4)


def test_generate_batched_matches_single(tiny_model, tokenizer):
    batched = ev.generate_texts(tiny_model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=3)
    single = [ev.generate_texts(tiny_model, tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in PROMPTS]
    assert batched == single


def test_mcq_likelihoods_match_separate_paths(tiny_model, tokenizer):
    template = default_template("zh", "mcq")
    combined = ev.mcq_likelihoods(tiny_model, tokenizer, ZH_MCQ, template, batch_size=2)
    options = ev.option_logprobs(tiny_model, tokenizer, ZH_MCQ, template, batch_size=2)
    letters = ev.letter_logprobs(tiny_model, tokenizer, ZH_MCQ, template, batch_size=2)
    target_sums, target_counts = ev.answer_logprobs(tiny_model, tokenizer, ZH_MCQ, template, batch_size=2)
    for i in range(len(ZH_MCQ)):
        np.testing.assert_allclose(combined.options[i][0], options[i][0], atol=1e-4)
        np.testing.assert_array_equal(combined.options[i][1], options[i][1])
        np.testing.assert_allclose(combined.letters[i], letters[i], atol=1e-4)
    np.testing.assert_allclose(combined.target_sums, target_sums, atol=1e-4)
    np.testing.assert_array_equal(combined.target_counts, target_counts)


def test_score_continuations_rejects_empty(tiny_model):
    with pytest.raises(ValueError, match="at least one token"):
        ev.score_continuations(tiny_model, [[1, 2]], [[]])


# ----------------------------------------------------------------------------------------------
# evaluate_model end to end on tiny models
# ----------------------------------------------------------------------------------------------


def test_evaluate_mcq_writes_jsonl(tiny_model, tokenizer, tmp_path):
    path = tmp_path / "preds" / "tiny__zh_mcq.jsonl"
    result = ev.evaluate_model(
        tiny_model, tokenizer, ZH_MCQ, get_template("zh_mcq_expert"), max_new_tokens=4,
        predictions_path=path, model_name="tiny", n_resamples=50,
    )
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(ZH_MCQ)
    assert "B. 心脏" in lines[0]
    assert ev.read_jsonl(path) == json.loads(json.dumps(result.records))
    assert result.records[0]["model"] == "tiny"


def test_evaluate_mcq_metric_keys(tiny_model, tokenizer):
    metrics, records = ev.evaluate_model(
        tiny_model, tokenizer, ZH_MCQ, default_template("zh", "mcq"), max_new_tokens=4, n_resamples=50
    )
    for key in ev.MCQ_METRICS:
        assert key in metrics, key
        assert metrics[key] == pytest.approx(np.mean([r[key] for r in records]))
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]
    assert metrics["n"] == 2
    # Gold letters are B and B, so always answering B is right every time.
    assert metrics["acc_constant"] == 100.0


def test_evaluate_mcq_agreement(tiny_model, tokenizer):
    _, records = ev.evaluate_model(
        tiny_model, tokenizer, ZH_MCQ, default_template("zh", "mcq"), max_new_tokens=4, n_resamples=0
    )
    for record in records:
        agree = record["pred_generate"] == record["pred_option_norm"]
        assert record["agree_generate_option"] == (100.0 if agree else 0.0)


def test_evaluate_mcq_option_counts(tiny_model, tokenizer):
    _, records = ev.evaluate_model(
        tiny_model, tokenizer, ZH_MCQ, default_template("zh", "mcq"), methods=("option", "letter"), n_resamples=0
    )
    assert [len(r["option_logprob_sum"]) for r in records] == [4, 3]
    assert [len(r["letter_logprobs"]) for r in records] == [4, 3]
    assert "acc_generate" not in records[0]


def test_evaluate_empty_predictions_mcq(silent_model, tokenizer):
    metrics, records = ev.evaluate_model(
        silent_model, tokenizer, ZH_MCQ, default_template("zh", "mcq"), methods=("generate",), max_new_tokens=3,
        n_resamples=0,
    )
    assert metrics["n_empty"] == 2
    assert metrics["acc_generate"] == 0.0
    assert all(r["prediction"] == "" and r["empty"] for r in records)


def test_evaluate_empty_predictions_qa(silent_model, tokenizer):
    metrics, _ = ev.evaluate_model(
        silent_model, tokenizer, ZH_QA, default_template("zh", "qa"), max_new_tokens=3, n_resamples=0
    )
    assert metrics["n_empty"] == 2
    for key in ev.QA_METRICS:
        assert metrics[key] == 0.0, key
    assert metrics["answer_nll"] == pytest.approx(math.log(len(tokenizer)), rel=1e-4)


def test_evaluate_qa_records(tiny_model, tokenizer):
    metrics, records = ev.evaluate_model(
        tiny_model, tokenizer, ZH_QA, default_template("zh", "qa"), max_new_tokens=6, n_resamples=50
    )
    for record in records:
        if record["prediction"]:
            expected = ev.qa_scores(record["prediction"], record["target"])
            assert {k: record[k] for k in ev.QA_METRICS} == expected
    target_ids = tokenizer("血液中健康红细胞不足的状态。", add_special_tokens=False)["input_ids"]
    assert records[0]["answer_tokens"] == len(target_ids)
    assert metrics["answer_nll"] > 0


# ----------------------------------------------------------------------------------------------
# The real SmolLM2 checkpoint
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_groups_match_pairs(smollm):
    model, tokenizer = smollm
    template = default_template("en", "mcq")
    prompts = ev.encode_prompts(tokenizer, EN_MCQ, template)
    grouped = ev.option_logprobs(model, tokenizer, EN_MCQ, template, prompts=prompts)
    pair_prompts = [p for p, e in zip(prompts, EN_MCQ) for _ in e.options]
    pair_options = [tokenizer(o, add_special_tokens=False)["input_ids"] for e in EN_MCQ for o in e.options]
    sums, counts = ev.score_continuations(model, pair_prompts, pair_options, batch_size=11)
    np.testing.assert_allclose(np.concatenate([g[0] for g in grouped]), sums, atol=1e-3)
    np.testing.assert_array_equal(np.concatenate([g[1] for g in grouped]), counts)


@pytest.mark.slow
def test_real_mcq_evaluation(smollm, tmp_path):
    model, tokenizer = smollm
    path = tmp_path / "smollm2__toy.jsonl"
    metrics, records = ev.evaluate_model(
        model, tokenizer, EN_MCQ, default_template("en", "mcq"), max_new_tokens=12, predictions_path=path,
        n_resamples=100,
    )
    assert len(ev.read_jsonl(path)) == 3
    assert metrics["n_unparsed"] + metrics["n_empty"] <= 3
    # The easy temperature question: greedy decoding answers "A. 37".
    assert records[2]["prediction"].startswith("A")
    assert records[2]["acc_generate"] == 100.0
    for record in records:
        normalized = np.array(record["option_logprob_sum"]) / np.array(record["option_tokens"])
        assert record["pred_option_norm"] == int(np.argmax(normalized))
    assert 0 < metrics["answer_nll"] < 2
    letter_probs = np.exp(records[0]["letter_logprobs"])
    assert 0.5 < letter_probs.sum() <= 1.0


# ----------------------------------------------------------------------------------------------
# Template search
# ----------------------------------------------------------------------------------------------


def test_search_templates_ranks_by_metric(tiny_model, tokenizer):
    from hm_utils.prompts import search_templates, templates_for

    rows = search_templates(tiny_model, tokenizer, ZH_QA, "answer_nll", ["nll"], n_resamples=50)
    assert sorted(row["template"] for row in rows) == sorted(t.name for t in templates_for("zh", "qa"))
    values = [row["value"] for row in rows]
    assert values == sorted(values)
    assert all(row["metric"] == "answer_nll" for row in rows)
    assert all(row["n"] == 2 for row in rows)


def test_search_templates_rejects_mixed_tasks(tiny_model, tokenizer):
    from hm_utils.prompts import search_templates

    with pytest.raises(ValueError, match="mix languages"):
        search_templates(tiny_model, tokenizer, [*ZH_QA, *EN_MCQ], "answer_nll", ["nll"])


def test_search_templates_unknown_metric(tiny_model, tokenizer):
    from hm_utils.prompts import search_templates

    with pytest.raises(ValueError, match="metric 'rouge-l' is not produced"):
        search_templates(tiny_model, tokenizer, ZH_QA, "rouge-l", ["nll"], n_resamples=10)


# ----------------------------------------------------------------------------------------------
# Several tasks
# ----------------------------------------------------------------------------------------------


def test_evaluate_tasks_writes_and_reuses(tiny_model, tokenizer, tmp_path):
    tasks = {"zh_qa": ZH_QA, "en_mcq": EN_MCQ}
    templates = {"zh_qa": "zh_qa_plain", "en_mcq": default_template("en", "mcq")}
    methods = {"mcq": ["option", "nll"], "qa": ["nll"]}
    first = ev.evaluate_tasks(tiny_model, tokenizer, tasks, templates, tmp_path, model_name="tiny",
                              methods=methods, n_resamples=20)
    assert set(first) == {"zh_qa", "en_mcq"}
    assert first["en_mcq"]["n"] == 3
    assert "acc_option_norm" in first["en_mcq"]
    assert len(ev.read_jsonl(tmp_path / "zh_qa.jsonl")) == 2
    stored = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert stored["metrics"] == first

    # Same key: reused without a model pass.
    again = ev.evaluate_tasks(ForbiddenModel(), tokenizer, tasks, templates, tmp_path, model_name="tiny",
                              methods=methods, n_resamples=20)
    assert again == first


def test_evaluate_tasks_missing_template(tiny_model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"no prompt template for task\(s\) \['zh_qa'\]"):
        ev.evaluate_tasks(tiny_model, tokenizer, {"zh_qa": ZH_QA}, {}, tmp_path, model_name="tiny")

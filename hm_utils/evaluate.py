r"""Evaluation of a causal LM on instruction examples, with scoring kept separate from the model.

Tasks are data (lists of :class:`~hm_utils.data.Example` plus a
:class:`~hm_utils.prompts.PromptTemplate`). Model passes return plain arrays, and the metric
functions take strings or arrays, so they can be tested without a model.

Methods (``Method``), each giving one or more metrics:

``generate``
    Greedy decoding (``do_sample=False``), batched with left padding. For multiple choice
    (MCQ), :func:`parse_choice` reads the chosen option from the text (a leading letter, an
    "answer is X" phrase, or the option text), after :func:`normalize_answer` folds full-width
    characters, case, punctuation and whitespace. Metric ``acc_generate``; an empty or
    unparseable answer counts as wrong (``n_empty``, ``n_unparsed``). For QA: ``bleu-4``,
    ``rouge-1``, ``rouge-2``, ``rouge-l`` from :func:`qa_scores`.
``option`` (MCQ)
    No generation. For option :math:`o` with tokens :math:`o_1..o_n` after the prompt
    :math:`x`, :math:`\ell_{sum}(o) = \sum_t \log p(o_t \mid x, o_{<t})` and
    :math:`\ell_{norm}(o) = \ell_{sum}(o) / n`. The prediction is the argmax
    (``acc_option_norm``, ``acc_option_sum``), and ``agree_generate_option`` is the share of
    examples where the generated choice equals the ``option_norm`` choice. The scored text is
    the option alone (``option_continuation="text"``) or ``"B. text"`` (``"target"``).
``letter`` (MCQ)
    One forward pass per question: :math:`s_k = \log p(\text{letter}_k \mid x)` for the next
    token. ``acc_letter`` is the argmax. ``acc_letter_calibrated`` subtracts from each
    letter's score its mean over the evaluated questions,
    :math:`s_{ik} - \frac{1}{N}\sum_j s_{jk}`, which removes a constant preference for one
    letter. The calibration is fitted on the evaluated questions themselves, and its bootstrap
    interval treats the fitted means as fixed, so it is somewhat too narrow.
``nll``
    Mean token negative log-likelihood of the training target
    (:func:`hm_utils.prompts.render_target`) given the prompt, averaged over examples
    (``answer_nll``, nats per token, lower is better). The end-of-turn token is not scored.

For MCQ, :func:`evaluate_model` computes ``option``, ``letter`` and ``nll`` together in
:func:`mcq_likelihoods`, which runs each prompt through the model once and reuses its KV cache.

Every MCQ evaluation also reports ``acc_constant``: the accuracy of always answering the most
frequent gold letter, the floor that a model collapsed onto one letter reaches.

Scale: accuracies, agreement and QA scores are percentages (0-100), ``answer_nll`` is in nats.
Each per-example record stores, under the metric's own key, the example's value on the same
scale (100 or 0 for a correct or wrong answer), so every metric is the mean of its record
values, and :func:`bootstrap_ci` and :func:`paired_bootstrap` resample those values.
``metrics[key + "_ci_low"]`` and ``metrics[key + "_ci_high"]`` hold the percentile interval.

QA metrics follow LLaMA-Factory's ``ComputeSimilarity``
(``src/llamafactory/train/sft/metric.py``, read at commit 158f4cb): ROUGE-1/2/L F from ``rouge_chinese.Rouge`` on
jieba tokens joined by spaces (0 when either side has no token), BLEU-4 from
``nltk.translate.bleu_score.sentence_bleu`` on the character lists (whitespace included) with
``SmoothingFunction().method3``, each multiplied by 100 and rounded to 4 decimals per example,
then averaged.

Tokenisation: the prompt comes from the chat template (:func:`~hm_utils.prompts.render_prompt`),
and it is encoded with ``add_special_tokens=False``. A continuation (option or target) is
encoded on its own and appended, so the token boundary at the start of the answer is the same
for every option.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hm_utils.data import Example
from hm_utils.files import write_json_atomic
from hm_utils.prompts import OPTION_SEPARATOR, PromptTemplate, option_letters, render_prompt, render_target

logger = logging.getLogger(__name__)

Method = Literal["generate", "option", "letter", "nll"]
OptionContinuation = Literal["text", "target"]

DEFAULT_METHODS: dict[str, tuple[Method, ...]] = {
    "mcq": ("generate", "option", "letter", "nll"),
    "qa": ("generate", "nll"),
}
DEFAULT_MAX_NEW_TOKENS = {"mcq": 32, "qa": 128}
QA_METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


class EvalResult(NamedTuple):
    """Aggregate metrics (with ``_ci_low``/``_ci_high`` bounds) and one record per example."""

    metrics: dict[str, float]
    records: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Answer normalisation and parsing (MCQ generation)
# ---------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Fold text for matching: NFKC (full-width to half-width), casefold, drop punctuation and whitespace.

    Unicode categories P* (punctuation), Z* (separators) and C* (control, format) are removed,
    so ``"（Ｂ）　心脏。"`` and ``"(b) 心脏"`` both become ``"b心脏"``.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in folded if unicodedata.category(ch)[0] not in "PZC")


_LEADING_LETTER = re.compile(r"^[\(\[]?([A-Z])(?:[\)\]\.:,;、]|\s|$)")
# An answer phrase, then an upper-case letter that does not start a word.
_ANSWER_PHRASE = re.compile(
    r"(?:(?i:answer)\s*(?:(?i:is)|:)?|(?i:option)|答案\s*(?:是|为)?|选项?\s*(?:是|为)?)"
    r"\s*[:\(\[]?\s*([A-Z])(?![A-Za-z])"
)


def parse_choice(prediction: str, options: Sequence[str]) -> int | None:
    """Return the option index a generated answer chooses, or ``None`` when none is found.

    Rules, first match wins, after NFKC folding of full-width characters:

    1. a leading letter in range followed by a delimiter or the end (``"B"``, ``"B. 心脏"``,
       ``"(B)"``); a leading ``"A "`` followed by a lower-case word is read as the English
       article and skipped;
    2. a phrase such as ``"answer is C"``, ``"Answer: C"``, ``"答案是C"``, ``"选C"``, with an
       upper-case letter (``"the answer is a ..."`` is not read as option A);
    3. the option text: the options whose :func:`normalize_answer` form occurs in the
       normalised answer; among several, the longest wins if it contains all the others
       (``"heart failure"`` over ``"heart"``), otherwise the answer is ambiguous (``None``).

    A leading letter wins over the option text when the two disagree.
    """
    if not options:
        raise ValueError("parse_choice needs at least one option")
    text = unicodedata.normalize("NFKC", prediction).strip()
    if not text:
        return None
    letters = option_letters(len(options))

    match = _LEADING_LETTER.match(text)
    if match and match.group(1) in letters:
        is_article = match.group(1) == "A" and re.match(r"^A\s+[a-z]", text) is not None
        if not is_article:
            return letters.index(match.group(1))

    for match in _ANSWER_PHRASE.finditer(text):
        letter = match.group(1)
        if letter in letters:
            return letters.index(letter)

    normalized = normalize_answer(text)
    option_forms = [normalize_answer(option) for option in options]
    found = [i for i, form in enumerate(option_forms) if form and form in normalized]
    if len(found) == 1:
        return found[0]
    if found:
        longest = max(found, key=lambda i: len(option_forms[i]))
        if all(option_forms[i] in option_forms[longest] for i in found):
            return longest
    return None


# ---------------------------------------------------------------------------------------------
# QA metrics (LLaMA-Factory choices)
# ---------------------------------------------------------------------------------------------


def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def qa_scores(prediction: str, reference: str) -> dict[str, float]:
    """Score one generated answer against its reference as LLaMA-Factory does.

    Returns ``{"bleu-4", "rouge-1", "rouge-2", "rouge-l"}``, each x100 and rounded to 4
    decimals. ROUGE is the F score of ``rouge_chinese.Rouge().get_scores`` on jieba tokens
    joined by spaces, or 0 when either side has no non-space token. BLEU-4 is
    ``sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)``
    on characters.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba = _jieba()
    hypothesis = " ".join(jieba.cut(prediction))
    reference_tokens = " ".join(jieba.cut(reference))

    if not hypothesis.split() or not reference_tokens.split():
        rouge = {key: 0.0 for key in ("rouge-1", "rouge-2", "rouge-l")}
    else:
        scores = Rouge().get_scores(hypothesis, reference_tokens)[0]
        rouge = {key: scores[key]["f"] for key in ("rouge-1", "rouge-2", "rouge-l")}

    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)

    result = {"bleu-4": round(float(bleu) * 100, 4)}
    result.update({key: round(float(value) * 100, 4) for key, value in rouge.items()})
    return result


# ---------------------------------------------------------------------------------------------
# Log-likelihood on logits
# ---------------------------------------------------------------------------------------------


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the log-probabilities of the masked label tokens of each sequence.

    ``logits`` is ``[batch, seq, vocab]`` as a causal LM returns it for ``input_ids``: position
    ``t`` is the distribution of token ``t + 1``. ``labels`` is ``[batch, seq]``, normally the
    ``input_ids`` themselves, and ``label_mask[b, t]`` is True where token ``labels[b, t]`` is
    scored. The function shifts internally, so token ``t`` is scored with ``logits[:, t - 1]``.
    Position 0 has no prediction, and a True mask there raises ``ValueError``.

    Returns ``(sum_logprob, n_tokens)``: float32 ``[batch]`` and int64 ``[batch]``. Only the
    masked positions go through ``log_softmax`` (in float32), so memory is ``n_masked x vocab``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2] or label_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and label_mask {tuple(label_mask.shape)} must match "
            f"logits' first two dimensions {tuple(logits.shape[:2])}"
        )
    label_mask = label_mask.bool()
    if label_mask[:, 0].any():
        raise ValueError("label_mask is True at position 0, which no logit predicts; mask only tokens t >= 1")

    target_mask = label_mask[:, 1:]
    batch_index, position = target_mask.nonzero(as_tuple=True)
    selected_logits = logits[:, :-1][batch_index, position].float()
    selected_labels = labels[:, 1:][batch_index, position]
    token_logprobs = torch.log_softmax(selected_logits, dim=-1).gather(-1, selected_labels[:, None]).squeeze(-1)

    sums = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    sums.index_add_(0, batch_index, token_logprobs)
    counts = target_mask.sum(dim=1).to(torch.int64)
    return sums, counts


# ---------------------------------------------------------------------------------------------
# Tokenisation and input checks
# ---------------------------------------------------------------------------------------------


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Encode text without special tokens (the chat template already contains them)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(tokenizer: Any, examples: Sequence[Example], template: PromptTemplate) -> list[list[int]]:
    """Render and encode the chat prompt of every example."""
    prompts = [encode_text(tokenizer, render_prompt(tokenizer, example, template)) for example in examples]
    empty = [example.id for example, ids in zip(examples, prompts) if not ids]
    if empty:
        raise ValueError(f"prompt encodes to no tokens for examples {empty[:5]}; check the template and tokenizer")
    return prompts


def _unknown_token_id(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "unk_token_id", None)


def encode_continuations(tokenizer: Any, texts: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """Encode answer continuations, raising ``ValueError`` on an empty or unknown-token encoding.

    ``labels`` names each text in the error message (e.g. ``"example 17, option C"``).
    """
    unk = _unknown_token_id(tokenizer)
    encoded = [encode_text(tokenizer, text) for text in texts]
    bad = []
    for label, text, ids in zip(labels, texts, encoded):
        if not ids:
            bad.append(f"{label}: {text!r} encodes to no tokens")
        elif unk is not None and unk in ids:
            bad.append(f"{label}: {text!r} contains the unknown token {tokenizer.unk_token!r}")
    if bad:
        raise ValueError(
            f"{len(bad)} answer texts cannot be scored: {bad[:5]}; fix the text or use a tokenizer "
            "that covers it (byte-level BPE encodes any text)"
        )
    return encoded


def letter_token_ids(tokenizer: Any, n_options: int) -> list[int] | None:
    """Return the single-token ids of the letters ``A..``, or ``None`` if a letter needs several tokens."""
    ids = []
    for letter in option_letters(n_options):
        encoded = encode_text(tokenizer, letter)
        if len(encoded) != 1 or encoded[0] == _unknown_token_id(tokenizer):
            return None
        ids.append(encoded[0])
    return ids


def check_examples(examples: Sequence[Example], template: PromptTemplate) -> None:
    """Raise ``ValueError`` for an empty task, a task-type mismatch or an invalid MCQ example."""
    if len(examples) == 0:
        raise ValueError(
            f"no examples to evaluate with template {template.name!r}; check the data split and its filters"
        )
    mismatched = [e.id for e in examples if e.task_type != template.task_type]
    if mismatched:
        raise ValueError(
            f"{len(mismatched)} examples (e.g. {mismatched[:3]}) are not {template.task_type!r} examples, "
            f"which template {template.name!r} expects; evaluate each task type separately"
        )
    other_language = [e.id for e in examples if e.language != template.language]
    if other_language:
        logger.warning(
            "%d examples are not in the template's language %r (e.g. %s)",
            len(other_language),
            template.language,
            other_language[:3],
        )
    for example in examples:
        render_target(example)  # raises ValueError on missing options or a bad answer_index


# ---------------------------------------------------------------------------------------------
# Model passes
# ---------------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, width - len(sequence) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _accepts_argument(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _tail_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_tail: int
) -> torch.Tensor:
    """Return the logits of the last ``n_tail`` positions of a left-padded batch.

    Position ids count only real tokens, so a left-padded row is scored as if unpadded.
    ``logits_to_keep`` applies the output layer to the tail only; models without that argument
    compute all logits.
    """
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": n_tail} if _accepts_argument(model, "logits_to_keep") else {}
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra)
    return output.logits[:, -n_tail:]


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}; expected a positive integer")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_continuations(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(sum_logprob, n_tokens)`` of each continuation given its prompt (token ids).

    Sequences are sorted by length and left padded, and ``pad_id`` is masked out, so any id in
    the vocabulary works.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"got {len(prompts)} prompts but {len(continuations)} continuations")
    if any(len(p) == 0 for p in prompts) or any(len(c) == 0 for c in continuations):
        raise ValueError("every prompt and continuation needs at least one token")

    model.eval()
    device = _model_device(model)
    sequences = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    sums = np.zeros(len(sequences), dtype=np.float64)
    counts = np.zeros(len(sequences), dtype=np.int64)

    batches = _length_sorted_batches([len(s) for s in sequences], batch_size)
    for batch in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 4):
        input_ids, attention_mask = _left_pad([sequences[i] for i in batch], pad_id, device)
        n_tail = max(len(continuations[i]) for i in batch) + 1
        logits = _tail_logits(model, input_ids, attention_mask, n_tail)

        labels = input_ids[:, -n_tail:]
        label_mask = torch.zeros_like(labels, dtype=torch.bool)
        for row, i in enumerate(batch):
            label_mask[row, n_tail - len(continuations[i]) :] = True
        batch_sums, batch_counts = sequence_logprobs(logits, labels, label_mask)

        sums[batch] = batch_sums.double().cpu().numpy()
        counts[batch] = batch_counts.cpu().numpy()
    return sums, counts


def _cache_argument(model: torch.nn.Module) -> str:
    # transformers 5.x renamed the forward argument ``past_key_values`` to ``cache``.
    return "cache" if _accepts_argument(model, "cache") else "past_key_values"


@torch.inference_mode()
def score_continuation_groups(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    groups: Sequence[Sequence[Sequence[int]]],
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "options",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Score several continuations of each prompt, running each prompt through the model once.

    ``groups[i]`` contains the token ids of prompt ``i``'s continuations (e.g. its options).
    Returns, per prompt, ``(sum_logprob, n_tokens)`` arrays over its continuations, equal to
    :func:`score_continuations` on each pair up to float rounding. A batch of ``batch_size``
    prompts is encoded with the KV cache kept. The first token of every continuation is scored
    with the prompt's last logits, so single-token continuations (letters) cost nothing more.
    Longer continuations run in one second pass: the cache rows are repeated once per
    continuation, and the continuations minus their last token are fed right padded. That
    pass keeps ``rows x width x vocab`` logits, so lower ``batch_size`` for long options.
    """
    if len(prompts) != len(groups):
        raise ValueError(f"got {len(prompts)} prompts but {len(groups)} continuation groups")
    if any(len(p) == 0 for p in prompts) or any(len(g) == 0 or any(len(c) == 0 for c in g) for g in groups):
        raise ValueError("every prompt, group and continuation needs at least one token")

    model.eval()
    device = _model_device(model)
    results: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0, dtype=np.int64))] * len(prompts)

    batches = _length_sorted_batches([len(p) for p in prompts], batch_size)
    for batch in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 4):
        # Pass 1: the prompts, keeping the KV cache and the last position's logits.
        prompt_ids, prompt_mask = _left_pad([prompts[i] for i in batch], pad_id, device)
        position_ids = (prompt_mask.cumsum(dim=-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if _accepts_argument(model, "logits_to_keep") else {}
        output = model(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids, use_cache=True, **extra
        )
        cache = output.cache if getattr(output, "cache", None) is not None else output.past_key_values

        # Every continuation's first token is scored with its prompt's last logits.
        rows = [(row, c) for row, i in enumerate(batch) for c in range(len(groups[i]))]
        continuations = [groups[batch[row]][c] for row, c in rows]
        owner = torch.tensor([row for row, _ in rows], dtype=torch.long, device=device)
        first_tokens = torch.tensor([c[0] for c in continuations], dtype=torch.long, device=device)
        last_logprobs = torch.log_softmax(output.logits[:, -1].float(), dim=-1)
        sums = last_logprobs[owner, first_tokens].double()

        # Pass 2: continuations of two or more tokens feed all but their last token, right padded,
        # against their prompt's cache. Input position k predicts continuation token k + 1.
        long_rows = [r for r, c in enumerate(continuations) if len(c) > 1]
        if long_rows:
            width = max(len(continuations[r]) for r in long_rows) - 1
            input_ids = torch.full((len(long_rows), width), pad_id, dtype=torch.long)
            next_ids = torch.full((len(long_rows), width), pad_id, dtype=torch.long)
            input_mask = torch.zeros((len(long_rows), width), dtype=torch.long)
            for j, r in enumerate(long_rows):
                tokens = torch.tensor(continuations[r], dtype=torch.long)
                input_ids[j, : len(tokens) - 1] = tokens[:-1]
                next_ids[j, : len(tokens) - 1] = tokens[1:]
                input_mask[j, : len(tokens) - 1] = 1
            input_ids, next_ids, input_mask = input_ids.to(device), next_ids.to(device), input_mask.to(device)

            long_owner = owner[torch.tensor(long_rows, dtype=torch.long, device=device)]
            cache.batch_select_indices(long_owner)
            prompt_lengths = prompt_mask.sum(dim=-1)[long_owner]
            output = model(
                input_ids=input_ids,
                attention_mask=torch.cat([prompt_mask[long_owner], input_mask], dim=1),
                position_ids=prompt_lengths[:, None] + torch.arange(width, device=device)[None, :],
                use_cache=True,
                **{_cache_argument(model): cache},
            )

            scored = input_mask.bool()
            row_index = scored.nonzero(as_tuple=True)[0]
            logprobs = torch.log_softmax(output.logits[scored].float(), dim=-1)
            token_logprobs = logprobs.gather(-1, next_ids[scored][:, None]).squeeze(-1)
            extra = torch.zeros(len(long_rows), dtype=torch.float64, device=device)
            extra.index_add_(0, row_index, token_logprobs.double())
            sums[torch.tensor(long_rows, dtype=torch.long, device=device)] += extra

        sums_np = sums.cpu().numpy()
        counts_np = np.array([len(c) for c in continuations], dtype=np.int64)
        for row, i in enumerate(batch):
            selected = [r for r, (owner_row, _) in enumerate(rows) if owner_row == row]
            results[i] = (sums_np[selected], counts_np[selected])
    return results


@torch.inference_mode()
def next_token_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    token_ids: Sequence[int],
    batch_size: int = 8,
    pad_id: int = 0,
) -> np.ndarray:
    """Return ``[n_prompts, len(token_ids)]`` log-probabilities of candidate next tokens."""
    model.eval()
    device = _model_device(model)
    candidates = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    result = np.zeros((len(prompts), len(token_ids)), dtype=np.float64)

    batches = _length_sorted_batches([len(p) for p in prompts], batch_size)
    for batch in tqdm(batches, desc="letters", leave=False, disable=len(batches) < 4):
        input_ids, attention_mask = _left_pad([prompts[i] for i in batch], pad_id, device)
        logits = _tail_logits(model, input_ids, attention_mask, 1)[:, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)[:, candidates]
        result[batch] = logprobs.double().cpu().numpy()
    return result


def _pad_token_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")
    return int(pad)


@torch.inference_mode()
def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedily decode an answer for each encoded prompt (left padding, special tokens skipped, stripped)."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"invalid max_new_tokens {max_new_tokens}; expected >= 1")
    model.eval()
    device = _model_device(model)
    pad_id = _pad_token_id(tokenizer)
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos
    )

    texts = [""] * len(prompts)
    batches = _length_sorted_batches([len(p) for p in prompts], batch_size)
    for batch in tqdm(batches, desc="generating", leave=False, disable=len(batches) < 4):
        input_ids, attention_mask = _left_pad([prompts[i] for i in batch], pad_id, device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        new_tokens = output[:, input_ids.shape[1] :]
        for row, i in enumerate(batch):
            texts[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
    return texts


# ---------------------------------------------------------------------------------------------
# Fast likelihood paths over examples
# ---------------------------------------------------------------------------------------------


def answer_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    template: PromptTemplate,
    batch_size: int = 8,
    prompts: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(sum_logprob, n_tokens)`` of each example's target (:func:`render_target`) given its prompt.

    ``-sum / n`` is the example's mean token NLL. Pass ``prompts`` to reuse encoded prompts.
    """
    check_examples(examples, template)
    if prompts is None:
        prompts = encode_prompts(tokenizer, examples, template)
    targets = encode_continuations(
        tokenizer, [render_target(e) for e in examples], [f"example {e.id} target" for e in examples]
    )
    return score_continuations(model, prompts, targets, batch_size, _pad_token_id(tokenizer), desc="answer nll")


def _check_mcq(template: PromptTemplate, continuation: OptionContinuation = "text") -> None:
    if template.task_type != "mcq":
        raise ValueError(
            f"option and letter scoring need multiple-choice examples, but template {template.name!r} is for 'qa'"
        )
    if continuation not in ("text", "target"):
        raise ValueError(f"invalid continuation {continuation!r}; use 'text' or 'target'")


def _option_texts(example: Example, continuation: OptionContinuation) -> list[str]:
    """Return the scored text of each option: the option alone, or ``"B. text"``."""
    letters = option_letters(len(example.options))
    if continuation == "text":
        return list(example.options)
    return [f"{letter}{OPTION_SEPARATOR}{option}" for letter, option in zip(letters, example.options)]


def option_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    template: PromptTemplate,
    continuation: OptionContinuation = "text",
    batch_size: int = 8,
    prompts: Sequence[Sequence[int]] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return, per MCQ example, ``(sum_logprob, n_tokens)`` arrays over its options.

    ``continuation="text"`` scores the option text alone, ``"target"`` scores ``"B. text"``
    (the training target format). Each prompt runs through the model once
    (:func:`score_continuation_groups`).
    """
    check_examples(examples, template)
    _check_mcq(template, continuation)
    if prompts is None:
        prompts = encode_prompts(tokenizer, examples, template)

    texts, labels, sizes = [], [], []
    for example in examples:
        texts.extend(_option_texts(example, continuation))
        labels.extend(f"example {example.id} option {letter}" for letter in option_letters(len(example.options)))
        sizes.append(len(example.options))
    encoded = encode_continuations(tokenizer, texts, labels)
    groups = _split(encoded, sizes)
    return score_continuation_groups(model, prompts, groups, batch_size, _pad_token_id(tokenizer), desc="options")


def _split(items: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    offsets = np.cumsum([0, *sizes])
    return [list(items[offsets[i] : offsets[i + 1]]) for i in range(len(sizes))]


def letter_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    template: PromptTemplate,
    batch_size: int = 8,
    prompts: Sequence[Sequence[int]] | None = None,
) -> list[np.ndarray]:
    """Return, per MCQ example, the log-probability of each option letter as the answer's first token.

    Uses one forward pass per question when every letter is a single token, otherwise scores
    each letter as a continuation.
    """
    check_examples(examples, template)
    _check_mcq(template)
    if prompts is None:
        prompts = encode_prompts(tokenizer, examples, template)
    max_options = max(len(e.options) for e in examples)
    pad_id = _pad_token_id(tokenizer)

    token_ids = letter_token_ids(tokenizer, max_options)
    if token_ids is not None:
        table = next_token_logprobs(model, prompts, token_ids, batch_size, pad_id)
        return [table[i, : len(e.options)] for i, e in enumerate(examples)]

    logger.info("option letters are not single tokens; scoring them as continuations")
    letters = [option_letters(len(e.options)) for e in examples]
    flat = [letter for group in letters for letter in group]
    encoded = encode_continuations(tokenizer, flat, [f"letter {letter}" for letter in flat])
    groups = _split(encoded, [len(group) for group in letters])
    scored = score_continuation_groups(model, prompts, groups, batch_size, pad_id, desc="letters")
    return [sums for sums, _ in scored]


class MCQLikelihoods(NamedTuple):
    """Per-example results of :func:`mcq_likelihoods`."""

    options: list[tuple[np.ndarray, np.ndarray]]
    letters: list[np.ndarray]
    target_sums: np.ndarray
    target_counts: np.ndarray


def _encode_mcq_groups(
    tokenizer: Any, examples: Sequence[Example], continuation: OptionContinuation
) -> list[list[list[int]]]:
    """Encode, per example, its options, then its letters, then its target (raises on bad encodings)."""
    texts, labels, sizes = [], [], []
    for example in examples:
        letters = option_letters(len(example.options))
        texts.extend(_option_texts(example, continuation))
        labels.extend(f"example {example.id} option {letter}" for letter in letters)
        texts.extend(letters)
        labels.extend(f"example {example.id} letter {letter}" for letter in letters)
        texts.append(render_target(example))
        labels.append(f"example {example.id} target")
        sizes.append(2 * len(example.options) + 1)
    return _split(encode_continuations(tokenizer, texts, labels), sizes)


def mcq_likelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    template: PromptTemplate,
    continuation: OptionContinuation = "text",
    batch_size: int = 8,
    prompts: Sequence[Sequence[int]] | None = None,
    groups: Sequence[Sequence[Sequence[int]]] | None = None,
) -> MCQLikelihoods:
    """Score options, letters and the target of every MCQ example with one prompt pass each.

    Equivalent to :func:`option_logprobs`, :func:`letter_logprobs` and :func:`answer_logprobs`
    together, but each prompt goes through the model once instead of three times. ``groups``
    takes encodings already made by the caller.
    """
    check_examples(examples, template)
    _check_mcq(template, continuation)
    if prompts is None:
        prompts = encode_prompts(tokenizer, examples, template)
    if groups is None:
        groups = _encode_mcq_groups(tokenizer, examples, continuation)

    scored = score_continuation_groups(model, prompts, groups, batch_size, _pad_token_id(tokenizer), desc="likelihoods")
    options, letters, target_sums, target_counts = [], [], [], []
    for example, (sums, counts) in zip(examples, scored):
        n = len(example.options)
        options.append((sums[:n], counts[:n]))
        letters.append(sums[n : 2 * n])
        target_sums.append(sums[2 * n])
        target_counts.append(counts[2 * n])
    return MCQLikelihoods(options, letters, np.asarray(target_sums), np.asarray(target_counts))


def calibrate_letter_scores(scores: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Subtract from each letter's log-probability its mean over the questions that have that letter."""
    max_options = max(len(s) for s in scores)
    means = np.zeros(max_options)
    for k in range(max_options):
        means[k] = np.mean([s[k] for s in scores if len(s) > k])
    return [np.asarray(s) - means[: len(s)] for s in scores]


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------


def _resampled_means(values: np.ndarray, n_resamples: int, seed: int, chunk: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        index = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[index].mean(axis=1)
    return means


def _check_bootstrap_args(n: int, n_resamples: int, confidence: float) -> None:
    if n == 0:
        raise ValueError("cannot bootstrap an empty set of values")
    if n_resamples < 1:
        raise ValueError(f"invalid n_resamples {n_resamples}; expected >= 1")
    if not 0 < confidence < 1:
        raise ValueError(f"invalid confidence {confidence}; expected a value in (0, 1), e.g. 0.95")


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (examples resampled with replacement, fixed seed)."""
    array = np.asarray(values, dtype=np.float64)
    _check_bootstrap_args(len(array), n_resamples, confidence)
    if not np.isfinite(array).all():
        raise ValueError("bootstrap values contain NaN or inf")
    means = _resampled_means(array, n_resamples, seed)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_bootstrap(
    candidate: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of ``mean(candidate) - mean(reference)`` over the same examples.

    Both arrays are resampled with the same indices. Returns ``diff``, ``ci_low``, ``ci_high``
    (percentile interval) and ``p_value``: twice the smaller share of resampled differences on
    either side of 0, capped at 1.
    """
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs equal-length score arrays, got {a.shape} and {b.shape}")
    differences = a - b
    _check_bootstrap_args(len(differences), n_resamples, confidence)
    if not np.isfinite(differences).all():
        raise ValueError("paired bootstrap values contain NaN or inf")

    means = _resampled_means(differences, n_resamples, seed)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    p_value = min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0)))
    return {"diff": float(differences.mean()), "ci_low": float(low), "ci_high": float(high), "p_value": float(p_value)}


def paired_bootstrap_records(
    candidate_records: Iterable[dict[str, Any]],
    reference_records: Iterable[dict[str, Any]],
    key: str,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Pair two models' per-example records by ``id`` and run :func:`paired_bootstrap` on ``key``.

    Both record sets must cover the same example ids and carry a number under ``key``.
    """
    candidate = {r["id"]: r for r in candidate_records}
    reference = {r["id"]: r for r in reference_records}
    if set(candidate) != set(reference):
        only = sorted(set(candidate) ^ set(reference))
        raise ValueError(f"record sets cover different examples ({len(only)} unpaired, e.g. {only[:3]})")
    ids = sorted(candidate)
    missing = [i for i in ids if candidate[i].get(key) is None or reference[i].get(key) is None]
    if missing:
        raise ValueError(f"metric {key!r} is missing for examples {missing[:3]}; evaluate both models with it")
    return paired_bootstrap(
        [candidate[i][key] for i in ids], [reference[i][key] for i in ids], n_resamples, confidence, seed
    )


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as UTF-8 JSON lines (``ensure_ascii=False``) atomically; NaN/inf become ``null``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(_finite_or_none(record), ensure_ascii=False, allow_nan=False))
                handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file written by :func:`write_jsonl`."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------------------------
# evaluate_model
# ---------------------------------------------------------------------------------------------


def _check_methods(methods: Sequence[str], task_type: str) -> tuple[Method, ...]:
    allowed = {"mcq": {"generate", "option", "letter", "nll"}, "qa": {"generate", "nll"}}[task_type]
    invalid = [m for m in methods if m not in allowed]
    if invalid or not methods:
        raise ValueError(f"invalid methods {list(methods)} for {task_type!r} tasks; choose from {sorted(allowed)}")
    return tuple(methods)  # type: ignore[return-value]


def _base_record(example: Example, template: PromptTemplate, model_name: str | None) -> dict[str, Any]:
    record = {
        "id": example.id,
        "dataset": example.dataset,
        "language": example.language,
        "task_type": example.task_type,
        "template": template.name,
        "target": render_target(example),
    }
    if model_name is not None:
        record["model"] = model_name
    if example.task_type == "mcq":
        record["gold_index"] = example.answer_index
    return record


def _score_mcq(
    records: list[dict[str, Any]],
    examples: Sequence[Example],
    texts: list[str] | None,
    options: list[tuple[np.ndarray, np.ndarray]] | None,
    letters: list[np.ndarray] | None,
) -> dict[str, float]:
    """Fill MCQ per-example fields and return the counts (``n_empty``, ``n_unparsed``)."""
    counts: dict[str, float] = {}
    gold = [e.answer_index for e in examples]

    gold_letters = Counter(gold)
    constant_index, _ = max(gold_letters.items(), key=lambda item: (item[1], -item[0]))
    for record, g in zip(records, gold):
        record["acc_constant"] = 100.0 if g == constant_index else 0.0
    logger.info("constant-answer baseline: always option %s", option_letters(constant_index + 1)[-1])

    if texts is not None:
        n_empty = n_unparsed = 0
        for record, example, text in zip(records, examples, texts):
            choice = parse_choice(text, example.options) if text else None
            n_empty += not text
            n_unparsed += bool(text) and choice is None
            record.update(prediction=text, empty=not text, pred_generate=choice)
            record["acc_generate"] = 100.0 if choice == example.answer_index else 0.0
        counts.update(n_empty=float(n_empty), n_unparsed=float(n_unparsed))

    if options is not None:
        for record, example, (sums, token_counts) in zip(records, examples, options):
            norm = sums / token_counts
            record.update(option_logprob_sum=sums.tolist(), option_tokens=token_counts.tolist())
            record["pred_option_norm"] = int(np.argmax(norm))
            record["pred_option_sum"] = int(np.argmax(sums))
            record["acc_option_norm"] = 100.0 if record["pred_option_norm"] == example.answer_index else 0.0
            record["acc_option_sum"] = 100.0 if record["pred_option_sum"] == example.answer_index else 0.0
        if texts is not None:
            for record in records:
                agree = record["pred_generate"] == record["pred_option_norm"]
                record["agree_generate_option"] = 100.0 if agree else 0.0

    if letters is not None:
        calibrated = calibrate_letter_scores(letters)
        for record, example, raw, adjusted in zip(records, examples, letters, calibrated):
            record["letter_logprobs"] = np.asarray(raw).tolist()
            record["pred_letter"] = int(np.argmax(raw))
            record["pred_letter_calibrated"] = int(np.argmax(adjusted))
            record["acc_letter"] = 100.0 if record["pred_letter"] == example.answer_index else 0.0
            record["acc_letter_calibrated"] = 100.0 if record["pred_letter_calibrated"] == example.answer_index else 0.0
    return counts


def _score_qa(records: list[dict[str, Any]], examples: Sequence[Example], texts: list[str]) -> dict[str, float]:
    n_empty = 0
    for record, example, text in zip(records, examples, texts):
        if text:
            scores = qa_scores(text, example.output)
        else:
            scores = {key: 0.0 for key in QA_METRICS}
            n_empty += 1
        record.update(prediction=text, empty=not text, **scores)
    return {"n_empty": float(n_empty)}


def summarize_records(
    records: Sequence[dict[str, Any]],
    keys: Sequence[str],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Average each per-example metric in ``keys`` and add its bootstrap interval.

    Returns ``{key, key_ci_low, key_ci_high}`` for every key present in all records.
    """
    metrics: dict[str, float] = {}
    for key in keys:
        if not all(key in r and r[key] is not None for r in records):
            continue
        values = np.asarray([r[key] for r in records], dtype=np.float64)
        metrics[key] = float(values.mean())
        if n_resamples > 0:
            metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = bootstrap_ci(values, n_resamples, confidence, seed)
    return metrics


MCQ_METRICS = (
    "acc_generate",
    "acc_option_norm",
    "acc_option_sum",
    "agree_generate_option",
    "acc_letter",
    "acc_letter_calibrated",
    "acc_constant",
    "answer_nll",
)


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    template: PromptTemplate,
    *,
    methods: Sequence[Method] | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    option_continuation: OptionContinuation = "text",
    predictions_path: str | Path | None = None,
    model_name: str | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> EvalResult:
    """Evaluate one model on one task and return its metrics and per-example records.

    ``methods`` defaults to ``("generate", "option", "letter", "nll")`` for MCQ and
    ``("generate", "nll")`` for QA; ``max_new_tokens`` defaults to 32 (MCQ) or 128 (QA).
    Metrics are listed in the module docstring, plus ``n`` and, after generation,
    ``n_empty`` (and ``n_unparsed`` for MCQ). ``n_resamples=0`` skips the bootstrap
    intervals. When ``predictions_path`` is given, the records are written there as JSONL.
    All input checks run before the first forward pass.
    """
    check_examples(examples, template)
    task_type = template.task_type
    methods = _check_methods(methods if methods is not None else DEFAULT_METHODS[task_type], task_type)
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS[task_type]
    prompts = encode_prompts(tokenizer, examples, template)

    # Encode every answer text before any model pass, so tokenizer problems surface early.
    likelihood_methods = {"option", "letter", "nll"} & set(methods)
    groups = targets = None
    if task_type == "mcq" and likelihood_methods:
        _check_mcq(template, option_continuation)
        groups = _encode_mcq_groups(tokenizer, examples, option_continuation)
    elif task_type == "qa" and likelihood_methods:
        targets = encode_continuations(
            tokenizer, [render_target(e) for e in examples], [f"example {e.id} target" for e in examples]
        )
    logger.info("evaluating %d %s examples with %s, methods %s", len(examples), task_type, template.name, methods)

    records = [_base_record(e, template, model_name) for e in examples]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size) if "generate" in methods else None

    counts: dict[str, float] = {"n": float(len(examples))}
    target_sums = target_counts = None
    if task_type == "mcq":
        options = letters = None
        if groups is not None:
            scores = mcq_likelihoods(
                model, tokenizer, examples, template, option_continuation, batch_size, prompts, groups
            )
            options = scores.options if "option" in methods else None
            letters = scores.letters if "letter" in methods else None
            target_sums, target_counts = scores.target_sums, scores.target_counts
        counts.update(_score_mcq(records, examples, texts, options, letters))
        keys = MCQ_METRICS
    else:
        if texts is not None:
            counts.update(_score_qa(records, examples, texts))
        if targets is not None:
            target_sums, target_counts = score_continuations(
                model, prompts, targets, batch_size, _pad_token_id(tokenizer), desc="answer nll"
            )
        keys = QA_METRICS + ("answer_nll",)

    if "nll" in methods:
        for record, total, count in zip(records, target_sums, target_counts):
            record["answer_logprob_sum"] = float(total)
            record["answer_tokens"] = int(count)
            record["answer_nll"] = float(-total / count)

    metrics = summarize_records(records, keys, n_resamples, confidence, seed)
    metrics.update(counts)
    if counts.get("n_empty"):
        logger.warning("%d of %d generated answers are empty (scored as wrong/zero)", counts["n_empty"], len(examples))

    if predictions_path is not None:
        write_jsonl(records, predictions_path)
        logger.info("wrote %d predictions to %s", len(records), predictions_path)
    return EvalResult(metrics, records)


# ---------------------------------------------------------------------------------------------
# Several tasks, one model
# ---------------------------------------------------------------------------------------------

DEFAULT_TASK_METHODS: dict[str, tuple[str, ...]] = {"mcq": ("generate", "option", "letter", "nll"), "qa": ("generate", "nll")}
METRICS_FILE = "metrics.json"


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: dict[str, Sequence[Example]],
    templates: dict[str, PromptTemplate | str],
    out_dir: str | Path,
    *,
    model_name: str,
    methods: dict[str, Sequence[str]] | None = None,
    batch_size: int = 8,
    max_new_tokens: dict[str, int] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Evaluate one model on every task and write ``out_dir/metrics.json`` and ``out_dir/<task>.jsonl``.

    ``tasks`` maps a task name to its examples and ``templates`` a task name to its prompt
    template or registered template name. ``methods`` and ``max_new_tokens`` are keyed by
    task type ("mcq", "qa"). When ``metrics.json`` already contains the same model name, tasks,
    example ids, templates and methods, it is returned without running the model, so a
    resumed run does not evaluate twice. Returns ``{task: metrics}``.
    """
    from hm_utils.prompts import get_template

    out_dir = Path(out_dir)
    methods = {**DEFAULT_TASK_METHODS, **(methods or {})}
    missing = sorted(set(tasks) - set(templates))
    if missing:
        raise ValueError(f"no prompt template for task(s) {missing}; the template choice covers {sorted(templates)}")
    resolved = {task: get_template(t) if isinstance(t, str) else t for task, t in templates.items() if task in tasks}
    key = {
        "model": model_name,
        "tasks": {task: [example.id for example in examples] for task, examples in tasks.items()},
        "templates": {task: template.name for task, template in resolved.items()},
        "methods": {kind: list(value) for kind, value in methods.items()},
        "max_new_tokens": max_new_tokens,
        "n_resamples": n_resamples,
        "seed": seed,
    }
    metrics_path = out_dir / METRICS_FILE
    if metrics_path.is_file():
        stored = json.loads(metrics_path.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            logger.info("reusing %s", metrics_path)
            return stored["metrics"]

    results = {}
    for task, examples in tasks.items():
        task_type = examples[0].task_type if examples else "qa"
        tokens = (max_new_tokens or {}).get(task_type)
        result = evaluate_model(
            model, tokenizer, examples, resolved[task], methods=list(methods[task_type]), batch_size=batch_size,
            max_new_tokens=tokens, predictions_path=out_dir / f"{task}.jsonl", model_name=model_name,
            n_resamples=n_resamples, seed=seed,
        )
        results[task] = result.metrics
    _write_json_file(metrics_path, {"key": key, "metrics": results})
    return results


def _write_json_file(path: Path, payload: Any) -> None:
    # Non-finite metrics become null, because JSON has no NaN and readers must not meet one.
    write_json_atomic(path, _finite_or_none(payload))

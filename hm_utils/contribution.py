r"""Layer-wise contribution analysis: how much each decoder layer's delta helps each task.

Notation: base weights :math:`\theta_F`, specialist deltas :math:`\delta_m = \theta_m - \theta_F`,
merged delta :math:`\Delta` (merged model :math:`\theta_G = \theta_F + \Delta`), decoder layers
:math:`l = 0..L-1`, and :math:`\mathrm{score}_m` the validation score of task :math:`m`. For an
analysed delta :math:`D` (either :math:`\delta_m` or :math:`\Delta`) and the part :math:`R_l` of it
that "layer :math:`l`'s delta" means (:math:`R_l = D_l` by default):

.. math::

    \alpha_m^l &= \mathrm{score}_m(\theta_F + D) - \mathrm{score}_m(\theta_F + D - R_l)
        && \text{(deletion impact)} \\
    \beta_m^l  &= \mathrm{score}_m(\theta_F + R_l) - \mathrm{score}_m(\theta_F)
        && \text{(addition impact)} \\
    c_m^l      &= \alpha_m^l + \beta_m^l

where :math:`D_l` and :math:`R_l` are zero outside the tensors of layer :math:`l`. The
contribution on the specialist :math:`c_{mm}^l` uses :math:`D = \delta_m`, the contribution on
the merge :math:`c_{mG}^l` uses :math:`D = \Delta`. The conflict of task :math:`m` at layer
:math:`l` is :math:`\gamma_m^l = c_{mm}^l - c_{mG}^l` (positive: layer :math:`l` helps task
:math:`m` less after merging), and layers are ranked by :math:`\Gamma^l = \sum_m \gamma_m^l`,
largest first (:func:`rank_layers`).

Decisions (the method description leaves them open):

- **Deletion on the merge** (``MergeDeletion``). ``"merged_delta"`` (default): removing layer
  :math:`l`'s delta from the merge sets layer :math:`l` back to :math:`\theta_F`, and the
  addition probe is :math:`\theta_F + \Delta_l`. The probes are then the same for every task.
  ``"own_share"``: :math:`R_l` is task :math:`m`'s share of :math:`\Delta_l`, the entries of
  its pruned and scaled delta that survive sign election (``hm_utils.himerging.merged_shares``).
- **Score** (``ScoreKind``), computed from forward passes only, never by generation.
  ``"answer_logprob"`` (default, QA and multiple choice): the mean over examples of the mean
  token log-likelihood of the gold target (``hm_utils.prompts.render_target``) given the
  prompt, in nats per token, higher is better. It equals minus ``answer_nll`` of
  ``hm_utils.evaluate``. ``"option_accuracy"`` (multiple choice only): the accuracy in percent
  of the option whose text has the highest mean token log-likelihood (``acc_option_norm`` of
  ``hm_utils.evaluate``). BLEU and ROUGE need generation and are not used here.
- **Split**: pass validation examples only. The functions cannot tell a split from its
  examples, so :func:`check_validation_sets` only checks that every task has a non-empty set.

Speed. A probe changes one layer, so the hidden states entering layers :math:`0..l` are those
of the unchanged model. One forward pass of the analysed model (for deletion probes) and one of
the base (for addition probes) store the input of every probed layer. Forward pre-hooks also
record the exact arguments of every decoder layer call (attention masks, rotary embeddings).
Probing layer :math:`l` then swaps layer :math:`l`'s weights in place
(``hm_utils.merge.apply_delta_``), replays layers :math:`l..L-1` with the stored arguments, and
applies the final norm and the output layer, the latter at the answer positions only, exactly
as the model's own forward does with ``logits_to_keep``. The layers receive the same tensors as
in a full forward pass, so on the same device and thread count the scores equal those of a
full forward bit for bit. Nothing is written to disk.

Cache memory: the probed layers' inputs, ``rows x sequence x hidden`` values per probed layer
and task (for option accuracy a row is an example-option pair). The cache of one analysed model
(all its tasks) is held at a time, and the base cache of all tasks during the addition probes,
which serve every analysed model of a call from one base pass.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from hm_utils.data import Example
from hm_utils.files import write_json_atomic, write_text_atomic
from hm_utils.evaluate import encode_continuations, encode_prompts, sequence_logprobs
from hm_utils.merge.params import decoder_layer_of
from hm_utils.merge.task_vectors import TaskVectors, apply_delta_
from hm_utils.prompts import PromptTemplate, render_target

logger = logging.getLogger(__name__)

ScoreKind = Literal["answer_logprob", "option_accuracy"]
MergeDeletion = Literal["merged_delta", "own_share"]
SCORE_KINDS: tuple[str, ...] = ("answer_logprob", "option_accuracy")
MERGE_DELETIONS: tuple[str, ...] = ("merged_delta", "own_share")

# config.json keys that must agree between a base model and its fine-tuned specialists.
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)
FINETUNE_RECORD = "hm_finetune.json"


# ---------------------------------------------------------------------------------------------
# Input checks (cheap, run before any sweep)
# ---------------------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a transformers model folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    text_config = config.get("text_config")
    return {**config, **text_config} if isinstance(text_config, dict) else config


def _recorded_base_sha256(folder: Path) -> str | None:
    path = folder / FINETUNE_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    key = record.get("key") or {}
    base = record.get("base_model") or {}
    return key.get("base_model_sha256") or (base.get("sha256") if isinstance(base, dict) else None)


def check_specialists(
    base: str | Path,
    specialists: Mapping[str, str | Path] | Sequence[str | Path],
    base_reference: str | Path | None = None,
) -> None:
    """Raise ``ValueError`` unless every specialist folder was fine-tuned from the base folder.

    The checks run cheapest first. They compare the decoder layer count
    (``num_hidden_layers``), the other architecture keys of ``config.json``
    (``ARCHITECTURE_KEYS``) and the tensor names and shapes in the safetensors headers. Where a
    specialist folder has a fine-tuning record (``hm_finetune.json``), the recorded sha256 of its
    base must equal the fingerprint of ``base_reference`` (default ``base``), computed by
    ``hm_utils.finetune.fingerprint_model``. Pass the hub id as ``base_reference`` when ``base``
    is its local snapshot folder, because the fingerprint of a hub id is not that of a folder.
    Raises ``FileNotFoundError`` for a folder without ``config.json``. No tensor data is read,
    apart from hashing the base files when a specialist has a record.
    """
    from hm_utils.merge.io import safetensors_index

    base = Path(base)
    items = list(specialists.items()) if isinstance(specialists, Mapping) else [(str(p), p) for p in specialists]
    if not items:
        raise ValueError("no specialists given; pass at least one fine-tuned model folder")
    base_config = _read_config(base)

    for name, folder in items:
        config = _read_config(Path(folder))
        base_layers, layers = base_config.get("num_hidden_layers"), config.get("num_hidden_layers")
        if base_layers != layers:
            raise ValueError(
                f"specialist {name} has {layers} decoder layers, the base {base} has {base_layers};"
                " every specialist must be fine-tuned from the same base model"
            )
        differing = {
            key: (config.get(key), base_config.get(key))
            for key in ARCHITECTURE_KEYS
            if config.get(key) != base_config.get(key)
        }
        if differing:
            raise ValueError(
                f"specialist {name} does not share the architecture of the base {base}:"
                f" (specialist, base) values {differing}; merge only models fine-tuned from that base"
            )

    try:
        base_index = safetensors_index(base)
    except ValueError as error:
        logger.warning("tensor shapes not checked: %s", error)
        base_index = None
    if base_index is not None:
        for name, folder in items:
            try:
                index = safetensors_index(folder)
            except ValueError as error:
                logger.warning("tensor shapes of specialist %s not checked: %s", name, error)
                continue
            missing = sorted(base_index.keys() - index.keys())
            extra = sorted(index.keys() - base_index.keys())
            if missing or extra:
                raise ValueError(
                    f"specialist {name} has other tensors than the base {base}: missing {missing[:5]},"
                    f" extra {extra[:5]}; merge only models fine-tuned from that base"
                )
            shapes = [
                (tensor, index[tensor].shape, info.shape)
                for tensor, info in base_index.items()
                if index[tensor].shape != info.shape
            ]
            if shapes:
                raise ValueError(
                    f"specialist {name} has tensors of other shapes than the base {base}"
                    f" (name, specialist, base): {shapes[:3]}; merge only models fine-tuned from that base"
                )

    recorded = [(name, _recorded_base_sha256(Path(folder))) for name, folder in items]
    if any(sha for _, sha in recorded):
        from hm_utils.finetune import fingerprint_model

        base_sha = fingerprint_model(base if base_reference is None else base_reference)["sha256"]
        for name, sha in recorded:
            if sha is not None and sha != base_sha:
                raise ValueError(
                    f"specialist {name} records base model sha256 {sha}, but {base} has {base_sha};"
                    " it was fine-tuned from another base (or the base files changed)"
                )


def check_validation_sets(validation: Mapping[str, Sequence[Example] | None], tasks: Sequence[str]) -> None:
    """Raise ``ValueError`` when a task has no validation examples (missing, ``None`` or empty)."""
    missing = [task for task in tasks if task not in validation]
    if missing:
        raise ValueError(
            f"tasks {missing} have no validation split; the contribution analysis scores every task on"
            f" its validation examples (given: {sorted(validation)})"
        )
    empty = [task for task in tasks if not validation[task]]
    if empty:
        raise ValueError(f"the validation split of tasks {empty} is empty; add validation examples")


# ---------------------------------------------------------------------------------------------
# Probe sets: validation examples encoded into fixed, left-padded batches
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeBatch:
    """One left-padded batch and the answer tokens scored in it.

    ``labels`` and ``label_mask`` cover the last ``n_tail`` positions, whose logits the
    model computes (``logits_to_keep=n_tail``). ``rows[i]`` is the index of the scored item
    (an example, or an example-option pair for option accuracy) in row ``i``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    rows: tuple[int, ...]

    @property
    def n_tail(self) -> int:
        return int(self.labels.shape[1])

    def to(self, device: torch.device | str) -> ProbeBatch:
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            labels=self.labels.to(device),
            label_mask=self.label_mask.to(device),
        )


@dataclasses.dataclass(frozen=True)
class ProbeSet:
    """The validation examples of one task, encoded for scoring.

    ``owners[i]`` is the example of item ``i``; for ``"answer_logprob"`` items are examples.
    ``answers`` is the gold option index per example (option accuracy only).
    """

    name: str
    score: ScoreKind
    batches: tuple[ProbeBatch, ...]
    n_examples: int
    owners: np.ndarray
    answers: np.ndarray | None

    @property
    def n_items(self) -> int:
        return len(self.owners)

    def to(self, device: torch.device | str) -> ProbeSet:
        return dataclasses.replace(self, batches=tuple(batch.to(device) for batch in self.batches))


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")
    return int(pad)


def _make_batches(
    prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> tuple[ProbeBatch, ...]:
    """Sort sequences by length (longest first), cut into batches and left-pad them.

    The order, padding and position ids are those of ``hm_utils.evaluate.score_continuations``.
    """
    sequences = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            input_ids[row, width - len(sequences[i]) :] = torch.tensor(sequences[i], dtype=torch.long)
            attention_mask[row, width - len(sequences[i]) :] = 1
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)

        # One extra position: the logit at the position before the first answer token predicts it.
        n_tail = max(len(continuations[i]) for i in rows) + 1
        label_mask = torch.zeros((len(rows), n_tail), dtype=torch.bool)
        for row, i in enumerate(rows):
            label_mask[row, n_tail - len(continuations[i]) :] = True
        batches.append(
            ProbeBatch(input_ids, attention_mask, position_ids, input_ids[:, -n_tail:].clone(), label_mask, tuple(rows))
        )
    return tuple(batches)


def build_probe_set(
    tokenizer: Any,
    examples: Sequence[Example],
    template: PromptTemplate,
    score: ScoreKind = "answer_logprob",
    batch_size: int = 8,
    name: str = "task",
) -> ProbeSet:
    """Encode one task's validation examples for :func:`score_model` and :func:`layer_impacts`.

    ``"answer_logprob"`` scores the target ``render_target(example)`` after the chat prompt;
    ``"option_accuracy"`` scores every option text of a multiple-choice example. Raises
    ``ValueError`` for an empty set, an unknown score, option accuracy on QA examples, or an
    answer that encodes to no tokens.
    """
    if score not in SCORE_KINDS:
        raise ValueError(f"invalid score {score!r} for task {name}; use one of {SCORE_KINDS}")
    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}; expected a positive integer")
    examples = list(examples)
    if not examples:
        raise ValueError(f"task {name} has no validation examples; the contribution analysis needs at least one")
    if score == "option_accuracy" and any(example.task_type != "mcq" for example in examples):
        raise ValueError(f"task {name}: option_accuracy needs multiple-choice examples; use 'answer_logprob' for QA")

    prompts = encode_prompts(tokenizer, examples, template)
    if score == "answer_logprob":
        continuations = encode_continuations(
            tokenizer, [render_target(e) for e in examples], [f"example {e.id} target" for e in examples]
        )
        item_prompts = prompts
        owners = np.arange(len(examples))
        answers = None
    else:
        texts, labels, owner_list, item_prompts = [], [], [], []
        for index, (example, prompt) in enumerate(zip(examples, prompts)):
            render_target(example)  # raises ValueError for options without a valid answer_index
            for option_number, option in enumerate(example.options):
                texts.append(option)
                labels.append(f"example {example.id} option {option_number}")
                owner_list.append(index)
                item_prompts.append(prompt)
        continuations = encode_continuations(tokenizer, texts, labels)
        owners = np.asarray(owner_list)
        answers = np.asarray([example.answer_index for example in examples])

    batches = _make_batches(item_prompts, continuations, batch_size, _pad_id(tokenizer))
    return ProbeSet(name, score, batches, len(examples), owners, answers)


def probe_set_from_tokens(
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    name: str = "task",
) -> ProbeSet:
    """Build an ``"answer_logprob"`` probe set from token ids: one prompt and one answer per example."""
    if not prompts or len(prompts) != len(answers):
        raise ValueError(f"task {name}: got {len(prompts)} prompts and {len(answers)} answers; pass one answer per prompt")
    if any(len(p) == 0 for p in prompts) or any(len(a) == 0 for a in answers):
        raise ValueError(f"task {name}: every prompt and answer needs at least one token")
    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}; expected a positive integer")
    batches = _make_batches(prompts, answers, batch_size, pad_id)
    return ProbeSet(name, "answer_logprob", batches, len(prompts), np.arange(len(prompts)), None)


def aggregate_score(probe_set: ProbeSet, sums: np.ndarray, counts: np.ndarray) -> float:
    """Turn per-item log-probability sums and token counts into the task score (module docstring)."""
    means = sums / counts
    if probe_set.score == "answer_logprob":
        value = float(np.mean(means))
    else:
        correct = []
        for example in range(probe_set.n_examples):
            option_scores = means[probe_set.owners == example]
            correct.append(int(np.argmax(option_scores)) == int(probe_set.answers[example]))
        value = 100.0 * float(np.mean(correct))
    if not math.isfinite(value):
        raise FloatingPointError(f"score of task {probe_set.name} is {value}; the model produced NaN or infinite logits")
    return value


# ---------------------------------------------------------------------------------------------
# Forward passes: full, and replayed from a cached decoder-layer input
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecoderStack:
    """The parts of a causal LM that a layer replay needs."""

    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    head: torch.nn.Module
    logit_softcap: float | None


def decoder_stack(model: torch.nn.Module) -> DecoderStack:
    """Find the decoder layers, final norm and output layer of a Llama, Qwen2 or Gemma3 style model.

    Raises ``TypeError`` for a model without ``model.layers`` (or ``model.language_model.layers``)
    and ``model.norm``.
    """
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        inner = inner.language_model
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise TypeError(
            f"{type(model).__name__} has no model.layers and model.norm; the layer replay supports"
            " decoder-only models laid out like LlamaForCausalLM, Qwen2ForCausalLM and Gemma3ForCausalLM"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    return DecoderStack(inner.layers, inner.norm, model.get_output_embeddings(), softcap)


def _tail_logits(model: torch.nn.Module, batch: ProbeBatch) -> torch.Tensor:
    output = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.n_tail,
        use_cache=False,
    )
    return output.logits[:, -batch.n_tail :]


def _accumulate(batch: ProbeBatch, logits: torch.Tensor, sums: np.ndarray, counts: np.ndarray) -> None:
    batch_sums, batch_counts = sequence_logprobs(logits, batch.labels, batch.label_mask)
    rows = list(batch.rows)
    sums[rows] = batch_sums.double().cpu().numpy()
    counts[rows] = batch_counts.cpu().numpy()


@torch.inference_mode()
def score_model(model: torch.nn.Module, probe_set: ProbeSet) -> float:
    """Score a model on a probe set with full forward passes (the reference for the cached probes)."""
    model.eval()
    sums = np.zeros(probe_set.n_items)
    counts = np.zeros(probe_set.n_items, dtype=np.int64)
    for batch in probe_set.batches:
        _accumulate(batch, _tail_logits(model, batch), sums, counts)
    return aggregate_score(probe_set, sums, counts)


@dataclasses.dataclass
class _LayerCalls:
    """Per batch: the input of each probed layer and the other arguments of every layer call."""

    inputs: dict[int, torch.Tensor]
    calls: list[tuple[tuple, dict[str, Any]]]


def _capture(
    model: torch.nn.Module, stack: DecoderStack, batch: ProbeBatch, keep: set[int]
) -> tuple[_LayerCalls, torch.Tensor]:
    """Run one full forward pass, recording every decoder layer's call; return the record and the logits."""
    n_layers = len(stack.layers)
    calls: list[tuple[tuple, dict[str, Any]] | None] = [None] * n_layers
    inputs: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module, args, kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            calls[index] = (rest, {key: value for key, value in kwargs.items() if key != "hidden_states"})
            if index in keep:
                # A copy, so that no later in-place operation can change the recorded input.
                inputs[index] = hidden.clone()

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(stack.layers)]
    try:
        logits = _tail_logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    skipped = [i for i, call in enumerate(calls) if call is None]
    if skipped:
        raise RuntimeError(f"decoder layers {skipped[:5]} were not called in the forward pass; the replay needs every layer")
    return _LayerCalls(inputs, calls), logits


def _replay(stack: DecoderStack, record: _LayerCalls, start: int, n_tail: int) -> torch.Tensor:
    """Run layers ``start..L-1`` from the recorded input of ``start``, then the norm and the output layer."""
    hidden = record.inputs[start].clone()
    for index in range(start, len(stack.layers)):
        rest, kwargs = record.calls[index]
        output = stack.layers[index](hidden, *rest, **kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
    hidden = stack.norm(hidden)
    logits = stack.head(hidden[:, -n_tail:, :])
    if stack.logit_softcap is not None:
        logits = logits / stack.logit_softcap
        logits = torch.tanh(logits)
        logits = logits * stack.logit_softcap
    return logits


class _CachedScorer:
    """Scores probe sets whose model differs from the recorded one only in layers >= the probed layer."""

    def __init__(self, model: torch.nn.Module, stack: DecoderStack, probe_sets: Mapping[str, ProbeSet], keep: set[int]):
        self.stack = stack
        self.probe_sets = probe_sets
        self.records: dict[str, list[_LayerCalls]] = {}
        self.scores: dict[str, float] = {}
        for task, probe_set in probe_sets.items():
            sums = np.zeros(probe_set.n_items)
            counts = np.zeros(probe_set.n_items, dtype=np.int64)
            records = []
            for batch in probe_set.batches:
                record, logits = _capture(model, stack, batch, keep)
                _accumulate(batch, logits, sums, counts)
                records.append(record)
            self.records[task] = records
            self.scores[task] = aggregate_score(probe_set, sums, counts)

    def score_from(self, task: str, layer: int) -> float:
        probe_set = self.probe_sets[task]
        sums = np.zeros(probe_set.n_items)
        counts = np.zeros(probe_set.n_items, dtype=np.int64)
        for batch, record in zip(probe_set.batches, self.records[task]):
            _accumulate(batch, _replay(self.stack, record, layer, batch.n_tail), sums, counts)
        return aggregate_score(probe_set, sums, counts)


# ---------------------------------------------------------------------------------------------
# Layer impacts of one analysed delta
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerImpacts:
    """Scores of one task under the probes of one analysed delta, per probed layer.

    ``score_model``: :math:`\\theta_F + D`; ``score_base``: :math:`\\theta_F`;
    ``score_without[k]``: :math:`\\theta_F + D - R_l`; ``score_only[k]``: :math:`\\theta_F + R_l`,
    for ``l = layers[k]``.
    """

    task: str
    layers: tuple[int, ...]
    score_model: float
    score_base: float
    score_without: np.ndarray
    score_only: np.ndarray

    @property
    def alpha(self) -> np.ndarray:
        """Deletion impact per probed layer."""
        return self.score_model - self.score_without

    @property
    def beta(self) -> np.ndarray:
        """Addition impact per probed layer."""
        return self.score_only - self.score_base

    @property
    def contribution(self) -> np.ndarray:
        return self.alpha + self.beta


def check_layers(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """Return the probed layers sorted; ``None`` means all. Raises ``ValueError`` for bad indices."""
    if layers is None:
        return tuple(range(num_layers))
    chosen = sorted(set(int(layer) for layer in layers))
    if not chosen:
        raise ValueError("no layers to probe; pass None for all decoder layers or a non-empty list")
    outside = [layer for layer in chosen if not 0 <= layer < num_layers]
    if outside:
        raise ValueError(f"layers {outside} are outside the model's decoder layers 0..{num_layers - 1}")
    return tuple(chosen)


def _check_model_matches(model: torch.nn.Module, stack: DecoderStack, task_vectors: TaskVectors) -> None:
    if len(stack.layers) != task_vectors.num_layers:
        raise ValueError(
            f"the model has {len(stack.layers)} decoder layers but the task vectors have {task_vectors.num_layers};"
            " load the base model the specialists were fine-tuned from"
        )


def _layer_part(delta: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {name: delta[name] for name in names if name in delta}


@dataclasses.dataclass(frozen=True)
class _Analysis:
    """One analysed model ``θ_F + delta``, the tasks scored on it and their removable deltas."""

    delta: Mapping[str, torch.Tensor]
    tasks: tuple[str, ...]
    removable: Mapping[str, Mapping[str, torch.Tensor]]

    def addition_groups(self) -> list[tuple[Mapping[str, torch.Tensor], tuple[str, ...]]]:
        """Deltas added at a probed layer, each with the tasks scored on that probe."""
        shared = tuple(task for task in self.tasks if task not in self.removable)
        groups = [(self.delta, shared)] if shared else []
        return groups + [(self.removable[task], (task,)) for task in self.tasks if task in self.removable]


def _without_part(analysis: _Analysis, task: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Layer tensors of ``D - R`` for one task (empty, that is the base, when R is D)."""
    if task not in analysis.removable:
        return {}
    share = analysis.removable[task]
    delta = analysis.delta
    return {n: delta[n] - share[n] if n in share else delta[n] for n in names if n in delta}


def _sweep(
    model: torch.nn.Module,
    base_state: Mapping[str, torch.Tensor],
    analyses: Sequence[_Analysis],
    probe_sets: Mapping[str, ProbeSet],
    probed: tuple[int, ...],
    progress: bool,
) -> list[dict[str, LayerImpacts]]:
    """Run the deletion probes of every analysis, then the addition probes of all from one base pass."""
    stack = decoder_stack(model)
    device = next(model.parameters()).device
    needed = sorted({task for analysis in analyses for task in analysis.tasks})
    probe_sets = {task: probe_sets[task].to(device) for task in needed}
    layer_names = {layer: [name for name in base_state if decoder_layer_of(name) == layer] for layer in probed}
    keep = set(probed)
    model.eval()

    start = time.perf_counter()
    model_scores: list[dict[str, float]] = [{} for _ in analyses]
    without = [{task: np.zeros(len(probed)) for task in a.tasks} for a in analyses]
    only = [{task: np.zeros(len(probed)) for task in a.tasks} for a in analyses]

    with torch.inference_mode():
        # Deletion probes: from θ_F + D, remove R_l at one layer at a time.
        for index, analysis in enumerate(analyses):
            apply_delta_(model, base_state, analysis.delta)
            scorer = _CachedScorer(model, stack, {task: probe_sets[task] for task in analysis.tasks}, keep)
            model_scores[index] = dict(scorer.scores)
            for k, layer in enumerate(tqdm(probed, desc="deletion probes", disable=not progress, leave=False)):
                names = layer_names[layer]
                for task in analysis.tasks:
                    apply_delta_(model, base_state, _without_part(analysis, task, names), layers=[layer])
                    without[index][task][k] = scorer.score_from(task, layer)
                apply_delta_(model, base_state, _layer_part(analysis.delta, names), layers=[layer])
            del scorer

        # Addition probes: from θ_F, add R_l at one layer at a time; one base pass serves every analysis.
        apply_delta_(model, base_state, {})
        scorer = _CachedScorer(model, stack, probe_sets, keep)
        for k, layer in enumerate(tqdm(probed, desc="addition probes", disable=not progress, leave=False)):
            names = layer_names[layer]
            for index, analysis in enumerate(analyses):
                for added, tasks in analysis.addition_groups():
                    apply_delta_(model, base_state, _layer_part(added, names), layers=[layer])
                    for task in tasks:
                        only[index][task][k] = scorer.score_from(task, layer)
            apply_delta_(model, base_state, {}, layers=[layer])
        score_base = dict(scorer.scores)
        del scorer

    logger.info(
        "probed %d layers for %d analysed models in %.1f s", len(probed), len(analyses), time.perf_counter() - start
    )
    return [
        {
            task: LayerImpacts(
                task, probed, model_scores[index][task], score_base[task], without[index][task], only[index][task]
            )
            for task in analysis.tasks
        }
        for index, analysis in enumerate(analyses)
    ]


def layer_impacts(
    model: torch.nn.Module,
    base_state: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    probe_sets: Mapping[str, ProbeSet],
    layers: Sequence[int] | None = None,
    removable: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> dict[str, LayerImpacts]:
    """Probe every layer in ``layers`` for every task of ``probe_sets`` (module docstring).

    ``delta`` is the analysed delta :math:`D`. The probes of a task remove and add the layer-``l``
    part of ``removable[task]``, the delta :math:`R`. By default :math:`R` is ``delta`` itself,
    so the deletion probe sets layer ``l`` to ``base_state`` exactly. Weights are
    swapped in place; the model is left at ``base_state`` (model tensors outside
    ``base_state`` are not touched). Raises ``ValueError`` for bad layers or a removable
    delta without a probe set, before any forward pass.
    """
    if not probe_sets:
        raise ValueError("no probe sets; pass one ProbeSet per task")
    probed = check_layers(layers, len(decoder_stack(model).layers))
    removable = dict(removable or {})
    unknown = sorted(set(removable) - set(probe_sets))
    if unknown:
        raise ValueError(f"removable deltas for tasks {unknown} that have no probe set")
    analysis = _Analysis(delta, tuple(probe_sets), removable)
    return _sweep(model, base_state, [analysis], probe_sets, probed, progress)[0]


# ---------------------------------------------------------------------------------------------
# Contributions on the specialists and on the merge, conflicts and ranking
# ---------------------------------------------------------------------------------------------


def rank_layers(gamma: np.ndarray, layers: Sequence[int], positive_only: bool = True) -> list[int]:
    """Rank layers by :math:`\\Gamma^l = \\sum_m \\gamma_m^l`, largest first (ties: lower layer first).

    ``gamma`` is ``[n_models, len(layers)]``. With ``positive_only`` only layers with
    :math:`\\Gamma^l > 0` are returned.
    """
    gamma = np.asarray(gamma, dtype=float)
    if gamma.ndim != 2 or gamma.shape[1] != len(layers):
        raise ValueError(f"gamma must be [n_models, {len(layers)}], got shape {gamma.shape}")
    if not np.isfinite(gamma).all():
        raise ValueError("gamma contains NaN or infinity; recompute the contributions")
    total = gamma.sum(axis=0)
    order = sorted(range(len(layers)), key=lambda k: (-total[k], layers[k]))
    return [int(layers[k]) for k in order if not positive_only or total[k] > 0]


@dataclasses.dataclass(frozen=True)
class Contributions:
    """Per-task, per-layer contributions on the specialists and on the merge.

    ``specialist[m, k]`` is :math:`c_{mm}^l` and ``merged[m, k]`` is :math:`c_{mG}^l` for task
    ``tasks[m]`` (the task of specialist ``m``) and layer ``l = layers[k]``.
    """

    tasks: tuple[str, ...]
    layers: tuple[int, ...]
    specialist: np.ndarray
    merged: np.ndarray
    specialist_impacts: Mapping[str, LayerImpacts] | None = None
    merged_impacts: Mapping[str, LayerImpacts] | None = None

    def __post_init__(self) -> None:
        shape = (len(self.tasks), len(self.layers))
        for label, values in (("specialist", self.specialist), ("merged", self.merged)):
            if np.shape(values) != shape:
                raise ValueError(f"{label} contributions have shape {np.shape(values)}, expected {shape}")
            if not np.isfinite(values).all():
                raise ValueError(f"{label} contributions contain NaN or infinity")

    @property
    def gamma(self) -> np.ndarray:
        """:math:`\\gamma_m^l = c_{mm}^l - c_{mG}^l`, ``[n_tasks, n_layers]``."""
        return np.asarray(self.specialist, dtype=float) - np.asarray(self.merged, dtype=float)

    @property
    def total_conflict(self) -> np.ndarray:
        """:math:`\\Gamma^l`, one value per probed layer."""
        return self.gamma.sum(axis=0)

    def ranking(self, positive_only: bool = True) -> list[int]:
        return rank_layers(self.gamma, self.layers, positive_only)

    def with_merged(self, merged: np.ndarray, merged_impacts: Mapping[str, LayerImpacts] | None = None) -> Contributions:
        """Return a copy with new merge contributions (after the merge changed)."""
        return dataclasses.replace(self, merged=np.asarray(merged, dtype=float), merged_impacts=merged_impacts)

    def to_records(self) -> list[dict[str, Any]]:
        """Return one JSON-ready row per (task, layer): c, gamma, Gamma and, when kept, alpha and beta."""
        gamma, total = self.gamma, self.total_conflict
        rows = []
        for m, task in enumerate(self.tasks):
            for k, layer in enumerate(self.layers):
                row = {
                    "task": task,
                    "layer": layer,
                    "c_specialist": float(self.specialist[m, k]),
                    "c_merged": float(self.merged[m, k]),
                    "gamma": float(gamma[m, k]),
                    "Gamma": float(total[k]),
                }
                for prefix, impacts in (("specialist", self.specialist_impacts), ("merged", self.merged_impacts)):
                    if impacts is not None and task in impacts:
                        row[f"alpha_{prefix}"] = float(impacts[task].alpha[k])
                        row[f"beta_{prefix}"] = float(impacts[task].beta[k])
                rows.append(row)
        return rows


def _check_probe_tasks(task_vectors: TaskVectors, probe_sets: Mapping[str, ProbeSet]) -> None:
    missing = [name for name in task_vectors.names if name not in probe_sets]
    extra = sorted(set(probe_sets) - set(task_vectors.names))
    if missing or extra:
        raise ValueError(
            f"probe sets must be keyed by the specialist names {task_vectors.names} (task m is the task of"
            f" specialist m): missing {missing}, extra {extra}"
        )


def _specialist_analyses(task_vectors: TaskVectors) -> list[_Analysis]:
    return [_Analysis(delta, (name,), {}) for name, delta in zip(task_vectors.names, task_vectors.deltas)]


def _merged_analysis(
    task_vectors: TaskVectors,
    merged_delta: Mapping[str, torch.Tensor],
    deletion: MergeDeletion,
    shares: Sequence[Mapping[str, torch.Tensor]] | None,
) -> _Analysis:
    if deletion not in MERGE_DELETIONS:
        raise ValueError(f"invalid deletion {deletion!r}; use one of {MERGE_DELETIONS}")
    if deletion == "own_share":
        if shares is None or len(shares) != len(task_vectors):
            raise ValueError(
                f"deletion='own_share' needs one share per specialist ({len(task_vectors)}); compute them with"
                " hm_utils.himerging.merged_shares"
            )
        return _Analysis(merged_delta, tuple(task_vectors.names), dict(zip(task_vectors.names, shares)))
    if shares is not None:
        raise ValueError("shares are used only with deletion='own_share'")
    return _Analysis(merged_delta, tuple(task_vectors.names), {})


def _prepare(
    model: torch.nn.Module, task_vectors: TaskVectors, probe_sets: Mapping[str, ProbeSet], layers: Sequence[int] | None
) -> tuple[int, ...]:
    _check_probe_tasks(task_vectors, probe_sets)
    _check_model_matches(model, decoder_stack(model), task_vectors)
    return check_layers(layers, task_vectors.num_layers)


def specialist_contributions(
    model: torch.nn.Module,
    task_vectors: TaskVectors,
    probe_sets: Mapping[str, ProbeSet],
    layers: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, LayerImpacts]:
    """Return :math:`c_{mm}`: each specialist's layer impacts on its own task (probe sets keyed by specialist name)."""
    probed = _prepare(model, task_vectors, probe_sets, layers)
    results = _sweep(model, task_vectors.base, _specialist_analyses(task_vectors), probe_sets, probed, progress)
    return {task: impacts for result in results for task, impacts in result.items()}


def merged_contributions(
    model: torch.nn.Module,
    task_vectors: TaskVectors,
    merged_delta: Mapping[str, torch.Tensor],
    probe_sets: Mapping[str, ProbeSet],
    layers: Sequence[int] | None = None,
    deletion: MergeDeletion = "merged_delta",
    shares: Sequence[Mapping[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> dict[str, LayerImpacts]:
    """Return :math:`c_{mG}`: the merge's layer impacts on every task.

    ``deletion="own_share"`` needs ``shares`` (one delta per specialist, in
    ``task_vectors.names`` order, from ``hm_utils.himerging.merged_shares``).
    """
    analysis = _merged_analysis(task_vectors, merged_delta, deletion, shares)
    probed = _prepare(model, task_vectors, probe_sets, layers)
    return _sweep(model, task_vectors.base, [analysis], probe_sets, probed, progress)[0]


def contribution_analysis(
    model: torch.nn.Module,
    task_vectors: TaskVectors,
    merged_delta: Mapping[str, torch.Tensor],
    probe_sets: Mapping[str, ProbeSet],
    layers: Sequence[int] | None = None,
    deletion: MergeDeletion = "merged_delta",
    shares: Sequence[Mapping[str, torch.Tensor]] | None = None,
    specialist_impacts: Mapping[str, LayerImpacts] | None = None,
    progress: bool = True,
) -> Contributions:
    """Compute :math:`c_{mm}` and :math:`c_{mG}` for every task and probed layer.

    The specialists and the merge share one base forward pass per task. Pass
    ``specialist_impacts`` from an earlier call to reuse them (they do not depend on the
    merge). The model is left at the base weights.
    """
    merged_analysis = _merged_analysis(task_vectors, merged_delta, deletion, shares)
    probed = _prepare(model, task_vectors, probe_sets, layers)
    names = task_vectors.names
    if specialist_impacts is None:
        results = _sweep(
            model, task_vectors.base, [*_specialist_analyses(task_vectors), merged_analysis], probe_sets, probed, progress
        )
        specialist_impacts = {task: impacts for result in results[:-1] for task, impacts in result.items()}
        merged_impacts = results[-1]
    else:
        if any(name not in specialist_impacts or specialist_impacts[name].layers != probed for name in names):
            raise ValueError(f"specialist_impacts must cover tasks {names} on layers {probed}")
        merged_impacts = _sweep(model, task_vectors.base, [merged_analysis], probe_sets, probed, progress)[0]
    return Contributions(
        tasks=tuple(names),
        layers=probed,
        specialist=np.stack([specialist_impacts[name].contribution for name in names]),
        merged=np.stack([merged_impacts[name].contribution for name in names]),
        specialist_impacts=dict(specialist_impacts),
        merged_impacts=merged_impacts,
    )


# ---------------------------------------------------------------------------------------------
# Stage files: probe settings, probe sets of a run, contributions on disk
# ---------------------------------------------------------------------------------------------

CONTRIBUTIONS_CSV = "contributions.csv"
CONTRIBUTIONS_JSON = "contributions.json"
RANKING_JSON = "ranking.json"


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """Settings of the validation probe sets of a run.

    ``examples``: the first ``examples`` validation examples of each task (``None``: all).
    ``score``: the score kind per task type (``"mcq"``, ``"qa"``); both default to
    ``"answer_logprob"`` so that contributions are comparable across tasks.
    ``batch_size``: examples (or example-option pairs) per forward pass.
    """

    examples: int | None = 32
    score: Mapping[str, ScoreKind] = dataclasses.field(
        default_factory=lambda: {"mcq": "answer_logprob", "qa": "answer_logprob"}
    )
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.examples is not None and (isinstance(self.examples, bool) or not isinstance(self.examples, int)):
            raise ValueError(f"probe examples must be a positive integer or None (all), got {self.examples!r}")
        if self.examples is not None and self.examples < 1:
            raise ValueError(f"probe examples {self.examples} selects no example; pass a positive count or None")
        for task_type, kind in self.score.items():
            if kind not in SCORE_KINDS:
                raise ValueError(f"invalid score {kind!r} for task type {task_type!r}; use one of {SCORE_KINDS}")
        if self.score.get("qa", "answer_logprob") != "answer_logprob":
            raise ValueError("QA tasks can only use the 'answer_logprob' score")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"invalid probe batch_size {self.batch_size!r}; expected a positive integer")

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "score": dict(self.score), "batch_size": self.batch_size}

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> ProbeSettings:
        return cls(document["examples"], dict(document["score"]), int(document["batch_size"]))

    def score_of(self, task_type: str) -> ScoreKind:
        """Return the score kind of a task type; ``"answer_logprob"`` when the type is not listed."""
        return self.score.get(task_type, "answer_logprob")


def build_probe_sets(
    tokenizer: Any,
    validation: Mapping[str, Sequence[Example]],
    templates: Mapping[str, PromptTemplate | str],
    settings: ProbeSettings = ProbeSettings(),
) -> dict[str, ProbeSet]:
    """Build one probe set per task from its validation examples (the first ``settings.examples``).

    ``templates`` maps each task to its template or registered template name. Raises
    ``ValueError`` for a task without a template or without validation examples.
    """
    from hm_utils.prompts import get_template

    tasks = list(validation)
    check_validation_sets(validation, tasks)
    missing = [task for task in tasks if task not in templates]
    if missing:
        raise ValueError(f"no prompt template for tasks {missing}; the template choice covers {sorted(templates)}")
    probe_sets = {}
    for task in tasks:
        examples = list(validation[task])[: settings.examples]
        template = templates[task]
        template = get_template(template) if isinstance(template, str) else template
        score = settings.score_of(examples[0].task_type)
        probe_sets[task] = build_probe_set(tokenizer, examples, template, score, settings.batch_size, name=task)
    return probe_sets


def _impacts_to_dict(impacts: LayerImpacts) -> dict[str, Any]:
    return {
        "layers": list(impacts.layers),
        "score_model": float(impacts.score_model),
        "score_base": float(impacts.score_base),
        "score_without": [float(v) for v in impacts.score_without],
        "score_only": [float(v) for v in impacts.score_only],
    }


def _impacts_from_dict(task: str, document: Mapping[str, Any]) -> LayerImpacts:
    return LayerImpacts(
        task=task,
        layers=tuple(int(layer) for layer in document["layers"]),
        score_model=float(document["score_model"]),
        score_base=float(document["score_base"]),
        score_without=np.asarray(document["score_without"], dtype=float),
        score_only=np.asarray(document["score_only"], dtype=float),
    )


def contributions_to_dict(contributions: Contributions) -> dict[str, Any]:
    """Return a JSON-ready form of ``contributions``, with the probe scores when they are kept."""
    document: dict[str, Any] = {
        "tasks": list(contributions.tasks),
        "layers": list(contributions.layers),
        "specialist": np.asarray(contributions.specialist, dtype=float).tolist(),
        "merged": np.asarray(contributions.merged, dtype=float).tolist(),
    }
    for key in ("specialist_impacts", "merged_impacts"):
        impacts = getattr(contributions, key)
        document[key] = None if impacts is None else {task: _impacts_to_dict(v) for task, v in impacts.items()}
    return document


def contributions_from_dict(document: Mapping[str, Any]) -> Contributions:
    """Rebuild :class:`Contributions` from :func:`contributions_to_dict` output."""
    impacts = {}
    for key in ("specialist_impacts", "merged_impacts"):
        stored = document.get(key)
        impacts[key] = None if stored is None else {task: _impacts_from_dict(task, v) for task, v in stored.items()}
    return Contributions(
        tasks=tuple(document["tasks"]),
        layers=tuple(int(layer) for layer in document["layers"]),
        specialist=np.asarray(document["specialist"], dtype=float),
        merged=np.asarray(document["merged"], dtype=float),
        **impacts,
    )


def ranking_document(contributions: Contributions) -> dict[str, Any]:
    """Return Γ per probed layer, the full ranking (largest Γ first) and the layers with Γ > 0."""
    total = contributions.total_conflict
    return {
        "Gamma": {str(layer): float(value) for layer, value in zip(contributions.layers, total)},
        "ranking": contributions.ranking(positive_only=False),
        "conflicting": contributions.ranking(positive_only=True),
    }


def write_contributions(
    contributions: Contributions, out_dir: str | Path, settings: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``contributions.csv`` (one row per task and layer), ``contributions.json`` and ``ranking.json``.

    ``settings`` (JSON-ready, e.g. the probe settings and the deletion rule) is stored in
    ``contributions.json`` beside the values. Returns the paths by file kind.
    """
    import pandas as pd

    out_dir = Path(out_dir)
    document = {"settings": dict(settings or {}), **contributions_to_dict(contributions)}
    return {
        "csv": write_text_atomic(out_dir / CONTRIBUTIONS_CSV, pd.DataFrame(contributions.to_records()).to_csv(index=False)),
        "json": write_json_atomic(out_dir / CONTRIBUTIONS_JSON, document),
        "ranking": write_json_atomic(out_dir / RANKING_JSON, ranking_document(contributions)),
    }


def read_contributions(path: str | Path) -> tuple[Contributions, dict[str, Any]]:
    """Read ``contributions.json`` written by :func:`write_contributions`; return the values and settings."""
    path = Path(path)
    if path.is_dir():
        path = path / CONTRIBUTIONS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"contributions file not found: {path}; run the contribution stage first")
    document = json.loads(path.read_text(encoding="utf-8"))
    return contributions_from_dict(document), dict(document.get("settings") or {})

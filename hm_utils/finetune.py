"""LoRA fine-tuning of task specialists and of the mixed-data baseline, merged into full weights.

LoRA adds a trainable rank-``r`` update to each targeted linear layer ``W`` (out × in) of the
decoder while ``W`` stays frozen::

    h = W x + (alpha / r) · B A dropout(x),    A: r × in (random init), B: out × r (zeros)

After training the update is merged into an fp32 copy of the base model,
``W' = W + (alpha / r) · B A``, so a specialist is an ordinary checkpoint whose delta
``W' − W`` is what the merging methods operate on.

Training is supervised fine-tuning on chat-formatted examples. The prompt is the base model's
chat template applied to the example (``hm_utils.prompts.render_prompt``), the target is
``render_target(example)`` followed by the EOS token, and the loss is the token-level mean
cross-entropy over target tokens only::

    L = −(1 / |T|) Σ_{t ∈ T} log p(x_t | x_<t),    T = positions of target tokens in the batch

Prompt tokens carry label -100. The output layer is evaluated only at the positions that
predict a target token. For SmolLM2-135M (vocabulary 49,152) with 124-token sequences and
27-token answers this made a training step about 1.16 times faster than computing all logits
(``bench/finetune_cost.py``, 2-core AMD EPYC, one thread).
An example longer than ``max_length`` loses tokens from the left of its prompt. Only when the
target alone does not fit is the target cut from the right (see :func:`truncate_sequence`).

The optimiser is AdamW with linear warm-up over ``ceil(warmup_ratio · steps)`` steps and linear
decay to zero (``transformers.get_linear_schedule_with_warmup``), gradient clipping by global
norm, and optional gradient accumulation. The frozen base model runs in ``base_dtype`` while the
LoRA parameters stay in fp32. ``"auto"`` picks bf16 on CUDA and fp32 on CPU, because on a
CPU without bf16 instructions (AVX2 only) torch 2.13 trained about 14 times slower with a bf16
base than with an fp32 one (``bench/finetune_cost.py`` on a 2-core AMD EPYC). On CUDA the base model is loaded with
``device_map="auto"``.

:func:`train_specialist` writes one folder::

    config.json, model.safetensors, tokenizer files   merged fp32 checkpoint
    adapter/                                          the LoRA adapter (peft format)
    hm_finetune.json                                  settings, hashes, counts, timings
    train_log.json, train_log.csv                     loss per optimiser step

The folder is written atomically (temporary sibling folder, then rename). A folder whose
record has the same key (settings, sha256 of the examples, sha256 of the tokenised sequences,
sha256 of the base model's files) is reused and not trained again.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from tqdm.auto import tqdm

from hm_utils.data import Example
from hm_utils.files import write_json_atomic, write_text_atomic
from hm_utils.models import resolve_model, sha256_file
from hm_utils.prompts import PromptTemplate, default_template, get_template, render_prompt, render_target

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
RECORD_FILE = "hm_finetune.json"
LOG_JSON = "train_log.json"
LOG_CSV = "train_log.csv"
ADAPTER_DIR = "adapter"
RECORD_FORMAT = 1

BaseDtype = Literal["auto", "float32", "bfloat16"]
TemplateChoice = PromptTemplate | Mapping[str, PromptTemplate | str] | None
LossFunction = Callable[[Any, Mapping[str, Any]], tuple[Any, int]]


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA and optimiser settings for one fine-tuning run.

    ``rank``, ``alpha``, ``dropout`` and ``learning_rate`` default to the values of the
    Hi-Merging paper (Fu, Wu et al., ACL 2025): rank 8, alpha 16, dropout 0.01, lr 1e-4. The
    paper does not state the other settings, and their defaults here are this module's choice.
    ``target_modules`` is ``"all-linear"`` (every linear layer inside the decoder, output layer
    excluded) or a tuple of linear module names such as ``("q_proj", "v_proj")``.
    ``max_steps``, when set, fixes the number of optimiser steps and overrides ``epochs``.
    ``batch_size`` counts examples per forward pass, and one optimiser step uses
    ``batch_size · gradient_accumulation_steps`` examples.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.01
    learning_rate: float = 1e-4
    target_modules: str | tuple[str, ...] = "all-linear"
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    group_by_length: bool = True
    base_dtype: BaseDtype = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        validate_settings(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoraSettings:
        """Build settings from a mapping, e.g. a notebook parameter; unknown keys raise ``ValueError``."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LoRA setting(s) {unknown}; valid names are {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready plain values."""
        values = dataclasses.asdict(self)
        if isinstance(values["target_modules"], tuple):
            values["target_modules"] = list(values["target_modules"])
        return values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_settings(settings: LoraSettings) -> None:
    """Raise ``ValueError`` naming the first invalid field of ``settings``."""
    positive_ints = ("rank", "epochs", "batch_size", "gradient_accumulation_steps")
    for name in positive_ints:
        value = getattr(settings, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"invalid LoRA setting {name}={value!r}; expected an integer >= 1")
    if not _is_int(settings.max_length) or settings.max_length < 2:
        raise ValueError(f"invalid LoRA setting max_length={settings.max_length!r}; expected an integer >= 2")
    if settings.max_steps is not None and (not _is_int(settings.max_steps) or settings.max_steps < 1):
        raise ValueError(f"invalid LoRA setting max_steps={settings.max_steps!r}; expected None or an integer >= 1")
    if not _is_int(settings.seed):
        raise ValueError(f"invalid LoRA setting seed={settings.seed!r}; expected an integer")

    if not _is_number(settings.alpha) or settings.alpha <= 0:
        raise ValueError(f"invalid LoRA setting alpha={settings.alpha!r}; expected a number > 0")
    if not _is_number(settings.learning_rate) or settings.learning_rate <= 0:
        raise ValueError(f"invalid LoRA setting learning_rate={settings.learning_rate!r}; expected a number > 0")
    if not _is_number(settings.dropout) or not 0 <= settings.dropout < 1:
        raise ValueError(f"invalid LoRA setting dropout={settings.dropout!r}; expected 0 <= dropout < 1")
    if not _is_number(settings.warmup_ratio) or not 0 <= settings.warmup_ratio < 1:
        raise ValueError(f"invalid LoRA setting warmup_ratio={settings.warmup_ratio!r}; expected 0 <= ratio < 1")
    if not _is_number(settings.weight_decay) or settings.weight_decay < 0:
        raise ValueError(f"invalid LoRA setting weight_decay={settings.weight_decay!r}; expected a number >= 0")
    if settings.max_grad_norm is not None and (not _is_number(settings.max_grad_norm) or settings.max_grad_norm <= 0):
        raise ValueError(
            f"invalid LoRA setting max_grad_norm={settings.max_grad_norm!r}; expected None (no clipping) or a number > 0"
        )

    if settings.base_dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(
            f"invalid LoRA setting base_dtype={settings.base_dtype!r}; use 'auto', 'float32' or 'bfloat16'"
        )
    for name in ("group_by_length", "gradient_checkpointing"):
        if not isinstance(getattr(settings, name), bool):
            raise ValueError(f"invalid LoRA setting {name}={getattr(settings, name)!r}; expected True or False")

    targets = settings.target_modules
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ValueError(
                f"invalid LoRA setting target_modules={targets!r}; use 'all-linear' or a tuple of module names"
            )
    elif not targets or not all(isinstance(name, str) and name for name in targets):
        raise ValueError(
            f"invalid LoRA setting target_modules={targets!r}; expected a non-empty tuple of module names"
        )


# ---------------------------------------------------------------------------------------------
# Model inspection and input checks
# ---------------------------------------------------------------------------------------------


def linear_module_names(model: Any) -> list[str]:
    """Return the sorted leaf names of the ``nn.Linear`` modules inside the model's decoder.

    The output layer (``lm_head``) is outside the decoder and never listed.
    """
    import torch

    decoder = model.get_decoder()
    names = {name.rsplit(".", 1)[-1] for name, module in decoder.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def build_meta_model(config: Any) -> Any:
    """Build the model's module tree on the meta device (no weights are allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def resolve_target_modules(target_modules: str | Sequence[str], valid_names: Sequence[str]) -> list[str]:
    """Resolve ``"all-linear"`` to explicit module names and check explicit names.

    Raises ``ValueError`` for a name that is not a linear module of the decoder, listing the
    valid names.
    """
    valid = sorted(valid_names)
    if not valid:
        raise ValueError("the model's decoder has no nn.Linear modules, so LoRA has nothing to target")
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(f"invalid target_modules {target_modules!r}; use 'all-linear' or a list of {valid}")
        return valid
    unknown = sorted(set(target_modules) - set(valid))
    if unknown:
        raise ValueError(f"unknown LoRA target module(s) {unknown}; the decoder's linear modules are {valid}")
    return sorted(set(target_modules))


def _model_eos_ids(config: Any, model_ref: str) -> set[int]:
    """Collect the EOS ids declared in ``config`` and, for a model reference, its generation config."""
    from transformers import GenerationConfig

    candidates = [getattr(config, "eos_token_id", None)]
    if model_ref:
        try:
            candidates.append(GenerationConfig.from_pretrained(model_ref).eos_token_id)
        except OSError:
            logger.debug("%s has no generation_config.json; using the EOS ids of config.json", model_ref)
    ids: set[int] = set()
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(item) for item in value)
    return ids


def check_tokenizer_matches(tokenizer: Any, config: Any, model_ref: str = "") -> None:
    """Raise ``ValueError`` when ``tokenizer`` cannot belong to the model described by ``config``.

    The tokenizer's vocabulary must fit the embedding matrix, and every special-token id must be
    inside it. The tokenizer needs an EOS token whose id is one of the model's EOS ids (from
    ``config.json`` and ``generation_config.json``). When both define a BOS id, the ids must match.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = int(text_config.vocab_size)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    fix = f"load the tokenizer saved with the model ({model_ref or 'the base model folder'})"

    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer {name!r} has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; {fix}"
        )
    special_ids = [token_id for token_id in getattr(tokenizer, "all_special_ids", []) if token_id is not None]
    outside = sorted(token_id for token_id in special_ids if not 0 <= token_id < vocab_size)
    if outside:
        raise ValueError(
            f"tokenizer {name!r} has special token ids {outside} outside the model's vocabulary of {vocab_size}; {fix}"
        )

    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token, which ends every training target; {fix}")
    model_eos = _model_eos_ids(text_config, model_ref)
    if model_eos and eos_id not in model_eos:
        raise ValueError(
            f"tokenizer {name!r} has eos_token_id {eos_id} but the model's EOS ids are {sorted(model_eos)}; {fix}"
        )

    model_bos = getattr(text_config, "bos_token_id", None)
    if tokenizer.bos_token_id is not None and isinstance(model_bos, int) and tokenizer.bos_token_id != model_bos:
        raise ValueError(
            f"tokenizer {name!r} has bos_token_id {tokenizer.bos_token_id} but the model's is {model_bos}; {fix}"
        )


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One SFT sequence: ``labels[i]`` is ``input_ids[i]`` on target tokens and -100 on the prompt."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_truncated: bool = False
    target_truncated: bool = False

    @property
    def n_target_tokens(self) -> int:
        """Number of positions that carry a label."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclasses.dataclass(frozen=True)
class TokenizedSet:
    """Tokenised training examples with truncation counts."""

    examples: tuple[TokenizedExample, ...]
    n_prompt_truncated: int
    n_target_truncated: int

    @property
    def n_tokens(self) -> int:
        """Total number of tokens (prompt and target)."""
        return sum(len(example.input_ids) for example in self.examples)

    @property
    def n_target_tokens(self) -> int:
        """Total number of target tokens, the ones the loss is computed on."""
        return sum(example.n_target_tokens for example in self.examples)

    def sha256(self) -> str:
        """Return the sha256 of the token ids and labels, in order."""
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(json.dumps([example.input_ids, example.labels]).encode())
            digest.update(b"\n")
        return digest.hexdigest()


def truncate_sequence(prompt_ids: Sequence[int], target_ids: Sequence[int], max_length: int) -> TokenizedExample:
    """Join prompt and target into one labelled sequence of at most ``max_length`` tokens.

    A sequence that is too long keeps its last prompt tokens (the prompt is cut from the left)
    and the whole target. When the target alone needs ``max_length`` tokens or more, the prompt
    keeps its last ``min(len(prompt), max_length // 2)`` tokens and the target is cut from the
    right to fill the rest, which drops the EOS token.
    """
    prompt_ids, target_ids = list(prompt_ids), list(target_ids)
    if not target_ids:
        raise ValueError("target has no tokens; an SFT example needs at least the EOS token")
    prompt_truncated = target_truncated = False

    if len(prompt_ids) + len(target_ids) > max_length:
        if len(target_ids) < max_length:
            prompt_ids = prompt_ids[len(prompt_ids) + len(target_ids) - max_length :]
            prompt_truncated = True
        else:
            keep_prompt = min(len(prompt_ids), max_length // 2)
            prompt_truncated = keep_prompt < len(prompt_ids)
            prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
            target_ids = target_ids[: max_length - keep_prompt]
            target_truncated = True

    return TokenizedExample(
        input_ids=tuple(prompt_ids + target_ids),
        labels=tuple([IGNORE_INDEX] * len(prompt_ids) + target_ids),
        prompt_truncated=prompt_truncated,
        target_truncated=target_truncated,
    )


def template_for(example: Example, templates: TemplateChoice) -> PromptTemplate:
    """Return the prompt template for one example.

    ``templates`` is one template for every example, a mapping from ``example.dataset`` to a
    template or a registered template name, or ``None`` for the default template of the
    example's language and task type.
    """
    if templates is None:
        return default_template(example.language, example.task_type)
    if isinstance(templates, PromptTemplate):
        return templates
    if example.dataset not in templates:
        raise ValueError(
            f"no prompt template for data set {example.dataset!r} (example {example.id!r}); "
            f"the template mapping covers {sorted(templates)}"
        )
    chosen = templates[example.dataset]
    return get_template(chosen) if isinstance(chosen, str) else chosen


def tokenize_example(tokenizer: Any, example: Example, template: PromptTemplate, max_length: int) -> TokenizedExample:
    """Tokenise one example for SFT: chat-template prompt, then ``render_target(example)`` + EOS."""
    prompt = render_prompt(tokenizer, example, template)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(render_target(example), add_special_tokens=False)["input_ids"]
    return truncate_sequence(prompt_ids, [*target_ids, tokenizer.eos_token_id], max_length)


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example], templates: TemplateChoice, max_length: int
) -> TokenizedSet:
    """Tokenise examples in order, count truncations and log a warning when any occurred."""
    tokenized = [tokenize_example(tokenizer, ex, template_for(ex, templates), max_length) for ex in examples]
    result = TokenizedSet(
        examples=tuple(tokenized),
        n_prompt_truncated=sum(item.prompt_truncated for item in tokenized),
        n_target_truncated=sum(item.target_truncated for item in tokenized),
    )
    if result.n_prompt_truncated or result.n_target_truncated:
        logger.warning(
            "%d of %d examples exceed max_length=%d: %d prompts cut from the left, %d targets cut from the right",
            sum(item.prompt_truncated or item.target_truncated for item in tokenized),
            len(tokenized),
            max_length,
            result.n_prompt_truncated,
            result.n_target_truncated,
        )
    return result


# ---------------------------------------------------------------------------------------------
# Hashes and training data
# ---------------------------------------------------------------------------------------------


def hash_examples(examples: Iterable[Example]) -> str:
    """Return the sha256 of the examples' fields, in order."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(dataclasses.asdict(example), ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(path)
    return _FILE_HASHES[key]


def fingerprint_model(reference: str | Path) -> dict[str, Any]:
    """Return ``{"reference", "sha256"}`` identifying a base model.

    For a local folder, ``sha256`` covers ``config.json`` and every weight file (``*.safetensors``
    and ``*.bin``) by name and content, so moving the folder keeps the fingerprint. For a hub
    id it is the sha256 of the id and of the cached snapshot's commit, or of the id alone when the
    model is not in the local hub cache.
    """
    resolved = resolve_model(reference)
    folder = Path(resolved)
    digest = hashlib.sha256()
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"model folder {folder} has no *.safetensors or *.bin weight files")
        for path in [folder / "config.json", *files]:
            digest.update(f"{path.name}:{_cached_sha256(path)}\n".encode())
        return {"reference": resolved, "sha256": digest.hexdigest()}

    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(resolved, "config.json")
    revision = Path(cached).parent.name if isinstance(cached, str) else None
    # NOTE: a hub snapshot is identified by its commit only; its files are not hashed.
    digest.update(f"{resolved}@{revision}".encode())
    return {"reference": resolved, "revision": revision, "sha256": digest.hexdigest()}


def mix_training_sets(sets: Mapping[str, Sequence[Example]] | Sequence[Sequence[Example]], seed: int) -> list[Example]:
    """Return the union of several tasks' training sets, shuffled with ``seed``.

    Mapping keys are visited in sorted order before the shuffle, so the result does not depend
    on the mapping's insertion order.
    """
    if isinstance(sets, Mapping):
        parts = [sets[key] for key in sorted(sets)]
    else:
        parts = list(sets)
    union = [example for part in parts for example in part]
    random.Random(seed).shuffle(union)
    return union


# ---------------------------------------------------------------------------------------------
# Batching and loss
# ---------------------------------------------------------------------------------------------


def make_batches(lengths: Sequence[int], batch_size: int, group_by_length: bool, seed: int) -> list[list[int]]:
    """Split example indices into batches for one epoch.

    The indices are shuffled with ``seed``. With ``group_by_length``, each run of
    ``50 · batch_size`` shuffled indices is sorted by length (longest first) before it is cut
    into batches, so a batch contains examples of similar length and needs little padding. The
    batch order is then shuffled, so an epoch does not go from long to short examples.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    group = 50 * batch_size
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda index: -lengths[index])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad sequences into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    import torch

    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _causal_lm(model: Any) -> Any:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def answer_loss_sum(model: Any, batch: Mapping[str, Any]) -> tuple[Any, int]:
    """Return (sum of target-token cross-entropies, number of target tokens) for one batch.

    The decoder runs on the whole sequence, but the output layer runs only at the positions that
    predict a labelled token. The result equals the summed causal-LM loss of a full forward pass. Gemma-style final logit soft-capping is applied when configured.
    NOTE: other output-layer transforms (e.g. a logit scale) are not reproduced here.
    """
    import torch
    import torch.nn.functional as F

    causal_lm = _causal_lm(model)
    decoder = causal_lm.get_decoder()
    head = causal_lm.get_output_embeddings()
    input_device = causal_lm.get_input_embeddings().weight.device

    hidden = decoder(
        input_ids=batch["input_ids"].to(input_device),
        attention_mask=batch["attention_mask"].to(input_device),
        use_cache=False,
    ).last_hidden_state

    next_labels = batch["labels"][:, 1:].to(hidden.device)
    mask = next_labels != IGNORE_INDEX
    selected = hidden[:, :-1][mask]
    logits = head(selected.to(head.weight.device)).float()

    config = causal_lm.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap

    loss = F.cross_entropy(logits, next_labels[mask].to(logits.device), reduction="sum")
    return loss, int(mask.sum())


def full_logits_loss_sum(model: Any, batch: Mapping[str, Any]) -> tuple[Any, int]:
    """Return the same value as :func:`answer_loss_sum` from the model's own forward pass.

    The output layer runs at every position, as in ``Trainer``. It is the reference for
    :func:`answer_loss_sum` and the slower alternative that ``bench/finetune_cost.py`` times.
    """
    causal_lm = _causal_lm(model)
    input_device = causal_lm.get_input_embeddings().weight.device
    output = model(
        input_ids=batch["input_ids"].to(input_device),
        attention_mask=batch["attention_mask"].to(input_device),
        labels=batch["labels"].to(input_device),
        use_cache=False,
    )
    n_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return output.loss * n_targets, n_targets


# ---------------------------------------------------------------------------------------------
# Model loading and the training loop
# ---------------------------------------------------------------------------------------------


def default_device() -> str:
    """Return ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_base_dtype(base_dtype: BaseDtype, device: str) -> Literal["float32", "bfloat16"]:
    """Resolve ``"auto"`` to ``"bfloat16"`` on CUDA and ``"float32"`` elsewhere."""
    if base_dtype != "auto":
        return base_dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def load_base_model(reference: str, base_dtype: BaseDtype, device: str) -> Any:
    """Load a causal LM for LoRA training: weights in ``base_dtype``, ``device_map="auto"`` on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if resolve_base_dtype(base_dtype, device) == "bfloat16" else torch.float32
    # NOTE: the CUDA branch is written for GPU machines but the tests run on CPU only.
    if device.startswith("cuda"):
        device_map = "auto" if device == "cuda" else {"": device}
        return AutoModelForCausalLM.from_pretrained(reference, dtype=dtype, device_map=device_map)
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype)
    return model.to(device)


def add_lora(model: Any, settings: LoraSettings, target_modules: Sequence[str]) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter (seeded), LoRA parameters in fp32."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    for parameter in peft_model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if settings.gradient_checkpointing:
        _causal_lm(peft_model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_model


@dataclasses.dataclass(frozen=True)
class StepLog:
    """One optimiser step: mean target-token loss, the learning rate it used, pre-clip gradient norm."""

    step: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float
    target_tokens: int
    tokens: int
    elapsed_s: float


def plan_steps(n_examples: int, settings: LoraSettings) -> int:
    """Return the number of optimiser steps a run takes."""
    if settings.max_steps is not None:
        return settings.max_steps
    micro_batches = math.ceil(n_examples / settings.batch_size)
    return settings.epochs * math.ceil(micro_batches / settings.gradient_accumulation_steps)


def _micro_batch_groups(data: TokenizedSet, settings: LoraSettings, total_steps: int):
    """Yield (epoch fraction, list of micro-batches) for each optimiser step."""
    lengths = [len(example.input_ids) for example in data.examples]
    accumulation = settings.gradient_accumulation_steps
    produced, epoch = 0, 0
    while produced < total_steps:
        batches = make_batches(lengths, settings.batch_size, settings.group_by_length, settings.seed + epoch)
        groups = [batches[start : start + accumulation] for start in range(0, len(batches), accumulation)]
        for index, group in enumerate(groups):
            if produced == total_steps:
                return
            produced += 1
            yield epoch + (index + 1) / len(groups), group
        epoch += 1


def train_lora(
    model: Any, data: TokenizedSet, settings: LoraSettings, pad_id: int, loss_fn: LossFunction = answer_loss_sum
) -> list[StepLog]:
    """Train the LoRA parameters of ``model`` in place and return the per-step log.

    Each optimiser step averages the loss over all target tokens of its micro-batches.
    ``loss_fn`` returns (sum of target-token losses, number of target tokens) for one batch.
    Raises ``RuntimeError`` at the first non-finite loss or gradient norm.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    if not data.examples:
        raise ValueError("the training set is empty; pass at least one example")
    total_steps = plan_steps(len(data.examples), settings)
    warmup_steps = math.ceil(settings.warmup_ratio * total_steps)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters; wrap it with add_lora first")
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    torch.manual_seed(settings.seed)

    model.train()
    log: list[StepLog] = []
    start = time.perf_counter()
    progress = tqdm(total=total_steps, desc="LoRA training", unit="step")
    for step, (epoch, group) in enumerate(_micro_batch_groups(data, settings, total_steps), start=1):
        micro_batches = [[data.examples[index] for index in batch] for batch in group]
        group_targets = sum(example.n_target_tokens for batch in micro_batches for example in batch)
        group_tokens = sum(len(example.input_ids) for batch in micro_batches for example in batch)
        learning_rate = scheduler.get_last_lr()[0]

        total_loss = 0.0
        for examples in micro_batches:
            loss_sum, _ = loss_fn(model, collate(examples, pad_id))
            (loss_sum / max(group_targets, 1)).backward()
            total_loss += float(loss_sum.detach())

        max_norm = settings.max_grad_norm if settings.max_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        mean_loss = total_loss / max(group_targets, 1)
        if not math.isfinite(mean_loss) or not math.isfinite(grad_norm):
            raise RuntimeError(
                f"training diverged at step {step}: loss {mean_loss}, gradient norm {grad_norm}; "
                f"lower learning_rate (now {settings.learning_rate})"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        log.append(
            StepLog(
                step=step,
                epoch=round(epoch, 6),
                loss=mean_loss,
                learning_rate=learning_rate,
                grad_norm=grad_norm,
                target_tokens=group_targets,
                tokens=group_tokens,
                elapsed_s=round(time.perf_counter() - start, 3),
            )
        )
        progress.update(1)
        progress.set_postfix(loss=f"{mean_loss:.3f}")
    progress.close()
    model.eval()
    return log


# ---------------------------------------------------------------------------------------------
# Files: training logs, records, atomic folders
# ---------------------------------------------------------------------------------------------


def save_training_log(log: Sequence[StepLog], folder: str | Path) -> tuple[Path, Path]:
    """Write the per-step log as ``train_log.json`` and ``train_log.csv`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [dataclasses.asdict(entry) for entry in log]
    json_path, csv_path = folder / LOG_JSON, folder / LOG_CSV
    write_json_atomic(json_path, rows)

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[field.name for field in dataclasses.fields(StepLog)])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(csv_path, buffer.getvalue())
    return json_path, csv_path


def load_training_log(path: str | Path) -> list[dict[str, Any]]:
    """Read ``train_log.json`` from a checkpoint folder or from the file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_JSON
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}; train_specialist writes it beside the checkpoint")
    return json.loads(path.read_text(encoding="utf-8"))


def plot_training_curves(runs: str | Path | Mapping[str, str | Path], smooth: int = 1) -> Any:
    """Plot loss against optimiser step and return the matplotlib ``Figure``.

    ``runs`` is one checkpoint folder (or log file) or a mapping from a label to one. With
    ``smooth > 1`` a trailing moving average over ``smooth`` steps is drawn over the raw loss.
    """
    from matplotlib.figure import Figure

    if smooth < 1:
        raise ValueError(f"invalid smooth={smooth!r}; expected a window of >= 1 steps")
    if isinstance(runs, (str, Path)):
        runs = {Path(runs).name: runs}

    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for label, path in runs.items():
        rows = load_training_log(path)
        steps = [row["step"] for row in rows]
        losses = [row["loss"] for row in rows]
        if smooth == 1:
            axes.plot(steps, losses, label=label)
            continue
        line = axes.plot(steps, losses, alpha=0.3)[0]
        averaged = [sum(losses[max(0, i - smooth + 1) : i + 1]) / (i + 1 - max(0, i - smooth + 1)) for i in range(len(losses))]
        axes.plot(steps, averaged, color=line.get_color(), label=label)
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("training loss (mean over answer tokens)")
    axes.legend()
    return figure


def _staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))


def _replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an existing ``target`` is moved aside first, then deleted.

    Temporary files and folders are created owner-only, so the permissions are opened to the
    usual 0644 for files and 0755 for folders first.
    """
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_replaceable(folder: Path) -> None:
    """Raise ``FileExistsError`` if ``folder`` exists, is not empty and is not a checkpoint of this module.

    This keeps a mistyped ``out_dir`` (e.g. a notebook's output folder) from being deleted.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"output path {folder} exists and is not a folder; choose another out_dir")
    if any(folder.iterdir()) and not (folder / RECORD_FILE).is_file():
        raise FileExistsError(
            f"output folder {folder} is not empty and has no {RECORD_FILE}, so it is not a fine-tuned "
            "checkpoint and will not be replaced; choose another out_dir or remove the folder"
        )


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """Return the fine-tuning record of a checkpoint folder, or ``None`` if it has none."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def is_finished(folder: str | Path, key: Mapping[str, Any]) -> bool:
    """Return whether ``folder`` contains a merged checkpoint whose record has exactly ``key``."""
    folder = Path(folder)
    record = read_record(folder)
    if record is None or record.get("key") != dict(key):
        return False
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Merging an adapter into full weights
# ---------------------------------------------------------------------------------------------


def merge_adapter(base_path: str | Path, adapter_path: str | Path, out_dir: str | Path) -> Path:
    """Merge a LoRA adapter into an fp32 copy of the base model and write a full checkpoint.

    ``out_dir`` receives fp32 safetensors, config, generation config and tokenizer (the
    adapter folder's tokenizer if it has one, else the base model's). The adapter folder is
    copied to ``out_dir/adapter``. Its ``hm_finetune.json`` and training logs, if present, are
    copied next to the weights, and the record gains a ``merge`` entry. The folder is built in
    a temporary sibling and renamed into place, replacing an existing ``out_dir``. Raises
    ``ValueError`` when a merged weight is NaN or infinite, and ``FileExistsError`` when
    ``out_dir`` is a non-empty folder without a fine-tuning record.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_path, out_dir = Path(adapter_path), Path(out_dir)
    if not (adapter_path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_path} is not a peft adapter folder (no adapter_config.json)")
    check_replaceable(out_dir)
    base_ref = resolve_model(base_path)

    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload(safe_merge=True)
    has_tokenizer = (adapter_path / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter_path if has_tokenizer else base_ref)

    staging = _staging_dir(out_dir)
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.copytree(adapter_path, staging / ADAPTER_DIR)
        for name in (LOG_JSON, LOG_CSV):
            if (adapter_path / name).is_file():
                shutil.copy2(adapter_path / name, staging / name)

        record = read_record(adapter_path) or {}
        record["merge"] = {
            "base_model": base_ref,
            "dtype": "float32",
            "seconds": round(time.perf_counter() - start, 3),
        }
        write_json_atomic(staging / RECORD_FILE, record)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("merged adapter %s into %s in %.1f s", adapter_path, out_dir, time.perf_counter() - start)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _load_tokenizer(tokenizer: Any, model_ref: str) -> Any:
    from transformers import AutoTokenizer

    if tokenizer is None:
        return AutoTokenizer.from_pretrained(model_ref)
    if isinstance(tokenizer, (str, Path)):
        return AutoTokenizer.from_pretrained(resolve_model(tokenizer))
    return tokenizer


def _release_memory(device: str) -> None:
    """Free the training model's memory before the merge loads a second copy of the base."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def train_specialist(
    base_model: str | Path,
    examples: Sequence[Example],
    out_dir: str | Path,
    settings: LoraSettings | None = None,
    templates: TemplateChoice = None,
    tokenizer: Any = None,
    device: str | None = None,
) -> Path:
    """Fine-tune a LoRA adapter on ``examples``, merge it into full fp32 weights, return ``out_dir``.

    ``base_model`` is an embedded checkpoint name, a local folder or a hub id. ``templates``
    selects the prompt template (see :func:`template_for`). ``tokenizer`` defaults to the base
    model's and may be a tokenizer object or a reference. ``device`` defaults to CUDA when
    visible. When ``out_dir`` already contains a finished checkpoint with the same key, it is
    returned without training. Otherwise the model is trained and ``out_dir`` replaced.

    Raises ``ValueError`` before any training for an empty training set, a tokenizer that does
    not match the model, an unknown target module or a template mismatch, and
    ``FileExistsError`` for an ``out_dir`` that :func:`check_replaceable` rejects. Invalid
    settings raise when ``LoraSettings`` is built.
    """
    from transformers import AutoConfig

    settings = settings or LoraSettings()
    out_dir = Path(out_dir)
    examples = list(examples)
    if not examples:
        raise ValueError("the training set is empty; pass at least one Example")
    bad = [type(example).__name__ for example in examples if not isinstance(example, Example)]
    if bad:
        raise TypeError(f"training examples must be hm_utils.data.Example, got {sorted(set(bad))}")

    base_ref = resolve_model(base_model)
    config = AutoConfig.from_pretrained(base_ref)
    tokenizer = _load_tokenizer(tokenizer, base_ref)
    check_tokenizer_matches(tokenizer, config, base_ref)
    target_modules = resolve_target_modules(settings.target_modules, linear_module_names(build_meta_model(config)))

    data = tokenize_examples(tokenizer, examples, templates, settings.max_length)
    base_fingerprint = fingerprint_model(base_ref)
    device = device or default_device()
    base_dtype = resolve_base_dtype(settings.base_dtype, device)
    key = {
        "format": RECORD_FORMAT,
        "settings": settings.to_dict(),
        "base_dtype": base_dtype,
        "data_sha256": hash_examples(examples),
        "tokens_sha256": data.sha256(),
        "base_model_sha256": base_fingerprint["sha256"],
    }
    if is_finished(out_dir, key):
        logger.info("reusing finished checkpoint %s (same settings, data and base model)", out_dir)
        return out_dir
    check_replaceable(out_dir)
    if read_record(out_dir) is not None:
        logger.warning("%s was trained with another configuration; training again and replacing it", out_dir)

    total_steps = plan_steps(len(examples), settings)
    logger.info(
        "training LoRA on %s: %d examples, %d tokens (%d in targets), %d steps, device %s, base in %s",
        base_ref, len(examples), data.n_tokens, data.n_target_tokens, total_steps, device, base_dtype,
    )
    model = add_lora(load_base_model(base_ref, base_dtype, device), settings, target_modules)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log = train_lora(model, data, settings, pad_id)
    train_seconds = log[-1].elapsed_s

    adapter_staging = _staging_dir(out_dir.with_name(out_dir.name + "-adapter"))
    try:
        model.save_pretrained(adapter_staging)
        tokenizer.save_pretrained(adapter_staging)
        save_training_log(log, adapter_staging)
        record = {
            "key": key,
            "kind": "lora",
            "base_model": base_fingerprint,
            "target_modules": target_modules,
            "n_examples": len(examples),
            "n_tokens": data.n_tokens,
            "n_target_tokens": data.n_target_tokens,
            "n_prompt_truncated": data.n_prompt_truncated,
            "n_target_truncated": data.n_target_truncated,
            "datasets": sorted({example.dataset for example in examples}),
            "steps": len(log),
            "first_loss": log[0].loss,
            "final_loss": log[-1].loss,
            "train_seconds": train_seconds,
            "tokens_per_second": round(sum(entry.tokens for entry in log) / max(train_seconds, 1e-9), 1),
            "device": device,
            "versions": _library_versions(),
        }
        write_json_atomic(adapter_staging / RECORD_FILE, record)
        del model
        _release_memory(device)
        merge_adapter(base_ref, adapter_staging, out_dir)
    finally:
        shutil.rmtree(adapter_staging, ignore_errors=True)
    logger.info("specialist written to %s (loss %.3f -> %.3f in %.0f s)", out_dir, log[0].loss, log[-1].loss, train_seconds)
    return out_dir


def train_mixed(
    base_model: str | Path,
    sets: Mapping[str, Sequence[Example]],
    out_dir: str | Path,
    settings: LoraSettings | None = None,
    templates: TemplateChoice = None,
    tokenizer: Any = None,
    device: str | None = None,
) -> Path:
    """Train the mixed-data baseline: :func:`train_specialist` on the union of ``sets``, shuffled with the seed."""
    settings = settings or LoraSettings()
    if not sets or not any(sets.values()):
        raise ValueError("no training examples in any task; pass {task: [Example, ...]} with at least one example")
    union = mix_training_sets(sets, settings.seed)
    return train_specialist(base_model, union, out_dir, settings, templates, tokenizer, device)

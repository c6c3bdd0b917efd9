"""Checks on merge inputs before any weights load, and on merged outputs after writing.

``check_merge_inputs`` reads only ``config.json`` files, tokenizer files and safetensors
headers. It rejects quantised checkpoints, differing architectures, layer counts, hidden
or vocabulary sizes, tied and untied output heads mixed, tensors missing from what the
architecture of ``config.json`` stores (an untied output head included), missing or extra
tensors between inputs, tensors of different shapes, non-float tensors, ``.bin`` weights,
tokenizers with different token-to-id mappings, unknown parameters, non-finite numbers,
densities outside (0, 1] and weights that sum to zero under ``normalize``.

Two conditions need weights. ``check_same_base`` reads a sample of decoder layers and
rejects a model whose distance from the base is as large as the base weights, because it
was then fine-tuned from another base. Non-finite values are seen only when weights
load, so the engine checks every input and output tensor as it streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from hm_utils.merge.config import MergeConfig
from hm_utils.merge.io import TensorInfo, TensorReader, safetensors_index, weight_files
from hm_utils.merge.model_folder import ArchitectureTensors, architecture_tensors, tokenizer_difference, tokenizer_digest
from hm_utils.merge.params import check_finite, decoder_layer_of, setting_numbers

logger = logging.getLogger(__name__)

# config.json fields that must agree between all inputs.
_MATCHING_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")

# Limit of ||θ_m − θ_F|| / ||θ_F|| (see relative_deltas). The LoRA specialists of
# SmolLM2-135M-Instruct that notebook 03_finetune trains measure about 0.0035. Two
# unrelated weight sets of norms a and b differ by about sqrt(a^2 + b^2), at least the
# norm of either, so they measure 1 or more. NOTE: full fine-tuning was not measured.
DEFAULT_MAX_RELATIVE_DELTA = 1.0


@dataclasses.dataclass
class InputSummary:
    """Facts about the inputs gathered without loading weights: local folders, tensor layout, layer count.

    ``tensors`` lists the tensors to merge, without stored copies of tied tensors.
    ``architecture`` contains the tensors that the architecture of ``config.json`` stores
    (``None`` when transformers cannot build it). ``tokenizer`` is the folder whose
    tokenizer files go into the output (``None`` when no input has any).
    """

    reference: Path
    base: Path | None
    models: list[Path]
    tensors: dict[str, TensorInfo]
    num_layers: int
    model_config: dict[str, Any]
    architecture: ArchitectureTensors | None = None
    tokenizer: Path | None = None

    @property
    def tied_copies(self) -> frozenset[str]:
        """Names of tied copies that an output may store (mergekit writes the output head of tied models)."""
        if self.architecture is not None:
            return self.architecture.tied_copies
        return frozenset({"lm_head.weight"}) if _tied(self.model_config) else frozenset()


def local_model_dir(reference: str) -> Path:
    """Return the local folder of a model reference (a path, or a hub id already in the HF cache).

    A reference that can only be a path (``hm_utils.models.looks_like_local_path``) must
    exist locally. Only ``owner/name`` without such a folder is looked up as a hub id, with
    ``huggingface_hub.snapshot_download``, which downloads only when ``HF_HUB_OFFLINE`` is
    unset. Raises ``FileNotFoundError`` when nothing is found.
    """
    from hm_utils.models import looks_like_local_path

    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"model reference {reference} is a file; give the model folder that contains config.json")
    if looks_like_local_path(reference):
        raise FileNotFoundError(f"local model folder {reference} does not exist (resolved to {path.absolute()}); check the path")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return Path(
            snapshot_download(
                reference,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"],
                local_files_only=offline,
            )
        )
    except Exception as error:  # huggingface_hub raises several unrelated types here
        where = "in the local hub cache (HF_HUB_OFFLINE=1)" if offline else "on the hub"
        raise FileNotFoundError(
            f"model {reference} is neither a local folder nor found {where}; give an existing local path"
            f" or a valid hub id ({type(error).__name__}: {error})"
        ) from error


def read_model_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a merge input must be a transformers model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def _tied(config: dict[str, Any]) -> bool:
    # transformers' PretrainedConfig defaults tie_word_embeddings to True.
    return bool(config.get("tie_word_embeddings", True))


def _check_parameters(config: MergeConfig) -> None:
    sources = [("global parameters", config.parameters)] + [(entry.model, entry.parameters) for entry in config.models]
    for owner, parameters in sources:
        for name, setting in parameters.items():
            check_finite(setting, f"{name} of {owner}")
            numbers = setting_numbers(setting)
            if name == "density":
                bad = [number for number in numbers if not 0 < number <= 1]
                if bad:
                    raise ValueError(f"density {bad[0]} of {owner} is outside (0, 1]; density is the fraction of entries kept")
            if name == "gamma" and any(not 0 <= number < 1 for number in numbers):
                raise ValueError(f"gamma of {owner} must lie in [0, 1); got {numbers}")
            if name == "epsilon" and any(number < 0 for number in numbers):
                raise ValueError(f"epsilon of {owner} must be >= 0; got {numbers}")
    if "weight" not in config.parameters:
        missing = [entry.model for entry in config.models if "weight" not in entry.parameters]
        if missing:
            raise ValueError(f"no weight for {missing}; give each model a weight or set a global weight")


def _check_configs(folders: list[Path], configs: list[dict[str, Any]]) -> None:
    """Reject quantised inputs and config.json files whose architecture, sizes or head tying differ."""
    for folder, model_config in zip(folders, configs):
        if model_config.get("quantization_config"):
            method = model_config["quantization_config"].get("quant_method", "unknown")
            raise ValueError(
                f"{folder} is quantised ({method}); merge full-precision weights (dequantise and save without quantization_config)"
            )

    reference_folder, reference_config = folders[0], configs[0]
    for folder, model_config in zip(folders[1:], configs[1:]):
        if model_config.get("architectures") != reference_config.get("architectures"):
            raise ValueError(
                f"{folder} has architectures {model_config.get('architectures')}, {reference_folder} has"
                f" {reference_config.get('architectures')}; merge only models fine-tuned from one base"
            )
        for field in _MATCHING_FIELDS:
            value, expected = model_config.get(field), reference_config.get(field)
            if value == expected:
                continue
            if field == "vocab_size":
                raise ValueError(
                    f"vocab_size is {value} in {folder} and {expected} in {reference_folder}, so their embedding"
                    " matrices have different numbers of rows; give all models one tokenizer and one vocabulary size"
                    " (resize_token_embeddings) before merging"
                )
            raise ValueError(
                f"{field} is {value} in {folder} and {expected} in {reference_folder};"
                " merge only models with the same architecture and sizes"
            )
        if _tied(model_config) != _tied(reference_config):
            raise ValueError(
                f"tie_word_embeddings is {_tied(model_config)} in {folder} and {_tied(reference_config)} in"
                f" {reference_folder}; tied and untied output heads cannot be merged"
            )


def _tensor_kind(name: str) -> str:
    return "embedding matrix" if "embed" in name or "lm_head" in name else "tensor"


def _check_against_architecture(folder: Path, index: dict[str, TensorInfo], architecture: ArchitectureTensors, tied: bool) -> None:
    """Reject a checkpoint that lacks a tensor its config.json implies, or stores one with another shape."""
    missing = sorted(architecture.shapes.keys() - index.keys())
    if missing:
        if not tied and any("lm_head" in name for name in missing):
            raise ValueError(
                f"{folder} has no output head {missing[0]}, but its config.json sets tie_word_embeddings: false;"
                " save the model with its output head, or set tie_word_embeddings: true if the head is the embedding matrix"
            )
        raise ValueError(
            f"tensors of {folder} do not match {architecture.architecture} of its config.json: missing {missing[:5]};"
            " the checkpoint is incomplete or its config.json belongs to another model"
        )
    for name, expected in architecture.shapes.items():
        if index[name].shape != expected:
            raise ValueError(
                f"{_tensor_kind(name)} {name} is {index[name].shape} in {folder}, but its config.json gives {expected};"
                " make config.json (vocab_size, hidden_size, ...) describe the stored weights"
            )


def _drop_tied_copies(folder: Path, index: dict[str, TensorInfo], tied_copies: frozenset[str]) -> dict[str, TensorInfo]:
    stored = sorted(tied_copies & index.keys())
    if stored:
        # transformers ties these to their source tensor on load, so the stored values are never used.
        logger.info("%s stores tied copies %s; they are not merged", folder, stored)
    return {name: info for name, info in index.items() if name not in tied_copies}


def _check_same_tensors(folders: list[Path], indexes: list[dict[str, TensorInfo]]) -> None:
    """Reject inputs whose tensor names, shapes or dtypes cannot be merged with the reference's."""
    reference_folder, reference_index = folders[0], indexes[0]
    for folder, index in zip(folders[1:], indexes[1:]):
        missing = sorted(reference_index.keys() - index.keys())
        extra = sorted(index.keys() - reference_index.keys())
        if missing or extra:
            raise ValueError(
                f"tensors of {folder} differ from {reference_folder}: missing {missing[:5]}, extra {extra[:5]}"
            )
        for name, info in index.items():
            expected = reference_index[name].shape
            if info.shape != expected:
                raise ValueError(
                    f"{_tensor_kind(name)} {name} is {info.shape} in {folder} and {expected} in {reference_folder};"
                    " resize the vocabulary to match before merging"
                )
    for folder, index in zip(folders, indexes):
        for name, info in index.items():
            if not info.dtype.is_floating_point or info.dtype.itemsize < 2:
                raise ValueError(f"tensor {name} of {folder} is {info.dtype}; merging needs float16, bfloat16 or float32 weights")


def _check_tokenizers(folders: list[Path]) -> Path | None:
    """Reject tokenizers with different token-to-id mappings; return the folder whose tokenizer the output gets.

    That is the reference (base) folder, or the first input with a tokenizer when the
    reference has none. A folder without tokenizer files is accepted and uses that tokenizer.
    """
    digests = [tokenizer_digest(folder) for folder in folders]
    with_tokenizer = [(folder, digest) for folder, digest in zip(folders, digests) if digest is not None]
    if not with_tokenizer:
        logger.warning("no input has tokenizer files (tokenizer.json, tokenizer.model or vocab.json); the output will have none")
        return None
    source, expected = with_tokenizer[0]
    for folder, digest in with_tokenizer[1:]:
        if digest != expected:
            raise ValueError(
                f"the tokenizer of {folder} differs from that of {source}: {tokenizer_difference(folder, source)};"
                " embedding rows of one model would be read with another model's token ids."
                " Merge models that share one tokenizer, or remove the tokenizer files of a model that uses the base's"
            )
    if source != folders[0]:
        logger.warning("%s has no tokenizer files; the output gets the tokenizer of %s", folders[0], source)
    return source


def check_merge_inputs(config: MergeConfig) -> InputSummary:
    """Check a merge config against its input folders without loading weights.

    Returns an ``InputSummary``. Raises ``ValueError`` (or ``FileNotFoundError``) naming
    the model, the value and the fix for every condition listed in the module docstring.
    """
    config.validate()
    _check_parameters(config)

    references = ([config.base_model] if config.base_model is not None else []) + config.model_paths
    folders = [local_model_dir(reference) for reference in references]
    configs = [read_model_config(folder) for folder in folders]
    _check_configs(folders, configs)

    reference_folder, reference_config = folders[0], configs[0]
    tied = _tied(reference_config)
    for folder in folders:
        if weight_files(folder)[0].suffix != ".safetensors":
            raise ValueError(
                f"{folder} stores .bin weights; convert it to safetensors before merging"
                " (AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder) writes model.safetensors)"
            )
    architecture = architecture_tensors(reference_folder, reference_config)
    if architecture is not None:
        tied_copies = architecture.tied_copies
    else:
        tied_copies = frozenset({"lm_head.weight"}) if tied else frozenset()
    indexes = []
    for folder in folders:
        index = _drop_tied_copies(folder, safetensors_index(folder), tied_copies)
        if architecture is not None:
            _check_against_architecture(folder, index, architecture, tied)
        indexes.append(index)
    _check_same_tensors(folders, indexes)
    tokenizer = _check_tokenizers(folders)

    num_layers = int(reference_config.get("num_hidden_layers") or reference_config.get("n_layer") or 0)
    has_base = config.base_model is not None
    return InputSummary(
        reference=reference_folder,
        base=folders[0] if has_base else None,
        models=folders[1:] if has_base else folders,
        tensors=indexes[0],
        num_layers=num_layers,
        model_config=reference_config,
        architecture=architecture,
        tokenizer=tokenizer,
    )


def _sample_layers(summary: InputSummary) -> list[int]:
    if summary.num_layers <= 0:
        return []
    return sorted({0, summary.num_layers // 2, summary.num_layers - 1})


def relative_deltas(summary: InputSummary) -> dict[Path, float]:
    """Return ``||θ_m − θ_F|| / ||θ_F||`` of every model over the matrices of a few decoder layers.

    The sample is the first, middle and last decoder layer (every matrix when no tensor
    name has a layer number), read one tensor at a time in float32. Norms are skipped:
    they start at one in every model, so they look close even between unrelated bases.
    """
    layers = set(_sample_layers(summary))
    names = [name for name, info in summary.tensors.items() if len(info.shape) >= 2 and decoder_layer_of(name) in layers]
    if not names:
        names = [name for name, info in summary.tensors.items() if len(info.shape) >= 2]

    base_square = 0.0
    delta_squares = {folder: 0.0 for folder in summary.models}
    with contextlib.ExitStack() as stack:
        base_reader = stack.enter_context(TensorReader(summary.base))
        readers = [stack.enter_context(TensorReader(folder)) for folder in summary.models]
        for name in names:
            base = base_reader.read(name).float()
            base_square += float(torch.linalg.vector_norm(base, dtype=torch.float64)) ** 2
            for folder, reader in zip(summary.models, readers):
                delta = reader.read(name).float().sub_(base)
                delta_squares[folder] += float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
    if base_square == 0:
        return {folder: 0.0 for folder in summary.models}
    return {folder: (square / base_square) ** 0.5 for folder, square in delta_squares.items()}


def check_same_base(summary: InputSummary, max_relative_delta: float | None = DEFAULT_MAX_RELATIVE_DELTA) -> dict[Path, float]:
    """Reject a model that was fine-tuned from another base than ``base_model``; return the relative deltas.

    Reads the sample of ``relative_deltas`` (three decoder layers per model). A model whose
    relative delta exceeds ``max_relative_delta`` raises ``ValueError``. ``None`` skips
    the check, and so does a merge without a base model (``linear``).
    """
    if summary.base is None or max_relative_delta is None:
        return {}
    ratios = relative_deltas(summary)
    for folder, ratio in ratios.items():
        logger.info("relative delta of %s from base %s: %.4f", folder, summary.base, ratio)
        if ratio > max_relative_delta:
            raise ValueError(
                f"{folder} differs from base model {summary.base} by {ratio:.2f} times the norm of the base weights"
                f" (decoder layers {_sample_layers(summary)}), above the limit {max_relative_delta}; fine-tuning changes"
                " weights far less, so it was fine-tuned from another base. Set base_model to the model it was"
                f" fine-tuned from, or raise max_relative_delta (--max-relative-delta) above {ratio:.2f} to merge anyway"
            )
    return ratios


def verify_output(folder: str | Path, summary: InputSummary, check_values: bool = True) -> None:
    """Check a merged folder: every tensor of the inputs and of the architecture present with its shape, values finite.

    An output head written as its own tensor for a tied model (mergekit does this) is
    accepted. Raises ``ValueError`` naming the first problem.
    """
    folder = Path(folder)
    index = safetensors_index(folder)
    expected = {name: info.shape for name, info in summary.tensors.items()}
    if summary.architecture is not None:
        expected.update(summary.architecture.shapes)
    missing = sorted(expected.keys() - index.keys())
    if missing:
        raise ValueError(f"merged model in {folder} lacks tensors {missing[:5]}")
    extra = sorted(index.keys() - expected.keys() - summary.tied_copies)
    if extra:
        raise ValueError(f"merged model in {folder} has unexpected tensors {extra[:5]}")
    for name, shape in expected.items():
        if index[name].shape != shape:
            raise ValueError(f"merged tensor {name} is {index[name].shape}, expected {shape}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"merged model in {folder} has no config.json")
    if check_values:
        with TensorReader(folder) as reader:
            for name in index:
                if not torch.isfinite(reader.read(name)).all():
                    raise ValueError(f"merged tensor {name} in {folder} contains NaN or infinity")

"""Checks on merge inputs before any weights load, and on merged outputs after writing.

``check_merge_inputs`` reads only ``config.json`` files and safetensors headers. It rejects
quantised checkpoints, differing architectures, layer counts, hidden or vocabulary
sizes, tied and untied output heads mixed, missing or extra tensors, tensors of
different shapes, non-float tensors, unknown parameters, non-finite numbers and
densities outside (0, 1]. Non-finite weights can only be seen when weights load; the
engine checks every input and output tensor as it streams.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from hm_utils.merge.config import MergeConfig
from hm_utils.merge.io import TensorInfo, TensorReader, safetensors_index, weight_files
from hm_utils.merge.params import check_finite, setting_numbers

logger = logging.getLogger(__name__)

# config.json fields that must agree between all inputs.
_MATCHING_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")


@dataclasses.dataclass
class InputSummary:
    """Facts about the inputs gathered without loading weights: local folders, tensor layout, layer count."""

    reference: Path
    base: Path | None
    models: list[Path]
    tensors: dict[str, TensorInfo]
    num_layers: int
    model_config: dict[str, Any]


def local_model_dir(reference: str) -> Path:
    """Return the local folder of a model reference (a path, or a hub id already in the HF cache).

    A hub id is looked up with ``huggingface_hub.snapshot_download``, which downloads only
    when ``HF_HUB_OFFLINE`` is unset. Raises ``FileNotFoundError`` when nothing is found.
    """
    path = Path(reference)
    if path.is_dir():
        return path
    if path.is_absolute() or reference.startswith("."):
        raise FileNotFoundError(f"model folder {reference} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                reference,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"],
                local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1",
            )
        )
    except Exception as error:  # huggingface_hub raises several unrelated types here
        raise FileNotFoundError(f"model {reference} is not a local folder and could not be found on the hub: {error}") from error


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
            if model_config.get(field) != reference_config.get(field):
                raise ValueError(
                    f"{field} is {model_config.get(field)} in {folder} and {reference_config.get(field)} in"
                    f" {reference_folder}; merge only models with the same architecture and sizes"
                )
        if _tied(model_config) != _tied(reference_config):
            raise ValueError(
                f"tie_word_embeddings is {_tied(model_config)} in {folder} and {_tied(reference_config)} in"
                f" {reference_folder}; tied and untied output heads cannot be merged"
            )

    indexes = []
    for folder in folders:
        if weight_files(folder)[0].suffix != ".safetensors":
            raise ValueError(f"{folder} stores .bin weights; convert it to safetensors (save_pretrained) before merging")
        indexes.append(safetensors_index(folder))

    reference_index = indexes[0]
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
                kind = "embedding matrix" if "embed" in name or "lm_head" in name else "tensor"
                raise ValueError(
                    f"{kind} {name} is {info.shape} in {folder} and {expected} in {reference_folder};"
                    " resize the vocabulary to match before merging"
                )
    for folder, index in zip(folders, indexes):
        for name, info in index.items():
            if not info.dtype.is_floating_point or info.dtype.itemsize < 2:
                raise ValueError(f"tensor {name} of {folder} is {info.dtype}; merging needs float16, bfloat16 or float32 weights")

    num_layers = int(reference_config.get("num_hidden_layers") or reference_config.get("n_layer") or 0)
    has_base = config.base_model is not None
    return InputSummary(
        reference=reference_folder,
        base=folders[0] if has_base else None,
        models=folders[1:] if has_base else folders,
        tensors=reference_index,
        num_layers=num_layers,
        model_config=reference_config,
    )


def verify_output(folder: str | Path, summary: InputSummary, check_values: bool = True) -> None:
    """Check a merged folder: every expected tensor present with its shape, values finite.

    An output head written as its own tensor for a tied model (mergekit does this) is
    accepted. Raises ``ValueError`` naming the first problem.
    """
    folder = Path(folder)
    index = safetensors_index(folder)
    missing = sorted(summary.tensors.keys() - index.keys())
    if missing:
        raise ValueError(f"merged model in {folder} lacks tensors {missing[:5]}")
    extra = sorted(index.keys() - summary.tensors.keys() - {"lm_head.weight"})
    if extra:
        raise ValueError(f"merged model in {folder} has unexpected tensors {extra[:5]}")
    for name, info in summary.tensors.items():
        if index[name].shape != info.shape:
            raise ValueError(f"merged tensor {name} is {index[name].shape}, expected {info.shape}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"merged model in {folder} has no config.json")
    if check_values:
        with TensorReader(folder) as reader:
            for name in index:
                if not torch.isfinite(reader.read(name)).all():
                    raise ValueError(f"merged tensor {name} in {folder} contains NaN or infinity")

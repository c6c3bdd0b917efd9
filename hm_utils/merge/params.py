"""Parameter settings with mergekit's meaning: scalars, gradients and tensor-name filters.

A setting is one of

- a number (or bool): the value for every tensor;
- a list of numbers, a *gradient*: tensor ``x`` of decoder layer ``l`` out of ``L``
  takes position ``t = l / (L - 1)`` (``t = 1`` when ``L == 1``), and the value is the
  linear interpolation ``(1 - f) v[i] + f v[i + 1]`` with ``i = floor(t (n - 1))`` and
  ``f = t (n - 1) - i``. A gradient of exactly ``L`` values therefore gives layer ``l``
  the value ``v[l]`` (up to one rounding). Tensors outside the decoder layers
  (embeddings, final norm, output head) take ``t = 0``, the first value, as mergekit
  0.1.5 plans them;
- a list of ``{"filter": str | None, "value": setting}`` entries: the first entry whose
  filter is ``None``, ``"*"`` or a substring of the tensor name applies.

Per-model values take precedence over global ones, as in a mergekit configuration.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

Setting = Union[float, int, bool, str, Sequence[Any]]

_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def decoder_layer_of(tensor_name: str) -> int | None:
    """Return the decoder layer index of a tensor, or ``None`` for embeddings, final norm and head.

    Recognises ``model.layers.N.``, ``transformer.h.N.`` and ``*.blocks.N.`` names, the
    layouts of Llama, Qwen2, Gemma, Mistral, GPT-2 and GPT-NeoX checkpoints.
    """
    match = _LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Return the gradient position ``t`` of a tensor (see the module docstring)."""
    layer = decoder_layer_of(tensor_name)
    if layer is None:
        return 0.0
    if num_layers > 1:
        return layer / (num_layers - 1)
    return 1.0


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool, str))


def _is_conditional(value: Any) -> bool:
    return isinstance(value, Mapping) and "value" in value


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """Resolve a setting for one tensor at gradient position ``t``; ``None`` when no filter matches.

    Numbers come back as they interpolate (floats for gradients); mergekit applies the
    same formula, so both produce identical values.
    """
    if _is_conditional(setting):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if not isinstance(setting, Sequence):
        raise TypeError(f"invalid setting {setting!r}: expected a number, a list of numbers or filter entries")
    if not setting:
        return None

    if all(_is_scalar(entry) for entry in setting):
        numeric = all(isinstance(entry, (int, float)) and not isinstance(entry, bool) for entry in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * setting[low] + fraction * setting[high]

    for entry in setting:
        if not _is_conditional(entry):
            raise TypeError(
                f"invalid setting entry {entry!r}: a list mixes numbers and filter entries;"
                " use either a gradient or a list of {'filter': ..., 'value': ...}"
            )
        pattern = entry.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(entry["value"], tensor_name, t)
    return None


def resolve(
    name: str,
    sources: Sequence[Mapping[str, Setting] | None],
    tensor_name: str,
    t: float,
    default: Any = None,
) -> Any:
    """Return parameter ``name`` from the first source (highest precedence first) that defines it."""
    for source in sources:
        if source is not None and name in source:
            value = evaluate_setting(source[name], tensor_name, t)
            if value is not None:
                return value
    return default


def per_model_settings(value: Any, model_names: Sequence[str], parameter: str) -> list[Setting]:
    """Expand a user value into one setting per model.

    ``value`` is a setting for all models, a sequence with one setting per model (in
    ``model_names`` order) or a mapping from model name to setting. A bare list of
    numbers at the top level means one number per model, never a gradient: pass
    ``[gradient] * len(models)`` for a gradient shared by all models.
    """
    if _is_scalar(value) or _is_conditional(value):
        return [value] * len(model_names)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(model_names))
        missing = [name for name in model_names if name not in value]
        if unknown or missing:
            raise ValueError(
                f"{parameter}: mapping keys must be the model names {list(model_names)};"
                f" unknown {unknown}, missing {missing}"
            )
        return [value[name] for name in model_names]
    if isinstance(value, Sequence):
        if len(value) != len(model_names):
            raise ValueError(
                f"{parameter}: got {len(value)} entries for {len(model_names)} models;"
                " a top-level list gives one setting per model (use [gradient] * n_models"
                " for a per-layer list shared by all models)"
            )
        return list(value)
    raise TypeError(f"{parameter}: invalid value {value!r}; expected a number, a per-model list or a mapping")


def setting_numbers(setting: Setting) -> list[float]:
    """Return every number a setting can produce (its scalars, gradient points and filter values)."""
    if _is_conditional(setting):
        return setting_numbers(setting["value"])
    if isinstance(setting, bool):
        return []
    if isinstance(setting, (int, float)):
        return [float(setting)]
    if isinstance(setting, str):
        try:
            return [float(setting)]
        except ValueError:
            return []
    numbers: list[float] = []
    for entry in setting:
        numbers.extend(setting_numbers(entry))
    return numbers


def check_finite(setting: Setting, parameter: str) -> None:
    """Raise ``ValueError`` when a setting contains NaN or infinity."""
    for number in setting_numbers(setting):
        if not math.isfinite(number):
            raise ValueError(f"{parameter} contains a non-finite value {number}; use finite numbers")

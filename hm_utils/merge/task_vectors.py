"""In-memory merging: task vectors computed once, merged deltas, and in-place weight swaps.

``TaskVectors`` keeps the base state ``θ_F`` and every delta ``δ_m = θ_m − θ_F`` in
memory. A sweep calls ``merge_deltas`` with new weights or densities, then
``apply_delta_`` sets a loaded model to ``θ_F + Δ`` in all tensors or in chosen decoder
layers, without reading any checkpoint again.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hm_utils.merge.io import all_finite, load_state_dict
from hm_utils.merge.methods import check_density, check_parameter_names, check_weight_sum, merge_tensor, method_spec, torch_threads
from hm_utils.merge.params import (
    check_finite,
    decoder_layer_of,
    evaluate_setting,
    layer_position,
    per_model_settings,
)

logger = logging.getLogger(__name__)

StateOrPath = Mapping[str, torch.Tensor] | str | Path


def _as_state(source: StateOrPath, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if isinstance(source, (str, Path)):
        return load_state_dict(source, dtype=dtype)
    return {name: tensor.detach().to("cpu", dtype) for name, tensor in source.items() if tensor.is_floating_point()}


def _check_finite_tensor(name: str, tensor: torch.Tensor, owner: str) -> None:
    if not all_finite(tensor):
        raise ValueError(f"tensor {name} of {owner} contains NaN or infinity; fix or replace that checkpoint")


class TaskVectors:
    """Base weights ``θ_F`` and per-model deltas ``δ_m = θ_m − θ_F``, computed once.

    Attributes: ``base`` (name -> tensor), ``deltas`` (one name -> tensor dict per model,
    in ``names`` order), ``names`` (model names), ``num_layers`` (decoder layers seen in
    the tensor names). All tensors are CPU ``dtype`` (float32 by default). Only
    floating-point tensors are kept.
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        deltas: Sequence[Mapping[str, torch.Tensor]],
        names: Sequence[str] | None = None,
        num_layers: int | None = None,
    ):
        self.base = dict(base)
        self.deltas = [dict(delta) for delta in deltas]
        self.names = [f"model_{i}" for i in range(len(self.deltas))] if names is None else list(names)
        if len(self.names) != len(self.deltas):
            raise ValueError(f"{len(self.names)} names for {len(self.deltas)} models")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"model names must be unique, got {self.names}")
        for name, delta in zip(self.names, self.deltas):
            if delta.keys() != self.base.keys():
                missing = sorted(self.base.keys() - delta.keys())
                extra = sorted(delta.keys() - self.base.keys())
                raise ValueError(f"tensors of {name} differ from the base: missing {missing[:5]}, extra {extra[:5]}")
        layers = [decoder_layer_of(tensor_name) for tensor_name in self.base]
        seen = max((layer for layer in layers if layer is not None), default=-1) + 1
        self.num_layers = seen if num_layers is None else num_layers

    @classmethod
    def from_checkpoints(
        cls,
        base: StateOrPath,
        specialists: Sequence[StateOrPath],
        names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        threads: int | None = 1,
    ) -> TaskVectors:
        """Compute deltas from a base and specialist checkpoints (folders, files or state dicts).

        Raises ``ValueError`` when a specialist lacks a base tensor, has an extra one, has a
        different shape, or contains NaN or infinity. Names default to the folder names.
        ``threads`` sets torch's CPU threads while computing (see ``merge_deltas``).
        """
        with torch_threads(threads):
            return cls._from_checkpoints(base, specialists, names, dtype)

    @classmethod
    def _from_checkpoints(
        cls,
        base: StateOrPath,
        specialists: Sequence[StateOrPath],
        names: Sequence[str] | None,
        dtype: torch.dtype,
    ) -> TaskVectors:
        if names is None:
            names = [
                Path(spec).name if isinstance(spec, (str, Path)) else f"model_{i}" for i, spec in enumerate(specialists)
            ]
        base_state = _as_state(base, dtype)
        for tensor_name, tensor in base_state.items():
            _check_finite_tensor(tensor_name, tensor, "the base model")

        deltas = []
        for name, specialist in zip(names, specialists):
            state = _as_state(specialist, dtype)
            missing = sorted(base_state.keys() - state.keys())
            extra = sorted(state.keys() - base_state.keys())
            if missing or extra:
                raise ValueError(f"tensors of {name} differ from the base: missing {missing[:5]}, extra {extra[:5]}")
            delta = {}
            for tensor_name, base_tensor in base_state.items():
                tensor = state.pop(tensor_name)
                if tensor.shape != base_tensor.shape:
                    raise ValueError(
                        f"tensor {tensor_name} of {name} has shape {tuple(tensor.shape)}, base has {tuple(base_tensor.shape)}"
                    )
                _check_finite_tensor(tensor_name, tensor, name)
                delta[tensor_name] = tensor - base_tensor
            deltas.append(delta)
            del state
        return cls(base_state, deltas, names)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.base)

    def __len__(self) -> int:
        return len(self.deltas)

    def layer_tensor_names(self, layers: Iterable[int]) -> list[str]:
        """Names of the tensors that belong to the given decoder layers."""
        wanted = set(layers)
        return [name for name in self.base if decoder_layer_of(name) in wanted]


def resolve_model_parameters(
    method: str,
    model_names: Sequence[str],
    weights: Any,
    densities: Any,
    options: Mapping[str, Any],
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Split user arguments into per-model settings and shared settings, validated.

    Returns ``(per_model, shared)``: ``per_model[parameter]`` is a list with one setting
    per model, ``shared[parameter]`` one setting. Raises ``ValueError`` for an unknown
    method or parameter, non-finite numbers and densities outside (0, 1].
    """
    spec = method_spec(method)
    options = dict(options)
    if "lambda_" in options:
        options["lambda"] = options.pop("lambda_")
    check_parameter_names(method, list(options), where="options")

    per_model: dict[str, list[Any]] = {"weight": per_model_settings(weights, model_names, "weights")}
    if "density" in spec.model_parameters:
        per_model["density"] = per_model_settings(densities, model_names, "densities")
    elif densities is not None and not (isinstance(densities, (int, float)) and densities == 1):
        raise ValueError(f"merge method {method!r} takes no density; pass densities=None or 1.0")
    for parameter in ("gamma", "epsilon"):
        if parameter in options:
            per_model[parameter] = per_model_settings(options.pop(parameter), model_names, parameter)
    shared = {name: options[name] for name in spec.shared_parameters if name in options}

    for parameter, settings in per_model.items():
        for model_name, setting in zip(model_names, settings):
            check_finite(setting, f"{parameter} of {model_name}")
    for parameter, setting in shared.items():
        check_finite(setting, parameter)
    return per_model, shared


def _resolved(setting: Any, tensor_name: str, t: float, default: Any) -> Any:
    value = evaluate_setting(setting, tensor_name, t)
    return default if value is None else value


def merge_deltas(
    task_vectors: TaskVectors,
    method: str,
    weights: Any,
    densities: Any = 1.0,
    *,
    tensors: Collection[str] | None = None,
    layers: Collection[int] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    threads: int | None = 1,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Merge the task vectors tensor by tensor and return the merged delta ``Δ`` per tensor name.

    ``method``: one of ``hm_utils.merge.METHODS`` (mergekit names). ``weights`` and
    ``densities`` are a setting for all models, a list with one setting per model, or a
    mapping from model name to setting. A setting is a number, a per-layer gradient list
    or a list of ``{"filter", "value"}`` entries (see ``hm_utils.merge.params``). Options
    take mergekit's names: ``normalize``, ``rescale``, ``lambda`` (or ``lambda_``),
    ``int8_mask`` (accepted, no effect on values), and per-model ``gamma`` and ``epsilon``.
    ``tensors`` or ``layers`` restrict the result to those tensor names or decoder layers.
    Random methods draw from ``generator`` (the global torch RNG when ``None``).
    ``threads`` sets torch's CPU threads during the merge and is restored afterwards
    (``None`` keeps the current setting; see ``merge_checkpoints`` for why one is the
    default). ``θ_F + Δ`` is the merged model.
    """
    spec = method_spec(method)
    per_model, shared = resolve_model_parameters(method, task_vectors.names, weights, densities, options)
    model_defaults = spec.model_parameters
    shared_defaults = spec.shared_parameters

    # Name order, as in merge_checkpoints and mergekit, so seeded random draws agree.
    names = sorted(task_vectors.tensor_names)
    if tensors is not None:
        unknown = sorted(set(tensors) - set(names))
        if unknown:
            raise KeyError(f"tensors not in the task vectors: {unknown[:5]}")
        names = [name for name in names if name in set(tensors)]
    if layers is not None:
        names = [name for name in names if decoder_layer_of(name) in set(layers)]

    merged: dict[str, torch.Tensor] = {}
    with torch_threads(threads):
        for tensor_name in tqdm(names, desc=f"merge {method}", disable=not progress):
            merged[tensor_name] = _merge_one_tensor(
                task_vectors, tensor_name, method, per_model, shared, model_defaults, shared_defaults, generator
            )
    return merged


def _merge_one_tensor(
    task_vectors: TaskVectors,
    tensor_name: str,
    method: str,
    per_model: dict[str, list[Any]],
    shared: dict[str, Any],
    model_defaults: dict[str, Any],
    shared_defaults: dict[str, Any],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Resolve one tensor's settings at its layer position and merge its deltas."""
    t = layer_position(tensor_name, task_vectors.num_layers)
    values = {
        parameter: [_resolved(setting, tensor_name, t, model_defaults.get(parameter)) for setting in settings]
        for parameter, settings in per_model.items()
    }
    if any(weight is None for weight in values["weight"]):
        raise ValueError(f"no weight applies to tensor {tensor_name}; add a filter entry without a filter")
    for model_name, density in zip(task_vectors.names, values.get("density", [])):
        check_density(float(density), f"{model_name} at {tensor_name}")
    settings = {
        parameter: _resolved(shared[parameter], tensor_name, t, default) if parameter in shared else default
        for parameter, default in shared_defaults.items()
    }
    check_weight_sum([float(weight) for weight in values["weight"]], bool(settings["normalize"]), f"tensor {tensor_name}")

    return merge_tensor(
        [delta[tensor_name] for delta in task_vectors.deltas],
        method,
        [float(weight) for weight in values["weight"]],
        [float(density) for density in values["density"]] if "density" in values else None,
        base=task_vectors.base[tensor_name],
        normalize=bool(settings["normalize"]),
        rescale=bool(settings.get("rescale", False)),
        scale=float(settings.get("lambda", 1.0)),
        gammas=[float(gamma) for gamma in values["gamma"]] if "gamma" in values else None,
        epsilons=[float(epsilon) for epsilon in values["epsilon"]] if "epsilon" in values else None,
        generator=generator,
    )


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for name, buffer in model.named_buffers(remove_duplicate=False):
        tensors.setdefault(name, buffer)
    return tensors


@torch.no_grad()
def apply_delta_(
    model: torch.nn.Module,
    base_state: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    layers: Collection[int] | None = None,
) -> list[str]:
    """Set model tensors to ``base_state + delta`` in place and return the names written.

    Every tensor of ``base_state`` is written (``base_state`` alone where ``delta`` has no
    entry, which resets it), or with ``layers`` only the tensors of those decoder
    layers. The sum is formed in the base dtype and then cast to the parameter's dtype,
    so a bfloat16 model gets ``round(θ_F + Δ)``. Raises ``KeyError`` before writing
    anything when a name is missing from the model or ``delta`` has a name outside
    ``base_state``, and ``ValueError`` on a shape mismatch.
    """
    targets = _model_tensors(model)
    extra = sorted(set(delta) - set(base_state))
    if extra:
        raise KeyError(f"delta has tensors that are not in base_state: {extra[:5]}")
    names = [name for name in base_state if layers is None or decoder_layer_of(name) in set(layers)]
    missing = [name for name in names if name not in targets]
    if missing:
        raise KeyError(f"model has no tensors named {missing[:5]}; pass the model whose state dict produced base_state")
    for name in names:
        if tuple(targets[name].shape) != tuple(base_state[name].shape):
            raise ValueError(
                f"tensor {name} is {tuple(targets[name].shape)} in the model, {tuple(base_state[name].shape)} in base_state"
            )

    for name in names:
        target = targets[name]
        base = base_state[name]
        update = delta.get(name)
        if update is None:
            target.copy_(base)
        elif target.dtype == base.dtype and target.device == base.device:
            torch.add(base, update, out=target.data)
        else:
            target.copy_(base + update)
    return names

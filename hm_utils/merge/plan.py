"""Per-tensor merge parameters resolved from a config and tensor names, before any weights load."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from hm_utils.merge.checks import InputSummary
from hm_utils.merge.config import MergeConfig
from hm_utils.merge.methods import check_density, check_weight_sum, method_spec
from hm_utils.merge.params import decoder_layer_of, layer_position, resolve


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """Resolved parameters of one output tensor; per-model tuples follow ``config.models`` order."""

    name: str
    layer: int | None
    t: float
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    gammas: tuple[float, ...]
    epsilons: tuple[float, ...]
    normalize: bool
    rescale: bool
    scale: float

    def model_values(self, index: int) -> dict[str, float]:
        """Per-model values of model ``index`` (weight, density, and gamma or epsilon where used)."""
        return {
            "weight": self.weights[index],
            "density": self.densities[index],
            "gamma": self.gammas[index],
            "epsilon": self.epsilons[index],
        }


def plan_tensor(config: MergeConfig, tensor_name: str, num_layers: int) -> TensorPlan:
    """Resolve every parameter of one tensor.

    Raises ``ValueError`` for an invalid density or epsilon, and for weights that sum to
    zero under ``normalize``.
    """
    spec = method_spec(config.merge_method)
    t = layer_position(tensor_name, num_layers)
    model_defaults = spec.model_parameters
    shared_defaults = spec.shared_parameters

    per_model: dict[str, list[float]] = {}
    for parameter in ("weight", "density", "gamma", "epsilon"):
        default = model_defaults.get(parameter)
        values = []
        for entry in config.models:
            value = resolve(parameter, [entry.parameters, config.parameters], tensor_name, t, default)
            if parameter == "weight" and value is None:
                raise ValueError(f"no weight applies to {tensor_name} for {entry.model}; add an entry without a filter")
            values.append(float(value) if value is not None else {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}[parameter])
        per_model[parameter] = values

    if "density" in model_defaults:
        for entry, density, epsilon in zip(config.models, per_model["density"], per_model["epsilon"]):
            check_density(density, f"{entry.model} at {tensor_name}")
            if spec.sparsification is not None and spec.sparsification.value == "della_magprune" and density < 1:
                if density + epsilon >= 1 or density - epsilon <= 0:
                    raise ValueError(
                        f"DELLA needs density +/- epsilon inside (0, 1); {entry.model} at {tensor_name} has"
                        f" density {density}, epsilon {epsilon}; lower epsilon"
                    )

    shared = {name: resolve(name, [config.parameters], tensor_name, t, default) for name, default in shared_defaults.items()}
    check_weight_sum(per_model["weight"], bool(shared["normalize"]), tensor_name)
    return TensorPlan(
        name=tensor_name,
        layer=decoder_layer_of(tensor_name),
        t=t,
        weights=tuple(per_model["weight"]),
        densities=tuple(per_model["density"]),
        gammas=tuple(per_model["gamma"]),
        epsilons=tuple(per_model["epsilon"]),
        normalize=bool(shared["normalize"]),
        rescale=bool(shared.get("rescale", False)),
        scale=float(shared.get("lambda", 1.0)),
    )


def plan_merge(config: MergeConfig, summary: InputSummary) -> list[TensorPlan]:
    """Resolve the parameters of every tensor of the inputs, in lexicographic name order.

    mergekit 0.1.5 executes tensors in that order too, so seeded random methods draw
    from the global RNG in the same sequence and produce the same masks.
    """
    return [plan_tensor(config, name, summary.num_layers) for name in sorted(summary.tensors)]


def _format(value: float) -> str:
    return f"{value:.6g}"


def describe_plan(config: MergeConfig, plan: Sequence[TensorPlan]) -> str:
    """Return a text table of weight and density (and gamma or epsilon) per model per decoder layer.

    A layer whose tensors resolve differently (tensor-name filters) gets one row per
    tensor; tensors outside the decoder layers are listed under ``-``.
    """
    spec = method_spec(config.merge_method)
    columns = [name for name in ("weight", "density", "gamma", "epsilon") if name in spec.model_parameters]
    model_labels = [f"m{i}" for i in range(len(config.models))]

    lines = [f"merge_method: {config.merge_method}"]
    if config.base_model is not None:
        lines.append(f"base_model: {config.base_model}")
    for label, entry in zip(model_labels, config.models):
        lines.append(f"{label}: {entry.model}")
    shared = plan[0] if plan else None
    if shared is not None:
        shared_text = f"normalize={shared.normalize}"
        if spec.uses_base:
            shared_text += f" rescale={shared.rescale} lambda={_format(shared.scale)}"
        lines.append(f"shared (first tensor): {shared_text}")

    header = ["layer", "tensors"] + [f"{label}.{column}" for label in model_labels for column in columns]
    rows = [header]

    groups: dict[Any, list[TensorPlan]] = {}
    for item in plan:
        groups.setdefault(item.layer, []).append(item)
    ordered = sorted(groups, key=lambda layer: (layer is not None, -1 if layer is None else layer))
    for layer in ordered:
        items = groups[layer]
        distinct: dict[tuple, list[str]] = {}
        for item in items:
            key = tuple(item.model_values(i)[column] for i in range(len(model_labels)) for column in columns)
            key += (item.normalize, item.rescale, item.scale)
            distinct.setdefault(key, []).append(item.name)
        for key, names in distinct.items():
            if len(distinct) == 1:
                label = "all" if layer is not None else ", ".join(names)
            else:
                label = ", ".join(name.split(f"layers.{layer}.")[-1] if layer is not None else name for name in names)
            values = [_format(value) for value in key[: len(model_labels) * len(columns)]]
            rows.append(["-" if layer is None else str(layer), label] + values)

    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)

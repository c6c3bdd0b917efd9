r"""Hi-Merging: model-wise pruning and scaling, then layer-wise conflict resolution.

Notation: base :math:`\theta_F`, specialists :math:`m = 1..M` with deltas
:math:`\delta_m = \theta_m - \theta_F`, decoder layers :math:`l = 0..L-1`.

**Stage 1, model-wise.** For each specialist, a density :math:`p_m` and a weight :math:`s_m`
are chosen on a grid (:func:`setting_grid`, 0.1 .. 1.0 in steps of 0.1 by default). Per tensor
:math:`x`, the kept delta is

.. math:: d_m[x] = s_m \cdot \mathrm{trim}(\delta_m[x], p_m),

where :math:`\mathrm{trim}` keeps the :math:`\max(1, \lfloor p n \rfloor)` entries of largest
magnitude of the :math:`n`-entry tensor and zeros the rest, without rescaling. This is mergekit
0.1.5's ``ties`` with one model, ``density = p``, ``weight = s`` and ``normalize: false``
(:func:`model_wise_config`); the setting with the best validation score wins
(:func:`select_setting`).

**Stage 2, initial merge.** TIES sign election on the stage-1 deltas, per tensor and entry:
:math:`\sigma = \mathrm{sign}(\sum_m d_m)` (a zero sum counts as positive), and
:math:`\Delta = \sum_m [\mathrm{sign}(d_m) = \sigma]\, d_m`, without normalisation.

**Stage 3, contributions** (``hm_utils.contribution``): :math:`c_{mm}^l` on the specialist,
:math:`c_{mG}^l` on the merge, the conflict :math:`\gamma_m^l = c_{mm}^l - c_{mG}^l` and the
layer ranking by :math:`\Gamma^l = \sum_m \gamma_m^l`.

**Stage 4, conflict resolution** at a layer :math:`l`, with the losers
:math:`\mathcal{L} = \{m : \gamma_m^l > 0\}` (tasks that layer :math:`l` helps less after merging):

- severe, :math:`\mathcal{L}` = all models: keep only the delta of the model with the largest
  contribution at :math:`l` (weight 0 for the others at :math:`l`);
- partial, :math:`\emptyset \ne \mathcal{L} \ne` all: each non-losing model :math:`h` harms a
  loser at :math:`l`, so its delta at :math:`l` is pruned and scaled further:
  :math:`p_h^l = f_p\, p_h` and :math:`s_h^l = f_s\, s_h` (:math:`f_p = f_s = 0.5` by default);
- mutual enhancement, :math:`\mathcal{L} = \emptyset`: the layer stays as merged.

For :math:`M = 2` these are the published cases: severe when :math:`\gamma_A > 0` and
:math:`\gamma_B > 0`, partial when :math:`\gamma_A \gamma_B < 0` (the model with
:math:`\gamma \le 0` is the harming one), mutual when :math:`\gamma_A \le 0` and
:math:`\gamma_B \le 0`. The merge after resolution is TIES (stage 2) with per-layer, per-model
weights :math:`s_m^l` and densities :math:`p_m^l` (a ``LayerPlan``), written as a mergekit config
whose per-layer values are tensor-name filters (:func:`mergekit_config`).

Decisions (the method description leaves them open); each default can be changed:

1. *Where top-p applies.* Per tensor, as mergekit's ``ties`` does; kept values are not
   rescaled (mergekit's ``ties`` default ``rescale: false``), because :math:`s` is the scale.
2. *Score for QA, split.* The mean gold-answer token log-likelihood on the validation split, for
   QA and multiple choice alike. Option-likelihood accuracy is the alternative for multiple
   choice (``hm_utils.contribution.ScoreKind``). Contributions are compared across tasks in the
   severe case, so all tasks should use the same kind of score.
3. *"Layer l's delta removed" on the merge.* The whole merged delta at :math:`l` (default), or
   the task's own share of it (``hm_utils.contribution.MergeDeletion``; shares from
   :func:`merged_shares`).
4. *Iteration.* Layers are visited in decreasing :math:`\Gamma^l`, only those with
   :math:`\Gamma^l > 0` by default (``positive_only``); each layer at most once. The run stops
   when ``max_layers`` layers were visited (every visit counts, also a rejected or unchanged
   one; ``None`` means no budget) or when no candidate is left. Contributions on the merge are
   not recomputed after a resolution by default (``recompute=False``): one sweep ranks all
   layers. With ``recompute=True`` the caller's function recomputes :math:`c_{mG}` after every
   accepted change and the remaining layers are ranked again. An optional acceptance check
   (``acceptance="no_drop"``) keeps a resolution only if the caller's validation objective does
   not decrease; the default (``"always"``) keeps every resolution, as the published procedure
   has no such check.
5. *Partial conflict.* The harming models are the non-losers (:math:`\gamma \le 0`). "Half of p
   and s" is :math:`p_h^l = 0.5\, p_h`, :math:`s_h^l = 0.5\, s_h` of the model-wise values; the
   density applies to the original delta, so the kept entries are the top :math:`p_h/2` of
   :math:`\delta_h` per tensor, a subset of the stage-1 entries (up to flooring of the counts).
6. *Severe conflict, which model stays.* The larger :math:`c_{mm}^l`
   (``severe_criterion="specialist"``), or the larger :math:`c_{mG}^l` (``"merged"``); a tie
   falls to the other criterion, then to the first model.
7. *More than two models.* The loser-set generalisation above.
8. *Multiple-choice scoring.* Likelihood only (gold answer or options), no decoding.

A :math:`\gamma` of exactly 0 counts as not losing. The published conditions leave
:math:`(\gamma_A > 0, \gamma_B = 0)` uncovered; here it is a partial conflict with B harming.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hm_utils.contribution import Contributions, rank_layers
from hm_utils.merge.config import MergeConfig, ModelEntry, write_mergekit_config
from hm_utils.merge.params import decoder_layer_of
from hm_utils.merge.sparsify import magnitude_prune
from hm_utils.merge.task_vectors import TaskVectors, merge_deltas

logger = logging.getLogger(__name__)

SevereCriterion = Literal["specialist", "merged"]
AcceptanceRule = Literal["always", "no_drop"]
SEVERE_CRITERIA: tuple[str, ...] = ("specialist", "merged")
ACCEPTANCE_RULES: tuple[str, ...] = ("always", "no_drop")

# Shared TIES parameters of every Hi-Merging merge, in mergekit 0.1.5's names.
TIES_PARAMETERS: dict[str, Any] = {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}


# ---------------------------------------------------------------------------------------------
# Stage 1: model-wise density and weight
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class ModelSetting:
    """A model-wise TIES setting: ``density`` p (fraction of entries kept per tensor) and ``weight`` s."""

    density: float
    weight: float

    def __post_init__(self) -> None:
        if not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise ValueError(f"density {self.density!r} is outside (0, 1]; it is the fraction of entries kept")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight {self.weight!r} must be a positive finite number")


def grid_values(step: float = 0.1) -> list[float]:
    """Return ``step, 2 step, ..., 1.0``; raises ``ValueError`` unless ``step`` divides 1."""
    if not (isinstance(step, (int, float)) and 0 < step <= 1):
        raise ValueError(f"invalid grid step {step!r}; expected a number in (0, 1] such as 0.1")
    count = round(1 / step)
    if abs(count * step - 1) > 1e-9:
        raise ValueError(f"grid step {step} does not divide 1; use e.g. 0.1, 0.2, 0.25 or 0.5")
    return [round(k * step, 10) for k in range(1, count + 1)]


def setting_grid(step: float = 0.1) -> list[ModelSetting]:
    """Return the p x s grid, density-major: ``(step, step), (step, 2 step), ..., (1, 1)``."""
    values = grid_values(step)
    return [ModelSetting(density, weight) for density in values for weight in values]


def model_wise_config(
    base_model: str | Path, model: str | Path, setting: ModelSetting, dtype: str = "float32"
) -> MergeConfig:
    """Return the mergekit config of one stage-1 point: ``ties``, one model, ``normalize: false``."""
    return MergeConfig(
        merge_method="ties",
        models=[ModelEntry(str(model), {"weight": setting.weight, "density": setting.density})],
        base_model=str(base_model),
        parameters={"normalize": False, "rescale": False},
        dtype=dtype,
    )


def model_wise_configs(
    base_model: str | Path, model: str | Path, grid: Sequence[ModelSetting], dtype: str = "float32"
) -> list[MergeConfig]:
    """Return one :func:`model_wise_config` per grid point, in grid order."""
    return [model_wise_config(base_model, model, setting, dtype) for setting in grid]


def _single(task_vectors: TaskVectors, name: str) -> TaskVectors:
    if name not in task_vectors.names:
        raise KeyError(f"unknown model {name!r}; the task vectors contain {task_vectors.names}")
    index = task_vectors.names.index(name)
    return TaskVectors(task_vectors.base, [task_vectors.deltas[index]], [name], task_vectors.num_layers)


def model_wise_delta(task_vectors: TaskVectors, name: str, setting: ModelSetting) -> dict[str, torch.Tensor]:
    """Return ``s · trim(δ_name, p)`` per tensor, as ``merge_deltas`` computes the one-model TIES merge."""
    return merge_deltas(_single(task_vectors, name), "ties", setting.weight, setting.density, **TIES_PARAMETERS)


def model_wise_deltas(
    task_vectors: TaskVectors, name: str, grid: Sequence[ModelSetting]
) -> Iterator[tuple[ModelSetting, dict[str, torch.Tensor]]]:
    """Yield ``(setting, delta)`` over a grid, trimming once per density.

    Each delta equals :func:`model_wise_delta` of its setting, up to the sign of zero entries
    (the same float32 product of the trimmed delta and the weight). The grid is visited
    density by density.
    """
    delta = _single(task_vectors, name).deltas[0]
    for density in sorted({setting.density for setting in grid}):
        trimmed = {tensor: magnitude_prune(values, density) for tensor, values in delta.items()}
        for setting in (s for s in grid if s.density == density):
            yield setting, {
                tensor: values * torch.tensor(setting.weight, dtype=values.dtype) for tensor, values in trimmed.items()
            }


def select_setting(scores: Mapping[ModelSetting | tuple[float, float], float]) -> ModelSetting:
    """Return the setting with the highest score (higher is better).

    Keys are ``ModelSetting`` or ``(density, weight)`` pairs. Among equal scores the larger
    density wins, then the larger weight: the setting closest to the unmodified specialist.
    Raises ``ValueError`` for an empty table or a NaN or infinite score.
    """
    if not scores:
        raise ValueError("the score table is empty; score at least one (density, weight) setting")
    table = []
    for key, score in scores.items():
        setting = key if isinstance(key, ModelSetting) else ModelSetting(*key)
        if not math.isfinite(score):
            raise ValueError(f"score {score} for {setting} is not finite; rerun that evaluation")
        table.append((float(score), setting.density, setting.weight, setting))
    return max(table)[3]


# ---------------------------------------------------------------------------------------------
# Per-layer plans: TIES weights and densities per model and decoder layer
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """TIES settings of every model at every decoder layer.

    ``weights[m][l]`` and ``densities[m][l]`` apply to the tensors of decoder layer ``l`` of
    model ``model_names[m]``. Tensors outside the decoder layers (embeddings, final norm,
    output layer) use ``model_settings[m]``. A weight of 0 drops the model at that layer.
    """

    model_names: tuple[str, ...]
    model_settings: tuple[ModelSetting, ...]
    weights: tuple[tuple[float, ...], ...]
    densities: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        count = len(self.model_names)
        if count == 0:
            raise ValueError("a plan needs at least one model")
        if len(set(self.model_names)) != count:
            raise ValueError(f"model names must be unique, got {self.model_names}")
        if len(self.model_settings) != count or len(self.weights) != count or len(self.densities) != count:
            raise ValueError(f"a plan needs model settings, weights and densities for each of the {count} models")
        lengths = {len(row) for row in (*self.weights, *self.densities)}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"every weight and density row must have one value per layer, got lengths {sorted(lengths)}")
        for name, weights, densities in zip(self.model_names, self.weights, self.densities):
            for layer, (weight, density) in enumerate(zip(weights, densities)):
                if not (math.isfinite(weight) and weight >= 0):
                    raise ValueError(f"weight {weight} of {name} at layer {layer} must be finite and >= 0")
                if not 0 < density <= 1:
                    raise ValueError(f"density {density} of {name} at layer {layer} is outside (0, 1]")

    @property
    def num_layers(self) -> int:
        return len(self.weights[0])

    def with_layer(self, layer: int, weights: Sequence[float], densities: Sequence[float]) -> LayerPlan:
        """Return a copy whose layer ``layer`` has the given per-model weights and densities."""
        new_weights = tuple(row[:layer] + (float(w),) + row[layer + 1 :] for row, w in zip(self.weights, weights))
        new_densities = tuple(row[:layer] + (float(d),) + row[layer + 1 :] for row, d in zip(self.densities, densities))
        return dataclasses.replace(self, weights=new_weights, densities=new_densities)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: model-wise settings and the per-layer lists per model."""
        return {
            "models": list(self.model_names),
            "model_settings": {
                name: {"density": s.density, "weight": s.weight} for name, s in zip(self.model_names, self.model_settings)
            },
            "weights": {name: list(row) for name, row in zip(self.model_names, self.weights)},
            "densities": {name: list(row) for name, row in zip(self.model_names, self.densities)},
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> LayerPlan:
        names = tuple(document["models"])
        return cls(
            model_names=names,
            model_settings=tuple(ModelSetting(**document["model_settings"][name]) for name in names),
            weights=tuple(tuple(float(v) for v in document["weights"][name]) for name in names),
            densities=tuple(tuple(float(v) for v in document["densities"][name]) for name in names),
        )


def initial_plan(model_names: Sequence[str], settings: Sequence[ModelSetting], num_layers: int) -> LayerPlan:
    """Return the stage-2 plan: every layer of model ``m`` at its model-wise setting."""
    if len(settings) != len(model_names):
        raise ValueError(f"{len(settings)} settings for {len(model_names)} models")
    if num_layers < 1:
        raise ValueError(f"invalid num_layers {num_layers}; expected >= 1")
    return LayerPlan(
        model_names=tuple(model_names),
        model_settings=tuple(settings),
        weights=tuple((float(s.weight),) * num_layers for s in settings),
        densities=tuple((float(s.density),) * num_layers for s in settings),
    )


def layer_filters(tensor_names: Sequence[str], num_layers: int) -> list[str]:
    """Return for each decoder layer a tensor-name substring that selects exactly its tensors.

    The filter is the name prefix up to the layer index and its dot (``"model.layers.3."``).
    Raises ``ValueError`` when a layer has no tensors or its prefix also matches other tensors.
    """
    filters = []
    for layer in range(num_layers):
        names = [name for name in tensor_names if decoder_layer_of(name) == layer]
        if not names:
            raise ValueError(f"no tensors of decoder layer {layer} among the tensor names; check num_layers {num_layers}")
        marker = f".{layer}."
        prefixes = {name[: name.index(marker) + len(marker)] for name in names if marker in name}
        if len(prefixes) != 1:
            raise ValueError(f"tensors of decoder layer {layer} have no common prefix: {sorted(prefixes)[:3]}")
        prefix = prefixes.pop()
        matched = {name for name in tensor_names if prefix in name}
        if matched != set(names):
            raise ValueError(f"filter {prefix!r} would also select {sorted(matched - set(names))[:3]}")
        filters.append(prefix)
    return filters


def plan_settings(plan: LayerPlan, tensor_names: Sequence[str]) -> tuple[list[list[dict]], list[list[dict]]]:
    """Return per-model weight and density settings as mergekit filter lists.

    Each list has one ``{"filter": prefix, "value": v}`` entry per decoder layer and a final
    ``{"value": model-wise v}`` entry for every other tensor. ``merge_deltas`` and mergekit
    resolve them identically.
    """
    filters = layer_filters(tensor_names, plan.num_layers)

    def entries(row: Sequence[float], default: float) -> list[dict]:
        return [{"filter": f, "value": float(v)} for f, v in zip(filters, row)] + [{"value": float(default)}]

    weights = [entries(row, s.weight) for row, s in zip(plan.weights, plan.model_settings)]
    densities = [entries(row, s.density) for row, s in zip(plan.densities, plan.model_settings)]
    return weights, densities


def _check_plan_models(task_vectors: TaskVectors, plan: LayerPlan) -> None:
    if tuple(task_vectors.names) != plan.model_names:
        raise ValueError(f"plan models {plan.model_names} differ from the task vectors' {task_vectors.names}")
    if task_vectors.num_layers != plan.num_layers:
        raise ValueError(f"plan has {plan.num_layers} layers, the task vectors {task_vectors.num_layers}")


def merge_plan(
    task_vectors: TaskVectors, plan: LayerPlan, layers: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Return the merged delta Δ of a plan (TIES, sign election, no normalisation).

    ``layers`` restricts the result to those decoder layers' tensors. The settings are the
    filter lists of :func:`plan_settings`, the same that :func:`mergekit_config` writes.
    """
    _check_plan_models(task_vectors, plan)
    weights, densities = plan_settings(plan, task_vectors.tensor_names)
    return merge_deltas(task_vectors, "ties", weights, densities, layers=layers, **TIES_PARAMETERS)


def merged_shares(
    task_vectors: TaskVectors, plan: LayerPlan, layers: Sequence[int] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Return each model's share of the merged delta: its ``s · trim(δ, p)`` entries that survive sign election.

    Shares cover the decoder-layer tensors (of ``layers``, default all). Their sum is Δ of
    :func:`merge_plan` up to the order of float additions.
    """
    _check_plan_models(task_vectors, plan)
    wanted = set(range(plan.num_layers) if layers is None else layers)
    shares: list[dict[str, torch.Tensor]] = [{} for _ in plan.model_names]
    for tensor in task_vectors.tensor_names:
        layer = decoder_layer_of(tensor)
        if layer is None or layer not in wanted:
            continue
        first = task_vectors.deltas[0][tensor]
        stacked = first.new_empty((len(plan.model_names), *first.shape))
        for m, delta in enumerate(task_vectors.deltas):
            stacked[m] = magnitude_prune(delta[tensor], plan.densities[m][layer])
        weight = torch.tensor([row[layer] for row in plan.weights], dtype=stacked.dtype)
        stacked.mul_(weight.reshape(-1, *([1] * first.dim())))
        majority = stacked.sum(dim=0) >= 0
        mask = torch.where(majority, stacked > 0, stacked < 0)
        for m in range(len(plan.model_names)):
            shares[m][tensor] = stacked[m] * mask[m]
    return shares


def mergekit_config(
    plan: LayerPlan,
    base_model: str | Path,
    models: Mapping[str, str | Path] | Sequence[str | Path],
    tensor_names: Sequence[str],
    dtype: str = "float32",
) -> MergeConfig:
    """Return the mergekit ``ties`` config (``normalize: false``) of a plan, with per-layer filters.

    ``models`` maps each plan model name to its folder, or lists folders in plan order. The
    per-layer filters are derived from ``tensor_names``, the checkpoint's tensor names
    (``TaskVectors.tensor_names``). Filters are used instead of gradient lists
    because mergekit gives tensors outside the decoder layers the first gradient value and
    interpolates gradient positions in floating point.
    """
    if isinstance(models, Mapping):
        missing = [name for name in plan.model_names if name not in models]
        if missing:
            raise ValueError(f"no folder for plan models {missing}; pass a mapping from every model name to its folder")
        paths = [str(models[name]) for name in plan.model_names]
    else:
        paths = [str(path) for path in models]
        if len(paths) != len(plan.model_names):
            raise ValueError(f"{len(paths)} model folders for {len(plan.model_names)} plan models")
    weights, densities = plan_settings(plan, tensor_names)
    entries = [ModelEntry(path, {"weight": w, "density": d}) for path, w, d in zip(paths, weights, densities)]
    return MergeConfig(
        merge_method="ties",
        models=entries,
        base_model=str(base_model),
        parameters={"normalize": False, "rescale": False},
        dtype=dtype,
    )


def write_plan_config(config: MergeConfig, path: str | Path) -> Path:
    """Write a plan's mergekit config atomically; rerun it with ``mergekit-yaml PATH OUT_DIR``."""
    return write_mergekit_config(config, path)


# ---------------------------------------------------------------------------------------------
# Stage 4: conflict cases and the iterative resolution
# ---------------------------------------------------------------------------------------------


class ConflictCase(str, Enum):
    SEVERE = "severe"
    PARTIAL = "partial"
    MUTUAL = "mutual"


def classify_conflict(gamma: Sequence[float]) -> tuple[ConflictCase, tuple[int, ...]]:
    """Return the case of one layer and the indices of its losers (models with γ > 0)."""
    values = [float(g) for g in gamma]
    if not values or not all(math.isfinite(g) for g in values):
        raise ValueError(f"gamma must be a non-empty list of finite numbers, got {values}")
    losers = tuple(m for m, g in enumerate(values) if g > 0)
    if not losers:
        return ConflictCase.MUTUAL, losers
    if len(losers) == len(values):
        return ConflictCase.SEVERE, losers
    return ConflictCase.PARTIAL, losers


@dataclasses.dataclass(frozen=True)
class ResolutionOptions:
    """Settings of the iterative conflict resolution (decisions 4 to 6 of the module docstring).

    ``max_layers``: layers visited at most (``None``: no budget; 0 or less is invalid).
    ``positive_only``: visit only layers with Γ > 0. ``recompute``: recompute the merge's
    contributions after every accepted change. ``acceptance``: ``"always"`` or ``"no_drop"``
    (keep a change only if the objective does not decrease). ``severe_criterion``: the
    contribution that picks the surviving model in a severe conflict. ``layer_density_factor``
    and ``layer_weight_factor``: the factors applied to a harming model's model-wise density
    and weight in a partial conflict.
    """

    max_layers: int | None = None
    positive_only: bool = True
    recompute: bool = False
    acceptance: AcceptanceRule = "always"
    severe_criterion: SevereCriterion = "specialist"
    layer_density_factor: float = 0.5
    layer_weight_factor: float = 0.5

    def __post_init__(self) -> None:
        if self.max_layers is not None and (isinstance(self.max_layers, bool) or not isinstance(self.max_layers, int)):
            raise ValueError(f"max_layers must be an integer or None, got {self.max_layers!r}")
        if self.max_layers is not None and self.max_layers < 1:
            raise ValueError(
                f"max_layers {self.max_layers} visits no layer; pass a positive budget, or None for no budget"
            )
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"invalid acceptance {self.acceptance!r}; use one of {ACCEPTANCE_RULES}")
        if self.severe_criterion not in SEVERE_CRITERIA:
            raise ValueError(f"invalid severe_criterion {self.severe_criterion!r}; use one of {SEVERE_CRITERIA}")
        for name in ("layer_density_factor", "layer_weight_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"{name} {value!r} is outside (0, 1]")


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    """What the resolution did at one visited layer.

    ``kept`` is the surviving model of a severe conflict. ``changed`` lists the models whose
    weight or density changed at the layer. ``accepted`` tells whether the change is in the
    final plan.
    """

    layer: int
    case: ConflictCase
    gamma: tuple[float, ...]
    total_conflict: float
    losers: tuple[str, ...]
    kept: str | None
    changed: tuple[str, ...]
    accepted: bool
    objective_before: float | None = None
    objective_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["case"] = self.case.value
        document["gamma"] = list(self.gamma)
        document["losers"] = list(self.losers)
        document["changed"] = list(self.changed)
        return document


def _severe_survivor(specialist: Sequence[float], merged: Sequence[float], criterion: SevereCriterion) -> int:
    primary, secondary = (specialist, merged) if criterion == "specialist" else (merged, specialist)
    return max(range(len(primary)), key=lambda m: (primary[m], secondary[m], -m))


def resolve_layer(
    plan: LayerPlan,
    layer: int,
    gamma: Sequence[float],
    specialist: Sequence[float],
    merged: Sequence[float],
    options: ResolutionOptions = ResolutionOptions(),
) -> tuple[LayerPlan, ConflictCase, tuple[int, ...], int | None, tuple[int, ...]]:
    """Apply the case rule of one layer to a plan.

    ``gamma``, ``specialist`` (c_mm) and ``merged`` (c_mG) hold one value per plan model at
    ``layer``. Returns ``(new_plan, case, losers, kept, changed)`` with model indices.
    """
    count = len(plan.model_names)
    for label, values in (("gamma", gamma), ("specialist", specialist), ("merged", merged)):
        if len(values) != count:
            raise ValueError(f"{label} has {len(values)} values for {count} plan models")
    if not 0 <= layer < plan.num_layers:
        raise ValueError(f"layer {layer} is outside the plan's layers 0..{plan.num_layers - 1}")

    case, losers = classify_conflict(gamma)
    weights = [row[layer] for row in plan.weights]
    densities = [row[layer] for row in plan.densities]
    kept = None
    if case is ConflictCase.SEVERE:
        kept = _severe_survivor(specialist, merged, options.severe_criterion)
        changed = tuple(m for m in range(count) if m != kept and weights[m] != 0)
        for m in changed:
            weights[m] = 0.0
    elif case is ConflictCase.PARTIAL:
        changed = tuple(m for m in range(count) if m not in losers)
        for m in changed:
            setting = plan.model_settings[m]
            weights[m] = setting.weight * options.layer_weight_factor
            densities[m] = setting.density * options.layer_density_factor
    else:
        changed = ()
    return plan.with_layer(layer, weights, densities), case, losers, kept, changed


@dataclasses.dataclass(frozen=True)
class HiMergingResult:
    """The final plan, one decision per visited layer, the last contributions and why the run stopped."""

    plan: LayerPlan
    decisions: tuple[LayerDecision, ...]
    contributions: Contributions
    stop_reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "decisions": [decision.to_dict() for decision in self.decisions],
            "stop_reason": self.stop_reason,
        }


def _merged_values(result: Contributions | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    values = np.asarray(result.merged if isinstance(result, Contributions) else result, dtype=float)
    if values.shape != shape or not np.isfinite(values).all():
        raise ValueError(f"recomputed merge contributions must be finite with shape {shape}, got {values.shape}")
    return values


def resolve_conflicts(
    plan: LayerPlan,
    contributions: Contributions,
    options: ResolutionOptions = ResolutionOptions(),
    recompute_merged: Callable[[LayerPlan], Contributions | np.ndarray] | None = None,
    objective: Callable[[LayerPlan], float] | None = None,
) -> HiMergingResult:
    """Visit the most conflicting layers and resolve each (stage 4 of the module docstring).

    ``contributions`` are those of ``plan`` (tasks in plan model order). ``recompute_merged``
    returns the merge's contributions for a plan, ``[n_models, n_probed_layers]`` or a
    ``Contributions``; it is required with ``options.recompute``, for example
    ``lambda p: contribution_analysis(model, tv, merge_plan(tv, p), probe_sets, layers,
    specialist_impacts=first.specialist_impacts)``. ``objective`` returns the validation
    objective of a plan (higher is better), required with ``acceptance="no_drop"``.
    All arguments are checked before the first call of either function.
    """
    if tuple(contributions.tasks) != plan.model_names:
        raise ValueError(
            f"contributions are for tasks {contributions.tasks}, the plan for models {plan.model_names};"
            " task m must be the task of specialist m"
        )
    outside = [layer for layer in contributions.layers if not 0 <= layer < plan.num_layers]
    if outside:
        raise ValueError(f"contributions cover layers {outside} that the plan does not have")
    if options.recompute and recompute_merged is None:
        raise ValueError("options.recompute is set but no recompute_merged function was given")
    if options.acceptance == "no_drop" and objective is None:
        raise ValueError("acceptance 'no_drop' needs an objective function (validation objective of a plan)")

    names = plan.model_names
    column = {layer: k for k, layer in enumerate(contributions.layers)}
    visited: list[int] = []
    decisions: list[LayerDecision] = []
    current = objective(plan) if options.acceptance == "no_drop" else None
    stop_reason = "no layer left to visit"

    while True:
        if options.max_layers is not None and len(visited) >= options.max_layers:
            stop_reason = f"budget of {options.max_layers} layers reached"
            break
        candidates = [
            layer for layer in rank_layers(contributions.gamma, contributions.layers, options.positive_only)
            if layer not in visited
        ]
        if not candidates:
            break
        layer = candidates[0]
        visited.append(layer)
        k = column[layer]
        gamma = contributions.gamma[:, k]
        new_plan, case, losers, kept, changed = resolve_layer(
            plan, layer, gamma, contributions.specialist[:, k], contributions.merged[:, k], options
        )

        accepted = bool(changed)
        after = None
        if changed and options.acceptance == "no_drop":
            after = float(objective(new_plan))
            accepted = after >= current
        decisions.append(
            LayerDecision(
                layer=layer,
                case=case,
                gamma=tuple(float(g) for g in gamma),
                total_conflict=float(gamma.sum()),
                losers=tuple(names[m] for m in losers),
                kept=None if kept is None else names[kept],
                changed=tuple(names[m] for m in changed),
                accepted=accepted,
                objective_before=current,
                objective_after=after,
            )
        )
        logger.info(
            "layer %d: %s conflict, losers %s, changed %s, %s",
            layer, case.value, decisions[-1].losers, decisions[-1].changed, "accepted" if accepted else "not applied",
        )
        if not accepted:
            continue
        plan = new_plan
        if after is not None:
            current = after
        if options.recompute:
            merged = _merged_values(recompute_merged(plan), contributions.merged.shape)
            contributions = contributions.with_merged(merged)

    return HiMergingResult(plan, tuple(decisions), contributions, stop_reason)

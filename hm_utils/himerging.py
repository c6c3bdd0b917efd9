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

The last section runs the stages of notebooks 05 to 07 on a run folder: it reads the earlier
stages' outputs (:func:`load_stage_inputs`), searches the stage-1 grid with in-place weight
swaps (:func:`model_wise_search`), resolves conflicts with the recomputation and objective the
options need (:func:`run_hi_merging`), writes plans through mergekit (:func:`export_plan`) and
builds the results table (:func:`results_table`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hm_utils.contribution import Contributions, rank_layers
from hm_utils.merge.config import MergeConfig, ModelEntry, write_mergekit_config
from hm_utils.merge.params import decoder_layer_of
from hm_utils.merge.sparsify import magnitude_prune
from hm_utils.merge.task_vectors import TaskVectors, apply_delta_, merge_deltas

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


# ---------------------------------------------------------------------------------------------
# Stage runs (notebooks 05 to 07): inputs of a run folder, search, export, result tables
# ---------------------------------------------------------------------------------------------

DATA_STAGE = "01_data"
PROMPT_STAGE = "02_prompt_tuning"
FINETUNE_STAGE = "03_finetune"
BASELINE_STAGE = "04_baselines"
MODEL_WISE_STAGE = "05_model_wise"
CONTRIBUTION_STAGE = "06_contribution"
CHECKPOINTS_FILE = "checkpoints.json"
BEST_SETTINGS_FILE = "best_settings.json"
GRID_SCORES_FILE = "grid_scores.csv"

# Metrics of the results table per task type; all are higher-is-better percentages.
TABLE_METRICS: dict[str, tuple[str, ...]] = {"mcq": ("acc_option_norm",), "qa": ("bleu-4", "rouge-l")}


def read_checkpoints(stage_dir: str | Path) -> dict[str, Path]:
    """Read a stage's ``checkpoints.json`` (``{name: folder}``) and return absolute folders.

    A recorded folder that does not exist is looked up by its folder name inside
    ``stage_dir``, so a run folder that was moved or copied still resolves. Raises
    ``FileNotFoundError`` when the file or a folder is missing.
    """
    stage_dir = Path(stage_dir)
    path = stage_dir / CHECKPOINTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the stage that writes it first")
    folders = {}
    for name, recorded in json.loads(path.read_text(encoding="utf-8")).items():
        folder = Path(recorded)
        if not folder.is_dir():
            folder = stage_dir / folder.name
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint {name!r} of {path} not found at {recorded} nor at {folder}")
        folders[name] = folder.resolve()
    return folders


@dataclasses.dataclass(frozen=True)
class StageInputs:
    """The inputs that the merging stages read from the earlier stages of one run folder.

    ``base`` is the base model as mergekit and ``from_pretrained`` read it (a folder, or a hub
    id), ``base_dir`` its local folder. ``specialists`` maps each task to its fine-tuned
    folder, ``templates`` each task to its prompt template name. ``validation`` and ``test``
    hold the first examples of each split, as many as the caller asked for.
    """

    run_dir: Path
    base: str
    base_dir: Path
    tasks: tuple[str, ...]
    specialists: dict[str, Path]
    templates: dict[str, str]
    validation: dict[str, list]
    test: dict[str, list]

    @property
    def task_types(self) -> dict[str, str]:
        return {task: self.test[task][0].task_type for task in self.tasks}

    def task_vectors(self, dtype: str = "float32") -> TaskVectors:
        """Load the base and every specialist and return their deltas (tasks in order), on the CPU."""
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"invalid dtype {dtype!r}; use a torch dtype name such as 'float32'")
        folders = [self.specialists[task] for task in self.tasks]
        return TaskVectors.from_checkpoints(self.base_dir, folders, list(self.tasks), dtype=getattr(torch, dtype))


def load_stage_inputs(
    run_dir: str | Path,
    model: str,
    validation_examples: int | None = None,
    test_examples: int | None = None,
) -> StageInputs:
    """Read tasks, prompt templates, specialist folders and splits of a run folder, and check them.

    ``model`` is the base model reference of the run (an embedded name, a folder or a hub id).
    The checks run before any weights load: every task has a template, a specialist and a
    non-empty validation split, and every specialist was fine-tuned from ``model``
    (``hm_utils.contribution.check_specialists``).
    """
    from hm_utils.contribution import check_specialists, check_validation_sets
    from hm_utils.data import read_split
    from hm_utils.merge.checks import local_model_dir
    from hm_utils.models import resolve_model
    from hm_utils.prompts import load_prompt_choice

    run_dir = Path(run_dir)
    summary_path = run_dir / DATA_STAGE / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found; run {DATA_STAGE} for this run folder first")
    tasks = tuple(json.loads(summary_path.read_text(encoding="utf-8"))["tasks"])
    templates = load_prompt_choice(run_dir / PROMPT_STAGE / "prompts.json")
    checkpoints = read_checkpoints(run_dir / FINETUNE_STAGE)
    for label, table in (("prompt template", templates), ("specialist checkpoint", checkpoints)):
        missing = [task for task in tasks if task not in table]
        if missing:
            raise ValueError(f"tasks {missing} have no {label}; rerun the earlier stages for these tasks")

    data_dir = run_dir / DATA_STAGE
    validation = {task: read_split(data_dir / task / "validation.json")[:validation_examples] for task in tasks}
    test = {task: read_split(data_dir / task / "test.json")[:test_examples] for task in tasks}
    check_validation_sets(validation, tasks)
    empty = [task for task in tasks if not test[task]]
    if empty:
        raise ValueError(f"the test split of tasks {empty} is empty; the final evaluation needs test examples")

    base = resolve_model(model)
    base_dir = local_model_dir(base)
    specialists = {task: checkpoints[task] for task in tasks}
    check_specialists(base_dir, specialists, base_reference=base)
    return StageInputs(run_dir, base, base_dir, tasks, specialists, {t: templates[t] for t in tasks}, validation, test)


def check_evaluation_settings(
    reference: str | Path,
    inputs: StageInputs,
    methods: Mapping[str, Sequence[str]] | None,
    max_new_tokens: Mapping[str, int] | None,
    n_resamples: int,
    seed: int,
) -> None:
    """Raise ``ValueError`` unless an evaluation with these settings matches ``reference``.

    ``reference`` is a ``metrics.json`` of ``hm_utils.evaluate.evaluate_tasks`` (e.g. the base
    model's in stage 03). Rows of one results table must share the test examples, templates,
    methods, token limits, bootstrap resamples and seed; this check runs before any evaluation.
    """
    from hm_utils.evaluate import DEFAULT_TASK_METHODS

    reference = Path(reference)
    if not reference.is_file():
        raise FileNotFoundError(f"reference evaluation {reference} not found; run {FINETUNE_STAGE} first")
    stored = json.loads(reference.read_text(encoding="utf-8"))["key"]
    expected = {
        "tasks": {task: [example.id for example in inputs.test[task]] for task in inputs.tasks},
        "templates": dict(inputs.templates),
        "methods": {kind: list(value) for kind, value in {**DEFAULT_TASK_METHODS, **(methods or {})}.items()},
        "max_new_tokens": None if max_new_tokens is None else dict(max_new_tokens),
        "n_resamples": n_resamples,
        "seed": seed,
    }
    differing = [key for key, value in expected.items() if stored.get(key) != value]
    if differing:
        raise ValueError(
            f"evaluation settings {differing} differ from those of {reference}; set eval_max_examples, eval_methods,"
            " max_new_tokens, n_resamples and seed as in that stage, so that all rows share one results table"
        )


@dataclasses.dataclass(frozen=True)
class ModelWiseSearch:
    """Validation scores of the stage-1 grid.

    ``scores`` has one row per task and setting, columns ``task``, ``p`` (density), ``s``
    (weight) and ``score`` (higher is better). ``base_scores`` contains each task's score on the
    base model, ``score_kinds`` the kind of score per task.
    """

    scores: pd.DataFrame
    base_scores: dict[str, float]
    score_kinds: dict[str, str]

    @property
    def best(self) -> dict[str, ModelSetting]:
        """The selected setting per task (:func:`select_setting`)."""
        return {
            task: select_setting({(row.p, row.s): row.score for row in group.itertuples()})
            for task, group in self.scores.groupby("task", sort=False)
        }

    def grid(self, task: str) -> pd.DataFrame:
        """Return one task's scores as a table: rows are densities p, columns weights s."""
        rows = self.scores[self.scores["task"] == task]
        if rows.empty:
            raise KeyError(f"no grid scores for task {task!r}; tasks: {sorted(self.scores['task'].unique())}")
        return rows.pivot(index="p", columns="s", values="score")

    def write(self, out_dir: str | Path, settings: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """Write ``grid_scores.csv``, ``best_settings.json`` (``{task: {density, weight}}``) and ``model_wise.json``.

        ``model_wise.json`` contains the base and best scores, the score kinds and ``settings``.
        """
        from hm_utils.files import write_json_atomic, write_text_atomic

        out_dir = Path(out_dir)
        best = self.best
        best_scores = {task: float(self.grid(task).loc[s.density, s.weight]) for task, s in best.items()}
        summary = {
            "settings": dict(settings or {}),
            "score_kinds": self.score_kinds,
            "base_scores": self.base_scores,
            "best_scores": best_scores,
            "best": {task: dataclasses.asdict(setting) for task, setting in best.items()},
        }
        return {
            "grid": write_text_atomic(out_dir / GRID_SCORES_FILE, self.scores.to_csv(index=False)),
            "best": write_json_atomic(out_dir / BEST_SETTINGS_FILE, summary["best"]),
            "summary": write_json_atomic(out_dir / "model_wise.json", summary),
        }


def read_best_settings(path: str | Path) -> dict[str, ModelSetting]:
    """Read ``best_settings.json`` (``{task: {"density": p, "weight": s}}``)."""
    path = Path(path)
    if path.is_dir():
        path = path / BEST_SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run {MODEL_WISE_STAGE} first")
    document = json.loads(path.read_text(encoding="utf-8"))
    return {task: ModelSetting(float(v["density"]), float(v["weight"])) for task, v in document.items()}


def _check_probe_sets(task_vectors: TaskVectors, probe_sets: Mapping[str, Any]) -> None:
    missing = [name for name in task_vectors.names if name not in probe_sets]
    if missing:
        raise ValueError(f"no probe set for specialists {missing}; probe sets are keyed by task, the task of each specialist")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_wise_search(
    model: torch.nn.Module,
    task_vectors: TaskVectors,
    probe_sets: Mapping[str, Any],
    grid: Sequence[ModelSetting],
    progress: bool = True,
) -> ModelWiseSearch:
    """Score every grid setting of every specialist on its own task (stage 1).

    For specialist ``m`` and setting (p, s), the loaded base ``model`` is set in place to
    ``θ_F + s · trim(δ_m, p)`` (:func:`model_wise_deltas`) and scored with full forward passes
    on task ``m``'s probe set (``hm_utils.contribution.score_model``). Nothing is written to
    disk, and the model is left at the base weights. ``probe_sets`` are keyed by specialist name.
    """
    from hm_utils.contribution import score_model

    if not grid:
        raise ValueError("the grid is empty; pass settings from setting_grid(step)")
    _check_probe_sets(task_vectors, probe_sets)
    device = _model_device(model)
    probes = {name: probe_sets[name].to(device) for name in task_vectors.names}

    apply_delta_(model, task_vectors.base, {})
    base_scores = {name: score_model(model, probes[name]) for name in task_vectors.names}
    rows = []
    for name in task_vectors.names:
        points = tqdm(model_wise_deltas(task_vectors, name, grid), total=len(grid), desc=f"grid {name}", disable=not progress)
        for setting, delta in points:
            apply_delta_(model, task_vectors.base, delta)
            rows.append({"task": name, "p": setting.density, "s": setting.weight, "score": score_model(model, probes[name])})
        logger.info("model-wise grid of %s: base %.4f, best %s", name, base_scores[name],
                    select_setting({(r["p"], r["s"]): r["score"] for r in rows if r["task"] == name}))
    apply_delta_(model, task_vectors.base, {})
    kinds = {name: probes[name].score for name in task_vectors.names}
    return ModelWiseSearch(pd.DataFrame(rows, columns=["task", "p", "s", "score"]), base_scores, kinds)


def plan_contributions(
    model: torch.nn.Module,
    task_vectors: TaskVectors,
    plan: LayerPlan,
    probe_sets: Mapping[str, Any],
    layers: Sequence[int] | None = None,
    deletion: str = "merged_delta",
    specialist_impacts: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Contributions:
    """Run the contribution analysis on the merge of ``plan`` (its shares too with ``deletion="own_share"``).

    Pass ``specialist_impacts`` from an earlier analysis on the same probe sets and layers to
    skip the specialist sweeps, which do not depend on the merge.
    """
    from hm_utils.contribution import contribution_analysis

    merged = merge_plan(task_vectors, plan)
    shares = merged_shares(task_vectors, plan, layers) if deletion == "own_share" else None
    return contribution_analysis(
        model, task_vectors, merged, probe_sets, layers, deletion=deletion, shares=shares,
        specialist_impacts=specialist_impacts, progress=progress,
    )


@dataclasses.dataclass(frozen=True)
class ContributionStage:
    """The contribution analysis of stage 06 and the settings it was computed with."""

    contributions: Contributions
    probe: Any
    layers: tuple[int, ...] | None
    deletion: str
    model_wise: dict[str, ModelSetting]


def contribution_settings(
    probe: Any, layers: Sequence[int] | None, deletion: str, model_wise: Mapping[str, ModelSetting]
) -> dict[str, Any]:
    """Return the JSON-ready settings stored beside the contributions of stage 06."""
    return {
        "probe": probe.to_dict(),
        "layers": None if layers is None else sorted(int(layer) for layer in layers),
        "deletion": deletion,
        "model_wise": {task: dataclasses.asdict(setting) for task, setting in model_wise.items()},
    }


def read_contribution_stage(run_dir: str | Path) -> ContributionStage:
    """Read the contributions of stage 06 and check that they belong to stage 05's current settings.

    Raises ``ValueError`` when ``best_settings.json`` of stage 05 changed after the analysis,
    because the contributions on the merge then describe another merge.
    """
    from hm_utils.contribution import ProbeSettings, read_contributions

    run_dir = Path(run_dir)
    contributions, settings = read_contributions(run_dir / CONTRIBUTION_STAGE)
    missing = [key for key in ("probe", "layers", "deletion", "model_wise") if key not in settings]
    if missing:
        raise ValueError(f"contributions of {run_dir / CONTRIBUTION_STAGE} lack the settings {missing}; rerun {CONTRIBUTION_STAGE}")
    analysed = {task: ModelSetting(**value) for task, value in settings["model_wise"].items()}
    current = read_best_settings(run_dir / MODEL_WISE_STAGE)
    if analysed != current:
        raise ValueError(
            f"the contributions were computed for model-wise settings {analysed}, but {MODEL_WISE_STAGE} now selects"
            f" {current}; rerun {CONTRIBUTION_STAGE}"
        )
    layers = settings["layers"]
    return ContributionStage(
        contributions,
        ProbeSettings.from_dict(settings["probe"]),
        None if layers is None else tuple(layers),
        settings["deletion"],
        current,
    )


def plan_objective(
    model: torch.nn.Module, task_vectors: TaskVectors, probe_sets: Mapping[str, Any]
) -> Callable[[LayerPlan], float]:
    """Return the validation objective of a plan: the mean over tasks of the probe scores of its merge.

    The scores of different kinds (log-likelihood, accuracy) are averaged as they are, so the
    tasks should share one score kind. Each call leaves ``model`` at the base weights.
    """
    from hm_utils.contribution import score_model

    _check_probe_sets(task_vectors, probe_sets)
    device = _model_device(model)
    probes = {name: probe_sets[name].to(device) for name in task_vectors.names}

    def objective(plan: LayerPlan) -> float:
        apply_delta_(model, task_vectors.base, merge_plan(task_vectors, plan))
        value = float(np.mean([score_model(model, probes[name]) for name in task_vectors.names]))
        apply_delta_(model, task_vectors.base, {})
        return value

    return objective


def run_hi_merging(
    model: torch.nn.Module,
    task_vectors: TaskVectors,
    plan: LayerPlan,
    contributions: Contributions,
    probe_sets: Mapping[str, Any],
    options: ResolutionOptions = ResolutionOptions(),
    deletion: str = "merged_delta",
) -> HiMergingResult:
    """Resolve the conflicts of ``plan`` (stage 4), with the recomputation and objective that ``options`` need.

    ``contributions`` are those of ``plan``'s merge on ``probe_sets``. With
    ``options.recompute`` the merge's contributions are recomputed on the same layers after
    each accepted change (the specialists' are reused); with ``acceptance="no_drop"`` the
    objective is :func:`plan_objective`.
    """
    recompute = None
    if options.recompute:

        def recompute(candidate: LayerPlan) -> Contributions:
            return plan_contributions(
                model, task_vectors, candidate, probe_sets, contributions.layers, deletion,
                specialist_impacts=contributions.specialist_impacts, progress=False,
            )

    objective = plan_objective(model, task_vectors, probe_sets) if options.acceptance == "no_drop" else None
    return resolve_conflicts(plan, contributions, options, recompute, objective)


def search_plan(
    model: torch.nn.Module,
    task_vectors: TaskVectors,
    probe_sets: Mapping[str, Any],
    grid: Sequence[ModelSetting],
    layers: Sequence[int] | None,
    options: ResolutionOptions = ResolutionOptions(),
    deletion: str = "merged_delta",
) -> LayerPlan:
    """Run the whole Hi-Merging search on ``task_vectors`` and return the final plan.

    The steps of stages 05 to 07 in memory: the model-wise grid (:func:`model_wise_search`),
    the contributions of the initial merge on ``layers`` (:func:`plan_contributions`) and the
    conflict resolution (:func:`run_hi_merging`). ``model`` is left at the base weights.
    """
    search = model_wise_search(model, task_vectors, probe_sets, grid, progress=False)
    best = search.best
    plan = initial_plan(task_vectors.names, [best[name] for name in task_vectors.names], task_vectors.num_layers)
    contributions = plan_contributions(model, task_vectors, plan, probe_sets, layers, deletion, progress=False)
    result = run_hi_merging(model, task_vectors, plan, contributions, probe_sets, options, deletion)
    apply_delta_(model, task_vectors.base, {})
    return result.plan


def plan_table(plan: LayerPlan) -> pd.DataFrame:
    """Return one row per decoder layer with each model's weight and density at that layer."""
    columns = {}
    for name, weights, densities in zip(plan.model_names, plan.weights, plan.densities):
        columns[f"{name} weight"] = weights
        columns[f"{name} density"] = densities
    table = pd.DataFrame(columns)
    table.index.name = "layer"
    return table


def decisions_table(result: HiMergingResult) -> pd.DataFrame:
    """Return one row per visited layer: case, γ per model, Γ, losers, survivor, changed models, accepted."""
    rows = []
    for decision in result.decisions:
        row = {"layer": decision.layer, "case": decision.case.value, "Gamma": decision.total_conflict}
        row.update({f"gamma {name}": value for name, value in zip(result.plan.model_names, decision.gamma)})
        row.update(
            losers=" ".join(decision.losers), kept=decision.kept or "", changed=" ".join(decision.changed),
            accepted=decision.accepted, objective_before=decision.objective_before, objective_after=decision.objective_after,
        )
        rows.append(row)
    columns = ["layer", "case", "Gamma", *[f"gamma {n}" for n in result.plan.model_names], "losers", "kept", "changed",
               "accepted", "objective_before", "objective_after"]
    return pd.DataFrame(rows, columns=columns)


def write_hi_merging(result: HiMergingResult, out_dir: str | Path, stem: str, settings: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``<stem>.json`` (plan, decisions, stop reason, ``settings``), ``<stem>_decisions.csv`` and ``<stem>_plan.csv``."""
    from hm_utils.files import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    return {
        "json": write_json_atomic(out_dir / f"{stem}.json", {"settings": dict(settings or {}), **result.to_dict()}),
        "decisions": write_text_atomic(out_dir / f"{stem}_decisions.csv", decisions_table(result).to_csv(index=False)),
        "plan": write_text_atomic(out_dir / f"{stem}_plan.csv", plan_table(result.plan).to_csv()),
    }


@dataclasses.dataclass(frozen=True)
class MergeExport:
    """A plan merged by mergekit: its YAML config, its model folder and its evaluation label.

    ``label`` is ``name`` plus the first 12 hex digits of the config's sha256, so an evaluation
    stored under the label (``hm_utils.evaluate.evaluate_tasks`` reuses finished ones) always
    belongs to this exact merge.
    """

    name: str
    label: str
    config_path: Path
    model_dir: Path


def export_plan(
    plan: LayerPlan,
    inputs: StageInputs,
    tensor_names: Sequence[str],
    out_dir: str | Path,
    name: str,
    dtype: str = "float32",
) -> MergeExport:
    """Write the plan's mergekit config to ``out_dir/<name>.yml`` and merge it with mergekit into ``out_dir/<name>/``.

    The config is rerunnable with ``mergekit-yaml out_dir/<name>.yml OUT``. A finished merge
    of the same config in ``out_dir/<name>/`` is reused (``merge_with_mergekit_once``).
    """
    from hm_utils.merge.mergekit_runner import merge_with_mergekit_once

    out_dir = Path(out_dir)
    config = mergekit_config(plan, inputs.base, inputs.specialists, tensor_names, dtype)
    config_path = write_plan_config(config, out_dir / f"{name}.yml")
    model_dir = merge_with_mergekit_once(config, out_dir / name)
    digest = hashlib.sha256(config_path.read_bytes()).hexdigest()
    return MergeExport(name, f"{name}-{digest[:12]}", config_path, Path(model_dir))


def result_sources(run_dir: str | Path, tasks: Sequence[str]) -> dict[str, Path]:
    """Return the ``metrics.json`` of every earlier row of the results table, by row label.

    Rows: ``base``, ``<task> specialist`` per task, ``mixed data`` and the baselines of stage
    04 (in its ``checkpoints.json`` order). The base and the specialists are required; the
    mixed-data model and baselines without a finished evaluation are skipped with a log line.
    """
    from hm_utils.evaluate import METRICS_FILE

    run_dir = Path(run_dir)
    finetune_eval = run_dir / FINETUNE_STAGE / "eval"
    sources = {"base": finetune_eval / "base" / METRICS_FILE}
    sources.update({f"{task} specialist": finetune_eval / task / METRICS_FILE for task in tasks})
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"evaluations {missing} not found; run {FINETUNE_STAGE} first")
    optional = {"mixed data": finetune_eval / "mixed" / METRICS_FILE}

    baseline_dir = run_dir / BASELINE_STAGE
    if (baseline_dir / CHECKPOINTS_FILE).is_file():
        names = list(json.loads((baseline_dir / CHECKPOINTS_FILE).read_text(encoding="utf-8")))
        optional.update({name: baseline_dir / "eval" / name / METRICS_FILE for name in names})
    else:
        logger.info("no baselines: %s not found", baseline_dir / CHECKPOINTS_FILE)
    for label, path in optional.items():
        if path.is_file():
            sources[label] = path
        else:
            logger.info("results table without %s: %s not found", label, path)
    return sources


def results_table(
    sources: Mapping[str, str | Path],
    task_types: Mapping[str, str],
    table_metrics: Mapping[str, Sequence[str]] = TABLE_METRICS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build the results table and its 95 % intervals from ``evaluate_tasks`` outputs.

    ``sources`` maps each row label to a ``metrics.json``; ``task_types`` maps each task to
    its type, and ``table_metrics`` each type to its metric keys. Returns ``(values,
    intervals)``: one column ``"<task> <metric>"`` per task and metric, and in ``intervals`` the
    columns ``"<task> <metric> low"`` and ``"... high"``. Raises ``ValueError`` when the rows
    were evaluated on other examples or with other settings than the first row, and ``KeyError``
    for a metric a row lacks.
    """
    documents = {}
    for label, path in sources.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation of row {label!r} not found: {path}")
        documents[label] = json.loads(path.read_text(encoding="utf-8"))
    if not documents:
        raise ValueError("no rows; pass at least one metrics.json")

    first, reference = next(iter(documents.items()))
    reference_key = {k: v for k, v in reference["key"].items() if k != "model"}
    for label, document in documents.items():
        key = {k: v for k, v in document["key"].items() if k != "model"}
        differing = sorted(k for k in set(key) | set(reference_key) if key.get(k) != reference_key.get(k))
        if differing:
            raise ValueError(
                f"row {label!r} was evaluated with other {differing} than row {first!r}; evaluate every row on the"
                " same test examples with the same settings"
            )

    values, intervals = {}, {}
    for label, document in documents.items():
        row, bounds = {}, {}
        for task, task_type in task_types.items():
            metrics = document["metrics"].get(task)
            if metrics is None:
                raise KeyError(f"row {label!r} has no metrics for task {task!r}")
            for metric in table_metrics[task_type]:
                if metrics.get(metric) is None:
                    raise KeyError(
                        f"row {label!r} has no {metric!r} for task {task!r}; add the method that computes it to the"
                        f" evaluation methods (available: {sorted(metrics)})"
                    )
                column = f"{task} {metric}"
                row[column] = float(metrics[metric])
                bounds[f"{column} low"] = metrics.get(f"{metric}_ci_low")
                bounds[f"{column} high"] = metrics.get(f"{metric}_ci_high")
        values[label], intervals[label] = row, bounds
    values_table = pd.DataFrame.from_dict(values, orient="index")
    interval_table = pd.DataFrame.from_dict(intervals, orient="index").astype(float)
    values_table.index.name = interval_table.index.name = "Method"
    return values_table, interval_table

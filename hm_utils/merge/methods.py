"""Merge methods on one tensor, with the parameters and defaults of mergekit 0.1.5.

For base ``θ_F`` and deltas ``δ_m = θ_m − θ_F`` (m = 1..M), the task-arithmetic family
computes, per tensor,

    d_m   = w_m · sparsify(δ_m, density_m)                 (TIES: magnitude, DARE: random, ...)
    mask  = sign(d_m) == sign(Σ_m d_m)       if sign election is on ("sum" consensus; a
                                             zero sum counts as positive), else all ones
    Δ     = Σ_m mask_m d_m                   (disjoint sum)
    Δ    /= Σ_m mask_m w_m                   if normalize (a zero divisor counts as 1; the
                                             divisor of the no-election methods is Σ w_m,
                                             treated as 1 when |Σ w_m| < 1e-8)
    Δ    *= lambda
    θ_G   = θ_F + Δ

``linear`` (model soups) is ``θ_G = Σ_m w_m θ_m / Σ_m w_m`` (no division without
normalize), over the listed models only; in delta form it is ``Σ w_m δ_m / Σ w_m`` when
normalised and ``Σ w_m δ_m + (Σ w_m − 1) θ_F`` otherwise.

The operations after sparsification run in the same order and layout as mergekit's
(stacked deltas, reductions over the model axis), so results agree bit for bit whenever
the sparsification masks agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
from collections.abc import Iterable, Iterator, Sequence
from enum import Enum
from typing import Any

import torch

from hm_utils.merge.sparsify import della_prune, inplace_in_chunks, magnitude_prune, outlier_prune, random_prune


class Sparsification(str, Enum):
    MAGNITUDE = "magnitude"
    RANDOM = "random"
    MAGNITUDE_OUTLIERS = "magnitude_outliers"
    DELLA_MAGPRUNE = "della_magprune"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A merge method: its sparsification, sign election and parameter defaults."""

    name: str
    sparsification: Sparsification | None
    sign_election: bool
    default_normalize: bool
    default_rescale: bool
    uses_base: bool = True

    @property
    def shared_parameters(self) -> dict[str, Any]:
        """Parameters shared by all models, with their defaults."""
        if not self.uses_base:
            return {"normalize": self.default_normalize}
        return {
            "int8_mask": False,
            "normalize": self.default_normalize,
            "rescale": self.default_rescale,
            "lambda": 1.0,
        }

    @property
    def model_parameters(self) -> dict[str, Any]:
        """Per-model parameters with their defaults (``None`` marks a required one)."""
        if not self.uses_base:
            return {"weight": None}
        parameters: dict[str, Any] = {"weight": None, "density": 1.0}
        if self.sparsification is Sparsification.MAGNITUDE_OUTLIERS:
            parameters["gamma"] = 0.01
        if self.sparsification is Sparsification.DELLA_MAGPRUNE:
            parameters["epsilon"] = 0.15
        return parameters

    @property
    def parameter_names(self) -> list[str]:
        return [*self.shared_parameters, *self.model_parameters]


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("linear", None, False, True, False, uses_base=False),
        MethodSpec("task_arithmetic", None, False, False, False),
        MethodSpec("ties", Sparsification.MAGNITUDE, True, True, False),
        MethodSpec("dare_ties", Sparsification.RANDOM, True, False, True),
        MethodSpec("dare_linear", Sparsification.RANDOM, False, False, True),
        MethodSpec("breadcrumbs", Sparsification.MAGNITUDE_OUTLIERS, False, False, False),
        MethodSpec("breadcrumbs_ties", Sparsification.MAGNITUDE_OUTLIERS, True, False, False),
        MethodSpec("della", Sparsification.DELLA_MAGPRUNE, True, True, True),
        MethodSpec("della_linear", Sparsification.DELLA_MAGPRUNE, False, False, True),
    )
}


def method_spec(method: str) -> MethodSpec:
    """Return the spec of a method name; raises ``ValueError`` listing the valid names."""
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown merge method {method!r}{did_you_mean(method, METHODS)}; valid methods: {', '.join(METHODS)}") from None


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest valid name, or an empty string."""
    matches = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (unchanged when ``None``), then restore.

    The setting is process-wide, so it also applies to torch work in other Python threads.
    """
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_parameter_names(method: str, names: Sequence[str], where: str = "parameters") -> None:
    """Raise ``ValueError`` for a parameter the method does not take, listing the valid ones."""
    spec = method_spec(method)
    unknown = [name for name in names if name not in spec.parameter_names]
    if unknown:
        raise ValueError(
            f"unknown {where} {unknown}{did_you_mean(unknown[0], spec.parameter_names)} for merge method {method!r};"
            f" valid parameters: {', '.join(spec.parameter_names)}"
        )


def check_weight_sum(weights: Sequence[float], normalize: bool, where: str) -> None:
    """Raise ``ValueError`` when ``normalize`` would divide by weights that sum to zero.

    mergekit 0.1.5 divides ``linear`` by the zero sum (NaN output) and silently skips the
    division for the other methods. Both are rejected here before any weights load.
    """
    if normalize and abs(math.fsum(weights)) < 1e-8:
        raise ValueError(
            f"weights {list(weights)} of {where} sum to zero and normalize is true, so the merge would divide by zero;"
            " set normalize: false or give weights with a nonzero sum"
        )


def check_density(density: float, where: str) -> None:
    if not (0 < density <= 1):
        raise ValueError(f"density {density} for {where} is outside (0, 1]; density is the fraction of entries kept")


def sparsify_delta(
    delta: torch.Tensor,
    spec: MethodSpec,
    density: float,
    rescale: bool,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Apply the method's sparsification to one delta (identity for methods without one).

    With ``inplace`` the result may overwrite ``delta``.
    """
    if spec.sparsification is None:
        return delta
    if spec.sparsification is Sparsification.MAGNITUDE:
        return magnitude_prune(delta, density, rescale, inplace=inplace)
    if spec.sparsification is Sparsification.RANDOM:
        return random_prune(delta, density, rescale, generator, inplace=inplace)
    if spec.sparsification is Sparsification.MAGNITUDE_OUTLIERS:
        return outlier_prune(delta, density, gamma, rescale, inplace=inplace)
    return della_prune(delta, density, epsilon, rescale, generator, inplace=inplace)


def merge_tensor(
    deltas: Sequence[torch.Tensor],
    method: str,
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    base: torch.Tensor | None = None,
    normalize: bool | None = None,
    rescale: bool | None = None,
    scale: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Merge the deltas of one tensor and return the merged delta ``Δ`` (module docstring).

    ``weights``, ``densities``, ``gammas`` and ``epsilons`` hold one number per delta.
    ``normalize`` and ``rescale`` default to the method's defaults; ``scale`` is
    mergekit's ``lambda``. ``base`` is needed only by ``linear`` without normalisation.
    Random methods draw from ``generator`` (the global RNG when ``None``). ``inplace``
    lets the merge overwrite ``deltas``, which saves one tensor per model; the result
    is the same.
    """
    spec = method_spec(method)
    count = len(deltas)
    if count == 0:
        raise ValueError("merge_tensor needs at least one delta")
    densities = [1.0] * count if densities is None else list(densities)
    gammas = [0.01] * count if gammas is None else list(gammas)
    epsilons = [0.15] * count if epsilons is None else list(epsilons)
    for name, values in (("weights", weights), ("densities", densities), ("gammas", gammas), ("epsilons", epsilons)):
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries for {count} deltas")
    normalize = spec.default_normalize if normalize is None else normalize
    rescale = spec.default_rescale if rescale is None else rescale

    if not spec.uses_base:
        return _linear_delta(deltas, weights, normalize, base)

    # Weights as tensors of the delta dtype, as mergekit rounds them.
    dtype = deltas[0].dtype
    weight_tensors = [torch.tensor(float(weight), dtype=dtype) for weight in weights]

    # Weighted, sparsified deltas d_m; multiplying by 1.0 is exact, so it is skipped.
    kept = []
    for index, delta in enumerate(deltas):
        sparse = sparsify_delta(
            delta, spec, densities[index], rescale, gammas[index], epsilons[index], generator, inplace=inplace
        )
        if float(weights[index]) != 1.0:
            sparse = sparse.mul_(weight_tensors[index]) if inplace or sparse is not delta else sparse * weight_tensors[index]
        elif sparse is delta and not inplace:
            sparse = delta.clone()
        kept.append(sparse)
        del sparse

    # Sums run model by model in input order, the order of mergekit's sum over the stacked
    # model axis, so both round identically.
    total = kept[0].clone() if spec.sign_election else kept[0]
    for sparse in kept[1:]:
        total += sparse

    if not spec.sign_election:
        merged = total
        if normalize:
            divisor = weight_tensors[0].clone()
            for weight in weight_tensors[1:]:
                divisor += weight
            if divisor.abs() >= 1e-8:
                merged /= divisor
    else:
        # Entry m agrees when sign(d_m) equals the elected sign of the sum (+1 for a zero
        # sum); zeros never agree. The sign bit is set only for a negative sum or -0, and
        # a -0 sum means every d_m is zero, so no entry agrees either way. The elected sign
        # is kept as a boolean, which takes less memory than mergekit's ±1 tensor.
        elected_positive = torch.signbit(total).logical_not_()
        # The buffer of the sum becomes the divisor.
        divisor = total.zero_() if normalize else None
        del total
        merged = None
        for sparse, weight in zip(kept, weight_tensors):
            agree = torch.where(elected_positive, sparse > 0, sparse < 0)
            contribution = inplace_in_chunks(sparse, "mul_", agree)
            merged = contribution if merged is None else merged.add_(contribution)
            if normalize:
                # Adds exactly the weight where the entry agrees, as mergekit's sum of weight * mask.
                inplace_in_chunks(divisor, "add_", agree, alpha=weight.item())
            del agree
        del kept, elected_positive
        if normalize:
            inplace_in_chunks(divisor, "add_", divisor == 0)
            merged /= divisor

    if scale != 1:
        merged *= scale
    return merged


def _linear_delta(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool,
    base: torch.Tensor | None,
) -> torch.Tensor:
    total = math.fsum(weights)
    merged = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        merged.add_(delta, alpha=weight)
    if normalize:
        if total == 0:
            raise ValueError("linear merge with normalize needs weights with a nonzero sum")
        merged /= total
    elif total != 1:
        if base is None:
            raise ValueError("linear merge without normalize needs the base tensor when the weights do not sum to 1")
        merged.add_(base, alpha=total - 1)
    return merged


def linear_merge_full(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """Return ``Σ w_m θ_m (/ Σ w_m)`` computed as mergekit 0.1.5's ``linear`` does (float32 accumulation)."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight_tensor = torch.tensor(list(weights), dtype=dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, weight in zip(tensors, weight_tensor.unbind(0)):
        result.addcmul_(tensor, weight)
    if normalize:
        result.div_(weight_tensor.sum())
    return result.to(first.dtype)

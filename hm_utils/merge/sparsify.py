"""Sparsification of one delta tensor, with the semantics of mergekit 0.1.5 (``mergekit.sparsify``).

``density`` is the fraction of entries kept. Every function returns its input unchanged
when ``density >= 1``.

- ``magnitude_prune`` (TIES): keep the ``k = max(1, floor(density n))`` entries of largest
  ``|x|``. The threshold is the k-th largest magnitude, found by selection (see
  ``kth_largest``) instead of mergekit's full ``argsort``. Entries tied with a nonzero
  threshold are kept in flat-index order until exactly ``k`` are kept. mergekit breaks
  such ties by its unstable sort, so the two can differ at those positions only.
- ``outlier_prune`` (Model Breadcrumbs): in ascending ``|x|`` order drop the lowest
  ``n - floor(density n) - floor(gamma n)`` (at least 0) entries, keep the next
  ``floor(density n)`` and drop the rest (the ``gamma`` fraction of largest outliers).
- ``random_prune`` (DARE): keep each entry with probability ``density`` (Bernoulli).
- ``della_prune`` (DELLA MagPrune): per row, entry of ascending magnitude rank
  ``r`` in ``1..c`` is kept with probability
  ``density - epsilon + 2 epsilon (r - 1) / (c - 1)``.

With ``rescale`` the kept entries are multiplied by ``||x||_1 / ||kept||_1`` (skipped when
either norm is below ``1e-7``). This is mergekit 0.1.5's rescaling for every method that
has it; for DARE it equals ``1 / density`` in expectation, not exactly.

The random methods draw with ``torch.bernoulli`` exactly as mergekit does, so from the same
generator state they produce the same masks.
"""

from __future__ import annotations

from typing import Any

import torch

RESCALE_EPS = 1e-7
# Tensors at or below this size use torch.kthvalue directly.
_DIRECT_SELECTION_SIZE = 1 << 16
_SAMPLE_SIZE = 1 << 18


def rescale_l1(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Scale ``masked`` so that its L1 norm equals that of ``original`` (mergekit's ``l1`` rescale)."""
    return _rescale_to_norm(original.abs().sum(), masked, inplace=False)


def _rescale_to_norm(before: torch.Tensor, masked: torch.Tensor, inplace: bool) -> torch.Tensor:
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked.mul_(before / after) if inplace else masked * (before / after)


# Elements per chunk in inplace_in_chunks: 4 MiB of float32.
_CHUNK_ELEMENTS = 1 << 20


def inplace_in_chunks(target: torch.Tensor, method: str, mask: torch.Tensor, **options: Any) -> torch.Tensor:
    """Call the in-place ``target.<method>(mask, **options)`` chunk by chunk and return ``target``.

    torch 2.13 converts a boolean operand of an in-place float op into a full float copy
    first; chunks bound that copy to 4 MiB. The result is the same as one call.
    """
    if not (target.is_contiguous() and mask.is_contiguous()):
        return getattr(target, method)(mask, **options)
    flat_target, flat_mask = target.view(-1), mask.view(-1)
    for start in range(0, flat_target.numel(), _CHUNK_ELEMENTS):
        stop = start + _CHUNK_ELEMENTS
        getattr(flat_target[start:stop], method)(flat_mask[start:stop], **options)
    return target


def _apply_mask(delta: torch.Tensor, mask: torch.Tensor, rescale: bool, inplace: bool) -> torch.Tensor:
    """Return ``delta * mask``, L1-rescaled if asked; with ``inplace`` the product overwrites ``delta``."""
    if not inplace:
        masked = delta * mask
        return rescale_l1(delta, masked) if rescale else masked
    before = delta.abs().sum() if rescale else None
    masked = delta.mul_(mask)
    return _rescale_to_norm(before, masked, inplace=True) if rescale else masked


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Return the k-th largest element (1-based) of a flat float tensor, by selection.

    Tensors above 64Ki elements are narrowed first: a fixed-seed random sample brackets
    the k-th value between two sample quantiles, one counting pass checks the bracket,
    and ``torch.kthvalue`` runs on the few values inside it. The result is exact; when
    the bracket misses (rare), it falls back to ``torch.kthvalue`` on the whole tensor.
    """
    n = values.numel()
    rank_ascending = n - k + 1
    if n <= _DIRECT_SELECTION_SIZE:
        return torch.kthvalue(values, rank_ascending).values

    # A private generator leaves the global RNG untouched (DARE draws from it).
    generator = torch.Generator().manual_seed(n)
    sample_size = min(_SAMPLE_SIZE, max(1 << 14, n >> 4))
    sample = values[torch.randint(n, (sample_size,), generator=generator)]
    quantile = rank_ascending / n
    margin = 6.0 * (quantile * (1 - quantile) / sample_size) ** 0.5 + 2.0 / sample_size
    low_rank = max(1, int((quantile - margin) * sample_size))
    high_rank = min(sample_size, int((quantile + margin) * sample_size) + 1)
    low = torch.kthvalue(sample, low_rank).values
    high = torch.kthvalue(sample, high_rank).values

    at_least_low = values >= low
    below = n - int(torch.count_nonzero(at_least_low))
    if low == high:
        inside_count = int(torch.count_nonzero(values == low))
        if below < rank_ascending <= below + inside_count:
            return low
        return torch.kthvalue(values, rank_ascending).values
    inside = values[at_least_low.logical_and_(values <= high)]
    if below < rank_ascending <= below + inside.numel():
        return torch.kthvalue(inside, rank_ascending - below).values
    return torch.kthvalue(values, rank_ascending).values


def _top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries of a flat non-negative tensor.

    Entries tied with the threshold are kept in flat-index order. When the threshold is
    0 the tied entries are zeros, so the mask keeps only the positive entries: the
    masked values are the same either way.
    """
    threshold = kth_largest(magnitudes, k)
    mask = magnitudes > threshold
    if threshold > 0:
        missing = k - int(torch.count_nonzero(mask))
        if missing > 0:
            tied = magnitudes == threshold
            if int(torch.count_nonzero(tied)) == missing:
                mask |= tied
            else:
                mask[tied.nonzero().reshape(-1)[:missing]] = True
    return mask


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``max(1, floor(density n))`` largest-magnitude entries (``0 < density < 1``)."""
    k = max(1, int(density * delta.numel()))
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.dtype != torch.float32 and magnitudes.dtype != torch.float64:
        magnitudes = magnitudes.float()
    return _top_k_mask(magnitudes, k).reshape(delta.shape)


def magnitude_prune(delta: torch.Tensor, density: float, rescale: bool = False, inplace: bool = False) -> torch.Tensor:
    """Keep the ``max(1, floor(density n))`` largest-magnitude entries of ``delta``; zero the rest.

    With ``inplace`` the result overwrites ``delta``, here and in the other prune functions.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_() if inplace else torch.zeros_like(delta)

    return _apply_mask(delta, magnitude_mask(delta, density), rescale, inplace)


def outlier_prune(
    delta: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False, inplace: bool = False
) -> torch.Tensor:
    """Drop the ``gamma`` fraction of largest and the smallest entries, keeping ``floor(density n)``."""
    if density >= 1:
        return delta

    n = delta.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    if keep == 0:
        mask = torch.zeros(delta.shape, dtype=torch.bool)
    else:
        magnitudes = delta.abs().reshape(-1)
        if magnitudes.dtype != torch.float32 and magnitudes.dtype != torch.float64:
            magnitudes = magnitudes.float()
        # Ascending ranks [bottom, bottom + keep) = the (n - bottom) largest minus the (n - bottom - keep) largest.
        upper = _top_k_mask(magnitudes, n - bottom)
        drop = n - bottom - keep
        if drop > 0:
            upper &= ~_top_k_mask(magnitudes, drop)
        mask = upper.reshape(delta.shape)

    return _apply_mask(delta, mask.to(delta.dtype), rescale, inplace)


def random_prune(
    delta: torch.Tensor,
    density: float,
    rescale: bool = True,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE); draws like ``mergekit.sparsify.bernoulli``."""
    if density >= 1:
        return delta

    # torch.bernoulli has no float16 CPU kernel, so CPU work happens in float32 unless bf16.
    if delta.device.type != "cpu" or delta.dtype == torch.bfloat16:
        work_dtype = delta.dtype
    else:
        work_dtype = torch.float32
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=work_dtype), generator=generator)

    work = delta.to(work_dtype)
    # Only a tensor that is still delta's own buffer may be overwritten.
    masked = _apply_mask(work, mask, rescale, inplace and work is delta)
    return masked.to(delta.dtype)


def della_prune(
    delta: torch.Tensor,
    density: float,
    epsilon: float = 0.15,
    rescale: bool = True,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Keep entries with probability rising linearly with their magnitude rank in their row (DELLA)."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_() if inplace else torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"DELLA needs density +/- epsilon inside (0, 1); got density {density}, epsilon {epsilon}"
        )

    if delta.device.type != "cpu" or delta.dtype == torch.bfloat16:
        work_dtype = delta.dtype
    else:
        work_dtype = torch.float32
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    magnitudes = rows.abs()

    # Rank 1..c of each entry within its row; inverting the sort permutation by scatter
    # gives the same ranks as mergekit's argsort of the argsort.
    order = torch.argsort(magnitudes, dim=1, descending=False)
    del magnitudes
    positions = torch.arange(1, rows.shape[1] + 1, dtype=work_dtype).expand_as(order)
    ranks = torch.empty(order.shape, dtype=work_dtype).scatter_(1, order, positions)
    del order, positions

    # (density - epsilon) + clamp((rank - 1) / (c - 1), 0, 1) * 2 * epsilon, computed in the
    # buffer of the ranks with the same operations and roundings.
    columns = rows.shape[1]
    probabilities = ranks.sub_(1).div_(columns - 1).clamp_(0, 1).mul_(2).mul_(epsilon).add_(density - epsilon)
    mask = torch.bernoulli(probabilities, generator=generator).to(work_dtype)
    del probabilities, ranks

    work = rows.to(work_dtype)
    masked = _apply_mask(work, mask, rescale, inplace and work.data_ptr() == delta.data_ptr() and work.dtype == delta.dtype)
    return masked.to(delta.dtype).reshape(delta.shape)

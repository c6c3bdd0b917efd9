"""Deterministic train/validation/test splits with deduplication and size caps.

A pooled source (one list) is deduplicated by :func:`~hm_utils.data.schema.question_key`,
keeping the first occurrence, shuffled with ``random.Random(seed)`` and cut into pools by
``fractions`` in the order test, validation, train. Caps then keep a prefix of each pool,
so changing one split's cap never moves an example into another split, and a smaller
cap gives a subset of a larger one.

A source with official splits keeps them. Duplicates are removed inside each split and
across splits with priority test, then validation, then train (an example in the test
split is never in another). A missing validation split is cut from the shuffled train
split with ``fractions["validation"] / (fractions["train"] + fractions["validation"])``.
Each split is shuffled with its own generator, ``random.Random(f"{seed}:{split}")``, and
capped to a prefix.

:func:`check_splits` enforces that every split is non-empty and that no question key or
id appears in two splits.
"""

from __future__ import annotations

import logging
import random
from typing import Mapping

from hm_utils.data.formats import POOLED, LoadReport
from hm_utils.data.schema import Example, question_key

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}
DEFAULT_CAPS: dict[str, int | None] = {"train": 2000, "validation": 200, "test": 200}

Caps = Mapping[str, int | None]


class EmptySplitError(ValueError):
    """A split that ended up with no examples."""


def resolve_caps(caps: Caps | None) -> dict[str, int | None]:
    """Return caps for every split: ``DEFAULT_CAPS`` updated with ``caps`` (``None`` means uncapped)."""
    resolved = dict(DEFAULT_CAPS)
    for split, cap in (caps or {}).items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} in caps; use {SPLITS}")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ValueError(f"cap for {split!r} must be a positive integer or None, got {cap!r}")
        resolved[split] = cap
    return resolved


def resolve_fractions(fractions: Mapping[str, float] | None) -> dict[str, float]:
    """Return validated split fractions that sum to 1."""
    resolved = dict(fractions) if fractions is not None else dict(DEFAULT_FRACTIONS)
    if set(resolved) != set(SPLITS):
        raise ValueError(f"fractions must have exactly the keys {SPLITS}, got {sorted(resolved)}")
    if any(not 0 < value < 1 for value in resolved.values()):
        raise ValueError(f"every fraction must be between 0 and 1 (exclusive), got {resolved}")
    if abs(sum(resolved.values()) - 1) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {sum(resolved.values())}")
    return resolved


def deduplicate(examples: list[Example], seen: set[str] | None = None) -> tuple[list[Example], int]:
    """Drop examples whose question key was seen before (in ``seen`` or earlier in the list).

    ``seen`` is updated in place. Returns the kept examples and the number dropped.
    """
    seen = seen if seen is not None else set()
    kept = []
    for example in examples:
        key = question_key(example)
        if key in seen:
            continue
        seen.add(key)
        kept.append(example)
    return kept, len(examples) - len(kept)


def _cap(examples: list[Example], cap: int | None) -> list[Example]:
    return examples if cap is None else examples[:cap]


def split_pooled(
    examples: list[Example],
    seed: int,
    caps: Caps | None = None,
    fractions: Mapping[str, float] | None = None,
    report: LoadReport | None = None,
) -> dict[str, list[Example]]:
    """Deduplicate, shuffle and cut one list of examples into capped train/validation/test."""
    caps = resolve_caps(caps)
    fractions = resolve_fractions(fractions)
    unique, dropped = deduplicate(examples)
    if report is not None:
        report.skipped["duplicate"] += dropped
    if dropped:
        logger.info("removed %d duplicate questions", dropped)

    order = list(unique)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = round(n * fractions["test"])
    n_validation = round(n * fractions["validation"])
    pools = {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_validation],
        "train": order[n_test + n_validation :],
    }
    return {split: _cap(pools[split], caps[split]) for split in SPLITS}


def split_official(
    splits: Mapping[str, list[Example]],
    seed: int,
    caps: Caps | None = None,
    fractions: Mapping[str, float] | None = None,
    report: LoadReport | None = None,
) -> dict[str, list[Example]]:
    """Deduplicate official splits (test first), add a validation split if missing, shuffle and cap."""
    caps = resolve_caps(caps)
    fractions = resolve_fractions(fractions)
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown official splits {sorted(unknown)}; expected a subset of {SPLITS}")
    if "test" not in splits or "train" not in splits:
        raise ValueError(f"official splits need at least train and test, got {sorted(splits)}")

    seen: set[str] = set()
    unique: dict[str, list[Example]] = {}
    for split in ("test", "validation", "train"):
        if split in splits:
            unique[split], dropped = deduplicate(list(splits[split]), seen)
            if report is not None:
                report.skipped["duplicate"] += dropped
            if dropped:
                logger.info("%s: removed %d duplicate questions", split, dropped)

    shuffled = {}
    for split, examples in unique.items():
        order = list(examples)
        random.Random(f"{seed}:{split}").shuffle(order)
        shuffled[split] = order
    if "validation" not in shuffled:
        train = shuffled["train"]
        share = fractions["validation"] / (fractions["train"] + fractions["validation"])
        n_validation = round(len(train) * share)
        shuffled["validation"], shuffled["train"] = train[:n_validation], train[n_validation:]
    return {split: _cap(shuffled[split], caps[split]) for split in SPLITS}


def make_splits(
    loaded: Mapping[str, list[Example]],
    seed: int,
    caps: Caps | None = None,
    fractions: Mapping[str, float] | None = None,
    report: LoadReport | None = None,
) -> dict[str, list[Example]]:
    """Split ``{"all": examples}`` with :func:`split_pooled`, anything else with :func:`split_official`."""
    if set(loaded) == {POOLED}:
        return split_pooled(loaded[POOLED], seed, caps, fractions, report)
    if POOLED in loaded:
        raise ValueError(f"cannot mix pooled and official splits: {sorted(loaded)}")
    return split_official(loaded, seed, caps, fractions, report)


def check_splits(splits: Mapping[str, list[Example]], task: str) -> None:
    """Raise unless every split is non-empty, ids are unique, and no id or question key is in two splits."""
    for split in SPLITS:
        if not splits.get(split):
            raise EmptySplitError(
                f"task {task!r}: the {split} split is empty; provide more data, raise its cap or "
                "change the split fractions"
            )
        ids = [example.id for example in splits[split]]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task {task!r}: duplicate ids inside the {split} split; ids must be unique")
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1 :]:
            shared_ids = {e.id for e in splits[first]} & {e.id for e in splits[second]}
            if shared_ids:
                raise ValueError(f"task {task!r}: ids in both {first} and {second}: {sorted(shared_ids)[:5]}")
            shared_keys = {question_key(e) for e in splits[first]} & {question_key(e) for e in splits[second]}
            if shared_keys:
                raise ValueError(f"task {task!r}: {len(shared_keys)} questions in both {first} and {second}")

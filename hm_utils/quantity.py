"""Data-quantity study: specialists fine-tuned on fractions of the training data, and their merges.

At fraction f, task m's specialist trains on the first ``max(1, round(f · n_m))`` examples of
its training split. Stage 01 shuffles each split with the run's seed before writing it, so
every subset is a random sample and the subsets are nested. When the LoRA settings fix
``max_steps``, the step count is scaled by f as well, so every fraction passes over its data
the same number of times (with ``epochs`` the step count scales by itself). Fraction 1 is
the main specialist of stage 03 and is not trained again.

At every fraction the study scores on the same test examples:

- each specialist, on every task;
- each baseline named in the study (entries of ``configs/baselines.yaml``, such as model
  soups and task arithmetic);
- Hi-Merging: a layer plan (per-layer TIES weights and densities) applied to the fraction's
  task vectors. With ``search=False`` the plan is the one that stage 07 found on the full
  data. With ``search=True`` the whole search (model-wise grid, contributions, conflict
  resolution) runs again on the fraction's specialists.

Merges are computed in memory with :func:`hm_utils.merge.merge_deltas`, whose tensors equal
mergekit 0.1.5's, and written into one loaded model with :func:`hm_utils.merge.apply_delta_`.
The study therefore writes no merged checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

QUANTITY_FILE = "quantity.json"
SCORES_FILE = "scores.csv"
HI_MERGING = "Hi-Merging"


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """Return the fractions sorted; raise ``ValueError`` for an empty list, a duplicate or a value outside (0, 1]."""
    values = [float(f) for f in fractions]
    if not values:
        raise ValueError("no training-data fractions; pass e.g. [0.2, 0.4, 0.6, 0.8, 1.0]")
    bad = [f for f in values if not (math.isfinite(f) and 0 < f <= 1)]
    if bad:
        raise ValueError(f"training-data fractions {bad} are outside (0, 1]; give shares such as 0.2 for 20 %")
    if len(set(values)) != len(values):
        raise ValueError(f"training-data fractions {values} contain duplicates")
    return sorted(values)


def fraction_name(fraction: float) -> str:
    """Return the folder name of a fraction in whole percent, e.g. ``fraction_020`` for 0.2."""
    percent = fraction * 100
    if not math.isclose(percent, round(percent)):
        raise ValueError(f"fraction {fraction} is not a whole percentage; use values such as 0.2 or 0.35")
    return f"fraction_{int(round(percent)):03d}"


def fraction_examples(examples: Sequence[Any], fraction: float) -> list[Any]:
    """Return the first ``max(1, round(fraction · len(examples)))`` examples."""
    check_fractions([fraction])
    if not examples:
        raise ValueError("the training set is empty; a fraction of it would be empty too")
    return list(examples[: max(1, round(fraction * len(examples)))])


def fraction_settings(settings: Any, fraction: float) -> Any:
    """Return LoRA settings for a fraction: ``max_steps`` (when set) scaled by ``fraction``, at least 1."""
    check_fractions([fraction])
    if settings.max_steps is None:
        return settings
    return dataclasses.replace(settings, max_steps=max(1, round(settings.max_steps * fraction)))


def train_fractions(
    base_model: str | Path,
    train_sets: Mapping[str, Sequence[Any]],
    out_dir: str | Path,
    settings: Any,
    fractions: Sequence[float],
    full_checkpoints: Mapping[str, str | Path],
    templates: Any = None,
) -> dict[float, dict[str, Path]]:
    """Train one specialist per task and fraction below 1 into ``out_dir/<fraction_name>/<task>``.

    Fraction 1 maps to ``full_checkpoints`` (the main specialists). A finished checkpoint
    with the same configuration is reused (``hm_utils.finetune.train_specialist``). Writes
    ``out_dir/quantity.json`` and returns ``{fraction: {task: folder}}``.
    """
    from hm_utils.files import write_json_atomic
    from hm_utils.finetune import train_specialist

    fractions = check_fractions(fractions)
    missing = sorted(set(train_sets) - set(full_checkpoints))
    if 1.0 in fractions and missing:
        raise ValueError(f"tasks {missing} have no full-data specialist; train the main specialists first")
    out_dir = Path(out_dir)
    checkpoints: dict[float, dict[str, Path]] = {}
    for fraction in fractions:
        if fraction == 1.0:
            checkpoints[fraction] = {task: Path(full_checkpoints[task]) for task in train_sets}
            continue
        checkpoints[fraction] = {}
        for task, examples in train_sets.items():
            subset = fraction_examples(examples, fraction)
            logger.info("data quantity %s: %s on %d of %d examples", fraction_name(fraction), task, len(subset), len(examples))
            folder = out_dir / fraction_name(fraction) / task
            checkpoints[fraction][task] = train_specialist(
                base_model, subset, folder, fraction_settings(settings, fraction), templates=templates
            )
    write_json_atomic(
        out_dir / QUANTITY_FILE,
        {"fractions": {str(f): {task: str(path) for task, path in folders.items()} for f, folders in checkpoints.items()}},
    )
    return checkpoints


def read_fractions(stage_dir: str | Path) -> dict[float, dict[str, Path]]:
    """Read ``quantity.json`` of the fine-tuning stage; raise ``FileNotFoundError`` when it or a folder is missing.

    ``stage_dir`` is the folder that ``train_fractions`` wrote (``03_finetune/quantity``). A
    recorded folder that no longer exists is looked up inside ``stage_dir`` (fractions below
    1) or its parent (fraction 1), so a moved run folder still resolves.
    """
    path = Path(stage_dir) / QUANTITY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the fine-tuning stage with quantity_fractions set")
    document = json.loads(path.read_text(encoding="utf-8"))
    checkpoints = {}
    for fraction, folders in document["fractions"].items():
        resolved = {task: _relocated(Path(folder), Path(stage_dir), float(fraction)) for task, folder in folders.items()}
        absent = [str(folder) for folder in resolved.values() if not folder.is_dir()]
        if absent:
            raise FileNotFoundError(f"specialists {absent} of {path} not found; rerun the fine-tuning stage")
        checkpoints[float(fraction)] = resolved
    return dict(sorted(checkpoints.items()))


def _relocated(recorded: Path, stage_dir: Path, fraction: float) -> Path:
    """Return ``recorded``, or the same checkpoint inside ``stage_dir`` when the run folder was moved."""
    if recorded.is_dir():
        return recorded
    if fraction == 1.0:
        return stage_dir.parent / recorded.name
    return stage_dir / fraction_name(fraction) / recorded.name


def _record_digest(folders: Mapping[str, Path]) -> str:
    """Hash the training records of the specialists, so that an evaluation label changes with their training."""
    from hm_utils.finetune import read_record

    keys = {}
    for task, folder in sorted(folders.items()):
        record = read_record(folder)
        keys[task] = record["key"] if record else str(folder)
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def baseline_delta(task_vectors: Any, baseline: Any) -> dict[str, Any]:
    """Return the merged delta of a ``hm_utils.merge.Baseline`` over the task vectors.

    A baseline without densities keeps every entry (density 1), as mergekit does for
    methods that do not prune.
    """
    from hm_utils.merge import merge_deltas

    densities = 1.0 if baseline.densities is None else baseline.densities
    return merge_deltas(task_vectors, baseline.method, baseline.weights, densities, **baseline.parameters)


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """Evaluation settings shared by every model of the study: methods and token limits per task type, resamples, seed."""

    methods: Mapping[str, Sequence[str]]
    max_new_tokens: Mapping[str, int] | None = None
    batch_size: int = 8
    n_resamples: int = 1000
    seed: int = 0


def _evaluate_delta(
    model: Any,
    tokenizer: Any,
    task_vectors: Any,
    delta: Mapping[str, Any],
    inputs: Any,
    out_dir: Path,
    label: str,
    settings: StudySettings,
) -> dict[str, dict[str, float]]:
    from hm_utils.evaluate import evaluate_tasks
    from hm_utils.merge import apply_delta_

    apply_delta_(model, task_vectors.base, delta)
    return evaluate_tasks(
        model, tokenizer, inputs.test, inputs.templates, out_dir, model_name=label, methods=settings.methods,
        batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens, n_resamples=settings.n_resamples,
        seed=settings.seed,
    )


def _rows(fraction: float, model_label: str, scores: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if metric == "n" or metric.endswith(("_ci_low", "_ci_high")):
                continue
            rows.append({
                "fraction": fraction, "model": model_label, "task": task, "metric": metric, "value": value,
                "ci_low": metrics.get(f"{metric}_ci_low"), "ci_high": metrics.get(f"{metric}_ci_high"),
            })
    return rows


def run_study(
    model: Any,
    tokenizer: Any,
    inputs: Any,
    checkpoints: Mapping[float, Mapping[str, Path]],
    baselines: Mapping[str, Any],
    plan: Any,
    out_dir: str | Path,
    settings: StudySettings,
    search: Any = None,
    dtype: str = "float32",
) -> pd.DataFrame:
    """Score the specialists, the baselines and Hi-Merging at every fraction; write and return the scores.

    ``inputs`` is the ``StageInputs`` of the full-data run (tasks, templates, test examples).
    ``checkpoints`` maps each fraction to its specialists (``read_fractions``), ``baselines``
    maps names to ``hm_utils.merge.Baseline`` and ``plan`` is the full-data
    ``LayerPlan``. ``search``, when given, is a callable ``(model, task_vectors) ->
    LayerPlan`` that replaces ``plan`` by a new search at each fraction. Evaluations are
    stored under ``out_dir/<fraction_name>/<model>/`` with labels that include a hash of the
    specialists' training records, so a rerun reuses only evaluations of the same models.
    Writes ``out_dir/scores.csv``: one row per fraction, model, task and metric.
    """
    import torch

    from hm_utils.files import write_text_atomic
    from hm_utils.himerging import merge_plan
    from hm_utils.merge import TaskVectors

    out_dir = Path(out_dir)
    tasks = list(inputs.tasks)
    if tuple(plan.model_names) != tuple(tasks):
        raise ValueError(f"the plan's models {plan.model_names} differ from the tasks {tasks}")
    for fraction, folders in checkpoints.items():
        absent = [task for task in tasks if task not in folders]
        if absent:
            raise ValueError(f"fraction {fraction} has no specialist for tasks {absent}; rerun the fine-tuning stage")

    rows = []
    for fraction, folders in checkpoints.items():
        folder = out_dir / fraction_name(fraction)
        digest = _record_digest(folders)
        task_vectors = TaskVectors.from_checkpoints(
            inputs.base_dir, [folders[task] for task in tasks], tasks, dtype=getattr(torch, dtype)
        )
        for task, delta in zip(tasks, task_vectors.deltas):
            label = f"{task} specialist"
            scores = _evaluate_delta(model, tokenizer, task_vectors, delta, inputs, folder / task,
                                     f"{label}@{fraction}-{digest}", settings)
            rows += _rows(fraction, label, scores)
        for name, baseline in baselines.items():
            delta = baseline_delta(task_vectors, baseline)
            scores = _evaluate_delta(model, tokenizer, task_vectors, delta, inputs, folder / name,
                                     f"{name}@{fraction}-{digest}", settings)
            rows += _rows(fraction, name, scores)
        fraction_plan = plan if search is None else search(model, task_vectors)
        plan_digest = hashlib.sha256(json.dumps(fraction_plan.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        scores = _evaluate_delta(model, tokenizer, task_vectors, merge_plan(task_vectors, fraction_plan), inputs,
                                 folder / "hi_merging", f"{HI_MERGING}@{fraction}-{digest}-{plan_digest}", settings)
        rows += _rows(fraction, HI_MERGING, scores)
        logger.info("data quantity %s scored", fraction_name(fraction))
        del task_vectors

    table = pd.DataFrame(rows, columns=["fraction", "model", "task", "metric", "value", "ci_low", "ci_high"])
    write_text_atomic(out_dir / SCORES_FILE, table.to_csv(index=False))
    return table


def quantity_curves_table(scores: pd.DataFrame, task: str, metric: str) -> pd.DataFrame:
    """Pivot the study's scores for one task and metric: rows are fractions, columns models.

    The column of the task's own specialist is named ``specialist``. The other specialists
    are dropped, because the figure compares each task's own specialist with the merges.
    """
    subset = scores[(scores["task"] == task) & (scores["metric"] == metric)]
    if subset.empty:
        raise ValueError(f"no {metric!r} scores for task {task!r} in the data-quantity study")
    own = f"{task} specialist"
    subset = subset[~subset["model"].str.endswith(" specialist") | (subset["model"] == own)]
    table = subset.pivot(index="fraction", columns="model", values="value").sort_index()
    table = table.rename(columns={own: "specialist"})
    order = ["specialist", *[column for column in table.columns if column not in ("specialist", HI_MERGING)], HI_MERGING]
    return table[[column for column in order if column in table.columns]]

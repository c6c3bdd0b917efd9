"""The data stage of the pipeline: load tasks, write their splits and a summary.

:func:`run_data_stage` writes, under ``out_dir``::

    <task>/train.json, <task>/validation.json, <task>/test.json   (Alpaca JSON)
    summary.json                                                   (settings, sizes, counts)

Token lengths are counted without a chat template: the prompt is the instruction, the
question and the options as ``"A. text"`` lines, joined by newlines; the answer is
``output``. They size batches and truncation, so they need not match the prompt template
token for token.
"""

from __future__ import annotations

import collections
import logging
import statistics
from pathlib import Path
from typing import Any, Mapping

from tqdm.auto import tqdm

from hm_utils.data.schema import Example, examples_digest, write_json_atomic, write_split
from hm_utils.data.splits import SPLITS, Caps
from hm_utils.data.tasks import PreparedTask, prepare_task

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def prompt_text(example: Example) -> str:
    """Return the instruction, question and lettered options joined by newlines."""
    parts = [example.instruction, example.input]
    if example.options:
        parts += [f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(example.options)]
    return "\n".join(part for part in parts if part)


def token_lengths(prepared: PreparedTask, tokenizer: Any) -> list[dict[str, Any]]:
    """Return one row per example: task, split, language, prompt and answer token counts."""
    rows = []
    for split in SPLITS:
        examples = prepared.splits[split]
        if not examples:
            continue
        prompts = tokenizer([prompt_text(e) for e in examples], add_special_tokens=False)["input_ids"]
        answers = tokenizer([e.output for e in examples], add_special_tokens=False)["input_ids"]
        for example, prompt_ids, answer_ids in zip(examples, prompts, answers):
            rows.append({
                "task": prepared.spec.name,
                "split": split,
                "language": example.language,
                "prompt_tokens": len(prompt_ids),
                "answer_tokens": len(answer_ids),
            })
    return rows


def _length_stats(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(ordered), 2),
        "median": float(statistics.median(ordered)),
        "p95": float(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]),
        "max": float(ordered[-1]),
    }


def export_task(prepared: PreparedTask, out_dir: str | Path) -> dict[str, Any]:
    """Write a task's splits to ``out_dir/<task>/<split>.json``; return its summary entry."""
    task_dir = Path(out_dir) / prepared.spec.name
    entry = prepared.summary()
    entry["outputs"] = {}
    entry["digests"] = {}
    for split in SPLITS:
        path = write_split(prepared.splits[split], task_dir / f"{split}.json")
        entry["outputs"][split] = str(path.relative_to(Path(out_dir)))
        entry["digests"][split] = examples_digest(prepared.splits[split])
    if prepared.spec.task_type == "mcq":
        entry["answer_letters"] = {}
        for split in SPLITS:
            counts = collections.Counter(chr(ord("A") + e.answer_index) for e in prepared.splits[split])
            entry["answer_letters"][split] = dict(sorted(counts.items()))
    return entry


def run_data_stage(
    tasks: list[str],
    out_dir: str | Path,
    seed: int,
    caps: Caps | None = None,
    *,
    sources: Mapping[str, str] | None = None,
    fractions: Mapping[str, float] | None = None,
    skip_invalid: bool = False,
    tokenizer: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Prepare and export ``tasks``, write ``summary.json``; return the summary and token-length rows.

    ``sources`` maps a public task to its local path or hub id. Token lengths are counted
    only when ``tokenizer`` is given. Every task is loaded before anything is written, so
    an invalid task name or source fails before any output exists.
    """
    if not tasks:
        raise ValueError("no tasks given; pass at least one registered task name")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in {tasks}")
    sources = dict(sources or {})
    unknown = set(sources) - set(tasks)
    if unknown:
        raise ValueError(f"sources given for tasks that are not loaded: {sorted(unknown)}")

    prepared = [
        prepare_task(name, seed, caps, source=sources.get(name), fractions=fractions, skip_invalid=skip_invalid)
        for name in tqdm(tasks, desc="loading tasks")
    ]

    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"seed": seed, "tasks": {}}
    lengths: list[dict[str, Any]] = []
    for task in prepared:
        entry = export_task(task, out_dir)
        if tokenizer is not None:
            rows = token_lengths(task, tokenizer)
            lengths += rows
            entry["token_lengths"] = {
                "prompt": _length_stats([row["prompt_tokens"] for row in rows]),
                "answer": _length_stats([row["answer_tokens"] for row in rows]),
            }
        summary["tasks"][task.spec.name] = entry
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    logger.info("wrote %d tasks and %s to %s", len(prepared), SUMMARY_FILE, out_dir)
    return summary, lengths

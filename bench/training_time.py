"""Print the training time of every specialist, the mixed-data model and the data-quantity specialists of a run.

Without ``--retrain`` the script reads the training records that ``hm_utils.finetune`` writes
beside each checkpoint of ``RUN/03_finetune``. Their ``train_seconds`` is the wall time of the
optimiser steps, measured when the model was trained. Loading, adapter merging and saving
are not in it. With ``--retrain OUT`` it trains the same models again into ``OUT``, with the
settings and data recorded in the run, and prints the wall time of each complete
``train_specialist`` call (tokenisation, training, merging the adapter, saving).

The total is compared with a budget (``--budget-minutes``, 20 by default).

Example:
  python bench/training_time.py --run-dir papermill_runs/default-20261205-010000
  python bench/training_time.py --run-dir papermill_runs/default-20261205-010000 --retrain /tmp/retrain --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402

from hm_utils import finetune, quantity  # noqa: E402


def recorded_checkpoints(finetune_dir: Path) -> list[tuple[str, Path, str, float]]:
    """Return ``(label, folder, task, fraction)`` for every checkpoint of a fine-tuning stage folder.

    ``task`` is ``"mixed"`` for the mixed-data model, and ``fraction`` is 1 except for the
    data-quantity specialists.
    """
    from hm_utils.himerging import read_checkpoints

    try:
        folders = read_checkpoints(finetune_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    checkpoints = [(name, folder, name, 1.0) for name, folder in folders.items()]
    if (finetune_dir / "quantity" / quantity.QUANTITY_FILE).is_file():
        for fraction, per_task in quantity.read_fractions(finetune_dir / "quantity").items():
            if fraction < 1.0:
                checkpoints += [(f"{task} @ {fraction:.0%}", path, task, fraction) for task, path in per_task.items()]
    return checkpoints


def read_training_record(folder: Path) -> dict:
    record = finetune.read_record(folder)
    if record is None:
        raise SystemExit(f"error: {folder} has no training record; it was not written by hm_utils.finetune")
    return record


def recorded_times(checkpoints: list[tuple[str, Path, str, float]]) -> pd.DataFrame:
    rows = []
    for label, folder, _, _ in checkpoints:
        record = read_training_record(folder)
        rows.append({"model": label, "examples": record["n_examples"], "steps": record["steps"],
                     "tokens/s": record["tokens_per_second"], "seconds": record["train_seconds"]})
    return pd.DataFrame(rows).set_index("model")


def retrain(checkpoints: list[tuple[str, Path, str, float]], run_dir: Path, out_dir: Path) -> pd.DataFrame:
    """Train every checkpoint again from the run's data and recorded settings; time each complete call."""
    from hm_utils.data import read_split
    from hm_utils.prompts import load_prompt_choice

    data_dir = run_dir / "01_data"
    tasks = list(json.loads((data_dir / "summary.json").read_text(encoding="utf-8"))["tasks"])
    train_sets = {task: read_split(data_dir / task / "train.json") for task in tasks}
    templates = load_prompt_choice(run_dir / "02_prompt_tuning" / "prompts.json")
    rows = []
    for label, folder, task, fraction in checkpoints:
        record = read_training_record(folder)
        settings = finetune.LoraSettings.from_dict(record["key"]["settings"])
        if task == "mixed":
            examples = finetune.mix_training_sets(train_sets, settings.seed)
        else:
            examples = quantity.fraction_examples(train_sets[task], fraction)

        start = time.perf_counter()
        target = out_dir / (folder.name if fraction == 1.0 else f"{quantity.fraction_name(fraction)}_{task}")
        finetune.train_specialist(record["base_model"]["reference"], examples, target, settings, templates=templates)
        rows.append({"model": label, "examples": len(examples), "steps": finetune.plan_steps(len(examples), settings),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"{label}: {rows[-1]['seconds']} s", flush=True)
    return pd.DataFrame(rows).set_index("model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="run folder whose 03_finetune stage has finished")
    parser.add_argument("--retrain", type=Path, default=None, help="train every model again into this folder and time it")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for --retrain (default: torch's choice)")
    parser.add_argument("--budget-minutes", type=float, default=20.0, help="training budget to compare the total with")
    args = parser.parse_args(argv)

    checkpoints = recorded_checkpoints(args.run_dir / "03_finetune")
    if args.retrain is None:
        table = recorded_times(checkpoints)
        source = "recorded train_seconds (optimiser steps only)"
    else:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        table = retrain(checkpoints, args.run_dir, args.retrain)
        source = "wall time of each train_specialist call"
    total = table["seconds"].sum()
    print(table.to_string())
    print(f"\ntotal: {total / 60:.1f} min ({source}); budget {args.budget_minutes:g} min; "
          f"ratio total / budget = {total / 60 / args.budget_minutes:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


def recorded_checkpoints(finetune_dir: Path) -> dict[str, Path]:
    """Return every trained checkpoint of a fine-tuning stage folder, by label."""
    checkpoints_file = finetune_dir / "checkpoints.json"
    if not checkpoints_file.is_file():
        raise SystemExit(f"error: {checkpoints_file} not found; run 03_finetune on this run folder first")
    folders = {name: Path(path) for name, path in json.loads(checkpoints_file.read_text(encoding="utf-8")).items()}
    if (finetune_dir / "quantity" / quantity.QUANTITY_FILE).is_file():
        for fraction, per_task in quantity.read_fractions(finetune_dir / "quantity").items():
            if fraction < 1.0:
                folders.update({f"{task} @ {fraction:.0%}": path for task, path in per_task.items()})
    return folders


def recorded_times(folders: dict[str, Path]) -> pd.DataFrame:
    rows = []
    for label, folder in folders.items():
        record = finetune.read_record(folder)
        if record is None:
            raise SystemExit(f"error: {folder} has no training record; it was not written by hm_utils.finetune")
        rows.append({"model": label, "examples": record["n_examples"], "steps": record["steps"],
                     "tokens/s": record["tokens_per_second"], "seconds": record["train_seconds"]})
    return pd.DataFrame(rows).set_index("model")


def retrain(folders: dict[str, Path], run_dir: Path, out_dir: Path) -> pd.DataFrame:
    """Train every checkpoint again from the run's data and recorded settings; time each complete call."""
    from hm_utils.data import read_split
    from hm_utils.prompts import load_prompt_choice

    data_dir = run_dir / "01_data"
    tasks = list(json.loads((data_dir / "summary.json").read_text(encoding="utf-8"))["tasks"])
    train_sets = {task: read_split(data_dir / task / "train.json") for task in tasks}
    templates = load_prompt_choice(run_dir / "02_prompt_tuning" / "prompts.json")
    rows = []
    for label, folder in folders.items():
        record = finetune.read_record(folder)
        settings = finetune.LoraSettings.from_dict(record["key"]["settings"])
        base = record["base_model"]["reference"]
        task, _, share = label.partition(" @ ")
        if label == "mixed":
            examples = finetune.mix_training_sets(train_sets, settings.seed)
        elif share:
            examples = quantity.fraction_examples(train_sets[task], float(share.rstrip("%")) / 100)
        else:
            examples = train_sets[task]
        start = time.perf_counter()
        finetune.train_specialist(base, examples, out_dir / label.replace(" @ ", "_").replace("%", ""), settings,
                                  templates=templates)
        rows.append({"model": label, "examples": len(examples), "steps": settings.max_steps,
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

    folders = recorded_checkpoints(args.run_dir / "03_finetune")
    if args.retrain is None:
        table = recorded_times(folders)
        source = "recorded train_seconds (optimiser steps only)"
    else:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        table = retrain(folders, args.run_dir, args.retrain)
        source = "wall time of each train_specialist call"
    total = table["seconds"].sum()
    print(table.to_string())
    print(f"\ntotal: {total / 60:.1f} min ({source}); budget {args.budget_minutes:g} min; "
          f"ratio total / budget = {total / 60 / args.budget_minutes:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

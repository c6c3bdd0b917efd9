"""Command line: ``python -m hm_utils.merge CONFIG.yaml (--dry-run | --out DIR [--engine mergekit])``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from hm_utils.merge.checks import check_merge_inputs
from hm_utils.merge.config import MergeConfig
from hm_utils.merge.methods import torch_threads
from hm_utils.merge.plan import describe_plan, plan_merge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hm_utils.merge", description="Merge models described by a mergekit YAML config.")
    parser.add_argument("config", help="mergekit YAML config (models: form)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved weight and density per model per decoder layer; load no weights")
    parser.add_argument("--out", help="output model folder (replaced atomically when the merge succeeds)")
    parser.add_argument("--engine", choices=("hm", "mergekit"), default="hm", help="hm: streaming engine of this package; mergekit: mergekit's run_merge")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random draws of DARE and DELLA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads during the merge; 0 keeps torch's default (default: 1)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.dry_run and not args.out:
        parser.error("--out is required unless --dry-run is given")
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as error:
        # Input errors carry the value and the fix in their message; a traceback adds nothing.
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    config = MergeConfig.from_yaml(args.config)
    if args.dry_run:
        summary = check_merge_inputs(config)
        print(describe_plan(config, plan_merge(config, summary)))
        return 0

    threads = args.threads or None
    if args.engine == "mergekit":
        from hm_utils.merge.mergekit_runner import run_mergekit

        with torch_threads(threads):
            run_mergekit(args.config, args.out, random_seed=args.seed)
    else:
        from hm_utils.merge.engine import merge_checkpoints

        # Seeded like mergekit's --random-seed: the global RNG, drawn in tensor-name order.
        if args.seed is not None:
            torch.manual_seed(args.seed)
        merge_checkpoints(config, args.out, threads=threads)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

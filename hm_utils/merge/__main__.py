"""Command line: ``python -m hm_utils.merge CONFIG.yaml (--dry-run | --out DIR [--engine mergekit])``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from hm_utils.files import DISK_FULL_ERRNOS
from hm_utils.merge.checks import DEFAULT_MAX_RELATIVE_DELTA, check_merge_inputs
from hm_utils.merge.config import MergeConfig
from hm_utils.merge.methods import torch_threads
from hm_utils.merge.plan import describe_plan, plan_merge


def fix_malloc_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation above ``threshold`` bytes with mmap; return whether it applied.

    glibc raises its mmap threshold after large blocks are freed (up to 32 MiB), so later
    tensors of a few MiB come from the heap, whose freed memory stays resident. A fixed
    threshold returns each freed tensor to the system. It is process-wide, so only this
    command line sets it; other C libraries are left as they are.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""):
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return bool(ctypes.CDLL(name).mallopt(m_mmap_threshold, threshold))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hm_utils.merge", description="Merge models described by a mergekit YAML config.")
    parser.add_argument("config", help="mergekit YAML config (models: form)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved weight and density per model per decoder layer; load no weights")
    parser.add_argument("--out", help="output model folder (replaced atomically when the merge succeeds)")
    parser.add_argument("--engine", choices=("hm", "mergekit"), default="hm", help="hm: streaming engine of this package; mergekit: mergekit's run_merge")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random draws of DARE and DELLA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads during the merge; 0 keeps torch's default (default: 1)")
    parser.add_argument(
        "--max-relative-delta",
        type=float,
        default=DEFAULT_MAX_RELATIVE_DELTA,
        help="reject a model whose distance from base_model, over three decoder layers, exceeds this multiple of the"
        f" base weights' norm (fine-tuned from another base); 0 disables the check (default: {DEFAULT_MAX_RELATIVE_DELTA})",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.dry_run and not args.out:
        parser.error("--out is required unless --dry-run is given")
    fix_malloc_mmap_threshold()
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as error:
        # Input errors carry the value and the fix in their message; a traceback adds nothing.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        # explain_disk_full already named the output folder and the fix.
        print(f"error: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    config = MergeConfig.from_yaml(args.config)
    if args.dry_run:
        summary = check_merge_inputs(config)
        print(describe_plan(config, plan_merge(config, summary)))
        return 0

    threads = args.threads or None
    max_relative_delta = args.max_relative_delta or None
    if args.engine == "mergekit":
        from hm_utils.merge.mergekit_runner import run_mergekit

        with torch_threads(threads):
            run_mergekit(args.config, args.out, random_seed=args.seed, max_relative_delta=max_relative_delta)
    else:
        from hm_utils.merge.engine import merge_checkpoints

        # Seeded like mergekit's --random-seed: the global RNG, drawn in tensor-name order.
        if args.seed is not None:
            torch.manual_seed(args.seed)
        merge_checkpoints(config, args.out, threads=threads, max_relative_delta=max_relative_delta)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

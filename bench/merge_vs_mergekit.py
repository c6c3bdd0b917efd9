"""Benchmark: one TIES merge through the mergekit CLI and through the streaming engine.

The inputs are the real SmolLM2-135M-Instruct base and two specialists made from it by
``hm_utils.merge.synthetic.perturb_checkpoint`` (three models of 135M parameters, fp32).
Both runs merge the same YAML config (TIES, density 0.5, weight 1.0) from a warm page
cache, each in its own child process. Wall time and peak RSS come from ``os.wait4`` on
that child. The memory-bandwidth bound is the time a plain memory copy takes to move
the bytes a merge must move at least: every input byte read once, every output byte
written once.

Usage: python bench/merge_vs_mergekit.py [--workdir DIR] [--density 0.5] [--threads default 1 2]
Both tools run once per thread setting (mergekit's ``--num-threads``, the engine's
``--threads``). The printed ratios come from one run of each. On a shared CPU they vary
with load, and two threads contending with other jobs can be several times slower than
one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hm_utils.merge import MergeConfig, load_state_dict, write_mergekit_config
from hm_utils.merge.io import weight_files
from hm_utils.merge.synthetic import perturb_checkpoint
from hm_utils.models import provision


def run_child(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run a command; return its wall time in seconds and its peak RSS in bytes."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}:\n{stderr[-3000:]}")
    # ru_maxrss is in KiB on Linux.
    return wall, usage.ru_maxrss * 1024


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 3) -> float:
    """Bytes moved per second (read plus write) by the fastest of ``repeats`` large tensor copies."""
    source = torch.ones(nbytes // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def warm_cache(folders: list[Path]) -> int:
    """Read every weight file once so both runs start from the page cache; return the bytes."""
    total = 0
    for folder in folders:
        for file in weight_files(folder):
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 24):
                    total += len(chunk)
    return total


def count_differences(first: Path, second: Path) -> tuple[int, int]:
    ours, theirs = load_state_dict(first), load_state_dict(second)
    different = sum(int((ours[name] != theirs[name]).sum()) for name in ours)
    return different, sum(tensor.numel() for tensor in ours.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="folder for specialists and outputs (default: a temporary folder)")
    parser.add_argument("--density", type=float, default=0.5, help="TIES density (fraction of each delta kept)")
    parser.add_argument(
        "--threads",
        nargs="+",
        default=["default", "1", "2"],
        help="torch thread counts given to both tools; 'default' passes none, so each tool uses its own default",
    )
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merge_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    base = provision("smollm2-135m")
    specialists = []
    for seed in range(2):
        folder = workdir / f"specialist{seed}"
        if not (folder / "model.safetensors").is_file():
            perturb_checkpoint(base, folder, seed=seed)
        specialists.append(folder)

    config = MergeConfig.from_arguments("ties", base, specialists, weights=1.0, densities=args.density)
    config_path = write_mergekit_config(config, workdir / "ties.yml")

    bytes_read = warm_cache([base, *specialists])
    bytes_written = sum(file.stat().st_size for file in weight_files(base))
    bandwidth = copy_bandwidth()
    bound = (bytes_read + bytes_written) / bandwidth

    mergekit_cli = str(Path(sys.executable).with_name("mergekit-yaml"))
    gib = 1 << 30
    print(f"inputs: base + {len(specialists)} specialists of SmolLM2-135M fp32, TIES density {args.density}")
    print(f"bytes read {bytes_read / gib:.2f} GiB, written {bytes_written / gib:.2f} GiB; copy bandwidth {bandwidth / gib:.1f} GiB/s")
    print(f"memory-bandwidth bound: {bound:.2f} s")

    for threads in args.threads:
        mergekit_out, engine_out = workdir / "out_mergekit", workdir / "out_engine"
        for folder in (mergekit_out, engine_out):
            shutil.rmtree(folder, ignore_errors=True)
        thread_options = [] if threads == "default" else ["--num-threads", threads]
        engine_options = [] if threads == "default" else ["--threads", threads]
        label = "each tool's default (mergekit: torch's, engine: 1)" if threads == "default" else threads
        mergekit_wall, mergekit_rss = run_child([mergekit_cli, str(config_path), str(mergekit_out), "--quiet", *thread_options], env)
        engine_wall, engine_rss = run_child(
            [sys.executable, "-m", "hm_utils.merge", str(config_path), "--out", str(engine_out), *engine_options], env
        )
        different, total = count_differences(engine_out, mergekit_out)

        print(f"\ntorch threads: {label} (load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
        print(f"{'run':<10}{'wall s':>9}{'peak RSS MiB':>14}{'bound / wall':>14}")
        for name, wall, rss in (("mergekit", mergekit_wall, mergekit_rss), ("engine", engine_wall, engine_rss)):
            print(f"{name:<10}{wall:>9.1f}{rss / (1 << 20):>14.0f}{bound / wall:>14.3f}")
        print(f"speed-up (mergekit wall / engine wall): {mergekit_wall / engine_wall:.2f}x")
        print(f"peak RSS ratio (engine / mergekit): {engine_rss / mergekit_rss:.2f}")
        print(f"elements that differ: {different} of {total} (magnitude ties at the trim threshold)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

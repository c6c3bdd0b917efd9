"""Benchmark: peak memory of one streaming merge against model size and the largest tensor.

The inputs are the real SmolLM2-135M-Instruct base (fp32, about 540 MB) and two
specialists made from it by ``hm_utils.merge.synthetic.perturb_checkpoint``. The engine
merges them (TIES, density 0.5, weight 1.0) in a child process with one torch thread.
Peak RSS is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, first after a child that
only imports the engine (the interpreter baseline) and then after the merge child.

The engine's own estimate (``hm_utils.merge.engine``) is a peak of about (inputs + 3)
times the largest tensor plus the interpreter. The printed ratios come from one run.

Usage: python bench/merge_memory.py [--workdir DIR] [--density 0.5]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hm_utils.merge import MergeConfig, write_mergekit_config
from hm_utils.merge.io import safetensors_index, weight_files
from hm_utils.merge.synthetic import perturb_checkpoint
from hm_utils.models import resolve_model

MIB = 1 << 20


def children_peak_rss() -> int:
    """Return the largest peak RSS in bytes of any child waited for so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def run_child(command: list[str], env: dict[str, str]) -> float:
    """Run a command to completion and return its wall time in seconds; raise with its stderr on failure."""
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {completed.returncode}:\n{completed.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="folder for specialists and output (default: a temporary folder)")
    parser.add_argument("--density", type=float, default=0.5, help="TIES density (fraction of each delta kept)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merge_memory_"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    base = Path(resolve_model("smollm2-135m"))
    specialists = []
    for seed in range(2):
        folder = workdir / f"specialist{seed}"
        if not (folder / "model.safetensors").is_file():
            perturb_checkpoint(base, folder, seed=seed)
        specialists.append(folder)
    config = MergeConfig.from_arguments("ties", base, specialists, weights=1.0, densities=args.density)
    config_path = write_mergekit_config(config, workdir / "ties.yml")

    model_bytes = sum(file.stat().st_size for file in weight_files(base))
    index = safetensors_index(base)
    largest_name = max(index, key=lambda name: index[name].nbytes)
    largest_bytes = index[largest_name].nbytes
    inputs = 1 + len(specialists)

    run_child([sys.executable, "-c", "import hm_utils.merge.engine"], env)
    interpreter_rss = children_peak_rss()
    wall = run_child(
        [sys.executable, "-m", "hm_utils.merge", str(config_path), "--out", str(workdir / "merged"), "--threads", "1"], env
    )
    merge_rss = children_peak_rss()
    estimate = (inputs + 3) * largest_bytes + interpreter_rss

    print(f"inputs: base + {len(specialists)} specialists of SmolLM2-135M fp32, TIES density {args.density}; merge wall time {wall:.1f} s")
    print(f"model size (weight files of one model): {model_bytes / MIB:.0f} MiB")
    print(f"largest tensor: {largest_name} {tuple(index[largest_name].shape)}, {largest_bytes / MIB:.0f} MiB")
    print(f"peak RSS of a child that only imports the engine: {interpreter_rss / MIB:.0f} MiB")
    print(f"peak RSS of the merge child: {merge_rss / MIB:.0f} MiB")
    print(f"peak RSS / model size: {merge_rss / model_bytes:.2f}")
    print(f"peak RSS / all input weights ({inputs} models): {merge_rss / (inputs * model_bytes):.2f}")
    print(f"peak RSS / largest tensor: {merge_rss / largest_bytes:.2f}")
    print(f"(peak RSS - import-only RSS) / largest tensor: {(merge_rss - interpreter_rss) / largest_bytes:.2f}")
    print(f"engine estimate ({inputs} inputs + 3) x largest tensor + import-only RSS: {estimate / MIB:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Determinism: two runs of the smoke profile with the same seed give identical tables and figures.

The chain 01-08 runs twice through the batch runner into separate run folders, with a few
stages made smaller through ``--set`` so that both runs take a few minutes on 2 CPU cores.
Every table, results document and figure that the later stages read or publish must match
byte for byte. Files that record wall times (training records, manifests) are not compared;
the notebook fingerprints differ too, because they include the run folder.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "04_baselines.baselines=[ties]",
    "05_model_wise.grid_step=0.5",
    "06_contribution.layers=[3,28]",
]
COMPARED = [
    "01_data/summary.json",
    "01_data/cmekg_mcq_zh/train.json",
    "02_prompt_tuning/prompts.json",
    "03_finetune/scores.csv",
    "03_finetune/specialist_vs_base.csv",
    "04_baselines/scores.csv",
    "05_model_wise/grid_scores.csv",
    "05_model_wise/best_settings.json",
    "06_contribution/contributions.csv",
    "07_hi_merging/hi_merging_decisions.csv",
    "07_hi_merging/results.csv",
    "07_hi_merging/results_ci.csv",
    "07_hi_merging/quantity/scores.csv",
    "08_figures/results.md",
    "08_figures/grid_cmekg_mcq_zh.png",
    "08_figures/conflict.png",
    "08_figures/radar.pdf",
    "08_figures/quantity_hpo_definitions_en.png",
]


def run_smoke(run_dir: Path) -> None:
    command = [sys.executable, "-m", "hm_utils.runs", "--profile", "smoke", "--run-dir", str(run_dir)]
    for override in OVERRIDES:
        command += ["--set", override]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    first = tmp_path_factory.mktemp("determinism") / "first"
    second = first.parent / "second"
    run_smoke(first)
    run_smoke(second)
    yield first, second
    # Each run folder contains about 5 GB of checkpoints and merges.
    shutil.rmtree(first.parent, ignore_errors=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("relative", COMPARED)
def test_smoke_output_identical(two_runs, relative):
    first, second = (run / relative for run in two_runs)
    assert first.is_file(), f"{relative} was not written"
    assert digest(first) == digest(second), f"{relative} differs between two runs with the same seed"


def test_smoke_runs_same_parameters(two_runs):
    import json

    manifests = [json.loads((run / "manifest.json").read_text(encoding="utf-8")) for run in two_runs]
    for manifest in manifests:
        assert [entry["status"] for entry in manifest["notebooks"].values()] == ["done"] * 8
    parameters = [
        {name: {key: value for key, value in entry["parameters"].items() if key != "run_dir"}
         for name, entry in manifest["notebooks"].items()}
        for manifest in manifests
    ]
    assert parameters[0] == parameters[1]

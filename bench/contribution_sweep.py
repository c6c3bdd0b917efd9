"""Time the cached contribution sweep against the naive loop, on SmolLM2-135M with synthetic specialists.

Workload: two specialists (base + seeded noise on a few decoder layers, written to disk) and
one validation set per task. Both sides compute the contributions c_mm (each specialist on its
task) and c_mG (the stage-2 TIES merge on both tasks) at the chosen layers.

- Cached sweep (``hm_utils.contribution``): task vectors computed once from the folders, the
  merge in memory, probes by in-place layer swaps replayed from cached layer inputs.
- Naive loop: for every probe model, a mergekit config (task arithmetic for specialist probes,
  TIES with per-layer filters for merge probes), ``run_mergekit`` to disk, load, full forward.
  The base model is loaded from its folder once.

Both give the same scores (printed as the largest difference); the ratio compares wall-clock
times measured in this one run. Usage:

    python bench/contribution_sweep.py [--layers 2 27] [--examples 8] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hm_utils import contribution as C  # noqa: E402
from hm_utils import himerging as H  # noqa: E402
from hm_utils.data import Example  # noqa: E402
from hm_utils.merge import TaskVectors, decoder_layer_of, load_state_dict, run_mergekit, save_state_dict  # noqa: E402
from hm_utils.merge.config import MergeConfig, ModelEntry, write_mergekit_config  # noqa: E402
from hm_utils.merge.io import copy_auxiliary_files  # noqa: E402
from hm_utils.models import provision  # noqa: E402
from hm_utils.prompts import default_template  # noqa: E402

TERMS = [
    ("anemia", "A lack of healthy red blood cells to carry oxygen to the tissues."),
    ("asthma", "A condition in which the airways narrow, swell and produce extra mucus."),
    ("fracture", "A break in the continuity of a bone."),
    ("insulin", "A hormone made by the pancreas that lowers blood glucose."),
    ("migraine", "A headache of varying intensity, often with nausea and sensitivity to light."),
    ("sepsis", "The body's extreme response to an infection, which can damage its own tissues."),
    ("tendon", "A cord of strong fibrous tissue that attaches a muscle to a bone."),
    ("vaccine", "A preparation that trains the immune system to recognise a pathogen."),
    ("cataract", "A clouding of the lens of the eye that blurs vision."),
    ("eczema", "A condition that makes the skin red, dry and itchy."),
    ("gout", "A form of arthritis caused by uric acid crystals in a joint."),
    ("hernia", "An organ pushing through an opening in the muscle that holds it."),
    ("neuron", "A cell that transmits nerve impulses."),
    ("platelet", "A small cell fragment in the blood that helps it clot."),
    ("stroke", "Damage to the brain from an interruption of its blood supply."),
    ("ulcer", "An open sore on the skin or on a mucous membrane."),
]
PERTURBED = {"defs": (2, 9, 27), "reverse": (2, 15, 20)}


def examples_for(task: str, count: int) -> list[Example]:
    """Definitions of the first terms (task "defs"), or terms named from the last definitions (task "reverse")."""
    if task == "defs":
        rows = list(TERMS[:count])
        instruction = "Define the medical term."
    else:
        rows = [(text, term) for term, text in TERMS[-count:]]
        instruction = "Name the medical term defined here."
    return [Example(f"{task}{i}", task, "en", "qa", instruction, question, answer) for i, (question, answer) in enumerate(rows)]


def write_specialists(base_dir: Path, base: dict, root: Path) -> dict[str, Path]:
    generator = torch.Generator().manual_seed(0)
    folders = {}
    for task, layers in PERTURBED.items():
        state = {}
        for name, tensor in base.items():
            noise = torch.randn(tensor.shape, generator=generator) if decoder_layer_of(name) in layers else None
            state[name] = tensor + 0.05 * tensor.std() * noise if noise is not None else tensor
        folder = root / task
        folder.mkdir()
        save_state_dict(state, folder)
        copy_auxiliary_files(base_dir, folder)
        folders[task] = folder
    return folders


def cached_sweep(model, base_dir, folders, probe_sets, layers, plan):
    start = time.perf_counter()
    task_vectors = TaskVectors.from_checkpoints(base_dir, list(folders.values()), list(folders))
    merged = H.merge_plan(task_vectors, plan)
    setup_seconds = time.perf_counter() - start

    start = time.perf_counter()
    contributions = C.contribution_analysis(model, task_vectors, merged, probe_sets, layers, progress=False)
    return contributions, setup_seconds, time.perf_counter() - start


def naive_loop(base_dir, folders, probe_sets, layers, plan, tensor_names, work: Path):
    """Score every probe model built by mergekit on disk; return scores keyed like the sweep's."""
    filters = H.layer_filters(tensor_names, plan.num_layers)
    plan_weights, plan_densities = H.plan_settings(plan, tensor_names)
    runs = []

    def merged_score(config: MergeConfig, tasks: list[str]) -> dict[str, float]:
        out = work / f"probe{len(runs)}"
        run_mergekit(write_mergekit_config(config, work / f"probe{len(runs)}.yml"), out)
        runs.append(out)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        scores = {task: C.score_model(model, probe_sets[task]) for task in tasks}
        del model
        shutil.rmtree(out)
        return scores

    def arithmetic(task: str, weight) -> MergeConfig:
        entry = ModelEntry(str(folders[task]), {"weight": weight})
        return MergeConfig("task_arithmetic", [entry], base_model=str(base_dir))

    def ties(weights) -> MergeConfig:
        entries = [
            ModelEntry(str(folders[name]), {"weight": weights[m], "density": plan_densities[m]})
            for m, name in enumerate(plan.model_names)
        ]
        return MergeConfig("ties", entries, base_model=str(base_dir), parameters={"normalize": False, "rescale": False})

    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_scores = {task: C.score_model(base_model, probe_sets[task]) for task in probe_sets}
    del base_model

    results = {}
    for task in plan.model_names:
        whole = merged_score(arithmetic(task, 1.0), [task])[task]
        without, only = [], []
        for layer in layers:
            dropped = [{"filter": filters[layer], "value": 0.0}, {"value": 1.0}]
            alone = [{"filter": filters[layer], "value": 1.0}, {"value": 0.0}]
            without.append(merged_score(arithmetic(task, dropped), [task])[task])
            only.append(merged_score(arithmetic(task, alone), [task])[task])
        results[("specialist", task)] = (whole, base_scores[task], np.array(without), np.array(only))

    tasks = list(plan.model_names)
    whole = merged_score(ties(plan_weights), tasks)
    without, only = [], []
    for layer in layers:
        without.append(merged_score(ties([[{"filter": filters[layer], "value": 0.0}, *w] for w in plan_weights]), tasks))
        only.append(
            merged_score(
                ties([[{"filter": filters[layer], "value": row[layer]}, {"value": 0.0}] for row in plan.weights]), tasks
            )
        )
    for task in tasks:
        results[("merged", task)] = (
            whole[task], base_scores[task], np.array([s[task] for s in without]), np.array([s[task] for s in only])
        )
    return results, len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 27], help="decoder layers to probe")
    parser.add_argument("--examples", type=int, default=8, help="validation examples per task (at most 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements to this JSON file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    base_dir = provision("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    template = default_template("en", "qa")
    probe_sets = {
        task: C.build_probe_set(tokenizer, examples_for(task, args.examples), template, "answer_logprob", 8, task)
        for task in PERTURBED
    }
    settings = [H.ModelSetting(0.5, 0.9), H.ModelSetting(0.3, 1.0)]
    plan = H.initial_plan(list(PERTURBED), settings, len(C.decoder_stack(model).layers))

    with tempfile.TemporaryDirectory(prefix="contribution_bench_") as tmp:
        work = Path(tmp)
        folders = write_specialists(base_dir, load_state_dict(base_dir), work)

        contributions, setup_seconds, sweep_seconds = cached_sweep(model, base_dir, folders, probe_sets, args.layers, plan)
        start = time.perf_counter()
        tensor_names = list(load_state_dict(base_dir))
        naive, n_merges = naive_loop(base_dir, folders, probe_sets, args.layers, plan, tensor_names, work)
        naive_seconds = time.perf_counter() - start

    differences = []
    for (kind, task), (whole, base, without, only) in naive.items():
        impacts = (contributions.specialist_impacts if kind == "specialist" else contributions.merged_impacts)[task]
        differences += [abs(impacts.score_model - whole), abs(impacts.score_base - base)]
        differences += list(np.abs(impacts.score_without - without)) + list(np.abs(impacts.score_only - only))

    ours = setup_seconds + sweep_seconds
    report = {
        "layers": args.layers,
        "examples_per_task": args.examples,
        "threads": torch.get_num_threads(),
        "mergekit_runs": n_merges,
        "cached_setup_s": round(setup_seconds, 1),
        "cached_sweep_s": round(sweep_seconds, 1),
        "naive_s": round(naive_seconds, 1),
        "ratio_total": round(naive_seconds / ours, 2),
        "ratio_sweep_only": round(naive_seconds / sweep_seconds, 2),
        "max_score_difference": float(max(differences)),
    }
    print(f"layers {args.layers}, {args.examples} examples per task, {report['threads']} torch threads")
    print(f"cached: setup {setup_seconds:.1f} s (task vectors, merge) + sweep {sweep_seconds:.1f} s")
    print(f"naive:  {naive_seconds:.1f} s ({n_merges} mergekit runs, each loaded and scored)")
    print(f"ratio naive / cached: {report['ratio_total']:.2f}x (sweep only: {report['ratio_sweep_only']:.2f}x)")
    print(f"largest score difference between the two: {report['max_score_difference']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_name(f".{args.json.name}.tmp")
        temporary.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, args.json)


if __name__ == "__main__":
    main()

"""Batch runner: execute the numbered notebooks in order with papermill.

A run is one folder under ``papermill_runs/`` holding the executed notebooks
(``executed/NN_name.ipynb``), each stage's outputs (``NN_name/``), ``manifest.json`` and
``run.log``. Parameters come from one YAML file of profiles (``configs/profiles.yaml``):

* ``common`` parameters go to every notebook that declares them in its ``parameters`` cell;
* ``notebooks.<name>`` parameters go to that notebook, and each must be declared there;
* ``run_dir`` and ``seed`` are always injected.

Each notebook gets a fingerprint: the sha256 of its source, its parameters and the
fingerprint of the notebook before it. ``--resume`` skips a notebook whose manifest entry is
``done`` with the same fingerprint, so a change upstream reruns everything after it and
stale outputs are never reused. Every input is checked before the first notebook starts.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hm_utils import files

# Named explicitly so that `python -m hm_utils.runs` logs into run.log as well.
logger = logging.getLogger("hm_utils.runs")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILES = REPO_ROOT / "configs" / "profiles.yaml"
DEFAULT_NOTEBOOKS = REPO_ROOT / "notebooks"
DEFAULT_RUNS = REPO_ROOT / "papermill_runs"
ALWAYS_INJECTED = ("run_dir", "seed")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
REQUIRED_MODULES = ("papermill", "ipykernel", "torch", "transformers", "peft", "mergekit", "jieba", "rouge_chinese", "nltk")
RECORDED_PACKAGES = (
    "torch", "transformers", "peft", "accelerate", "mergekit", "papermill", "numpy",
    "pandas", "datasets", "safetensors", "tokenizers", "jieba", "rouge-chinese", "nltk",
    "matplotlib", "seaborn",
)


class RunConfigError(ValueError):
    """Invalid profile, notebook name or parameter, found before any notebook runs."""


class NotebookFailedError(RuntimeError):
    """A notebook raised; the message names the notebook and the cell."""


@dataclass(frozen=True)
class Profile:
    name: str
    offline: bool
    seed: int
    common: dict[str, Any]
    notebooks: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class PlannedNotebook:
    name: str
    path: Path
    parameters: dict[str, Any]
    fingerprint: str


def check_required_modules(modules: tuple[str, ...] = REQUIRED_MODULES) -> None:
    """Raise ``RunConfigError`` naming the first module the notebooks need that cannot be imported."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise RunConfigError(f"package {module!r} is not installed in {sys.prefix}; run `make setup` and use .venv/bin/python")


def load_profiles(path: str | Path = DEFAULT_PROFILES) -> tuple[list[str], dict[str, Profile]]:
    """Read the notebook order and every profile from the YAML file at ``path``."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    order = list(raw["notebooks"])
    profiles = {}
    for name, body in raw["profiles"].items():
        unknown = sorted(set(body.get("notebooks", {})) - set(order))
        if unknown:
            raise RunConfigError(
                f"profile {name!r} in {path} sets parameters for unknown notebooks {unknown}; "
                f"known notebooks: {order}"
            )
        profiles[name] = Profile(
            name=name,
            offline=bool(body.get("offline", True)),
            seed=int(body.get("seed", 0)),
            common=dict(body.get("common", {})),
            notebooks={key: dict(value or {}) for key, value in body.get("notebooks", {}).items()},
        )
    return order, profiles


def declared_parameters(notebook_path: str | Path) -> dict[str, Any]:
    """Return the names and default values assigned in the cell tagged ``parameters``.

    The cell is parsed, not executed, so no kernel starts. A default that is not a literal
    is returned as its source text.
    """
    notebook = json.loads(Path(notebook_path).read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            declared = {}
            for node in ast.parse(source).body:
                targets = []
                if isinstance(node, ast.Assign):
                    targets, value = node.targets, node.value
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    targets, value = [node.target], node.value
                for target in targets:
                    if isinstance(target, ast.Name):
                        try:
                            declared[target.id] = ast.literal_eval(value)
                        except ValueError:
                            declared[target.id] = ast.get_source_segment(source, value)
            return declared
    raise RunConfigError(
        f"notebook {notebook_path} has no code cell tagged 'parameters'; "
        "tag its first code cell 'parameters' in JupyterLab (Property Inspector)"
    )


def fingerprint(source: bytes, parameters: dict[str, Any], upstream: str) -> str:
    """Return the sha256 that identifies one notebook execution and everything before it."""
    digest = hashlib.sha256()
    digest.update(source)
    digest.update(json.dumps(parameters, sort_keys=True, ensure_ascii=False, default=str).encode())
    digest.update(upstream.encode())
    return digest.hexdigest()


def select_notebooks(order: list[str], existing: list[str], only: list[str] | None, start: str | None) -> list[str]:
    """Return the notebooks to execute, in chain order, after checking every name given."""
    for name in [*(only or []), *([start] if start else [])]:
        if name not in order:
            raise RunConfigError(f"unknown notebook {name!r}; choose from {order}")
        if name not in existing:
            raise RunConfigError(f"notebook {name!r} is in the chain but notebooks/{name}.ipynb does not exist yet")
    selected = [name for name in order if name in existing]
    if start:
        selected = selected[selected.index(start):]
    if only:
        selected = [name for name in selected if name in only]
    return selected


def plan_run(
    profile: Profile,
    order: list[str],
    notebooks_dir: Path,
    run_dir: Path,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[PlannedNotebook]:
    """Resolve parameters and fingerprints for every existing notebook in the chain.

    Raises ``RunConfigError`` for a parameter that a notebook does not declare.
    """
    overrides = overrides or {}
    planned = []
    upstream = ""
    for name in order:
        path = notebooks_dir / f"{name}.ipynb"
        if not path.is_file():
            continue
        declared = declared_parameters(path)
        specific = {**profile.notebooks.get(name, {}), **overrides.get(name, {})}
        undeclared = sorted(set(specific) - set(declared))
        if undeclared:
            raise RunConfigError(
                f"notebook {name} does not declare parameter(s) {undeclared}; "
                f"it declares {sorted(declared)}. Fix the profile or the --set option, or add them to its parameters cell"
            )
        missing = [key for key in ALWAYS_INJECTED if key not in declared]
        if missing:
            raise RunConfigError(f"notebook {name} must declare {missing} in its parameters cell")

        # A notebook-specific seed (from the profile or --set) overrides the profile's seed.
        parameters = {key: value for key, value in profile.common.items() if key in declared}
        parameters["seed"] = profile.seed
        parameters.update(specific)
        parameters["run_dir"] = str(run_dir)
        upstream = fingerprint(path.read_bytes(), parameters, upstream)
        planned.append(PlannedNotebook(name, path, parameters, upstream))
    return planned


def parse_overrides(assignments: list[str], order: list[str]) -> dict[str, dict[str, Any]]:
    """Parse ``NOTEBOOK.PARAM=VALUE`` strings; VALUE is read as YAML (numbers, lists, ...)."""
    overrides: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        notebook, dot, parameter = key.partition(".")
        if not sep or not dot or not parameter:
            raise RunConfigError(f"invalid --set {assignment!r}; expected NOTEBOOK.PARAM=VALUE, e.g. 01_data.seed=1")
        if notebook not in order:
            raise RunConfigError(f"unknown notebook {notebook!r} in --set {assignment!r}; choose from {order}")
        try:
            overrides.setdefault(notebook, {})[parameter] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise RunConfigError(f"invalid value in --set {assignment!r}: not YAML ({error.problem}); quote strings, close brackets") from None
    return overrides


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write the manifest JSON atomically; values JSON cannot encode are written as strings."""
    files.write_json_atomic(path, payload, default=str)


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """Return the commit and whether tracked files differ from it, or ``None`` values outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    """Return the installed version of each package that affects results."""
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def configure_environment(offline: bool) -> None:
    """Set or clear the hub's offline variables; kernels started afterwards inherit them."""
    for variable in OFFLINE_VARIABLES:
        if offline:
            os.environ[variable] = "1"
        else:
            os.environ.pop(variable, None)


def latest_run_dir(runs_root: Path, profile: str) -> Path | None:
    """Return the newest run folder of ``profile`` under ``runs_root``, if any."""
    candidates = sorted(runs_root.glob(f"{profile}-*/manifest.json"))
    return candidates[-1].parent if candidates else None


def execute_notebook(planned: PlannedNotebook, output_path: Path, kernel_name: str) -> None:
    """Execute one notebook with papermill, raising ``NotebookFailedError`` that names the failing cell."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(planned.path),
            str(output_path),
            parameters=planned.parameters,
            kernel_name=kernel_name,
            cwd=str(planned.path.parent),
            progress_bar=False,
            log_output=False,
        )
    except PapermillExecutionError as error:
        raise NotebookFailedError(
            f"notebook {planned.name} failed in cell {error.cell_index} of the executed notebook "
            f"(execution count {error.exec_count}): "
            f"{error.ename}: {error.evalue}; the executed notebook is kept at {output_path}"
        ) from error


def run(
    profile_name: str,
    *,
    profiles_path: str | Path = DEFAULT_PROFILES,
    notebooks_dir: str | Path = DEFAULT_NOTEBOOKS,
    runs_root: str | Path = DEFAULT_RUNS,
    run_dir: str | Path | None = None,
    resume: bool = False,
    only: list[str] | None = None,
    start: str | None = None,
    overrides: list[str] | None = None,
    kernel_name: str = "python3",
) -> Path:
    """Execute the profile's notebooks and return the run folder.

    Stops at the first failing notebook with ``NotebookFailedError``; its executed copy
    stays in the run folder.
    """
    check_required_modules()
    order, profiles = load_profiles(profiles_path)
    if profile_name not in profiles:
        raise RunConfigError(f"unknown profile {profile_name!r}; choose one of {sorted(profiles)} (defined in {profiles_path})")
    profile = profiles[profile_name]
    notebooks_dir, runs_root = Path(notebooks_dir).resolve(), Path(runs_root).resolve()
    existing = [name for name in order if (notebooks_dir / f"{name}.ipynb").is_file()]
    selected = select_notebooks(order, existing, only, start)

    if run_dir is None and resume:
        run_dir = latest_run_dir(runs_root, profile_name)
    if run_dir is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = runs_root / f"{profile_name}-{stamp}"
    run_dir = Path(run_dir).resolve()

    plan = plan_run(profile, order, notebooks_dir, run_dir, parse_overrides(overrides or [], order))
    plan = [planned for planned in plan if planned.name in selected]

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "executed").mkdir(exist_ok=True)
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("hm_utils")
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    try:
        with files.explain_disk_full(run_dir):
            return _run_plan(profile, plan, run_dir, resume, kernel_name)
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
        handler.close()


def _run_plan(profile: Profile, plan: list[PlannedNotebook], run_dir: Path, resume: bool, kernel_name: str) -> Path:
    from tqdm.auto import tqdm

    manifest_path = run_dir / "manifest.json"
    previous = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    entries = previous.get("notebooks", {}) if resume else {}
    manifest = {
        "profile": profile.name,
        "offline": profile.offline,
        "seed": profile.seed,
        "run_dir": str(run_dir),
        "started": previous.get("started") if resume and previous else dt.datetime.now().isoformat(timespec="seconds"),
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "notebooks": entries,
    }
    configure_environment(profile.offline)
    logger.info("run %s: profile %s, %d notebook(s), resume=%s", run_dir, profile.name, len(plan), resume)

    for planned in tqdm(plan, desc=f"notebooks ({profile.name})", unit="notebook"):
        output_path = run_dir / "executed" / planned.path.name
        entry = entries.get(planned.name, {})
        if resume and entry.get("status") == "done" and entry.get("fingerprint") == planned.fingerprint and output_path.is_file():
            logger.info("skip %s: done with identical source, parameters and upstream notebooks", planned.name)
            continue

        entries[planned.name] = {
            "status": "running",
            "fingerprint": planned.fingerprint,
            "parameters": planned.parameters,
            "started": dt.datetime.now().isoformat(timespec="seconds"),
        }
        write_json_atomic(manifest_path, manifest)
        logger.info("start %s", planned.name)
        start = time.perf_counter()
        try:
            execute_notebook(planned, output_path, kernel_name)
        except NotebookFailedError as error:
            entries[planned.name].update(status="failed", seconds=round(time.perf_counter() - start, 1), error=str(error))
            write_json_atomic(manifest_path, manifest)
            logger.error("%s", error)
            raise
        entries[planned.name].update(status="done", seconds=round(time.perf_counter() - start, 1))
        write_json_atomic(manifest_path, manifest)
        logger.info("done %s in %.1f s", planned.name, entries[planned.name]["seconds"])

    manifest["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    write_json_atomic(manifest_path, manifest)
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hm", description="Run the Hi-Merging notebooks in order with papermill.")
    parser.add_argument("--profile", default="default", help="parameter profile from the profiles file (smoke, default, paper)")
    parser.add_argument("--profiles-file", default=str(DEFAULT_PROFILES), help="YAML file of profiles")
    parser.add_argument("--run-dir", help="run folder to create or resume (default: papermill_runs/PROFILE-TIMESTAMP)")
    parser.add_argument("--resume", action="store_true", help="skip notebooks already done with identical source, "
                        "parameters and upstream notebooks; "
                        "without --run-dir, resumes the newest run of the profile")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks, e.g. 01_data")
    parser.add_argument("--from", dest="start", metavar="NOTEBOOK", help="run this notebook and every one after it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NOTEBOOK.PARAM=VALUE",
                        help="override one notebook parameter (VALUE read as YAML); may repeat")
    parser.add_argument("--list", action="store_true", help="print the profiles and notebooks, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.list:
            order, profiles = load_profiles(args.profiles_file)
            present = [name if (DEFAULT_NOTEBOOKS / f"{name}.ipynb").is_file() else f"{name} (not written yet)" for name in order]
            print("notebooks:", ", ".join(present))
            for name, profile in profiles.items():
                print(f"profile {name}: offline={profile.offline} seed={profile.seed}")
            return 0
        run_dir = run(
            args.profile,
            profiles_path=args.profiles_file,
            run_dir=args.run_dir,
            resume=args.resume,
            only=args.only,
            start=args.start,
            overrides=args.overrides,
        )
    except (RunConfigError, NotebookFailedError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, RunConfigError) else 1
    except OSError as error:
        if error.errno not in files.DISK_FULL_ERRNOS:
            raise
        # explain_disk_full already named the run folder and the fix.
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

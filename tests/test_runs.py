import json
import os
import stat
from pathlib import Path

import nbformat
import pytest
import yaml

from hm_utils import runs


def write_notebook(path: Path, parameters: str, body: str) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    parameters_cell = nbformat.v4.new_code_cell(parameters)
    parameters_cell.metadata["tags"] = ["parameters"]
    notebook.cells = [nbformat.v4.new_markdown_cell("# test"), parameters_cell, nbformat.v4.new_code_cell(body)]
    nbformat.write(notebook, path)


# Each notebook appends one line to a log in the run folder, so the tests can see which
# notebooks really executed and with which parameters.
FIRST_BODY = """
import json, os
from pathlib import Path
out = Path(run_dir) / "01_first"
out.mkdir(parents=True, exist_ok=True)
(out / "value.json").write_text(json.dumps({"value": value * 2, "offline": os.environ.get("HF_HUB_OFFLINE")}))
with open(Path(run_dir) / "executions.log", "a") as log:
    log.write(f"01_first {value} {label}\\n")
"""

SECOND_BODY = """
import json
from pathlib import Path
value = json.loads((Path(run_dir) / "01_first" / "value.json").read_text())["value"]
if fail:
    raise ValueError(f"deliberate failure at {value}")
with open(Path(run_dir) / "executions.log", "a") as log:
    log.write(f"02_second {value}\\n")
"""


@pytest.fixture()
def project(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "01_first.ipynb", 'run_dir = "x"\nseed = 0\nvalue = 1\nlabel = "a"\nmodel = "m"', FIRST_BODY)
    write_notebook(notebooks / "02_second.ipynb", 'run_dir = "x"\nseed = 0\nfail = False', SECOND_BODY)
    profiles = {
        "notebooks": ["01_first", "02_second", "03_absent"],
        "profiles": {
            "smoke": {"offline": True, "seed": 3, "common": {"label": "common", "model": "tiny"},
                      "notebooks": {"01_first": {"value": 5}}},
            "online": {"offline": False, "notebooks": {}},
        },
    }
    profiles_path = tmp_path / "profiles.yaml"
    profiles_path.write_text(yaml.safe_dump(profiles))
    return {"notebooks": notebooks, "profiles": profiles_path, "runs": tmp_path / "runs"}


def run_project(project, profile="smoke", **kwargs):
    return runs.run(profile, profiles_path=project["profiles"], notebooks_dir=project["notebooks"],
                    runs_root=project["runs"], **kwargs)


def executions(run_dir: Path) -> list[str]:
    return (run_dir / "executions.log").read_text().splitlines()


def test_declared_parameters_parsed(project):
    declared = runs.declared_parameters(project["notebooks"] / "01_first.ipynb")
    assert declared == {"run_dir": "x", "seed": 0, "value": 1, "label": "a", "model": "m"}


def test_plan_injects_common_and_specific(project):
    order, profiles = runs.load_profiles(project["profiles"])
    plan = runs.plan_run(profiles["smoke"], order, project["notebooks"], Path("/tmp/run"))
    first, second = plan
    assert first.parameters == {"label": "common", "model": "tiny", "value": 5, "run_dir": "/tmp/run", "seed": 3}
    # The second notebook declares neither label nor model, so it does not receive them.
    assert second.parameters == {"run_dir": "/tmp/run", "seed": 3}


def test_run_writes_outputs_and_manifest(project):
    run_dir = run_project(project)
    assert executions(run_dir) == ["01_first 5 common", "02_second 10"]
    assert (run_dir / "executed" / "01_first.ipynb").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["profile"] == "smoke"
    assert manifest["seed"] == 3
    assert manifest["packages"]["papermill"] is not None
    assert manifest["notebooks"]["01_first"]["status"] == "done"
    assert manifest["notebooks"]["01_first"]["parameters"]["value"] == 5
    assert manifest["notebooks"]["02_second"]["seconds"] > 0
    assert "finished" in manifest
    assert (run_dir / "run.log").read_text().count("done 0") == 2


def test_offline_profile_sets_variables(project, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run_dir = run_project(project, only=["01_first"])
    assert json.loads((run_dir / "01_first" / "value.json").read_text())["offline"] == "1"


def test_online_profile_clears_variables(project, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = run_project(project, profile="online", only=["01_first"])
    assert json.loads((run_dir / "01_first" / "value.json").read_text())["offline"] is None
    assert "HF_HUB_OFFLINE" not in os.environ


def test_resume_skips_done_notebooks(project):
    run_dir = run_project(project)
    run_project(project, run_dir=run_dir, resume=True)
    assert executions(run_dir) == ["01_first 5 common", "02_second 10"]


def test_resume_without_run_dir_uses_latest(project):
    run_dir = run_project(project)
    assert run_project(project, resume=True) == run_dir
    assert len(executions(run_dir)) == 2


def test_changed_parameter_reruns_downstream(project):
    run_dir = run_project(project)
    run_project(project, run_dir=run_dir, resume=True, overrides=["01_first.value=7"])
    assert executions(run_dir)[2:] == ["01_first 7 common", "02_second 14"]


def test_failure_names_notebook_and_cell(project):
    with pytest.raises(runs.NotebookFailedError) as raised:
        run_project(project, overrides=["02_second.fail=true"])
    message = str(raised.value)
    assert "02_second" in message
    # papermill inserts the injected-parameters cell, so the body is cell 3 of the executed copy.
    assert "cell 3 of the executed notebook" in message
    assert "deliberate failure at 10" in message
    run_dir = next(project["runs"].glob("smoke-*"))
    assert (run_dir / "executed" / "02_second.ipynb").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["notebooks"]["02_second"]["status"] == "failed"
    assert manifest["notebooks"]["01_first"]["status"] == "done"


def test_resume_after_failure_reruns_failed_only(project):
    with pytest.raises(runs.NotebookFailedError):
        run_project(project, overrides=["02_second.fail=true"])
    run_dir = next(project["runs"].glob("smoke-*"))
    run_project(project, run_dir=run_dir, resume=True)
    assert executions(run_dir) == ["01_first 5 common", "02_second 10"]


def test_from_and_only_select_notebooks():
    order = ["01_a", "02_b", "03_c", "04_d"]
    existing = ["01_a", "02_b", "03_c"]
    assert runs.select_notebooks(order, existing, None, "02_b") == ["02_b", "03_c"]
    assert runs.select_notebooks(order, existing, ["01_a", "03_c"], None) == ["01_a", "03_c"]
    assert runs.select_notebooks(order, existing, None, None) == existing


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"profile": "nope"}, "unknown profile 'nope'"),
        ({"only": ["09_x"]}, "unknown notebook '09_x'"),
        ({"only": ["03_absent"]}, "does not exist yet"),
        ({"overrides": ["01_first.colour=red"]}, "does not declare parameter(s) ['colour']"),
        ({"overrides": ["01_first"]}, "expected NOTEBOOK.PARAM=VALUE"),
        ({"overrides": ["01_first.value=[1"]}, "not YAML"),
    ],
)
def test_bad_input_rejected_before_running(project, kwargs, expected):
    with pytest.raises(runs.RunConfigError) as raised:
        run_project(project, **kwargs)
    assert expected in str(raised.value)
    assert not project["runs"].exists()


def test_undeclared_profile_parameter_rejected(project):
    profiles = yaml.safe_load(project["profiles"].read_text())
    profiles["profiles"]["smoke"]["notebooks"]["02_second"] = {"value": 1}
    project["profiles"].write_text(yaml.safe_dump(profiles))
    with pytest.raises(runs.RunConfigError, match="notebook 02_second does not declare"):
        run_project(project)


def test_cli_reports_one_line_error(project, capsys):
    code = runs.main(["--profile", "nope", "--profiles-file", str(project["profiles"])])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown profile 'nope'")


def test_repository_profiles_match_notebooks():
    order, profiles = runs.load_profiles()
    assert set(profiles) == {"smoke", "default", "paper"}
    assert profiles["paper"].offline is False
    assert profiles["default"].offline is True
    for profile in profiles.values():
        # Planning validates every parameter against the notebooks that exist.
        runs.plan_run(profile, order, runs.DEFAULT_NOTEBOOKS, Path("/tmp/run"))


def test_missing_package_rejected(project):
    with pytest.raises(runs.RunConfigError, match="package 'no_such_package_xyz' is not installed"):
        runs.check_required_modules(("json", "no_such_package_xyz"))


def test_profiles_share_evaluation_settings():
    # Every row of the results table must be scored with the same test settings.
    shared = ("eval_max_examples", "eval_methods", "max_new_tokens", "n_resamples", "batch_size")
    stages = ("03_finetune", "04_baselines", "05_model_wise", "07_hi_merging")
    order, profiles = runs.load_profiles()
    for name, profile in profiles.items():
        plan = {planned.name: planned for planned in runs.plan_run(profile, order, runs.DEFAULT_NOTEBOOKS, Path("/tmp/run"))}
        settings = []
        for stage in stages:
            if stage in plan:
                declared = runs.declared_parameters(plan[stage].path)
                settings.append({key: plan[stage].parameters.get(key, declared.get(key)) for key in shared})
        assert all(entry == settings[0] for entry in settings), name


def test_set_seed_overrides_profile(project):
    order, profiles = runs.load_profiles(project["profiles"])
    overrides = runs.parse_overrides(["01_first.seed=7"], order)
    first, second = runs.plan_run(profiles["smoke"], order, project["notebooks"], Path("/tmp/run"), overrides)
    assert first.parameters["seed"] == 7
    assert second.parameters["seed"] == 3


def test_atomic_text_mode_follows_umask(tmp_path):
    from hm_utils.files import write_text_atomic

    previous = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "table.csv", "a,b\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

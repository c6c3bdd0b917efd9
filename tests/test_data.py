"""Loaders on their fixtures, the Alpaca round trip, splits and bad input."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from hm_utils.data import (
    DataFormatError,
    EmptySplitError,
    Example,
    HubOfflineError,
    LoadReport,
    load_source,
    load_task,
    prepare_task,
    question_key,
    read_split,
    register_public_task,
    write_split,
)
from hm_utils.data.formats import parse_lettered_options, split_of_filename
from hm_utils.data.schema import InvalidRecord, validate_example
from hm_utils.data.splits import check_splits, split_official, split_pooled
from hm_utils.data.tasks import TASKS

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def load_all(fmt, name, **kwargs):
    report = LoadReport()
    splits = load_source(fmt, FIXTURES / name, dataset="fixture", report=report, **kwargs)
    return splits, report


def mcq(i, question=None, options=("alpha", "beta", "gamma", "delta"), answer=1):
    return Example(
        id=f"q{i}",
        dataset="toy",
        language="en",
        task_type="mcq",
        instruction="Choose.",
        input=question or f"Question number {i}?",
        output=options[answer],
        options=tuple(options),
        answer_index=answer,
    )


def qa(i, question=None, language="en"):
    return Example(
        id=f"a{i}",
        dataset="toy",
        language=language,
        task_type="qa",
        instruction="Answer.",
        input=question or f"What is item {i}?",
        output=f"Item {i} is a thing.",
    )


# --- loaders ----------------------------------------------------------------------------


def test_cmedqa2_official_splits():
    splits, report = load_all("cmedqa2", "cmedqa2")
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "validation": 1, "test": 1}
    first = splits["train"][0]
    assert first.id == "fixture-101"
    assert first.input == "头痛三天了，伴有低热，应该吃什么药？"
    assert first.output.startswith("可能是感冒引起的")
    assert splits["validation"][0].output.startswith("多见于髌骨软化")
    # test_candidates lists 9003 with label 0 first; the first positive is 9008.
    assert splits["test"][0].output == "长期失眠建议到睡眠门诊就诊。"
    assert report.records == 6


def test_cmedqa2_without_candidates(tmp_path):
    for name in ("question.csv", "answer.csv"):
        shutil.copy(FIXTURES / "cmedqa2" / name, tmp_path / name)
    splits = load_source("cmedqa2", tmp_path, dataset="fixture")
    assert list(splits) == ["all"]
    assert len(splits["all"]) == 6
    assert splits["all"][0].output.startswith("可能是感冒引起的")


def test_cmexam_skips_multi_answer():
    splits, report = load_all("cmexam", "cmexam.csv")
    examples = splits["all"]
    assert len(examples) == 5
    assert report.skipped["multi_answer"] == 1
    assert examples[1].options == ("维生素B12", "叶酸", "硫酸亚铁", "促红细胞生成素", "糖皮质激素")
    assert examples[1].answer_index == 2
    assert examples[1].output == "硫酸亚铁"
    assert examples[1].language == "zh"
    assert all(e.task_type == "mcq" for e in examples)


def test_cmb_exam_drops_empty_option():
    splits, report = load_all("cmb_exam", "cmb_exam.json")
    examples = splits["all"]
    assert len(examples) == 3
    assert report.skipped["multi_answer"] == 1
    caries = examples[1]
    assert caries.options == ("乳酸杆菌", "变形链球菌", "放线菌", "白色念珠菌")
    assert caries.output == "变形链球菌"
    assert "口腔" not in caries.instruction
    assert caries.instruction.startswith("以下是中国医师考试中执业医师考试")


def test_chatmed_query_response():
    splits, _ = load_all("chinese_dialogue", "chatmed_consult.jsonl")
    examples = splits["all"]
    assert len(examples) == 3
    assert examples[1].input == "宝宝一岁半，发烧38度，需要去医院吗？"
    assert examples[1].output.startswith("38度属于低热")
    assert examples[1].id == "fixture-chatmed_consult-line-2"


def test_medchatzh_instruction_output():
    splits, _ = load_all("chinese_dialogue", "medchatzh.json")
    examples = splits["all"]
    assert examples[0].input == "中医认为脾虚有哪些表现？"
    assert examples[0].instruction == "请回答以下医疗咨询问题。"
    assert examples[2].instruction == "请根据症状给出建议。"
    assert examples[2].input == "手脚冰凉，冬天尤其明显。"


def test_healthcaremagic_keeps_instruction():
    splits, _ = load_all("healthcaremagic", "healthcaremagic.json")
    examples = splits["all"]
    assert len(examples) == 3
    assert examples[0].instruction.startswith("If you are a doctor")
    assert examples[0].input.startswith("Hi doctor, I have had a dry cough")
    assert examples[0].language == "en"


def test_medqa_folder_gives_official_splits():
    splits, _ = load_all("medqa", "medqa")
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "validation": 2, "test": 2}
    anaphylaxis = splits["train"][2]
    assert anaphylaxis.output == "Epinephrine"
    assert anaphylaxis.answer_index == 2
    assert anaphylaxis.id == "fixture-train-line-3"


def test_medqa_single_file_is_pooled():
    splits, _ = load_all("medqa", "medqa/train.jsonl")
    assert list(splits) == ["all"]
    assert len(splits["all"]) == 4


def test_golden_touchstone_language_from_folder():
    zh, _ = load_all("golden_touchstone", "golden_touchstone/CN-benchmark/finese/finese_test.json")
    en, _ = load_all("golden_touchstone", "golden_touchstone/EN-benchmark/fpb/fpb_test.json")
    assert zh["all"][0].language == "zh"
    assert zh["all"][0].output == "积极"
    assert en["all"][0].language == "en"
    assert en["all"][1].output == "neutral"


def test_golden_touchstone_needs_language(tmp_path):
    path = tmp_path / "task_test.json"
    shutil.copy(FIXTURES / "golden_touchstone/EN-benchmark/fpb/fpb_test.json", path)
    with pytest.raises(ValueError, match="language='zh' or language='en'"):
        load_source("golden_touchstone", path, dataset="fixture")
    loaded = load_source("golden_touchstone", path, dataset="fixture", language="en")
    assert len(loaded["all"]) == 2


def test_medical_meadow_instruction_as_question():
    splits, _ = load_all("medical_meadow", "medical_meadow.json")
    examples = splits["all"]
    assert examples[0].input == "What are the symptoms of hypothyroidism?"
    assert examples[1].input == "What is the mechanism of action of metformin?"
    assert examples[1].instruction == "Answer the following medical question."


def test_lettered_options_variants():
    letters, options = parse_lettered_options("A. 心脏\nB、肝脏\nC：肺\nD 肾")
    assert letters == ["A", "B", "C", "D"]
    assert options == ["心脏", "肝脏", "肺", "肾"]


def test_split_names_from_filenames():
    assert split_of_filename(Path("phrases_no_exclude_train.jsonl")) == "train"
    assert split_of_filename(Path("dev.jsonl")) == "validation"
    assert split_of_filename(Path("test_with_annotation.csv")) == "test"
    assert split_of_filename(Path("notes.json")) is None


# --- hub --------------------------------------------------------------------------------


def test_hub_id_offline_raises(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE=1"):
        load_source("medqa", "GBaker/MedQA-USMLE-4-options", dataset="medqa_en")


def test_registered_hub_task_offline_raises(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubOfflineError, match="pass a local file or folder"):
        load_task("medqa_en")


def test_missing_local_path_is_not_hub():
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a hub id"):
        load_source("medqa", "./no/such/medqa.jsonl", dataset="fixture")


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name", "line", "field"),
    [
        ("medqa", "bad/medqa_missing_answer.jsonl", "line 2", "answer_idx"),
        ("cmexam", "bad/cmexam_answer_not_in_options.csv", "line 6", "Answer"),
        ("medical_meadow", "bad/meadow_empty_question.json", "line 7", "input"),
        ("chinese_dialogue", "bad/chatmed_undecodable.jsonl", "line 2", "response"),
    ],
)
def test_bad_record_names_file_line_field(fmt, name, line, field):
    with pytest.raises(DataFormatError) as raised:
        load_source(fmt, FIXTURES / name, dataset="fixture")
    error = raised.value
    assert error.path == str(FIXTURES / name)
    assert error.location == line
    assert error.field == field
    assert "skip_invalid=True" in str(error)


@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        ("medqa", "bad/medqa_missing_answer.jsonl"),
        ("cmexam", "bad/cmexam_answer_not_in_options.csv"),
        ("medical_meadow", "bad/meadow_empty_question.json"),
        ("chinese_dialogue", "bad/chatmed_undecodable.jsonl"),
    ],
)
def test_skip_invalid_counts(fmt, name, caplog):
    report = LoadReport()
    with caplog.at_level("WARNING"):
        splits = load_source(fmt, FIXTURES / name, dataset="fixture", skip_invalid=True, report=report)
    assert len(splits["all"]) == 2
    assert report.skipped["invalid"] == 1
    assert "skipped 1 invalid records" in caplog.text


def test_malformed_json_array(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "q", "input": "", "output": "a"},\n {"instruction": \n', encoding="utf-8")
    with pytest.raises(DataFormatError, match="line 4"):
        load_source("medical_meadow", path, dataset="fixture")


def test_mcq_output_must_match_option():
    example = dataclasses.replace(mcq(1), output="gamma")
    with pytest.raises(InvalidRecord) as raised:
        validate_example(example)
    assert raised.value.field == "output"


def test_mcq_answer_index_in_range():
    with pytest.raises(InvalidRecord) as raised:
        validate_example(dataclasses.replace(mcq(1), answer_index=4, output="alpha"))
    assert raised.value.field == "answer_index"


# --- Alpaca round trip ------------------------------------------------------------------


def test_alpaca_round_trip(tmp_path):
    examples = [
        mcq(1, question="以下哪项是糖尿病的常见症状？", options=("多饮", "脱发", "耳鸣", "咳嗽"), answer=0),
        qa(2, question="头痛怎么办？\n已经三天了。", language="zh"),
        qa(3, question='He said "fine" — ok?'),
    ]
    path = write_split(examples, tmp_path / "split.json")
    assert read_split(path) == examples


def test_alpaca_file_layout(tmp_path):
    path = write_split([mcq(1, question="心脏位于哪里？")], tmp_path / "split.json")
    text = path.read_text(encoding="utf-8")
    record = json.loads(text)[0]
    assert "心脏位于哪里？" in text
    assert list(record)[:3] == ["instruction", "input", "output"]
    assert record["options"] == ["alpha", "beta", "gamma", "delta"]
    assert record["answer_index"] == 1


def test_read_split_names_bad_record(tmp_path):
    path = write_split([qa(1), qa(2)], tmp_path / "split.json")
    records = json.loads(path.read_text(encoding="utf-8"))
    records[1]["output"] = ""
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataFormatError) as raised:
        read_split(path)
    assert raised.value.location == "record 1"
    assert raised.value.field == "output"


def test_write_split_rejects_invalid(tmp_path):
    with pytest.raises(ValueError, match="cannot write example"):
        write_split([dataclasses.replace(qa(1), input=" ")], tmp_path / "split.json")
    assert not (tmp_path / "split.json").exists()


# --- splits -----------------------------------------------------------------------------


def test_question_key_normalises():
    assert question_key(qa(1, "What  is  Item 1?")) == question_key(qa(2, "what is item 1"))
    assert question_key(qa(1, "（头痛）怎么办？")) == question_key(qa(2, "(头痛)怎么办"))


def test_question_key_includes_options():
    first = mcq(1, question="Which is true?", options=("a", "b", "c", "d"))
    shuffled = mcq(2, question="Which is true?", options=("d", "c", "b", "a"), answer=2)
    other = mcq(3, question="Which is true?", options=("e", "f", "g", "h"))
    assert question_key(first) == question_key(shuffled)
    assert question_key(first) != question_key(other)


def test_pooled_splits_disjoint():
    examples = [qa(i) for i in range(200)] + [qa(1000 + i, f"What is item {i}?") for i in range(20)]
    report = LoadReport()
    splits = split_pooled(examples, seed=3, caps={"train": None, "validation": None, "test": None}, report=report)
    check_splits(splits, "toy")
    assert report.skipped["duplicate"] == 20
    assert len(splits["test"]) == 20
    assert len(splits["validation"]) == 20
    assert len(splits["train"]) == 160
    assert splits["validation"] != splits["test"]


def test_pooled_splits_deterministic():
    examples = [qa(i) for i in range(100)]
    first = split_pooled(examples, seed=7)
    second = split_pooled(list(examples), seed=7)
    other = split_pooled(examples, seed=8)
    assert first == second
    assert first["test"] != other["test"]


def test_caps_take_prefixes():
    examples = [qa(i) for i in range(100)]
    small = split_pooled(examples, seed=1, caps={"train": 5, "validation": 3, "test": 4})
    large = split_pooled(examples, seed=1, caps={"train": 50, "validation": 10, "test": 10})
    assert [len(small[s]) for s in ("train", "validation", "test")] == [5, 3, 4]
    assert small["test"] == large["test"][:4]
    assert small["train"] == large["train"][:5]


def test_train_cap_leaves_test_unchanged():
    examples = [qa(i) for i in range(100)]
    first = split_pooled(examples, seed=1, caps={"train": 5})
    second = split_pooled(examples, seed=1, caps={"train": 60})
    assert first["test"] == second["test"]
    assert first["validation"] == second["validation"]


def test_official_splits_test_wins():
    shared = qa(1, "Shared question?")
    splits = {
        "train": [dataclasses.replace(shared, id="t1")] + [qa(i) for i in range(10, 30)],
        "validation": [dataclasses.replace(shared, id="v1"), qa(40)],
        "test": [shared, qa(50)],
    }
    report = LoadReport()
    result = split_official(splits, seed=0, report=report)
    check_splits(result, "toy")
    assert shared in result["test"]
    assert report.skipped["duplicate"] == 2
    assert len(result["train"]) == 20
    assert len(result["validation"]) == 1


def test_official_without_validation_carves_train():
    splits = {"train": [qa(i) for i in range(90)], "test": [qa(i) for i in range(100, 110)]}
    result = split_official(splits, seed=0, caps={"train": None, "validation": None, "test": None})
    check_splits(result, "toy")
    assert len(result["validation"]) == 10
    assert len(result["train"]) == 80


def test_empty_split_is_error():
    splits = split_pooled([qa(i) for i in range(3)], seed=0)
    with pytest.raises(EmptySplitError, match="split is empty"):
        check_splits(splits, "toy")


def test_invalid_caps_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        split_pooled([qa(1)], seed=0, caps={"dev": 10})
    with pytest.raises(ValueError, match="positive integer"):
        split_pooled([qa(1)], seed=0, caps={"train": 0})


# --- public tasks through the registry --------------------------------------------------


@pytest.fixture
def fixture_task():
    name = "fixture_medqa_en"
    register_public_task(name, "medqa", source="MedQA fixture", licence="test data", replace=True)
    yield name
    TASKS.pop(name)


def test_public_task_from_folder(fixture_task):
    prepared = prepare_task(fixture_task, seed=0, source=str(FIXTURES / "medqa"))
    assert {k: len(v) for k, v in prepared.splits.items()} == {"train": 3, "validation": 2, "test": 2}
    assert prepared.report.skipped["duplicate"] == 1
    assert all(e.dataset == fixture_task for e in prepared.splits["train"])


def test_public_task_needs_source(fixture_task):
    with pytest.raises(FileNotFoundError, match="pass source="):
        load_task(fixture_task)


def test_public_task_too_small_fails(tmp_path):
    name = "fixture_cmexam_zh"
    register_public_task(name, "cmexam", source="CMExam fixture", licence="test data", replace=True)
    try:
        with pytest.raises(EmptySplitError):
            prepare_task(name, seed=0, source=str(FIXTURES / "cmexam.csv"))
    finally:
        TASKS.pop(name)


def test_data_list_missing_source_one_line(capsys):
    from hm_utils.data.__main__ import main

    assert main(["list", "--source", "cmedqa2_zh=/missing/path"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ")
    assert "/missing/path" in error
    assert error.count("\n") == 1

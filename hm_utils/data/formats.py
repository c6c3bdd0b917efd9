"""Loaders for the public medical data set formats, from local files or the Hugging Face hub.

Each format has a converter that turns one source record (a dict) into an :class:`Example`.
Readers give every record a location such as "line 12". For CSV it is the line where the
record starts, counting the header as line 1. An invalid record raises
:class:`~hm_utils.data.schema.DataFormatError` naming the file, the line and the field.
With ``skip_invalid=True`` invalid records are skipped and their count is logged and kept
in the :class:`LoadReport`. Multiple-choice records with more than one correct answer are
always skipped, counted and logged, never converted.

Files are decoded as UTF-8 with ``surrogateescape``, so bytes that are not UTF-8 reach the
converter as lone surrogates and are reported against the field that contains them.

Alpaca-style records (``instruction``/``input``/``output``) keep ``input`` as the question:
when ``input`` is empty the record's ``instruction`` is the question, and the format's
default instruction takes its place.

Formats (``FORMATS``):

- ``cmedqa2``: cMedQA2 folder with ``question.csv`` (``question_id,content``) and
  ``answer.csv`` (``ans_id,question_id,content``); optional ``{train,dev,test}_candidates.txt``
  give the official split. Each question keeps its first positive answer.
- ``cmexam``: CMExam CSV with ``Question``, ``Options`` (one ``"A text"`` line per option)
  and ``Answer`` (``"A"``; ``"ABD"`` marks a multi-answer question).
- ``cmb_exam``: CMB-Exam JSON list with ``question``, ``option`` (``{"A": text, ...}``),
  ``answer`` and ``question_type`` (``单项选择题`` or ``多项选择题``).
- ``chinese_dialogue``: ChatMed-consult JSONL (``query``/``response``) or MedChatZH JSON
  (``instruction``/``output``).
- ``healthcaremagic``: ChatDoctor HealthCareMagic-100k JSON (``instruction``/``input``/``output``).
- ``medqa``: MedQA USMLE JSONL (``question``, ``options`` ``{"A": ..., "D": ...}``,
  ``answer_idx``, optional ``answer`` text).
- ``golden_touchstone``: Golden Touchstone JSON (``instruction``/``input``/``output``), a
  bilingual financial benchmark; its language comes from the ``CN-benchmark`` or
  ``EN-benchmark`` folder or the ``language`` argument.
- ``medical_meadow``: medAlpaca medical meadow JSON (``instruction``/``input``/``output``).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from hm_utils.data.schema import (
    DataFormatError,
    Example,
    InvalidRecord,
    Language,
    TaskType,
    check_text,
    validate_example,
)

logger = logging.getLogger(__name__)

Row = dict[str, Any]
# A converter takes a record and a key that makes ids unique for records without an id.
Converter = Callable[[Row, str], Example]

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
POOLED = "all"


class MultiAnswer(Exception):
    """A multiple-choice record with more than one correct answer (skipped, never converted)."""


class HubOfflineError(RuntimeError):
    """A hub id was given while ``HF_HUB_OFFLINE=1``."""


@dataclasses.dataclass
class LoadReport:
    """Counts of what a load read, kept and skipped (by reason), and how many answers it truncated."""

    sources: list[str] = dataclasses.field(default_factory=list)
    records: int = 0
    loaded: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "sources": list(self.sources),
            "records": self.records,
            "loaded": self.loaded,
            "skipped": {reason: count for reason, count in sorted(self.skipped.items()) if count},
            "truncated": self.truncated,
        }


# --- readers ----------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    return text.removeprefix("\ufeff")


def iter_jsonl(path: Path) -> Iterator[tuple[str, Row | InvalidRecord]]:
    """Yield ``("line N", record)`` per non-blank line; a line that is not a JSON object yields an :class:`InvalidRecord`."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        location = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            yield location, InvalidRecord("<json>", f"invalid JSON: {error.msg}")
            continue
        if not isinstance(record, dict):
            yield location, InvalidRecord("<json>", f"expected a JSON object, got {type(record).__name__}")
            continue
        yield location, record


def iter_json_array(path: Path) -> Iterator[tuple[str, Row | InvalidRecord]]:
    """Yield ``("line N", record)`` for each element of a JSON array, N being the line where it starts.

    A malformed array raises :class:`DataFormatError`, because no later record can be located.
    """
    text = _read_text(path)
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    position = whitespace.match(text, 0).end()
    if text[position : position + 1] != "[":
        raise DataFormatError(path, "line 1", "<json>", "expected a JSON array of objects")
    position = whitespace.match(text, position + 1).end()
    line = 1 + text.count("\n", 0, position)
    counted_to = position
    if text[position : position + 1] == "]":
        return

    while True:
        line += text.count("\n", counted_to, position)
        counted_to = position
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataFormatError(path, f"line {error.lineno}", "<json>", f"invalid JSON: {error.msg}") from None
        location = f"line {line}"
        if isinstance(record, dict):
            yield location, record
        else:
            yield location, InvalidRecord("<json>", f"expected a JSON object, got {type(record).__name__}")
        position = whitespace.match(text, end).end()
        separator = text[position : position + 1]
        if separator == "]":
            return
        if separator != ",":
            lineno = 1 + text.count("\n", 0, position)
            raise DataFormatError(path, f"line {lineno}", "<json>", "expected ',' or ']' between array elements")
        position = whitespace.match(text, position + 1).end()


def iter_json_records(path: Path) -> Iterator[tuple[str, Row | InvalidRecord]]:
    """Yield records of a ``.jsonl`` file (one object per line) or a ``.json`` array."""
    if path.suffix.lower() == ".jsonl":
        return iter_jsonl(path)
    text_start = _read_text(path).lstrip()[:1]
    return iter_json_array(path) if text_start == "[" else iter_jsonl(path)


def iter_csv(path: Path, delimiter: str = ",") -> Iterator[tuple[str, Row | InvalidRecord]]:
    """Yield ``("line N", row)`` per CSV record, N being the line where the record starts."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataFormatError(path, "line 1", "<header>", "the CSV file has no header row")
    reader.fieldnames = [name.strip() for name in reader.fieldnames]
    start = reader.line_num + 1
    for row in reader:
        location = f"line {start}"
        start = reader.line_num + 1
        if None in row:
            yield location, InvalidRecord("<csv>", f"{len(row[None])} more values than header columns")
            continue
        yield location, row


# --- conversion loop --------------------------------------------------------------------


def convert_records(
    records: Iterable[tuple[str, Row | InvalidRecord]],
    convert: Converter,
    *,
    source: str,
    skip_invalid: bool,
    report: LoadReport,
    id_prefix: str = "",
) -> list[Example]:
    """Convert and validate records; raise on the first invalid one unless ``skip_invalid``.

    The converter gets each record and a key for ids of records without their own id:
    ``id_prefix`` plus the location with spaces as hyphens (``"train-line-12"``).
    """
    examples = []
    invalid_before = report.skipped["invalid"]
    multi_before = report.skipped["multi_answer"]
    for location, record in records:
        report.records += 1
        try:
            if isinstance(record, InvalidRecord):
                raise record
            example = validate_example(convert(record, id_prefix + location.replace(" ", "-")))
        except MultiAnswer:
            report.skipped["multi_answer"] += 1
            continue
        except InvalidRecord as error:
            if not skip_invalid:
                raise DataFormatError(source, location, error.field, error.message) from None
            report.skipped["invalid"] += 1
            logger.debug("skipping %s, %s: %s", source, location, error)
            continue
        examples.append(example)

    report.loaded += len(examples)
    invalid = report.skipped["invalid"] - invalid_before
    multi = report.skipped["multi_answer"] - multi_before
    if invalid:
        logger.warning("%s: skipped %d invalid records", source, invalid)
    if multi:
        logger.info("%s: skipped %d multiple-choice records with more than one answer", source, multi)
    logger.info("%s: loaded %d examples", source, len(examples))
    return examples


def _field(row: Row, name: str, *, allow_empty: bool = False) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip() and not allow_empty):
        raise InvalidRecord(name, "missing value")
    return check_text(name, value, allow_empty=allow_empty)


def _optional(row: Row, name: str) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return check_text(name, value, allow_empty=True)


def _record_id(row: Row, keys: tuple[str, ...], dataset: str, fallback: str) -> str:
    for key in keys:
        value = row.get(key)
        if value is not None and str(value).strip():
            return f"{dataset}-{str(value).strip()}"
    return f"{dataset}-{fallback}"


def _answer_letters(answer: str) -> str:
    letters = re.sub(r"[\s,，、;；]", "", answer).upper()
    if len(letters) > 1 and letters.isalpha():
        raise MultiAnswer(letters)
    return letters


# --- converters -------------------------------------------------------------------------

ZH_EXAM_INSTRUCTION = "以下是中国医学考试的一道单项选择题，请选出正确答案。"
ZH_QA_INSTRUCTION = "请回答以下医疗咨询问题。"
EN_QA_INSTRUCTION = "Answer the following medical question."
MEDQA_INSTRUCTION = "Answer the following multiple-choice question from the US Medical Licensing Examination."

_LETTERED_LINE = re.compile(r"^\s*([A-Z])\s*(?:[.．、:：)）]\s*|\s+)(.*?)\s*$")


def parse_lettered_options(text: str) -> tuple[list[str], list[str]]:
    """Split ``"A text\\nB text"`` (also ``"A. text"``, ``"A、text"``) into letters and option texts.

    Raises :class:`InvalidRecord` unless the letters run A, B, C, ... and every text is non-empty.
    """
    letters, options = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _LETTERED_LINE.match(line)
        if not match:
            raise InvalidRecord("Options", f"option line {line!r} does not start with a letter")
        letters.append(match.group(1))
        options.append(match.group(2))
    expected = [chr(ord("A") + i) for i in range(len(letters))]
    if letters != expected:
        raise InvalidRecord("Options", f"option letters {letters} are not {expected}")
    for letter, option in zip(letters, options):
        if not option:
            raise InvalidRecord("Options", f"option {letter} is empty")
    return letters, options


def _mcq(dataset: str, language: Language, example_id: str, instruction: str, question: str,
         letters: list[str], options: list[str], answer: str, answer_field: str) -> Example:
    if answer not in letters:
        raise InvalidRecord(answer_field, f"answer {answer!r} is not among the options {letters}")
    index = letters.index(answer)
    return Example(
        id=example_id,
        dataset=dataset,
        language=language,
        task_type="mcq",
        instruction=instruction,
        input=question,
        output=options[index],
        options=tuple(options),
        answer_index=index,
    )


def cmexam_converter(dataset: str) -> Converter:
    """Return the CMExam CSV converter."""

    def convert(row: Row, key: str) -> Example:
        question = _field(row, "Question")
        letters, options = parse_lettered_options(_field(row, "Options"))
        answer = _answer_letters(_field(row, "Answer"))
        example_id = _record_id(row, ("id", "ID"), dataset, key)
        return _mcq(dataset, "zh", example_id, ZH_EXAM_INSTRUCTION, question, letters, options, answer, "Answer")

    return convert


def cmb_exam_converter(dataset: str) -> Converter:
    """Return the CMB-Exam converter; empty options (questions with fewer than five) are dropped."""

    def convert(row: Row, key: str) -> Example:
        question = _field(row, "question")
        if "多项" in _optional(row, "question_type"):
            raise MultiAnswer(row.get("question_type"))
        raw_options = row.get("option")
        if not isinstance(raw_options, dict) or not raw_options:
            raise InvalidRecord("option", f"expected an object of lettered options, got {raw_options!r}")
        answer = _answer_letters(_field(row, "answer"))
        kept = {}
        for letter in sorted(raw_options):
            text = raw_options[letter]
            if text is None or (isinstance(text, str) and not text.strip()):
                continue
            kept[letter.strip().upper()] = check_text(f"option.{letter}", text)
        letters = list(kept)
        exam_type, exam_class = _optional(row, "exam_type"), _optional(row, "exam_class")
        instruction = (
            f"以下是中国{exam_type}中{exam_class}考试的一道单项选择题，请选出正确答案。"
            if exam_type and exam_class
            else ZH_EXAM_INSTRUCTION
        )
        example_id = _record_id(row, ("id",), dataset, key)
        return _mcq(dataset, "zh", example_id, instruction, question, letters, list(kept.values()), answer, "answer")

    return convert


def medqa_converter(dataset: str) -> Converter:
    """Return the MedQA (USMLE, ``options`` dict and ``answer_idx``) converter."""

    def convert(row: Row, key: str) -> Example:
        question = _field(row, "question")
        raw_options = row.get("options")
        if not isinstance(raw_options, dict) or not raw_options:
            raise InvalidRecord("options", f"expected an object of lettered options, got {raw_options!r}")
        letters = sorted(raw_options)
        options = [check_text(f"options.{letter}", raw_options[letter]) for letter in letters]
        answer = _answer_letters(_field(row, "answer_idx"))
        example = _mcq(dataset, "en", _record_id(row, ("id",), dataset, key), MEDQA_INSTRUCTION,
                       question, letters, options, answer, "answer_idx")
        answer_text = _optional(row, "answer")
        if answer_text and answer_text != example.output:
            raise InvalidRecord("answer", f"{answer_text!r} differs from option {answer} {example.output!r}")
        return example

    return convert


def alpaca_converter(dataset: str, language: Language, default_instruction: str) -> Converter:
    """Return a converter for ``instruction``/``input``/``output`` records (free-text QA)."""

    def convert(row: Row, key: str) -> Example:
        instruction = _optional(row, "instruction")
        question = _optional(row, "input")
        if not question:
            if not instruction:
                raise InvalidRecord("input", "missing value (and no instruction to use as the question)")
            instruction, question = default_instruction, instruction
        return Example(
            id=_record_id(row, ("id",), dataset, key),
            dataset=dataset,
            language=language,
            task_type="qa",
            instruction=instruction,
            input=question,
            output=_field(row, "output"),
        )

    return convert


def chinese_dialogue_converter(dataset: str) -> Converter:
    """Return the converter for ChatMed-consult (``query``/``response``) and MedChatZH (``instruction``/``output``)."""
    alpaca = alpaca_converter(dataset, "zh", ZH_QA_INSTRUCTION)

    def convert(row: Row, key: str) -> Example:
        if "query" in row or "response" in row:
            return Example(
                id=_record_id(row, ("id",), dataset, key),
                dataset=dataset,
                language="zh",
                task_type="qa",
                instruction=ZH_QA_INSTRUCTION,
                input=_field(row, "query"),
                output=_field(row, "response"),
            )
        if "instruction" in row or "output" in row:
            return alpaca(row, key)
        raise InvalidRecord("query", f"expected query/response or instruction/output keys, got {sorted(row)}")

    return convert


# --- cMedQA2 ----------------------------------------------------------------------------


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _cmedqa2_table(path: Path, key: str, skip_invalid: bool, report: LoadReport) -> dict[str, tuple[str, str]]:
    """Read ``id -> (question_id, content)`` from question.csv or answer.csv."""
    table: dict[str, tuple[str, str]] = {}
    for location, row in iter_csv(path):
        try:
            if isinstance(row, InvalidRecord):
                raise row
            table[_field(row, key)] = (_optional(row, "question_id"), _field(row, "content"))
        except InvalidRecord as error:
            if not skip_invalid:
                raise DataFormatError(path, location, error.field, error.message) from None
            report.skipped["invalid"] += 1
    return table


def load_cmedqa2(
    path: str | Path,
    *,
    dataset: str = "cmedqa2_zh",
    skip_invalid: bool = False,
    report: LoadReport | None = None,
) -> dict[str, list[Example]]:
    """Load a cMedQA2 folder; return official splits if candidate files exist, else ``{"all": ...}``.

    ``train_candidates.txt`` rows are ``question_id,pos_ans_id,neg_ans_id``; ``dev`` and
    ``test`` rows are ``question_id,ans_id,cnt,label`` with ``label == 1`` for positives.
    Without candidate files every answer in ``answer.csv`` counts as positive for its question.
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    report = report if report is not None else LoadReport()
    questions_path = _first_existing(folder, ("question.csv", "questions.csv"))
    answers_path = _first_existing(folder, ("answer.csv", "answers.csv"))
    if questions_path is None or answers_path is None:
        raise FileNotFoundError(f"{folder}: a cMedQA2 folder needs question.csv and answer.csv")
    report.sources += [str(questions_path), str(answers_path)]
    questions = _cmedqa2_table(questions_path, "question_id", skip_invalid, report)
    answers = _cmedqa2_table(answers_path, "ans_id", skip_invalid, report)

    split_files = {
        split: folder / f"{name}_candidates.txt"
        for split, name in (("train", "train"), ("validation", "dev"), ("test", "test"))
        if (folder / f"{name}_candidates.txt").is_file()
    }
    positives: dict[str, dict[str, list[str]]] = {}
    if split_files:
        for split, candidates_path in split_files.items():
            report.sources.append(str(candidates_path))
            chosen: dict[str, list[str]] = {}
            for location, row in iter_csv(candidates_path):
                if isinstance(row, InvalidRecord):
                    raise DataFormatError(candidates_path, location, row.field, row.message)
                question_id = (row.get("question_id") or "").strip()
                answer_id = (row.get("pos_ans_id") or "").strip()
                if not answer_id and str(row.get("label", "")).strip() == "1":
                    answer_id = (row.get("ans_id") or "").strip()
                if question_id and answer_id:
                    chosen.setdefault(question_id, [])
                    if answer_id not in chosen[question_id]:
                        chosen[question_id].append(answer_id)
            positives[split] = chosen
    else:
        pooled: dict[str, list[str]] = {}
        for answer_id, (question_id, _) in answers.items():
            pooled.setdefault(question_id, []).append(answer_id)
        positives[POOLED] = pooled

    def records(chosen: dict[str, list[str]]) -> Iterator[tuple[str, Row | InvalidRecord]]:
        for question_id, answer_ids in chosen.items():
            location = f"question_id {question_id}"
            if question_id not in questions:
                yield location, InvalidRecord("question_id", f"{question_id!r} is not in {questions_path.name}")
                continue
            known = [answer_id for answer_id in answer_ids if answer_id in answers]
            if not known:
                yield location, InvalidRecord("ans_id", f"answers {answer_ids} are not in {answers_path.name}")
                continue
            yield location, {"question_id": question_id, "question": questions[question_id][1],
                             "answer": answers[known[0]][1]}

    def convert(row: Row, key: str) -> Example:
        return Example(
            id=f"{dataset}-{row['question_id']}",
            dataset=dataset,
            language="zh",
            task_type="qa",
            instruction=ZH_QA_INSTRUCTION,
            input=row["question"],
            output=row["answer"],
        )

    return {
        split: convert_records(records(chosen), convert, source=str(folder), skip_invalid=skip_invalid, report=report)
        for split, chosen in positives.items()
    }


# --- format table, local files and the hub ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Format:
    """A public data set format: how to read its files and convert its records."""

    name: str
    language: Language | None
    task_type: TaskType
    suffixes: tuple[str, ...]
    make_converter: Callable[..., Converter] | None
    hub: bool


FORMATS: dict[str, Format] = {
    spec.name: spec
    for spec in (
        Format("cmedqa2", "zh", "qa", (".csv",), None, hub=False),
        Format("cmexam", "zh", "mcq", (".csv",), cmexam_converter, hub=True),
        Format("cmb_exam", "zh", "mcq", (".json", ".jsonl"), cmb_exam_converter, hub=True),
        Format("chinese_dialogue", "zh", "qa", (".json", ".jsonl"), chinese_dialogue_converter, hub=True),
        Format("healthcaremagic", "en", "qa", (".json", ".jsonl"),
               lambda dataset: alpaca_converter(dataset, "en", EN_QA_INSTRUCTION), hub=True),
        Format("medqa", "en", "mcq", (".jsonl", ".json"), medqa_converter, hub=True),
        Format("golden_touchstone", None, "qa", (".json", ".jsonl"), None, hub=False),
        Format("medical_meadow", "en", "qa", (".json", ".jsonl"),
               lambda dataset: alpaca_converter(dataset, "en", EN_QA_INSTRUCTION), hub=True),
    )
}


def _golden_touchstone_language(path: Path, language: Language | None) -> Language:
    if language is not None:
        return language
    parts = {part.upper() for part in path.resolve().parts}
    if "CN-BENCHMARK" in parts:
        return "zh"
    if "EN-BENCHMARK" in parts:
        return "en"
    raise ValueError(
        f"cannot tell the language of Golden Touchstone file {path}: it is not under CN-benchmark "
        "or EN-benchmark; pass language='zh' or language='en'"
    )


def _converter(fmt: Format, dataset: str, path: Path | None, language: Language | None) -> Converter:
    if fmt.name == "golden_touchstone":
        if path is None:
            raise ValueError("Golden Touchstone loads from local files only; pass its JSON file")
        lang = _golden_touchstone_language(path, language)
        default = EN_QA_INSTRUCTION if lang == "en" else "请回答以下问题。"
        return alpaca_converter(dataset, lang, default)
    return fmt.make_converter(dataset)


def load_file(
    fmt: str,
    path: str | Path,
    *,
    dataset: str,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
    language: Language | None = None,
) -> list[Example]:
    """Load one local file of format ``fmt`` (not ``cmedqa2``, which is a folder)."""
    spec = _format(fmt)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{spec.name} file not found: {path}")
    report = report if report is not None else LoadReport()
    report.sources.append(str(path))
    convert = _converter(spec, dataset, path, language)
    records = iter_csv(path) if path.suffix.lower() == ".csv" else iter_json_records(path)
    return convert_records(records, convert, source=str(path), skip_invalid=skip_invalid, report=report,
                           id_prefix=f"{path.stem}-")


def _format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def split_of_filename(path: Path) -> str | None:
    """Return the canonical split named in a file name (``train``, ``dev`` -> ``validation``, ``test``), or ``None``."""
    words = re.split(r"[^a-z]+", path.stem.lower())
    found = {SPLIT_ALIASES[word] for word in words if word in SPLIT_ALIASES}
    return found.pop() if len(found) == 1 else None


def is_hub_id(source: str) -> bool:
    """Return whether ``source`` reads as a hub id (``owner/name``) rather than a local path."""
    if source.startswith((".", "/", "~")) or "\\" in source:
        return False
    if Path(source).suffix.lower() in {".json", ".jsonl", ".csv", ".txt"}:
        return False
    return source.count("/") == 1


def load_source(
    fmt: str,
    source: str | Path,
    *,
    dataset: str,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
    language: Language | None = None,
    hub_config: str | None = None,
) -> dict[str, list[Example]]:
    """Load a file, a folder of split files, or a hub id; return ``{split: examples}``.

    A single file gives ``{"all": examples}`` (split later). A folder gives one entry per
    file whose name contains ``train``, ``dev``/``val``/``validation`` or ``test``. A hub id
    is read with ``datasets.load_dataset`` unless ``HF_HUB_OFFLINE=1``, which raises
    :class:`HubOfflineError`.
    """
    spec = _format(fmt)
    report = report if report is not None else LoadReport()
    path = Path(str(source)).expanduser()

    if path.exists():
        if spec.name == "cmedqa2":
            return load_cmedqa2(path, dataset=dataset, skip_invalid=skip_invalid, report=report)
        if path.is_file():
            return {POOLED: load_file(fmt, path, dataset=dataset, skip_invalid=skip_invalid,
                                      report=report, language=language)}
        splits: dict[str, list[Example]] = {}
        for file in sorted(path.rglob("*")):
            if not file.is_file() or file.suffix.lower() not in spec.suffixes:
                continue
            split = split_of_filename(file)
            if split is None:
                continue
            if split in splits:
                raise ValueError(f"{path}: more than one {split} file; keep one per split")
            splits[split] = load_file(fmt, file, dataset=dataset, skip_invalid=skip_invalid,
                                      report=report, language=language)
        if not splits:
            raise FileNotFoundError(
                f"{path}: no {spec.name} file with train, dev/validation or test in its name "
                f"(suffixes {spec.suffixes}); pass a single file instead"
            )
        return splits

    source = str(source)
    if not is_hub_id(source):
        raise FileNotFoundError(f"{spec.name} source {source!r} is neither an existing path nor a hub id")
    return load_hub(fmt, source, dataset=dataset, skip_invalid=skip_invalid, report=report, config=hub_config)


def load_hub(
    fmt: str,
    hub_id: str,
    *,
    dataset: str,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
    config: str | None = None,
) -> dict[str, list[Example]]:
    """Load every split of a hub data set with ``datasets.load_dataset`` and convert its rows."""
    spec = _format(fmt)
    if not spec.hub:
        raise ValueError(f"format {spec.name!r} has no hub loader; download the files and pass their path")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise HubOfflineError(
            f"{dataset}: cannot read hub data set {hub_id!r} because HF_HUB_OFFLINE=1 (and no local "
            "path of that name exists); unset HF_HUB_OFFLINE on a machine with network access, or "
            "pass a local file or folder"
        )
    from datasets import load_dataset  # imported here: slow, and only needed online

    report = report if report is not None else LoadReport()
    report.sources.append(f"hub:{hub_id}" + (f"/{config}" if config else ""))
    convert = _converter(spec, dataset, None, None)
    loaded = load_dataset(hub_id, config)
    splits: dict[str, list[Example]] = {}
    for split_name, rows in loaded.items():
        split = SPLIT_ALIASES.get(split_name.lower())
        if split is None:
            logger.info("%s: ignoring hub split %r", hub_id, split_name)
            continue
        records = ((f"{split_name} row {i}", dict(row)) for i, row in enumerate(rows))
        splits[split] = convert_records(records, convert, source=f"{hub_id}:{split_name}",
                                        skip_invalid=skip_invalid, report=report)
    return splits

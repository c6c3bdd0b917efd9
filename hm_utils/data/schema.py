"""The instruction schema shared by every data set, its validation and its Alpaca JSON form.

An :class:`Example` keeps the task instruction apart from the question. ``instruction`` is
the task ("Answer the following multiple-choice question about anatomy."), ``input`` is
the question itself, and for multiple choice ``options`` contains the option texts, so a
prompt template decides how options are shown. Split files are LLaMA-Factory Alpaca JSON:
a UTF-8 JSON array of objects with ``instruction``, ``input`` and ``output`` plus the other
``Example`` fields (``id``, ``dataset``, ``language``, ``task_type``, ``options``,
``answer_index``), so :func:`read_split` restores every example exactly.

Deduplication compares :func:`question_key`: the question text after Unicode NFKC
normalisation and case folding, with whitespace and punctuation removed. For multiple
choice the sorted option texts are part of the key, because exams reuse stems such as
"Which of the following is true?" with different options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Literal, get_args

from hm_utils import files

logger = logging.getLogger(__name__)

Language = Literal["en", "zh"]
TaskType = Literal["mcq", "qa"]
LANGUAGES: tuple[str, ...] = get_args(Language)
TASK_TYPES: tuple[str, ...] = get_args(TaskType)

ALPACA_KEYS = ("instruction", "input", "output", "id", "dataset", "language", "task_type", "options", "answer_index")

# Lone surrogates U+DC80..U+DCFF are what ``errors="surrogateescape"`` makes of bytes that
# are not valid UTF-8, so a field that contains one came from undecodable text.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


@dataclasses.dataclass(frozen=True)
class Example:
    """One instruction example.

    For ``task_type == "mcq"``, ``options`` holds the option texts in order and
    ``answer_index`` the index of the correct one, and ``output`` is the correct option's
    text. For ``"qa"``, both are ``None`` and ``output`` is the reference answer.
    """

    id: str
    dataset: str
    language: Language
    task_type: TaskType
    instruction: str
    input: str
    output: str
    options: tuple[str, ...] | None = None
    answer_index: int | None = None


class InvalidRecord(ValueError):
    """A source record that cannot become an :class:`Example`; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field
        self.message = message


class DataFormatError(ValueError):
    """An invalid record in a data file, with the file, the line (or record) and the field."""

    def __init__(self, path: str | Path, location: str, field: str, message: str):
        super().__init__(
            f"{path}, {location}, field {field!r}: {message}; fix the record, or pass "
            "skip_invalid=True to skip invalid records and log their count"
        )
        self.path = str(path)
        self.location = location
        self.field = field


def check_text(field: str, value: Any, *, allow_empty: bool = False) -> str:
    """Return ``value`` as a stripped string, or raise :class:`InvalidRecord`.

    Rejects missing values, non-strings, text that came from undecodable bytes and,
    unless ``allow_empty``, empty text.
    """
    if value is None:
        raise InvalidRecord(field, "missing value")
    if isinstance(value, float) and value != value:  # NaN from a CSV reader
        raise InvalidRecord(field, "missing value")
    if not isinstance(value, str):
        raise InvalidRecord(field, f"expected text, got {type(value).__name__} {value!r}")
    if _UNDECODABLE.search(value):
        raise InvalidRecord(field, "undecodable text: the bytes are not valid UTF-8; re-encode the file as UTF-8")
    text = value.strip()
    if not text and not allow_empty:
        raise InvalidRecord(field, "empty text")
    return text


def validate_example(example: Example) -> Example:
    """Return ``example`` unchanged if it is consistent, else raise :class:`InvalidRecord`.

    Every example needs a non-empty ``id``, ``input`` (the question) and ``output``, and a
    known language and task type. A multiple-choice example needs at least two non-empty,
    distinct options, an ``answer_index`` inside them and ``output`` equal to the correct
    option. A QA example has no options and no answer index.
    """
    check_text("id", example.id)
    check_text("dataset", example.dataset)
    check_text("instruction", example.instruction, allow_empty=True)
    check_text("input", example.input)
    check_text("output", example.output)
    if example.language not in LANGUAGES:
        raise InvalidRecord("language", f"invalid language {example.language!r}; use one of {LANGUAGES}")
    if example.task_type not in TASK_TYPES:
        raise InvalidRecord("task_type", f"invalid task type {example.task_type!r}; use one of {TASK_TYPES}")

    if example.task_type == "qa":
        if example.options is not None or example.answer_index is not None:
            raise InvalidRecord("options", "a QA example must have options=None and answer_index=None")
        return example

    if not isinstance(example.options, tuple) or len(example.options) < 2:
        raise InvalidRecord("options", f"a multiple-choice example needs at least 2 options, got {example.options!r}")
    for position, option in enumerate(example.options):
        check_text(f"options[{position}]", option)
    if len(set(example.options)) != len(example.options):
        raise InvalidRecord("options", f"duplicate option texts in {example.options!r}")
    if not isinstance(example.answer_index, int) or isinstance(example.answer_index, bool):
        raise InvalidRecord("answer_index", f"expected an integer, got {example.answer_index!r}")
    if not 0 <= example.answer_index < len(example.options):
        raise InvalidRecord(
            "answer_index", f"{example.answer_index} is outside the {len(example.options)} options"
        )
    if example.output != example.options[example.answer_index]:
        raise InvalidRecord(
            "output",
            f"{example.output!r} differs from the correct option {example.options[example.answer_index]!r}",
        )
    return example


def normalise_text(text: str) -> str:
    """Return ``text`` after NFKC and case folding, without whitespace or punctuation."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in folded if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def question_key(example: Example) -> str:
    """Return the deduplication key: the normalised question, plus sorted options for MCQ."""
    key = normalise_text(example.input)
    if example.options:
        key += "\x1f" + "\x1f".join(sorted(normalise_text(option) for option in example.options))
    return key


def to_alpaca(example: Example) -> dict[str, Any]:
    """Return the Alpaca JSON record of ``example`` (``options`` becomes a list)."""
    record = dataclasses.asdict(example)
    if example.options is not None:
        record["options"] = list(example.options)
    return {key: record[key] for key in ALPACA_KEYS}


def from_alpaca(record: Any) -> Example:
    """Build a validated :class:`Example` from one Alpaca JSON record written by :func:`to_alpaca`."""
    if not isinstance(record, dict):
        raise InvalidRecord("<record>", f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ALPACA_KEYS if key not in record]
    if missing:
        raise InvalidRecord(missing[0], f"missing keys {missing}")
    options = record["options"]
    if options is not None:
        if not isinstance(options, list):
            raise InvalidRecord("options", f"expected a list or null, got {type(options).__name__}")
        options = tuple(options)
    example = Example(
        id=record["id"],
        dataset=record["dataset"],
        language=record["language"],
        task_type=record["task_type"],
        instruction=record["instruction"],
        input=record["input"],
        output=record["output"],
        options=options,
        answer_index=record["answer_index"],
    )
    return validate_example(example)


def examples_digest(examples: Iterable[Example]) -> str:
    """Return the sha256 of the examples' Alpaca records, to tell whether two splits are identical."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(to_alpaca(example), ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as UTF-8 JSON (``ensure_ascii=False``) through a temporary file and ``os.replace``.

    Raises ``ValueError`` for NaN or infinity, which JSON cannot represent.
    """
    return files.write_json_atomic(path, payload, indent=1)


def write_split(examples: Iterable[Example], path: str | Path) -> Path:
    """Write examples as an Alpaca JSON array, atomically; every example is validated first."""
    records = []
    for example in examples:
        try:
            validate_example(example)
        except InvalidRecord as error:
            raise ValueError(f"cannot write example {example.id!r} to {path}: {error}") from None
        records.append(to_alpaca(example))
    path = write_json_atomic(path, records)
    logger.info("wrote %d examples to %s", len(records), path)
    return path


def read_split(path: str | Path) -> list[Example]:
    """Read an Alpaca JSON array written by :func:`write_split`.

    Raises :class:`DataFormatError` naming the record and field of the first invalid record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}; write it with write_split")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataFormatError(path, f"byte {error.start}", "<text>", "the file is not valid UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(path, f"line {error.lineno}", "<json>", f"invalid JSON: {error.msg}") from None
    if not isinstance(records, list):
        raise DataFormatError(path, "line 1", "<json>", f"expected a JSON array, got {type(records).__name__}")

    examples = []
    for position, record in enumerate(records):
        try:
            examples.append(from_alpaca(record))
        except InvalidRecord as error:
            raise DataFormatError(path, f"record {position}", error.field, error.message) from None
    return examples

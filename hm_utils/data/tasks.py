"""The task registry: task name -> loader, language, task type, source and licence.

Embedded tasks (:mod:`hm_utils.data.embedded`) load offline from files inside installed
packages. Public tasks read a local file or folder, or a hub id when ``HF_HUB_OFFLINE``
is not ``"1"``; ``source`` overrides their default. :func:`load_task` is the entry point
for later stages: it loads, deduplicates, splits with a seed and caps, and checks that the
splits are non-empty and disjoint.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

from hm_utils.data import embedded
from hm_utils.data.formats import FORMATS, POOLED, LoadReport, load_source
from hm_utils.data.schema import Example, Language, TaskType
from hm_utils.data.splits import Caps, check_splits, make_splits, resolve_caps, resolve_fractions

logger = logging.getLogger(__name__)

Loader = Callable[[str | None, bool, LoadReport], dict[str, list[Example]]]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A registered data set.

    ``loader(source, skip_invalid, report)`` returns ``{"all": examples}`` for a pooled
    source or official ``{split: examples}``. ``source`` describes where the data comes
    from. ``default_source`` is the path or hub id a public task reads when the caller
    gives none; when it is ``None`` the caller must pass a source.
    """

    name: str
    language: Language
    task_type: TaskType
    source: str
    licence: str
    loader: Loader
    embedded: bool
    files: tuple[embedded.EmbeddedFile, ...] = ()
    default_source: str | None = None


@dataclasses.dataclass
class PreparedTask:
    """A task's splits with the settings and counts that produced them."""

    spec: TaskSpec
    splits: dict[str, list[Example]]
    report: LoadReport
    seed: int
    caps: dict[str, int | None]
    fractions: dict[str, float]

    def summary(self) -> dict[str, Any]:
        """Return a JSON-ready description: sizes, settings, source files and load counts."""
        return {
            "task": self.spec.name,
            "language": self.spec.language,
            "task_type": self.spec.task_type,
            "source": self.spec.source,
            "licence": self.spec.licence,
            "files": [
                {"package": file.requirement, "path": file.path, "sha256": file.sha256}
                for file in self.spec.files
            ],
            "seed": self.seed,
            "caps": self.caps,
            "fractions": self.fractions,
            "sizes": {split: len(examples) for split, examples in self.splits.items()},
            "load": self.report.to_dict(),
        }


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add ``spec`` to :data:`TASKS`; an existing name raises unless ``replace``."""
    if spec.name in TASKS and not replace:
        raise ValueError(f"task {spec.name!r} is already registered; pass replace=True to override it")
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """Look up a registered task."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; registered: {sorted(TASKS)}") from None


def _embedded_loader(build: Callable[[LoadReport], list[Example]], name: str) -> Loader:
    def load(source: str | None, skip_invalid: bool, report: LoadReport) -> dict[str, list[Example]]:
        if source is not None:
            raise ValueError(f"task {name!r} is built from package files and takes no source; got {source!r}")
        return {POOLED: build(report)}

    return load


def register_public_task(
    name: str,
    fmt: str,
    *,
    source: str,
    licence: str,
    default_source: str | None = None,
    language: Language | None = None,
    hub_config: str | None = None,
    replace: bool = False,
) -> TaskSpec:
    """Register a task read from a public format (see :data:`~hm_utils.data.formats.FORMATS`).

    ``language`` is required for formats without a fixed language (Golden Touchstone).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {sorted(FORMATS)}")
    task_language = language or FORMATS[fmt].language
    if task_language is None:
        raise ValueError(f"format {fmt!r} has no fixed language; pass language='en' or 'zh'")

    def load(given: str | None, skip_invalid: bool, report: LoadReport) -> dict[str, list[Example]]:
        chosen = given if given is not None else default_source
        if chosen is None:
            raise FileNotFoundError(
                f"task {name!r} has no default source; pass source= a local {fmt} file or folder"
            )
        return load_source(fmt, chosen, dataset=name, skip_invalid=skip_invalid, report=report,
                           language=language, hub_config=hub_config)

    spec = TaskSpec(
        name=name,
        language=task_language,
        task_type=FORMATS[fmt].task_type,
        source=source,
        licence=licence,
        loader=load,
        embedded=False,
        default_source=default_source,
    )
    return register_task(spec, replace=replace)


def prepare_task(
    name: str,
    seed: int = 0,
    caps: Caps | None = None,
    *,
    source: str | None = None,
    fractions: Mapping[str, float] | None = None,
    skip_invalid: bool = False,
) -> PreparedTask:
    """Load task ``name`` and split it; see :func:`load_task`. Also returns the settings and counts."""
    spec = get_task(name)
    resolved_caps = resolve_caps(caps)
    resolved_fractions = resolve_fractions(fractions)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    report = LoadReport()
    loaded = spec.loader(source, skip_invalid, report)
    splits = make_splits(loaded, seed, resolved_caps, resolved_fractions, report)
    check_splits(splits, name)
    logger.info(
        "task %s: %s (seed %d)", name, ", ".join(f"{split} {len(rows)}" for split, rows in splits.items()), seed
    )
    return PreparedTask(spec, splits, report, seed, resolved_caps, resolved_fractions)


def load_task(
    name: str,
    seed: int = 0,
    caps: Caps | None = None,
    *,
    source: str | None = None,
    fractions: Mapping[str, float] | None = None,
    skip_invalid: bool = False,
) -> dict[str, list[Example]]:
    """Return ``{"train": [...], "validation": [...], "test": [...]}`` for a registered task.

    ``caps`` maps a split to its maximum size (``None``: uncapped); missing splits take
    :data:`~hm_utils.data.splits.DEFAULT_CAPS`. The result depends only on the source
    data, ``seed``, ``caps`` and ``fractions``. Raises ``EmptySplitError`` if a split is empty.
    """
    return prepare_task(name, seed, caps, source=source, fractions=fractions, skip_invalid=skip_invalid).splits


# --- registrations ----------------------------------------------------------------------

_EMBEDDED = (
    ("mmlu_medical_en", "en", "mcq", embedded.build_mmlu_medical, (embedded.MMLU_FILE,),
     "MMLU test questions, medical subjects: " + ", ".join(embedded.MMLU_MEDICAL_SUBJECTS)),
    ("hpo_definitions_en", "en", "qa", embedded.build_hpo_definitions, (embedded.HPO_FILE,),
     "Human Phenotype Ontology 2025-01-16: term name -> first sentence of its definition"),
    ("cmekg_qa_zh", "zh", "qa", embedded.build_cmekg_qa, (embedded.CMEKG_FILE,),
     "CMeKG facts (就诊科室, 功效, 适应症) as template questions"),
    ("cmekg_mcq_zh", "zh", "mcq", embedded.build_cmekg_mcq, (embedded.CMEKG_FILE, embedded.HUATUO_SYMPTOM_FILE),
     "CMeKG disease symptoms (常见症状) that are Huatuo dictionary terms, as 4-option questions"),
)

for _name, _language, _task_type, _build, _files, _description in _EMBEDDED:
    register_task(
        TaskSpec(
            name=_name,
            language=_language,
            task_type=_task_type,
            source=" + ".join(f"{file.requirement}:{file.path}" for file in _files) + f" ({_description})",
            licence="; ".join(f"{file.distribution}: {file.licence}" for file in _files),
            loader=_embedded_loader(_build, _name),
            embedded=True,
            files=_files,
        )
    )

# NOTE: the hub ids below are read with datasets.load_dataset; that path is not exercised
# by the tests, which run offline.
_UNRECORDED = "not recorded here; check the data set's own terms before use"
register_public_task("medqa_en", "medqa", source="MedQA USMLE 4 options", licence=_UNRECORDED,
                     default_source="GBaker/MedQA-USMLE-4-options")
register_public_task("cmexam_zh", "cmexam", source="CMExam CSV (pass the folder or a CSV file)", licence=_UNRECORDED)
register_public_task("cmb_exam_zh", "cmb_exam", source="CMB-Exam JSON (pass a file or folder)", licence=_UNRECORDED)
register_public_task("cmedqa2_zh", "cmedqa2", source="cMedQA2 folder",
                     licence="non-commercial research use (cMedQA2 README)")
register_public_task("healthcaremagic_en", "healthcaremagic", source="ChatDoctor HealthCareMagic-100k",
                     licence=_UNRECORDED, default_source="lavita/ChatDoctor-HealthCareMagic-100k")
register_public_task("chatmed_consult_zh", "chinese_dialogue", source="ChatMed-consult", licence=_UNRECORDED,
                     default_source="michaelwzhu/ChatMed_Consult_Dataset")
register_public_task("medical_meadow_wikidoc_en", "medical_meadow", source="medAlpaca medical meadow wikidoc",
                     licence=_UNRECORDED, default_source="medalpaca/medical_meadow_wikidoc")

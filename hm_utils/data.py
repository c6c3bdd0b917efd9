"""Medical data sets normalised to one instruction schema."""

from __future__ import annotations

import dataclasses
from typing import Literal

Language = Literal["en", "zh"]
TaskType = Literal["mcq", "qa"]


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

"""Prompt templates: how an :class:`~hm_utils.data.Example` becomes chat messages and a target.

A :class:`PromptTemplate` is data: an optional system message and a user format string with the
placeholders ``{instruction}``, ``{input}`` and ``{options}``. ``{options}`` expands to one line per
option, ``"A. text"``, and to the empty string for QA examples. Runs of three or more newlines
left by empty fields collapse to one blank line, and the rendered message is stripped.

The training target (:func:`render_target`) is ``"<letter>. <option text>"`` for multiple choice
(e.g. ``"B. 心脏"``) and the reference ``output`` for QA, so the scorers in
:mod:`hm_utils.evaluate` accept either the letter or the option text in a generated answer.

:data:`TEMPLATES` maps a template name to its template. Each (language, task type) pair has three
candidates, which prompt search compares. The first registered candidate of a pair is its default.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import string
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from hm_utils.data import Example, Language, TaskType

logger = logging.getLogger(__name__)

PLACEHOLDERS = frozenset({"instruction", "input", "options"})
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
OPTION_SEPARATOR = ". "


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A named chat prompt for one language and task type.

    ``user`` is a :meth:`str.format` string that may use only ``{instruction}``, ``{input}`` and
    ``{options}``. Multiple-choice templates must contain ``{options}``. ``system`` is the system
    message, or ``None`` to leave it to the tokenizer's chat template (some templates insert
    their own default system message).
    """

    name: str
    language: Language
    task_type: TaskType
    system: str | None
    user: str

    def __post_init__(self) -> None:
        if self.language not in ("en", "zh"):
            raise ValueError(f"template {self.name!r}: invalid language {self.language!r}; use 'en' or 'zh'")
        if self.task_type not in ("mcq", "qa"):
            raise ValueError(f"template {self.name!r}: invalid task_type {self.task_type!r}; use 'mcq' or 'qa'")

        fields = placeholder_names(self.user)
        unknown = fields - PLACEHOLDERS
        if unknown:
            raise ValueError(
                f"template {self.name!r}: unknown placeholders {sorted(unknown)} in user string; "
                f"allowed are {sorted(PLACEHOLDERS)} (write literal braces as '{{{{' and '}}}}')"
            )
        if "input" not in fields:
            raise ValueError(f"template {self.name!r}: user string must contain '{{input}}'")
        if self.task_type == "mcq" and "options" not in fields:
            raise ValueError(f"template {self.name!r}: multiple-choice template must contain '{{options}}'")


def placeholder_names(format_string: str) -> set[str]:
    """Return the field names used in a :meth:`str.format` string."""
    return {field for _, field, _, _ in string.Formatter().parse(format_string) if field is not None}


def option_letters(n: int) -> list[str]:
    """Return the first ``n`` option letters, ``["A", "B", ...]`` (at most 26)."""
    if not 1 <= n <= len(LETTERS):
        raise ValueError(f"invalid number of options {n}; expected 1 to {len(LETTERS)}")
    return list(LETTERS[:n])


def format_options(options: tuple[str, ...] | list[str] | None) -> str:
    """Format options as lines ``"A. text"``; ``None`` or empty gives ``""``."""
    if not options:
        return ""
    letters = option_letters(len(options))
    return "\n".join(f"{letter}{OPTION_SEPARATOR}{text}" for letter, text in zip(letters, options))


def _check_example(example: Example, template: PromptTemplate) -> None:
    if example.task_type != template.task_type:
        raise ValueError(
            f"example {example.id!r} has task_type {example.task_type!r} but template "
            f"{template.name!r} is for {template.task_type!r}; pick a template with "
            f"templates_for({example.language!r}, {example.task_type!r})"
        )
    if example.task_type == "mcq":
        if not example.options:
            raise ValueError(f"multiple-choice example {example.id!r} has no options")
        if example.answer_index is None or not 0 <= example.answer_index < len(example.options):
            raise ValueError(
                f"multiple-choice example {example.id!r} has invalid answer_index "
                f"{example.answer_index!r} for {len(example.options)} options"
            )


def render_user(example: Example, template: PromptTemplate) -> str:
    """Fill the template's user string with the example's fields."""
    _check_example(example, template)
    text = template.user.format(
        instruction=example.instruction.strip(),
        input=example.input.strip(),
        options=format_options(example.options),
    )
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def render_messages(example: Example, template: PromptTemplate) -> list[dict[str, str]]:
    """Build chat messages ``[{"role": "system", ...}?, {"role": "user", ...}]`` for one example."""
    messages = []
    if template.system is not None:
        messages.append({"role": "system", "content": template.system})
    messages.append({"role": "user", "content": render_user(example, template)})
    return messages


def render_prompt(tokenizer: Any, example: Example, template: PromptTemplate) -> str:
    """Render the prompt text with the tokenizer's chat template, ending at the assistant turn.

    Calls ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.
    The returned text already contains the special tokens (BOS where the template adds one), so
    encode it with ``add_special_tokens=False``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat_template; "
            "use an instruction-tuned checkpoint or set tokenizer.chat_template"
        )
    messages = render_messages(example, template)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_target(example: Example) -> str:
    """Return the assistant answer a model is trained on: ``"B. 心脏"`` for MCQ, ``output`` for QA."""
    if example.task_type == "qa":
        return example.output
    if not example.options or example.answer_index is None or not 0 <= example.answer_index < len(example.options):
        raise ValueError(
            f"multiple-choice example {example.id!r} needs options and a valid answer_index, "
            f"got options={example.options!r}, answer_index={example.answer_index!r}"
        )
    letter = option_letters(len(example.options))[example.answer_index]
    return f"{letter}{OPTION_SEPARATOR}{example.options[example.answer_index]}"


# Candidate templates. The first one registered for each (language, task_type) is the default.
_CANDIDATES = [
    # English multiple choice.
    PromptTemplate(
        name="en_mcq_plain",
        language="en",
        task_type="mcq",
        system=None,
        user="{instruction}\n\n{input}\n\n{options}",
    ),
    PromptTemplate(
        name="en_mcq_expert",
        language="en",
        task_type="mcq",
        system="You are a medical expert. Answer multiple-choice questions accurately.",
        user="{instruction}\n\nQuestion: {input}\n\nOptions:\n{options}\n\n"
        "Reply with the letter and the text of the correct option.",
    ),
    PromptTemplate(
        name="en_mcq_letter",
        language="en",
        task_type="mcq",
        system="You are a helpful assistant.",
        user="Question: {input}\n{options}\nAnswer with the letter of the correct option, then its text.",
    ),
    # English free-text QA.
    PromptTemplate(
        name="en_qa_plain",
        language="en",
        task_type="qa",
        system=None,
        user="{instruction}\n\n{input}",
    ),
    PromptTemplate(
        name="en_qa_expert",
        language="en",
        task_type="qa",
        system="You are a medical expert. Answer concisely and accurately.",
        user="{instruction}\n\n{input}",
    ),
    PromptTemplate(
        name="en_qa_short",
        language="en",
        task_type="qa",
        system="You are a helpful assistant.",
        user="{input}\n\nAnswer in one or two sentences.",
    ),
    # Chinese multiple choice.
    PromptTemplate(
        name="zh_mcq_plain",
        language="zh",
        task_type="mcq",
        system=None,
        user="{instruction}\n\n{input}\n\n{options}",
    ),
    PromptTemplate(
        name="zh_mcq_expert",
        language="zh",
        task_type="mcq",
        system="你是一名医学专家，请准确回答选择题。",
        user="{instruction}\n\n问题：{input}\n\n选项：\n{options}\n\n请给出正确选项的字母和内容。",
    ),
    PromptTemplate(
        name="zh_mcq_letter",
        language="zh",
        task_type="mcq",
        system="你是一个乐于助人的助手。",
        user="问题：{input}\n{options}\n请先回答正确选项的字母，再写出选项内容。",
    ),
    # Chinese free-text QA.
    PromptTemplate(
        name="zh_qa_plain",
        language="zh",
        task_type="qa",
        system=None,
        user="{instruction}\n\n{input}",
    ),
    PromptTemplate(
        name="zh_qa_expert",
        language="zh",
        task_type="qa",
        system="你是一名医学专家，请简洁准确地回答问题。",
        user="{instruction}\n\n{input}",
    ),
    PromptTemplate(
        name="zh_qa_short",
        language="zh",
        task_type="qa",
        system="你是一个乐于助人的助手。",
        user="{input}\n\n请用一两句话回答。",
    ),
]

TEMPLATES: dict[str, PromptTemplate] = {template.name: template for template in _CANDIDATES}


def get_template(name: str) -> PromptTemplate:
    """Look up a registered template by name."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown prompt template {name!r}; registered: {sorted(TEMPLATES)}") from None


def templates_for(language: Language, task_type: TaskType) -> list[PromptTemplate]:
    """Return the candidate templates for one language and task type, default first."""
    found = [t for t in TEMPLATES.values() if t.language == language and t.task_type == task_type]
    if not found:
        raise ValueError(
            f"no prompt template for language={language!r}, task_type={task_type!r}; "
            "languages are 'en'/'zh' and task types 'mcq'/'qa'"
        )
    return found


def default_template(language: Language, task_type: TaskType) -> PromptTemplate:
    """Return the default template for one language and task type."""
    return templates_for(language, task_type)[0]


def save_prompt_choice(path: str | Path, choice: Mapping[str, str]) -> Path:
    """Write ``{task: template_name}`` as UTF-8 JSON, atomically; every name must be registered."""
    choice = dict(choice)
    for task, name in choice.items():
        if not isinstance(task, str) or not isinstance(name, str):
            raise TypeError(f"prompt choice must map str to str, got {task!r}: {name!r}")
        get_template(name)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(choice, handle, ensure_ascii=False, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote prompt choice for %d tasks to %s", len(choice), path)
    return path


def load_prompt_choice(path: str | Path) -> dict[str, str]:
    """Read a ``{task: template_name}`` JSON file written by :func:`save_prompt_choice`.

    Raises ``KeyError`` when a name is not in :data:`TEMPLATES`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt choice file not found: {path}; write it with save_prompt_choice")
    choice = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(choice, dict):
        raise ValueError(f"{path}: expected a JSON object {{task: template_name}}, got {type(choice).__name__}")
    for task, name in choice.items():
        if not isinstance(name, str):
            raise ValueError(f"{path}: template name for task {task!r} must be a string, got {name!r}")
        get_template(name)
    return choice


LOWER_IS_BETTER = frozenset({"answer_nll"})


def search_templates(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    metric: str,
    methods: Sequence[str],
    candidates: Sequence[PromptTemplate] | None = None,
    **evaluate_options: Any,
) -> list[dict[str, Any]]:
    """Score every candidate template on ``examples`` and return one row per template, best first.

    ``candidates`` defaults to the registered templates for the examples' language and task
    type. Each row contains the template name, the metric's name and value with its bootstrap
    interval, and the number of examples. ``answer_nll`` ranks lower first, every other metric higher first.
    """
    from hm_utils.evaluate import evaluate_model

    if not examples:
        raise ValueError("search_templates needs at least one example; the validation split is empty")
    languages = {example.language for example in examples}
    task_types = {example.task_type for example in examples}
    if len(languages) != 1 or len(task_types) != 1:
        raise ValueError(f"examples mix languages {sorted(languages)} or task types {sorted(task_types)}; search one task at a time")
    if candidates is None:
        candidates = templates_for(languages.pop(), task_types.pop())

    rows = []
    for template in candidates:
        result = evaluate_model(model, tokenizer, examples, template, methods=list(methods), **evaluate_options)
        if metric not in result.metrics:
            raise ValueError(f"metric {metric!r} is not produced by methods {list(methods)}; available: {sorted(result.metrics)}")
        rows.append({
            "template": template.name,
            "metric": metric,
            "value": result.metrics[metric],
            "ci_low": result.metrics.get(f"{metric}_ci_low"),
            "ci_high": result.metrics.get(f"{metric}_ci_high"),
            "n": len(examples),
        })
        logger.info("template %s: %s = %.4f", template.name, metric, result.metrics[metric])

    # Ties keep the registry order, so the default template wins a tie.
    rows.sort(key=lambda row: row["value"] if metric in LOWER_IS_BETTER else -row["value"])
    return rows

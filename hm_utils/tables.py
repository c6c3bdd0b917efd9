r"""Result tables: average improvement, average rank, and CSV / Markdown / LaTeX writers.

A results table is a :class:`pandas.DataFrame` with one row per method (the index) and one
column per metric, e.g. ``"MedQA acc"`` and ``"CMExam acc"``.

Avg Impr. of method :math:`m` over the base row :math:`b`, across the table's metrics
:math:`j = 1..J`, is

.. math:: \mathrm{AvgImpr}(m) = \frac{\frac{1}{J}\sum_j x_{mj}}{\frac{1}{J}\sum_j x_{bj}} - 1,

a ratio of means (not a mean of ratios), which reproduces the published Hi-Merging rows
(e.g. (59.14 + 83.78) / (51.41 + 74.62) - 1 = 13.40 % for the English specialist). It divides
raw values, so every metric must be one where higher is better.

Avg Rank is the mean over metrics of the method's rank among all rows of the table: rank 1 is
the best value, and tied values share the mean of the ranks they span (``method="average"``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from hm_utils.files import write_text_atomic

logger = logging.getLogger(__name__)

AVG_IMPR = "Avg Impr. (%)"
AVG_RANK = "Avg Rank"


def build_table(
    results: Mapping[str, Mapping[str, float]], columns: Sequence[str] | Mapping[str, str]
) -> pd.DataFrame:
    """Build a results table from ``{method: metrics}``, e.g. ``evaluate_model(...).metrics`` per model.

    ``columns`` lists the metric keys to keep, or maps each key to its column title
    (``{"acc_generate": "MedQA acc"}``). A missing key raises ``KeyError`` naming the method.
    """
    titles = dict(columns) if isinstance(columns, Mapping) else {key: key for key in columns}
    rows = {}
    for method, metrics in results.items():
        missing = [key for key in titles if key not in metrics]
        if missing:
            raise KeyError(f"method {method!r} has no metrics {missing}; available: {sorted(metrics)}")
        rows[method] = [float(metrics[key]) for key in titles]
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(titles.values()))
    table.index.name = "Method"
    _check_table(table)
    return table


def avg_improvement(method_values: Sequence[float], base_values: Sequence[float]) -> float:
    """Return ``mean(method_values) / mean(base_values) - 1`` as a fraction (0.134 means +13.4 %)."""
    method = np.asarray(method_values, dtype=np.float64)
    base = np.asarray(base_values, dtype=np.float64)
    if method.shape != base.shape or method.size == 0:
        raise ValueError(
            f"need the same non-zero number of metrics for method and base, got {method.size} and {base.size}"
        )
    if not (np.isfinite(method).all() and np.isfinite(base).all()):
        raise ValueError(f"metric values must be finite, got method={method.tolist()} base={base.tolist()}")
    if base.mean() <= 0:
        raise ValueError(f"base metrics must have a positive mean to divide by, got {base.tolist()}")
    return float(method.mean() / base.mean() - 1)


def _directions(table: pd.DataFrame, higher_is_better: bool | Mapping[str, bool]) -> dict[str, bool]:
    if isinstance(higher_is_better, bool):
        return {column: higher_is_better for column in table.columns}
    missing = [column for column in table.columns if column not in higher_is_better]
    if missing:
        raise ValueError(f"higher_is_better has no direction for columns {missing}; add them to the mapping")
    return {column: bool(higher_is_better[column]) for column in table.columns}


def _check_table(table: pd.DataFrame) -> None:
    if table.empty:
        raise ValueError("results table is empty; it needs at least one method row and one metric column")
    if not table.index.is_unique:
        raise ValueError(f"method names must be unique, got {list(table.index)}")
    values = table.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        bad = table.columns[~np.isfinite(values).all(axis=0)].tolist()
        raise ValueError(f"results table has missing or non-finite values in columns {bad}")


def average_ranks(table: pd.DataFrame, higher_is_better: bool | Mapping[str, bool] = True) -> pd.Series:
    """Return each row's mean rank over the columns (1 = best, ties get the mean of their ranks)."""
    _check_table(table)
    directions = _directions(table, higher_is_better)
    ranks = pd.DataFrame(
        {column: table[column].rank(method="average", ascending=not directions[column]) for column in table.columns}
    )
    return ranks.mean(axis=1).rename(AVG_RANK)


def summary_table(
    table: pd.DataFrame, base: str, higher_is_better: bool | Mapping[str, bool] = True
) -> pd.DataFrame:
    """Append ``"Avg Impr. (%)"`` (relative to row ``base``, x100) and ``"Avg Rank"`` columns.

    Raises ``ValueError`` when ``base`` is not a row or a metric is lower-is-better, because
    Avg Impr. divides raw values.
    """
    _check_table(table)
    if base not in table.index:
        raise ValueError(f"base row {base!r} not found; rows are {list(table.index)}")
    directions = _directions(table, higher_is_better)
    lower = [column for column, higher in directions.items() if not higher]
    if lower:
        raise ValueError(
            f"Avg Impr. needs metrics where higher is better; columns {lower} are lower-is-better, "
            "so leave them out of this table"
        )

    result = table.astype(np.float64).copy()
    base_values = table.loc[base].to_numpy(dtype=np.float64)
    result[AVG_IMPR] = [
        100 * avg_improvement(row.to_numpy(dtype=np.float64), base_values) for _, row in table.iterrows()
    ]
    result[AVG_RANK] = average_ranks(table, directions)
    return result


def _summary_directions(table: pd.DataFrame, higher_is_better: bool | Mapping[str, bool]) -> dict[str, bool]:
    metrics = table.drop(columns=[c for c in (AVG_IMPR, AVG_RANK) if c in table.columns])
    directions = _directions(metrics, higher_is_better)
    if AVG_IMPR in table.columns:
        directions[AVG_IMPR] = True
    if AVG_RANK in table.columns:
        directions[AVG_RANK] = False
    return directions


def _best_rows(table: pd.DataFrame, directions: Mapping[str, bool]) -> dict[str, set]:
    best = {}
    for column in table.columns:
        target = table[column].max() if directions[column] else table[column].min()
        best[column] = set(table.index[np.isclose(table[column].to_numpy(dtype=np.float64), target)])
    return best


def format_table(
    table: pd.DataFrame,
    decimals: int = 2,
    bold: str | None = None,
    higher_is_better: bool | Mapping[str, bool] = True,
) -> pd.DataFrame:
    """Format numbers as strings with ``decimals`` places; wrap each column's best value in ``bold % value``.

    ``bold`` is a ``%`` pattern such as ``"**%s**"`` (Markdown) or ``"\\textbf{%s}"`` (LaTeX), or
    ``None``. The summary columns have fixed directions (Avg Impr. higher, Avg Rank lower).
    """
    _check_table(table)
    directions = _summary_directions(table, higher_is_better)
    best = _best_rows(table, directions) if bold else {}
    formatted = pd.DataFrame(index=table.index, columns=table.columns, dtype=object)
    for column in table.columns:
        for row in table.index:
            text = f"{table.at[row, column]:.{decimals}f}"
            formatted.at[row, column] = bold % text if bold and row in best[column] else text
    return formatted


def _write_text(path: str | Path, text: str) -> Path:
    path = write_text_atomic(path, text)
    logger.info("wrote %s", path)
    return path


def write_csv(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the table as UTF-8 CSV with full float precision, atomically."""
    _check_table(table)
    return _write_text(path, table.to_csv(index_label=table.index.name or "method"))


def write_markdown(
    table: pd.DataFrame,
    path: str | Path,
    decimals: int = 2,
    bold_best: bool = True,
    higher_is_better: bool | Mapping[str, bool] = True,
) -> Path:
    """Write a GitHub Markdown table (via ``DataFrame.to_markdown``), best values in bold."""
    return _write_text(path, markdown_table(table, decimals, bold_best, higher_is_better) + "\n")


def markdown_table(
    table: pd.DataFrame,
    decimals: int = 2,
    bold_best: bool = True,
    higher_is_better: bool | Mapping[str, bool] = True,
) -> str:
    """Return the table as GitHub Markdown, numbers with ``decimals`` places, best values in bold."""
    formatted = format_table(table, decimals, "**%s**" if bold_best else None, higher_is_better)
    formatted.index.name = table.index.name or "method"
    return formatted.to_markdown(colalign=("left",) + ("right",) * len(formatted.columns))


def results_document(title: str, preamble: str, sections: Mapping[str, str]) -> str:
    """Join a Markdown document: ``# title``, the preamble, then one ``## heading`` and body per section."""
    parts = [f"# {title}", preamble.strip()]
    for heading, body in sections.items():
        parts += [f"## {heading}", body.strip()]
    return "\n\n".join(parts) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters in a label."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def write_latex(
    table: pd.DataFrame,
    path: str | Path,
    decimals: int = 2,
    bold_best: bool = True,
    higher_is_better: bool | Mapping[str, bool] = True,
    caption: str | None = None,
    label: str | None = None,
) -> Path:
    """Write a booktabs LaTeX ``tabular`` (via ``DataFrame.to_latex``), best values in ``\\textbf``.

    Row and column labels are escaped. ``caption`` and ``label``, when given, wrap the tabular
    in a ``table`` environment.
    """
    formatted = format_table(table, decimals, r"\textbf{%s}" if bold_best else None, higher_is_better)
    formatted.index = [latex_escape(name) for name in formatted.index]
    formatted.columns = [latex_escape(name) for name in formatted.columns]
    formatted.index.name = latex_escape(table.index.name or "Method")
    text = formatted.reset_index().to_latex(
        index=False,
        escape=False,
        column_format="l" + "r" * len(formatted.columns),
        caption=caption,
        label=label,
        position="t" if caption or label else None,
    )
    return _write_text(path, text)


def write_tables(
    table: pd.DataFrame,
    stem: str | Path,
    decimals: int = 2,
    higher_is_better: bool | Mapping[str, bool] = True,
    caption: str | None = None,
) -> dict[str, Path]:
    """Write ``stem.csv``, ``stem.md`` and ``stem.tex``; return ``{"csv", "md", "tex"}`` paths."""
    stem = Path(stem)
    return {
        "csv": write_csv(table, stem.with_suffix(".csv")),
        "md": write_markdown(table, stem.with_suffix(".md"), decimals, True, higher_is_better),
        "tex": write_latex(table, stem.with_suffix(".tex"), decimals, True, higher_is_better, caption),
    }


def published_qwen2_table() -> pd.DataFrame:
    """Return the published Qwen2-7B-Instruct rows (MedQA acc, CMExam acc in %), for checks and plots.

    Source: Fu, Wu et al., "Training-free LLM Merging for Multi-task Learning" (ACL 2025).
    """
    rows = {
        "Base": (51.41, 74.62),
        "English specialist": (59.14, 83.78),
        "Mixed-data fine-tuning": (60.08, 88.22),
        "Task Arithmetic": (59.53, 88.77),
        "TIES": (59.06, 88.78),
        "DARE": (58.67, 88.69),
        "Hi-Merging": (60.16, 89.07),
    }
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["MedQA acc", "CMExam acc"])
    table.index.name = "Method"
    return table


"""Figures for the study: one seaborn style, a CJK font, PNG and PDF output.

Every plotting function takes plain tables (pandas DataFrames or mappings) read from run
outputs and returns a matplotlib ``Figure``; ``save_figure`` writes it. Nothing here
computes results.

The radar chart normalises each data set's scores linearly so that the base model maps
to 20 and the better of the source models (the specialists) maps to 80:
``normalised = 20 + 60 * (score - base) / (best_source - base)``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import font_manager

logger = logging.getLogger(__name__)

# Noto Sans CJK SC (SIL Open Font License 1.1), shipped in the mplfonts wheel.
CJK_FONT_PACKAGE = "mplfonts"
CJK_FONT_FILE = "fonts/NotoSansCJKsc-Regular.otf"
PALETTE = "colorblind"


def cjk_font_path() -> Path | None:
    """Return the path of the packaged CJK font, or ``None`` when its package is not installed."""
    spec = importlib.util.find_spec(CJK_FONT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / CJK_FONT_FILE
    return path if path.is_file() else None


def set_style() -> str | None:
    """Apply the study's seaborn style and register the CJK font; return the font's family name.

    Without the font package, Chinese labels fall back to matplotlib's default font and a
    warning names the package to install.
    """
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 120, "savefig.dpi": 200, "savefig.bbox": "tight", "pdf.fonttype": 42})
    path = cjk_font_path()
    if path is None:
        logger.warning("CJK font not found; install %s (make setup does) to render Chinese labels", CJK_FONT_PACKAGE)
        return None
    font_manager.fontManager.addfont(str(path))
    family = font_manager.FontProperties(fname=str(path)).get_name()
    plt.rcParams["font.sans-serif"] = [family, *plt.rcParams["font.sans-serif"]]
    plt.rcParams["axes.unicode_minus"] = False
    return family


def save_figure(figure: plt.Figure, folder: str | Path, stem: str, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``figure`` as ``folder/stem.<format>`` for each format, each through a temporary file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for extension in formats:
        target = folder / f"{stem}.{extension}"
        temporary = folder / f".{stem}.tmp.{extension}"
        # PDF and PNG metadata carry a creation date or software version by default.
        # Dropping them keeps reruns byte-identical.
        metadata = {"pdf": {"CreationDate": None}, "png": {"Software": None}}.get(extension)
        figure.savefig(temporary, format=extension, metadata=metadata)
        os.replace(temporary, target)
        written.append(target)
    return written


def grid_heatmap(scores: pd.DataFrame, title: str, baseline: float | None = None, fmt: str = ".3g") -> plt.Figure:
    """Plot a p x s score grid: rows are densities p, columns are scales s.

    With ``baseline`` (the base model's score) the colour map is centred on it, so cells
    that beat the base read as warm.
    """
    figure, axis = plt.subplots(figsize=(6.4, 5.2))
    sns.heatmap(
        scores.sort_index(ascending=False), annot=True, fmt=fmt, cmap="RdBu_r", center=baseline,
        cbar_kws={"label": "validation score"}, ax=axis, annot_kws={"fontsize": 7},
    )
    axis.set_xlabel("scale s")
    axis.set_ylabel("density p")
    axis.set_title(title)
    return figure


def layer_profile(values: pd.DataFrame, title: str, ylabel: str) -> plt.Figure:
    """Plot per-layer values, one line per column, with a zero line (contribution or conflict)."""
    figure, axis = plt.subplots(figsize=(7.5, 3.4))
    for column in values.columns:
        axis.plot(values.index, values[column], marker="o", markersize=3, label=str(column))
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("decoder layer")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(frameon=False, fontsize=8)
    return figure


def quantity_curves(scores: pd.DataFrame, title: str, ylabel: str) -> plt.Figure:
    """Plot score against training-data fraction, one line per method (columns), index = fraction."""
    figure, axis = plt.subplots(figsize=(5.0, 3.6))
    for column in scores.columns:
        axis.plot(scores.index * 100, scores[column], marker="o", label=str(column))
    axis.set_xlabel("training data used (%)")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(frameon=False, fontsize=8)
    return figure


def radar_normalise(
    scores: pd.DataFrame, base: str, sources: Sequence[str], skip_undefined: bool = False
) -> pd.DataFrame:
    """Map each column (data set metric) linearly so ``base`` scores 20 and the best source model 80.

    ``scores`` has one row per model. Metrics where lower is better must be negated first.
    A column where the best source model scores the same as the base has no mapping: it
    raises ``ValueError``, or with ``skip_undefined`` it is left out with a warning.
    """
    missing = [name for name in [base, *sources] if name not in scores.index]
    if missing:
        raise ValueError(f"radar_normalise: models {missing} are not rows of the score table {list(scores.index)}")
    normalised = {}
    for column in scores.columns:
        base_score = scores.loc[base, column]
        best_source = scores.loc[list(sources), column].max()
        if math.isclose(best_source, base_score) and skip_undefined:
            logger.warning("radar chart without %r: the best source model scores %s, equal to the base", column, best_source)
            continue
        if math.isclose(best_source, base_score):
            raise ValueError(
                f"radar_normalise: for {column!r} the best source model scores {best_source}, equal to the base; "
                "drop the column or choose other source models"
            )
        normalised[column] = 20 + 60 * (scores[column] - base_score) / (best_source - base_score)
    return pd.DataFrame(normalised, index=scores.index)


def radar_chart(normalised: pd.DataFrame, title: str) -> plt.Figure:
    """Plot one polygon per model (row) over the data-set axes (columns).

    The radius runs from 0 to 100, or further when a value exceeds 100. A value below 0 (a
    model worse than the base by more than a third of the base-to-best gap) is drawn at 0.
    """
    labels = list(normalised.columns)
    if len(labels) < 3:
        logger.warning("radar chart with %d axes %s; three or more make a readable polygon", len(labels), labels)
    angles = np.linspace(0, 2 * np.pi, len(labels), endpoint=False).tolist()
    figure, axis = plt.subplots(figsize=(5.4, 5.4), subplot_kw={"polar": True})
    axis.set_ylim(0, max(100.0, float(np.nanmax(normalised.to_numpy(dtype=float), initial=0.0))))
    for model, row in normalised.iterrows():
        values = np.clip(row.to_numpy(dtype=float), 0.0, None).tolist()
        axis.plot(angles + angles[:1], values + values[:1], label=str(model))
        axis.fill(angles + angles[:1], values + values[:1], alpha=0.08)
    axis.set_xticks(angles)
    axis.set_xticklabels(labels)
    axis.set_title(title)
    axis.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), frameon=False, fontsize=8)
    return figure


def table_figure(table: pd.DataFrame, title: str, decimals: int = 2) -> plt.Figure:
    """Render a results table (rows are models) as a figure, numbers with ``decimals`` places."""
    cells = [[f"{value:.{decimals}f}" for value in row] for row in table.to_numpy(dtype=float)]
    height = 0.6 + 0.28 * (len(table) + 1)
    width = 2.2 + 1.25 * len(table.columns)
    figure, axis = plt.subplots(figsize=(width, height))
    axis.axis("off")
    drawn = axis.table(cellText=cells, rowLabels=[str(i) for i in table.index],
                       colLabels=[str(c).replace(" ", "\n", 1) for c in table.columns], loc="center", cellLoc="right")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(7)
    drawn.scale(1.0, 1.5)
    axis.set_title(title)
    return figure


def scores_by_model(records: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Turn ``{model: {metric: value}}`` into a DataFrame with models as rows, in the given order."""
    return pd.DataFrame.from_dict(records, orient="index")

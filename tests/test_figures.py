import hashlib

import numpy as np
import pandas as pd
import pytest
from matplotlib import font_manager

from hm_utils import figures


def test_radar_normalise_maps_base_and_best():
    scores = pd.DataFrame(
        {"MedQA": [51.41, 59.14, 55.0, 60.16], "CMExam": [74.62, 80.0, 83.78, 89.07]},
        index=["base", "en", "zh", "hi-merging"],
    )
    normalised = figures.radar_normalise(scores, base="base", sources=["en", "zh"])
    assert normalised.loc["base", "MedQA"] == pytest.approx(20.0)
    assert normalised.loc["en", "MedQA"] == pytest.approx(80.0)
    assert normalised.loc["zh", "CMExam"] == pytest.approx(80.0)
    expected = 20 + 60 * (60.16 - 51.41) / (59.14 - 51.41)
    assert normalised.loc["hi-merging", "MedQA"] == pytest.approx(expected)


def test_radar_normalise_rejects_flat_column():
    scores = pd.DataFrame({"a": [1.0, 1.0]}, index=["base", "en"])
    with pytest.raises(ValueError, match="equal to the base"):
        figures.radar_normalise(scores, base="base", sources=["en"])


def test_radar_normalise_rejects_unknown_model():
    scores = pd.DataFrame({"a": [1.0, 2.0]}, index=["base", "en"])
    with pytest.raises(ValueError, match=r"models \['zh'\]"):
        figures.radar_normalise(scores, base="base", sources=["en", "zh"])


def test_cjk_font_registered():
    family = figures.set_style()
    assert family is not None
    path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    assert path.endswith("NotoSansCJKsc-Regular.otf")


def test_save_figure_is_deterministic(tmp_path):
    figures.set_style()
    grid = pd.DataFrame(np.arange(9, dtype=float).reshape(3, 3), index=[0.2, 0.6, 1.0], columns=[0.2, 0.6, 1.0])
    digests = []
    for folder in ("a", "b"):
        figure = figures.grid_heatmap(grid, "中文标题 p × s", baseline=4.0)
        written = figures.save_figure(figure, tmp_path / folder, "heatmap")
        assert [path.suffix for path in written] == [".png", ".pdf"]
        digests.append([hashlib.sha256(path.read_bytes()).hexdigest() for path in written])
    assert digests[0] == digests[1]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["heatmap.pdf", "heatmap.png"]


def test_radar_normalise_skips_flat_column():
    scores = pd.DataFrame({"flat": [1.0, 1.0, 3.0], "kept": [1.0, 2.0, 1.5]}, index=["base", "en", "merge"])
    normalised = figures.radar_normalise(scores, base="base", sources=["en"], skip_undefined=True)
    assert list(normalised.columns) == ["kept"]
    assert normalised.loc["merge", "kept"] == pytest.approx(50.0)


def test_table_figure_shows_every_cell(tmp_path):
    figures.set_style()
    table = pd.DataFrame({"cmekg_mcq_zh acc": [25.0, 31.5], "Avg Rank": [2.0, 1.0]}, index=["base", "Hi-Merging"])
    figure = figures.table_figure(table, "结果")
    texts = {cell.get_text().get_text() for cell in figure.axes[0].tables[0].get_celld().values()}
    assert {"25.00", "31.50", "2.00", "1.00", "base", "Hi-Merging"} <= texts


def test_quantity_curves_axis_in_percent():
    scores = pd.DataFrame({"specialist": [1.0, 2.0], "Hi-Merging": [1.5, 2.5]}, index=[0.2, 1.0])
    figure = figures.quantity_curves(scores, "defs", "rouge-l")
    lines = figure.axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[20.0, 100.0], [20.0, 100.0]]
    assert [line.get_label() for line in lines] == ["specialist", "Hi-Merging"]


def test_radar_chart_clips_below_zero():
    normalised = pd.DataFrame({"a": [20.0, -40.0], "b": [20.0, 80.0], "c": [20.0, 130.0]}, index=["base", "merge"])
    figure = figures.radar_chart(normalised, "radar")
    axis = figure.axes[0]
    merge_line = [line for line in axis.get_lines() if line.get_label() == "merge"][0]
    assert list(merge_line.get_ydata()) == [0.0, 80.0, 130.0, 0.0]
    assert axis.get_ylim() == (0.0, 130.0)

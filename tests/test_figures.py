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

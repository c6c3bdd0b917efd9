import math

import pandas as pd
import pytest

from hm_utils.tables import (
    AVG_IMPR,
    AVG_RANK,
    average_ranks,
    avg_improvement,
    build_table,
    latex_escape,
    markdown_table,
    published_qwen2_table,
    results_document,
    summary_table,
    write_csv,
    write_latex,
    write_markdown,
    write_tables,
)

# Published Avg Impr. by hand: (MedQA + CMExam) / (51.41 + 74.62) - 1, in %.
EXPECTED_AVG_IMPR = {
    "Base": 0.0,
    "English specialist": ((59.14 + 83.78) / (51.41 + 74.62) - 1) * 100,  # 13.40
    "Mixed-data fine-tuning": ((60.08 + 88.22) / (51.41 + 74.62) - 1) * 100,  # 17.67
    "Task Arithmetic": ((59.53 + 88.77) / (51.41 + 74.62) - 1) * 100,  # 17.67
    "TIES": ((59.06 + 88.78) / (51.41 + 74.62) - 1) * 100,  # 17.31
    "DARE": ((58.67 + 88.69) / (51.41 + 74.62) - 1) * 100,  # 16.92
    "Hi-Merging": ((60.16 + 89.07) / (51.41 + 74.62) - 1) * 100,  # 18.41
}
EXPECTED_ROUNDED = {
    "Base": 0.00,
    "English specialist": 13.40,
    "Mixed-data fine-tuning": 17.67,
    "Task Arithmetic": 17.67,
    "TIES": 17.31,
    "DARE": 16.92,
    "Hi-Merging": 18.41,
}
# Ranks by hand. MedQA: Hi 1, Mixed 2, TA 3, Spec 4, TIES 5, DARE 6, Base 7.
# CMExam: Hi 1, TIES 2, TA 3, DARE 4, Mixed 5, Spec 6, Base 7.
EXPECTED_RANK = {
    "Base": 7.0,
    "English specialist": 5.0,
    "Mixed-data fine-tuning": 3.5,
    "Task Arithmetic": 3.0,
    "TIES": 3.5,
    "DARE": 5.0,
    "Hi-Merging": 1.0,
}


@pytest.fixture
def published():
    return published_qwen2_table()


def test_avg_improvement_specialist():
    value = avg_improvement([59.14, 83.78], [51.41, 74.62])
    assert value == pytest.approx(142.92 / 126.03 - 1, abs=1e-12)


def test_avg_improvement_base_is_zero():
    assert avg_improvement([51.41, 74.62], [51.41, 74.62]) == 0.0


def test_avg_improvement_ratio_of_means():
    # A mean of ratios would give (2/1 + 1/3) / 2 - 1 = 0.1667; the ratio of means gives 3/4 - 1.
    assert avg_improvement([2.0, 1.0], [1.0, 3.0]) == pytest.approx(-0.25)


def test_avg_improvement_length_mismatch():
    with pytest.raises(ValueError, match="same non-zero number"):
        avg_improvement([1.0, 2.0], [1.0])


def test_avg_improvement_nan():
    with pytest.raises(ValueError, match="finite"):
        avg_improvement([math.nan, 2.0], [1.0, 1.0])


def test_avg_improvement_zero_base():
    with pytest.raises(ValueError, match="positive mean"):
        avg_improvement([1.0], [0.0])


@pytest.mark.parametrize("method", list(EXPECTED_AVG_IMPR))
def test_published_avg_impr(published, method):
    summary = summary_table(published, base="Base")
    assert summary.at[method, AVG_IMPR] == pytest.approx(EXPECTED_AVG_IMPR[method], abs=1e-9)
    assert round(summary.at[method, AVG_IMPR], 2) == EXPECTED_ROUNDED[method]


@pytest.mark.parametrize("method", list(EXPECTED_RANK))
def test_published_avg_rank(published, method):
    assert summary_table(published, base="Base").at[method, AVG_RANK] == EXPECTED_RANK[method]


def test_summary_keeps_metric_columns(published):
    summary = summary_table(published, base="Base")
    assert list(summary.columns) == ["MedQA acc", "CMExam acc", AVG_IMPR, AVG_RANK]
    assert summary.at["TIES", "CMExam acc"] == 88.78


def test_average_ranks_ties():
    table = pd.DataFrame({"m1": [80.0, 80.0, 70.0], "m2": [1.0, 2.0, 2.0]}, index=["a", "b", "c"])
    ranks = average_ranks(table)
    # m1: a and b tie for ranks 1-2 -> 1.5 each, c 3. m2: b and c tie for 1-2 -> 1.5, a 3.
    assert ranks["a"] == pytest.approx((1.5 + 3.0) / 2)
    assert ranks["b"] == pytest.approx((1.5 + 1.5) / 2)
    assert ranks["c"] == pytest.approx((3.0 + 1.5) / 2)


def test_average_ranks_lower_is_better():
    table = pd.DataFrame({"acc": [50.0, 60.0], "nll": [1.0, 2.0]}, index=["a", "b"])
    ranks = average_ranks(table, higher_is_better={"acc": True, "nll": False})
    assert ranks["a"] == 1.5
    assert ranks["b"] == 1.5


def test_average_ranks_missing_direction():
    table = pd.DataFrame({"acc": [50.0], "nll": [1.0]}, index=["a"])
    with pytest.raises(ValueError, match="nll"):
        average_ranks(table, higher_is_better={"acc": True})


def test_summary_missing_base(published):
    with pytest.raises(ValueError, match="'base'"):
        summary_table(published, base="base")


def test_summary_rejects_lower_is_better():
    table = pd.DataFrame({"acc": [50.0, 60.0], "nll": [1.0, 2.0]}, index=["base", "m"])
    with pytest.raises(ValueError, match="nll"):
        summary_table(table, base="base", higher_is_better={"acc": True, "nll": False})


def test_summary_rejects_nan():
    table = pd.DataFrame({"acc": [50.0, math.nan]}, index=["base", "m"])
    with pytest.raises(ValueError, match="non-finite"):
        summary_table(table, base="base")


def test_build_table_from_metrics():
    results = {"base": {"acc_generate": 30.0, "rouge-l": 12.8}, "merged": {"acc_generate": 35.0, "rouge-l": 20.6}}
    table = build_table(results, {"acc_generate": "MCQ acc", "rouge-l": "QA ROUGE-L"})
    assert list(table.columns) == ["MCQ acc", "QA ROUGE-L"]
    assert table.at["merged", "QA ROUGE-L"] == 20.6


def test_build_table_missing_metric():
    with pytest.raises(KeyError, match="merged"):
        build_table({"base": {"a": 1.0}, "merged": {"b": 2.0}}, ["a"])


def test_write_csv_round_trip(published, tmp_path):
    summary = summary_table(published, base="Base")
    path = write_csv(summary, tmp_path / "t.csv")
    loaded = pd.read_csv(path, index_col=0)
    assert list(loaded.index) == list(summary.index)
    assert loaded.at["Hi-Merging", AVG_IMPR] == pytest.approx(summary.at["Hi-Merging", AVG_IMPR], abs=1e-12)


def test_write_markdown_bold_best(published, tmp_path):
    text = write_markdown(summary_table(published, base="Base"), tmp_path / "t.md").read_text(encoding="utf-8")
    hi_merging = next(line for line in text.splitlines() if line.startswith("| Hi-Merging"))
    assert "**60.16**" in hi_merging
    assert "**18.41**" in hi_merging
    assert "**1.00**" in hi_merging
    assert "| Base" in text
    assert "**51.41**" not in text


def test_write_latex_content(published, tmp_path):
    path = write_latex(summary_table(published, base="Base"), tmp_path / "t.tex", caption="Main", label="tab:main")
    text = path.read_text(encoding="utf-8")
    assert r"\textbf{89.07}" in text
    assert r"Avg Impr. (\%)" in text
    assert r"English specialist & 59.14 & 83.78 & 13.40 & 5.00 \\" in text
    assert r"\caption{Main}" in text
    assert r"\toprule" in text


def test_latex_escape():
    assert latex_escape("task_arith 50%") == r"task\_arith 50\%"


def test_write_tables_all_formats(published, tmp_path):
    paths = write_tables(summary_table(published, base="Base"), tmp_path / "main")
    assert sorted(paths) == ["csv", "md", "tex"]
    assert all(p.is_file() for p in paths.values())
    assert paths["md"].name == "main.md"


def test_markdown_table_matches_file(published, tmp_path):
    path = write_markdown(published, tmp_path / "table.md")
    assert path.read_text(encoding="utf-8") == markdown_table(published) + "\n"


def test_results_document_sections():
    text = results_document("Results", "Scale: 中文 tasks.", {"Table": "| a |\n| - |", "Notes": "none"})
    assert text == "# Results\n\nScale: 中文 tasks.\n\n## Table\n\n| a |\n| - |\n\n## Notes\n\nnone\n"

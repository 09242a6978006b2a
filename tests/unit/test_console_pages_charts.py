"""The console's server-side SVG charts: well-formed SVG that a screen reader can read (role,
title, description, axis labels, values as text), styled by classes only (the CSP forbids inline
styles), with every label escaped however hostile."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable

import pytest
from markupsafe import Markup

from appliance.console.charts import (
    SERIES_SHOWN,
    Series,
    bar_chart,
    line_chart,
    money,
    nice_max,
    top_series,
)

SVG = "{http://www.w3.org/2000/svg}"
DAYS = ["2026-12-01", "2026-12-02", "2026-12-03"]
HOSTILE = "</title><script>alert(1)</script>\"'&"


def _parse(markup: str) -> ET.Element:
    return ET.fromstring(str(markup))  # raises on anything not well-formed


def _texts(root: ET.Element, cls: str) -> list[str]:
    return [
        "".join(t.itertext())
        for t in root.iter(f"{SVG}text")
        if cls in (t.get("class") or "").split()
    ]


def test_a_bar_chart_is_labelled_for_a_screen_reader() -> None:
    series = [Series("alpha", (10, 0, 1234)), Series("beta", (5, 0, 0))]
    root = _parse(bar_chart("tokens", "Tokens per day", DAYS, series, "tokens"))
    assert root.get("role") == "img"
    assert root.get("aria-labelledby") == "tokens-title tokens-desc"
    assert root.find(f"{SVG}title").text == "Tokens per day"
    desc = root.find(f"{SVG}desc").text
    assert "1,249 tokens in all" in desc and "1,234 tokens, on 2026-12-03" in desc
    labels = _texts(root, "chart-label")
    assert "day (UTC)" in labels and "tokens" in labels
    # Each day's total as text above its bar; a day with nothing has no value.
    assert _texts(root, "chart-value") == ["15", "1,234"]
    tooltips = [
        r.find(f"{SVG}title").text
        for r in root.iter(f"{SVG}rect")
        if r.find(f"{SVG}title") is not None
    ]
    assert "alpha, 2026-12-03: 1,234 tokens" in tooltips
    assert _texts(root, "chart-legend") == ["alpha", "beta"]


def test_charts_use_classes_never_inline_styles() -> None:
    series = [Series("a", (1, 2, 3))]
    for chart in (bar_chart, line_chart):
        markup = str(chart("c", "t", DAYS, series, "tokens"))
        root = _parse(markup)
        assert all("style" not in el.attrib for el in root.iter())
        assert "<style" not in markup and "fill=" not in markup


@pytest.mark.parametrize("chart", [bar_chart, line_chart])
def test_hostile_labels_are_escaped(chart: Callable[..., Markup]) -> None:
    markup = str(chart("c", HOSTILE, DAYS, [Series(HOSTILE, (1, 0, 2))], HOSTILE))
    root = _parse(markup)  # still one well-formed document
    assert not list(root.iter(f"{SVG}script")) and "<script" not in markup
    assert root.find(f"{SVG}title").text == HOSTILE
    assert HOSTILE in _texts(root, "chart-legend")
    assert HOSTILE in _texts(root, "chart-label")


def test_many_series_keep_the_largest_and_sum_the_rest() -> None:
    series = [Series(f"k{i:02d}", (float(i), 1.0)) for i in range(12)]
    shown = top_series(series)
    assert len(shown) == SERIES_SHOWN
    assert [s.label for s in shown[:-1]] == ["k11", "k10", "k09", "k08", "k07", "k06"]
    assert shown[-1].label == "other (6)"
    assert shown[-1].values == (0 + 1 + 2 + 3 + 4 + 5, 6.0)
    assert sum(s.total for s in shown) == sum(s.total for s in series)  # nothing lost


def test_bad_values_draw_as_zero_and_an_empty_chart_says_so() -> None:
    root = _parse(bar_chart("c", "t", DAYS, [Series("a", (math.nan, -5, math.inf))], "tokens"))
    assert _texts(root, "chart-value") == []
    assert _texts(root, "chart-empty") == ["no usage in this period"]
    assert "none" in root.find(f"{SVG}desc").text
    root = _parse(line_chart("c", "t", [], [], "tokens"))
    assert "no days" in root.find(f"{SVG}desc").text


def test_a_series_must_have_a_value_per_day() -> None:
    with pytest.raises(ValueError, match="2 values for 3 categories"):
        bar_chart("c", "t", DAYS, [Series("a", (1, 2))], "tokens")


def test_a_line_chart_has_a_line_per_series_and_labels_each_peak() -> None:
    series = [Series("a", (1, 7, 3)), Series("b", (0.5, 0, 0.25))]
    root = _parse(line_chart("cost", "Cost per day", DAYS, series, "cost", money))
    assert len(list(root.iter(f"{SVG}polyline"))) == 2
    assert sorted(_texts(root, "chart-value")) == ["0.5", "7"]
    points = [c.find(f"{SVG}title").text for c in root.iter(f"{SVG}circle")]
    assert "b, 2026-12-03: 0.25 cost" in points and len(points) == 6


@pytest.mark.parametrize(
    ("peak", "top"), [(0, 1), (0.3, 0.5), (1, 1), (7, 10), (1234, 2000), (2400, 2500)]
)
def test_the_y_axis_ends_on_a_round_number(peak: float, top: float) -> None:
    assert nice_max(peak) == pytest.approx(top)

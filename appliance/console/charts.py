"""Server-side SVG charts for the console (no chart library, no script): a stacked bar chart and
a line chart of values per category (a day).

Accessible: each chart is an `<svg role="img">` labelled by its `<title>` and a `<desc>` that
says its range, total and peak in words; both axes are labelled; every non-zero bar and each
line's peak carry their value as text, and each mark its own `<title>` (a tooltip). Colours and
fonts come from CSS classes only (`chart-*`, `series-N`): the console's Content-Security-Policy
forbids inline styles. Every label is escaped (key and agent names are the operator's text).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 760, 300
LEFT, RIGHT, TOP, BOTTOM = 72, 16, 28, 84  # the plot's margins: axis labels, the legend below
SERIES_SHOWN = 7  # more series than this: the smallest are summed as "other"
OTHER = "other"
TICKS = 4  # horizontal grid lines above zero

Format = Callable[[float], str]


def tokens(value: float) -> str:
    return f"{value:,.0f}"


def money(value: float) -> str:
    return f"{value:,.4f}".rstrip("0").rstrip(".") if value else "0"


@dataclass(frozen=True)
class Series:
    label: str
    values: tuple[float, ...]  # one per category

    @property
    def total(self) -> float:
        return sum(self.values)


def clean(value: float) -> float:
    """What is drawn: a finite value, never below zero (a bar cannot go under the axis)."""
    return value if math.isfinite(value) and value > 0 else 0.0


def top_series(series: Sequence[Series], shown: int = SERIES_SHOWN) -> list[Series]:
    """The `shown` largest series by total (ties by label), the rest summed into "other"."""
    ranked = sorted(series, key=lambda s: (-s.total, s.label))
    if len(ranked) <= shown:
        return ranked
    rest = ranked[shown - 1 :]
    summed = tuple(sum(vals) for vals in zip(*(s.values for s in rest), strict=True))
    return [*ranked[: shown - 1], Series(f"{OTHER} ({len(rest)})", summed)]


def nice_max(peak: float) -> float:
    """The y axis' top: 1, 2, 2.5 or 5 times a power of ten, at or above `peak` (1 when 0)."""
    if peak <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(peak))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= peak:
            return step * power
    return 10 * power  # not reached: 10 * power >= peak always


def _num(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


class _Frame:
    """The plot area's geometry for `count` categories and a y axis from 0 to `top`."""

    def __init__(self, count: int, top: float) -> None:
        self.count = max(count, 1)
        self.top = top
        self.plot_w = WIDTH - LEFT - RIGHT
        self.plot_h = HEIGHT - TOP - BOTTOM
        self.slot = self.plot_w / self.count

    def x(self, index: int) -> float:
        """The centre of category `index`."""
        return LEFT + self.slot * (index + 0.5)

    def y(self, value: float) -> float:
        return TOP + self.plot_h * (1 - clean(value) / self.top)


def _axes(frame: _Frame, categories: Sequence[str], unit: str, fmt: Format) -> list[str]:
    base = TOP + frame.plot_h
    parts = []
    for i in range(TICKS + 1):
        value = frame.top * i / TICKS
        y = _num(frame.y(value))
        parts.append(
            f'<line class="chart-grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y}" y2="{y}"/>'
            f'<text class="chart-tick chart-tick-y" x="{LEFT - 6}" y="{y}">'
            f"{escape(fmt(value))}</text>"
        )
    every = max(1, math.ceil(len(categories) / 10))  # at most ~10 labels along the x axis
    for i, name in enumerate(categories):
        last = i == len(categories) - 1 and i % every >= (every + 1) // 2  # not on the one before
        if i % every == 0 or last:
            parts.append(
                f'<text class="chart-tick chart-tick-x" x="{_num(frame.x(i))}" y="{base + 16}">'
                f"{escape(name[5:] if len(name) == 10 else name)}</text>"  # 2026-12-08 -> 12-08
            )
    parts.append(
        f'<line class="chart-axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{base}" y2="{base}"/>'
        f'<line class="chart-axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{base}"/>'
        f'<text class="chart-label chart-label-x" x="{LEFT + frame.plot_w / 2:.1f}" '
        f'y="{base + 34}">day (UTC)</text>'
        f'<text class="chart-label chart-label-y" x="14" y="{TOP + frame.plot_h / 2:.1f}" '
        f'transform="rotate(-90 14 {TOP + frame.plot_h / 2:.1f})">{escape(unit)}</text>'
    )
    return parts


def _legend(series: Sequence[Series]) -> list[str]:
    parts = []
    y = HEIGHT - 22
    x = float(LEFT)
    step = (WIDTH - LEFT - RIGHT) / max(len(series), 1)
    for i, s in enumerate(series):
        label = s.label if len(s.label) <= 40 else s.label[:39] + "…"
        parts.append(
            f'<rect class="chart-swatch series-{i}" x="{x:.1f}" y="{y - 9}" width="10" '
            f'height="10"/><text class="chart-legend" x="{x + 14:.1f}" y="{y}">'
            f"{escape(label)}</text>"
        )
        x += step
    return parts


def _describe(
    title: str, categories: Sequence[str], series: Sequence[Series], unit: str, fmt: Format
) -> str:
    totals = [sum(clean(s.values[i]) for s in series) for i in range(len(categories))]
    if not categories:
        return f"{title}: no days to show."
    span = f"from {categories[0]} to {categories[-1]}"
    if not any(totals):
        return f"{title} {span}: none."
    peak = max(range(len(totals)), key=lambda i: totals[i])
    return (
        f"{title} {span}: {fmt(sum(totals))} {unit} in all; the most, "
        f"{fmt(totals[peak])} {unit}, on {categories[peak]}; "
        f"{len(series)} series: {', '.join(s.label for s in series)}."
    )


def _svg(chart_id: str, title: str, desc: str, body: list[str], empty: bool) -> Markup:
    ident = escape(chart_id)
    note = (
        f'<text class="chart-empty" x="{WIDTH / 2:.0f}" y="{TOP + 40}">no usage in this period'
        "</text>"
        if empty
        else ""
    )
    return Markup(
        f'<svg class="chart" id="{ident}" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'aria-labelledby="{ident}-title {ident}-desc" xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{ident}-title">{escape(title)}</title>'
        f'<desc id="{ident}-desc">{escape(desc)}</desc>{"".join(body)}{note}</svg>'
    )


def _checked(categories: Sequence[str], series: Sequence[Series]) -> None:
    for s in series:
        if len(s.values) != len(categories):
            raise ValueError(
                f"series {s.label!r} has {len(s.values)} values for {len(categories)} categories"
            )


def bar_chart(
    chart_id: str,
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    unit: str,
    fmt: Format = tokens,
) -> Markup:
    """Stacked bars, one per category, a segment per series; each bar's total above it."""
    _checked(categories, series)
    shown = top_series(series)
    totals = [sum(clean(s.values[i]) for s in shown) for i in range(len(categories))]
    frame = _Frame(len(categories), nice_max(max(totals, default=0.0)))
    body = _axes(frame, categories, unit, fmt)
    bar_w = max(frame.slot * 0.7, 1.0)
    for i, day in enumerate(categories):
        below = 0.0
        x = frame.x(i) - bar_w / 2
        for n, s in enumerate(shown):
            value = clean(s.values[i])
            if not value:
                continue
            y_top, y_bottom = frame.y(below + value), frame.y(below)
            body.append(
                f'<rect class="chart-bar series-{n}" x="{x:.1f}" y="{y_top:.1f}" '
                f'width="{bar_w:.1f}" height="{max(y_bottom - y_top, 0.5):.1f}"><title>'
                f"{escape(s.label)}, {escape(day)}: {escape(fmt(value))} {escape(unit)}"
                "</title></rect>"
            )
            below += value
        if totals[i]:
            body.append(
                f'<text class="chart-value" x="{frame.x(i):.1f}" y="{frame.y(totals[i]) - 4:.1f}">'
                f"{escape(fmt(totals[i]))}</text>"
            )
    body += _legend(shown)
    desc = _describe(title, categories, shown, unit, fmt)
    return _svg(chart_id, title, desc, body, empty=not any(totals))


def line_chart(
    chart_id: str,
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    unit: str,
    fmt: Format = tokens,
) -> Markup:
    """A line per series, a point per category (with its value as a tooltip), each line's
    peak labelled with its value."""
    _checked(categories, series)
    shown = top_series(series)
    peak = max((clean(v) for s in shown for v in s.values), default=0.0)
    frame = _Frame(len(categories), nice_max(peak))
    body = _axes(frame, categories, unit, fmt)
    for n, s in enumerate(shown):
        points = [(frame.x(i), frame.y(v)) for i, v in enumerate(s.values)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        body.append(f'<polyline class="chart-line series-{n}" points="{coords}"/>')
        for i, (x, y) in enumerate(points):
            body.append(
                f'<circle class="chart-point series-{n}" cx="{x:.1f}" cy="{y:.1f}" r="2.5">'
                f"<title>{escape(s.label)}, {escape(categories[i])}: "
                f"{escape(fmt(clean(s.values[i])))} {escape(unit)}</title></circle>"
            )
        if s.values and any(clean(v) for v in s.values):
            top = max(range(len(s.values)), key=lambda i: clean(s.values[i]))
            x, y = points[top]
            body.append(
                f'<text class="chart-value" x="{x:.1f}" y="{y - 6:.1f}">'
                f"{escape(fmt(clean(s.values[top])))}</text>"
            )
    body += _legend(shown)
    desc = _describe(title, categories, shown, unit, fmt)
    return _svg(chart_id, title, desc, body, empty=peak == 0)

"""Two small charts, drawn server-side as SVG by hand (no charting library, no script):
edits committed and reverted per day, and locality over time.

Everything written into the SVG is a number or a date we format ourselves, and it still
goes through `markupsafe.escape`: the result is inserted into the page as markup.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from markupsafe import Markup, escape

if TYPE_CHECKING:
    from kmd.daemon.surface import Records

WIDTH, HEIGHT = 640, 190
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 14, 30
COMMITTED, REVERTED, LINE, THRESHOLD, GRID, INK = "#2e7d32", "#c62828", "#1565c0", "#ef6c00", "#e0e0e0", "#424242"
MIN_DAYS, MAX_DAYS = 7, 30  # at least a week, so one busy day has context
MAX_POINTS = 300


@dataclass(frozen=True)
class Activity:
    days: list[date]
    committed: list[int]
    reverted: list[int]
    locality: list[tuple[datetime, float]]  # (when, loc measured then), oldest first
    min_loc: float | None


def _utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def activity(ledger: Records, *, min_loc: float | None = None, today: date | None = None) -> Activity:
    """Per-day counts from the edit events; locality from each commit's probes and each revert's after-figures."""
    committed: Counter[date] = Counter()
    reverted: Counter[date] = Counter()
    points: list[tuple[datetime, float]] = []
    for event in ledger.events(entity="edit"):
        when = _utc(event.ts)
        if event.kind == "edit.committed":
            committed[when.date()] += 1
            loc = (event.data.get("probes") or {}).get("loc")
            if isinstance(loc, int | float):
                points.append((when, float(loc)))
        elif event.kind == "edit.reverted":
            reverted[when.date()] += 1
    for revert in ledger.reverts():
        loc = (revert.probes_after or {}).get("loc")
        if isinstance(loc, int | float):
            points.append((_utc(revert.reverted_at), float(loc)))
    points.sort()
    last = today or datetime.now(UTC).date()
    first_seen = min([*committed, *reverted], default=last)
    span = max(MIN_DAYS, min(MAX_DAYS, (last - first_seen).days + 1))
    days = [last - timedelta(days=span - 1 - i) for i in range(span)]
    return Activity(days, [committed[d] for d in days], [reverted[d] for d in days], points[-MAX_POINTS:], min_loc)


def _svg(label: str, body: list[str]) -> Markup:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>')  # fmt: skip
    return Markup(head + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, anchor: str = "middle", size: int = 11, fill: str = INK) -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{fill}" '
            f'font-family="sans-serif">{escape(text)}</text>')  # fmt: skip


def _nice_max(value: int) -> int:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000):
        if value <= step * 4:
            return step * 4
    return value


def per_day_chart(data: Activity) -> Markup:
    """Grouped bars: committed (green) and reverted (red) edits per UTC day."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = _nice_max(max([*data.committed, *data.reverted, 1]))
    body: list[str] = []
    for i in range(5):  # grid and y labels
        value = top * i // 4
        y = TOP + plot_h - plot_h * value / top
        body.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="{GRID}"/>')
        body.append(_text(LEFT - 6, y + 4, str(value), anchor="end"))
    n = len(data.days)
    slot = plot_w / n
    bar = max(1.0, min(14.0, slot * 0.38))
    every = max(1, round(n / 8))  # at most ~8 date labels
    for i, (day, c, r) in enumerate(zip(data.days, data.committed, data.reverted, strict=True)):
        mid = LEFT + slot * (i + 0.5)
        for x, value, colour, what in ((mid - bar, c, COMMITTED, "committed"), (mid, r, REVERTED, "reverted")):
            if value:
                h = plot_h * value / top
                body.append(f'<rect x="{x:.1f}" y="{TOP + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                            f'fill="{colour}"><title>{escape(f"{day.isoformat()}: {value} {what}")}</title></rect>')  # fmt: skip
        if i % every == 0 or i == n - 1:
            body.append(_text(mid, HEIGHT - BOTTOM + 16, day.strftime("%m-%d")))
    body.append(f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" stroke="{INK}"/>')
    body.append(f'<rect x="{WIDTH - RIGHT - 168}" y="2" width="10" height="10" fill="{COMMITTED}"/>')
    body.append(_text(WIDTH - RIGHT - 154, 11, "committed", anchor="start"))
    body.append(f'<rect x="{WIDTH - RIGHT - 84}" y="2" width="10" height="10" fill="{REVERTED}"/>')
    body.append(_text(WIDTH - RIGHT - 70, 11, "reverted", anchor="start"))
    total_c, total_r = sum(data.committed), sum(data.reverted)
    return _svg(f"edits per day over {n} days: {total_c} committed, {total_r} reverted", body)


def locality_chart(data: Activity) -> Markup:
    """Locality measured after each commit and revert, with the policy's threshold dashed."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    points = data.locality
    values = [v for _, v in points] + ([data.min_loc] if data.min_loc is not None else [])
    need = 1.0 - min(values, default=0.9) + 0.005  # room below the lowest value
    step = next((s for s in (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25) if 4 * s >= need), 0.25)  # round ticks
    low = 1.0 - 4 * step
    body: list[str] = []
    for i in range(5):
        value = low + step * i
        y = TOP + plot_h - plot_h * (value - low) / (1.0 - low)
        body.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="{GRID}"/>')
        body.append(_text(LEFT - 6, y + 4, f"{value:.3f}", anchor="end"))

    def y_of(v: float) -> float:
        return TOP + plot_h - plot_h * (v - low) / (1.0 - low)

    if data.min_loc is not None:
        y = y_of(data.min_loc)
        body.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="{THRESHOLD}" '
                    f'stroke-dasharray="5,4"><title>{escape(f"threshold min_loc {data.min_loc}")}</title></line>')  # fmt: skip
    if not points:
        body.append(_text(LEFT + plot_w / 2, TOP + plot_h / 2, "no locality measured yet"))
        return _svg("locality over time: no measurements yet", body)
    t0, t1 = points[0][0].timestamp(), points[-1][0].timestamp()
    span = (t1 - t0) or 1.0

    def x_of(when: datetime) -> float:
        return LEFT + (plot_w * (when.timestamp() - t0) / span if len(points) > 1 else plot_w / 2)

    coords = " ".join(f"{x_of(w):.1f},{y_of(v):.1f}" for w, v in points)
    body.append(f'<polyline points="{coords}" fill="none" stroke="{LINE}" stroke-width="1.5"/>')
    for when, v in points:
        body.append(f'<circle cx="{x_of(when):.1f}" cy="{y_of(v):.1f}" r="2.5" fill="{LINE}">'
                    f'<title>{escape(f"{when:%Y-%m-%d %H:%M} loc {v:.4f}")}</title></circle>')  # fmt: skip
    body.append(_text(LEFT, HEIGHT - BOTTOM + 16, f"{points[0][0]:%m-%d %H:%M}", anchor="start"))
    if len(points) > 1:
        body.append(_text(WIDTH - RIGHT, HEIGHT - BOTTOM + 16, f"{points[-1][0]:%m-%d %H:%M}", anchor="end"))
    last = points[-1][1]
    return _svg(f"locality over time: {len(points)} measurements, latest {last:.4f}", body)


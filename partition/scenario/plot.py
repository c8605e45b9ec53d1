"""The picture of a run, made to be read in a paper: one panel per ping probe (round trips on a
log axis, the p50 and p99 of each 100 ms drawn over the points, lost requests marked), the
stream rates, each instance's state over time, and a zoomed panel on each fault.

Each fault is a shaded band from the moment it fired to the host's detection (orange) and on to
the instance being active again (green). A band carries a short tag (F1, F2, ...) staggered so
that tags never sit on each other; what each tag means (what fired, detected after how long,
recovered after how long) is written in a key beside the panels, with the legend, outside the
data. The format follows the file's extension: ``.png``, ``.svg`` or ``.pdf``.

matplotlib is an optional extra (``pip install -e '.[plot]'``); it is imported only here, only
when a plot is asked for, with the Agg backend (no display needed).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from partition.errors import MKError
from partition.scenario.runner import RunResult

MAX_POINTS = 20_000       # scatter points per probe; more are thinned evenly (lines use all)
MAX_ZOOMS = 4             # zoomed panels, one per fault, at most
STATE_COLORS = {"active": "#3a9d4a", "loaded": "#b0b0b0", "failed": "#d62728",
                "ready": "#e8e8e8", "empty": "#ffffff"}
UNDETECTED, RECOVERING = "#ff9f1c", "#2ca02c"


class PlotUnavailable(MKError):
    """matplotlib is not installed."""


@dataclass
class Band:
    """One fault or action on the timeline: fired, detected, back (seconds from the start)."""
    tag: str
    name: str
    what: str
    fired: float
    detected: float | None
    recovered: float | None
    is_fault: bool

    def describe(self) -> str:
        text = f"{self.tag}  {self.name} ({self.what}) at {self.fired:.3f} s"
        after = []
        if self.detected is not None:
            after.append(f"detected +{(self.detected - self.fired) * 1e3:.1f} ms")
        if self.recovered is not None:
            after.append(f"active again +{(self.recovered - self.fired) * 1e3:.1f} ms")
        elif self.is_fault:
            after.append("not recovered")
        return text + ("\n    " + ", ".join(after) if after else "")


def bands(result: RunResult) -> list[Band]:
    """Every fault and action, with when the host saw the failure it caused and when the
    instance was active again (a takeover counts), from the run's timeline."""
    out: list[Band] = []
    timeline = result.timeline
    for ev in timeline:
        if ev["event"] not in ("fault_fired", "action_fired"):
            continue
        is_fault = ev["event"] == "fault_fired"
        target, fired = ev.get("target"), ev["t"]
        detected = recovered = None
        if is_fault:
            for later in timeline:
                if later["t"] < fired or later.get("name") not in (target, None):
                    continue
                if detected is None and later["event"] in ("failure", "foreign_write"):
                    detected = later["t"]
                elif detected is not None and (
                        later["event"] == "takeover"
                        or (later["event"] == "state_change" and later.get("new") == "active")):
                    recovered = later["t"]
                    break
        out.append(Band(f"{'F' if is_fault else 'A'}{len(out) + 1}", ev.get("name", "?"),
                        str(ev.get("what")), fired, detected, recovered, is_fault))
    return out


def plot(result: RunResult, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed",
                              "pip install -e '.[plot]' (or pip install matplotlib)") from None
    pings = [r for r in result.records.values() if r.kind == "ping"]
    streams = [r for r in result.records.values() if r.kind == "stream"]
    names = [i["name"] for i in result.scenario.instances]
    marks = bands(result)
    zooms = [b for b in marks if b.is_fault][:MAX_ZOOMS] if pings else []
    rows = [3.2] * len(pings) + ([2.4] if streams else []) + \
        [max(1.6, 0.4 + 0.32 * len(names))] + ([2.6] if zooms else [])
    fig = plt.figure(figsize=(14, sum(rows) + 1.2))
    grid = fig.add_gridspec(len(rows), 1, height_ratios=rows, hspace=0.45,
                            left=0.07, right=0.70, top=0.93, bottom=0.06)
    main: list[Any] = []
    for k in range(len(rows) - (1 if zooms else 0)):
        main.append(fig.add_subplot(grid[k, 0], sharex=main[0] if main else None))
    t0, end = result.t0_ns, result.scenario.duration
    for ax, rec in zip(main, pings):
        _ping_panel(ax, rec, t0)
    if streams:
        _stream_panel(main[len(pings)], streams, t0)
    keys = _states(main[-1], result, names)
    for ax in main:
        _shade(ax, marks, tags=ax is main[0])
        ax.grid(True, which="both", alpha=0.3)
    for ax in main[:-1]:
        ax.tick_params(labelbottom=False)
    main[-1].set_xlabel("seconds from start")
    main[-1].set_xlim(0, end)
    if zooms:
        sub = grid[len(rows) - 1, 0].subgridspec(1, len(zooms), wspace=0.3)
        for j, b in enumerate(zooms):
            _zoom(fig.add_subplot(sub[0, j]), pings[0], b, t0)
    key = "\n".join(b.describe() for b in marks) or "no fault, no action"
    fig.text(0.72, 0.93, "Faults and actions\n" + key, va="top", fontsize=8, family="monospace")
    handles, labels = [], []
    for ax in main:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    handles += keys
    labels += [k.get_label() for k in keys]
    if handles:                       # one legend, beside the panels, never over the data
        fig.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.72, 0.06), fontsize=8,
                   frameon=False)
    mode = "oversubscribed" if result.machine.get("oversubscribe") else "dedicated cores"
    fig.suptitle(f"{result.scenario.name}: {result.verdict.upper()} ({mode}, protection "
                 f"{'on' if result.machine.get('protection') else 'off'})", x=0.07, ha="left")
    fig.savefig(path, dpi=110)        # the format follows the extension: png, svg, pdf
    plt.close(fig)


def _ping_panel(ax: Any, rec: Any, t0: int) -> None:
    step = max(1, len(rec.t) // MAX_POINTS)
    xs = [(t - t0) / 1e9 for t in rec.t[::step]]
    ys = [r / 1000.0 for r in rec.r[::step]]
    ax.scatter(xs, ys, s=2, alpha=0.15, color="#7f9fbf", zorder=1,
               label="round trips (each point)")
    win = rec.windows(t0)
    if win:
        mid = [w[0] + 0.05 for w in win]
        ax.plot(mid, [w[2] for w in win], color="#08306b", lw=1.8, zorder=3,
                label="p99 per 100 ms")
        ax.plot(mid, [w[1] for w in win], color="#d95f02", lw=1.8, zorder=3,
                label="p50 per 100 ms")
    if rec.losses:
        xs = [(at - t0) / 1e9 for at, _ in rec.losses]
        ax.scatter(xs, [0.97] * len(xs), marker="x", color="red", s=30, zorder=4,
                   transform=ax.get_xaxis_transform(), clip_on=False, label="lost requests")
        for (_, n), x in zip(rec.losses, xs):
            ax.text(x, 0.99, str(n), color="red", fontsize=7, ha="center", va="bottom",
                    transform=ax.get_xaxis_transform())
    ax.set_yscale("log")
    ax.set_ylabel(f"{rec.name}\nround trip (us)")


def _stream_panel(ax: Any, streams: list[Any], t0: int) -> None:
    for rec in streams:
        pts = sorted(((at - t0) / 1e9, n) for at, n in rec.throughput)
        rate = [(t_b, n_b / (t_b - t_a)) for (t_a, _), (t_b, n_b) in itertools.pairwise(pts)
                if t_b > t_a]
        if rate:
            ax.plot([x for x, _ in rate], [y for _, y in rate], lw=1.4, zorder=3,
                    label=f"{rec.name} sent/s")
    ax.set_ylabel("stream\nmessages/s")


def _shade(ax: Any, marks: list[Band], tags: bool) -> None:
    """Bands: fired -> detected (orange), detected -> active again (green); an action is a
    thin gray line. Tags on the first panel, staggered over three heights."""
    for k, b in enumerate(marks):
        if not b.is_fault:
            ax.axvline(b.fired, color="gray", ls="--", lw=1, zorder=2)
        else:
            ax.axvline(b.fired, color="red", lw=1, zorder=2)
            ax.axvspan(b.fired, b.detected if b.detected is not None else b.fired,
                       color=UNDETECTED, alpha=0.35, lw=0, zorder=0)
            if b.detected is not None:
                ax.axvspan(b.detected, b.recovered if b.recovered is not None else ax.get_xlim()[1],
                           color=RECOVERING, alpha=0.18, lw=0, zorder=0)
        if tags:
            ax.text(b.fired, 1.02 + 0.09 * (k % 3), f" {b.tag}", fontsize=8,
                    color="red" if b.is_fault else "gray", ha="left", va="bottom",
                    transform=ax.get_xaxis_transform(), clip_on=False)


def _zoom(ax: Any, rec: Any, b: Band, t0: int) -> None:
    """The first probe around one fault: from a little before it fired to a little after the
    instance was back, so that a 10 ms outage is as wide as the panel."""
    back = b.recovered if b.recovered is not None else (b.detected or b.fired) + 0.2
    pad = max(0.01, (back - b.fired) * 0.5)
    lo, hi = b.fired - pad, back + pad
    pts = [((t - t0) / 1e9, r / 1000.0) for t, r in zip(rec.t, rec.r)
           if lo <= (t - t0) / 1e9 <= hi]
    if pts:
        ax.scatter([x for x, _ in pts], [y for _, y in pts], s=6, color="#08306b", zorder=3)
    _shade(ax, [b], tags=False)
    ax.set_xlim(lo, hi)
    ax.set_yscale("log")
    ax.set_title(f"{b.tag}: {b.name} ({b.what})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="both", alpha=0.3)


def _states(ax: Any, result: RunResult, names: list[str]) -> list[Any]:
    """One lane per instance: its state over the run (from the timeline's state changes);
    returns the legend's entries for the colours it and the bands use."""
    from matplotlib.patches import Patch
    end = result.scenario.duration
    for lane, name in enumerate(names):
        changes = [(ev["t"], ev["new"]) for ev in result.timeline
                   if ev["event"] == "state_change" and ev.get("name") == name]
        for k, (t, state) in enumerate(changes):
            t_next = changes[k + 1][0] if k + 1 < len(changes) else end
            start = max(t, 0.0)
            if t_next > start:
                ax.broken_barh([(start, t_next - start)], (lane - 0.35, 0.7),
                               color=STATE_COLORS.get(state, "#888888"), zorder=2)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.invert_yaxis()
    ax.set_ylabel("state")
    return [Patch(color=STATE_COLORS[state], label=f"state {state}")
            for state in ("active", "loaded", "failed")] + \
        [Patch(color=UNDETECTED, alpha=0.35, label="fault, not yet detected"),
         Patch(color=RECOVERING, alpha=0.18, label="detected, recovering")]

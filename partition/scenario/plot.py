"""The picture of a run: each probe's latency over time on a log axis, faults and recoveries
marked where they happened. matplotlib is an optional extra (``pip install -e '.[plot]'``); it is
imported only here, only when a plot is asked for, with the Agg backend (no display needed).
"""

from __future__ import annotations

import itertools
from typing import Any

from partition.errors import MKError
from partition.scenario.runner import RunResult

MAX_POINTS = 20_000       # scatter points per probe; more are thinned evenly (lines use all)


class PlotUnavailable(MKError):
    """matplotlib is not installed."""


def _recoveries(result: RunResult) -> list[tuple[float, str]]:
    out = []
    failed: set[str] = set()
    for ev in result.timeline:
        if ev["event"] == "failure":
            failed.add(ev.get("name", ""))
        elif ev["event"] == "takeover":
            out.append((ev["t"], f"{ev.get('standby')} takes over {ev.get('name')}"))
        elif ev["event"] == "state_change" and ev.get("new") == "active" \
                and ev.get("name") in failed:
            failed.discard(ev["name"])
            out.append((ev["t"], f"{ev['name']} active again"))
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
    heights = [4.0] * ((1 if pings else 0) + (1 if streams else 0)) + [max(2.2, 0.5 + 0.35 * len(names))]
    fig, axes = plt.subplots(len(heights), 1, figsize=(11, sum(heights) + 0.8), squeeze=False,
                             sharex=True, gridspec_kw={"height_ratios": heights})
    ax_list = [a for a in axes[:, 0]]
    t0 = result.t0_ns
    if pings:
        ax = ax_list[0]
        for rec in pings:
            step = max(1, len(rec.t) // MAX_POINTS)
            xs = [(t - t0) / 1e9 for t in rec.t[::step]]
            ys = [r / 1000.0 for r in rec.r[::step]]
            dots = ax.scatter(xs, ys, s=2, alpha=0.25, label=f"{rec.name} round trips")
            win = rec.windows(t0)
            if win:
                color = dots.get_facecolor()[0]
                ax.plot([w[0] + 0.05 for w in win], [w[2] for w in win], color=color, lw=1.2,
                        label=f"{rec.name} p99 per 100 ms")
                ax.plot([w[0] + 0.05 for w in win], [w[1] for w in win], color=color, lw=1.2,
                        ls=":", label=f"{rec.name} p50 per 100 ms")
        ax.set_yscale("log")
        ax.set_ylabel("round trip (us, log)")
    if streams:
        ax = ax_list[-2]
        for rec in streams:
            pts = sorted(((at - t0) / 1e9, n) for at, n in rec.throughput)
            rate = []
            for (t_a, _), (t_b, n_b) in itertools.pairwise(pts):
                if t_b > t_a:
                    rate.append((t_b, n_b / (t_b - t_a)))
            if rate:
                ax.plot([x for x, _ in rate], [y for _, y in rate], lw=1.2,
                        label=f"{rec.name} sent/s")
        ax.set_ylabel("stream messages/s")
    _states(ax_list[-1], result, names)
    for ax in ax_list:
        _marks(ax, result, labels=ax is ax_list[0])     # labels once, lines on every panel
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7)
    ax_list[-1].set_xlabel("seconds from start")
    ax_list[-1].set_xlim(0, result.scenario.duration)
    mode = "oversubscribed" if result.machine.get("oversubscribe") else "dedicated cores"
    fig.suptitle(f"{result.scenario.name}: {result.verdict.upper()} ({mode}, protection "
                 f"{'on' if result.machine.get('protection') else 'off'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _marks(ax: Any, result: RunResult, labels: bool) -> None:
    for ev in result.timeline:
        if ev["event"] in ("fault_fired", "action_fired"):
            color = "red" if ev["event"] == "fault_fired" else "gray"
            ax.axvline(ev["t"], color=color, ls="--", lw=1)
            if labels:
                ax.text(ev["t"], 0.97, f" {ev['name']} ({ev.get('what')})", rotation=90,
                        va="top", fontsize=7, color=color, transform=ax.get_xaxis_transform())
    for t, label in _recoveries(result):
        ax.axvline(t, color="green", ls="-", lw=1)
        if labels:
            ax.text(t, 0.03, f" {label}", rotation=90, va="bottom", fontsize=7, color="green",
                    transform=ax.get_xaxis_transform())


STATE_COLORS = {"active": "#3a9d4a", "loaded": "#b0b0b0", "failed": "#d62728",
                "ready": "#e8e8e8", "empty": "#ffffff"}


def _states(ax: Any, result: RunResult, names: list[str]) -> None:
    """One lane per instance: its state over the run (from the timeline's state changes)."""
    end = result.scenario.duration
    for lane, name in enumerate(names):
        changes = [(ev["t"], ev["new"]) for ev in result.timeline
                   if ev["event"] == "state_change" and ev.get("name") == name]
        for k, (t, state) in enumerate(changes):
            t_next = changes[k + 1][0] if k + 1 < len(changes) else end
            start = max(t, 0.0)
            if t_next > start:
                ax.broken_barh([(start, t_next - start)], (lane - 0.35, 0.7),
                               color=STATE_COLORS.get(state, "#888888"))
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.invert_yaxis()
    handles = [plt_patch(c, s) for s, c in STATE_COLORS.items() if s in ("active", "loaded", "failed")]
    ax.legend(handles=handles, loc="upper right", fontsize=7, ncol=3)
    ax.set_ylabel("state")


def plt_patch(color: str, label: str) -> Any:
    from matplotlib.patches import Patch
    return Patch(color=color, label=label)

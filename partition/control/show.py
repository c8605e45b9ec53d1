"""What ``mkctl show`` prints: the machine as a table, one row per instance.

Kept apart from the views (``partition.host.views``) and from the rest of the CLI: a ``show``
runs in a fresh interpreter each time, and what it imports is most of what it costs (``mkctl
bench scale`` times it against a bare interpreter at 511 instances). The table needs only the
fields ``Machine.describe_brief`` gives, which is what the CLI asks the host for.
"""

from __future__ import annotations

from typing import Any

from partition.terminal import printable
from partition.units import format_cpulist, format_size

#: the footnote of a ``*`` after an instance's CPUs (show and top alike)
SHARED_NOTE = "* = CPU shared with another instance or the host (oversubscribed)"


def _held(i: dict[str, Any]) -> str:
    """What an instance holds: its boot region and the regions added at run time (``+N``)."""
    added = i.get("regions_added", 0)
    return format_size(i.get("memory_total", i["memory_bytes"])) + (f" (+{added})" if added else "")


def render_show(snapshot: dict[str, Any]) -> str:
    m, pool = snapshot["machine"], snapshot["pool"]
    out = [
        f"machine {m['run_dir']}  host pid {m['supervisor_pid']}  host CPUs "
        f"{format_cpulist(m['host_cpus']) or '-'}"
        + (f"  (adopted from a dead host in {m['adopt_ms']} ms)" if m.get("adopt_ms") is not None
           else "") + ("  [instances outlive this host]" if m.get("survive_host") else ""),
        f"pool    CPUs {format_cpulist(pool['cpus']) or '-'} (available: "
        f"{format_cpulist(pool['cpus_available']) or '-'})  memory "
        f"{format_size(pool['memory_bytes'])}"
        + (f" in {len(pool['chunks'])} chunks" if len(pool.get("chunks", ())) > 1 else "")
        + " (free "
        f"{format_size(pool['memory_available']) if pool['memory_available'] else '0'})",
    ]
    if not m.get("protection", True):
        out.append("MEMORY  UNPROTECTED: every instance maps the whole arena; a wild write "
                   "corrupts its victim")
    if m["oversubscribe"]:
        out.append("MODE    OVERSUBSCRIBED: instances may share host cores; a spinning instance "
                   "costs a peer on its core a scheduler timeslice per hop")
    else:
        out.append("MODE    dedicated: every instance owns its cores")
    if pool.get("llc_way_mask") is not None:
        llc = pool.get("llc") or {}
        out.append(f"LLC     ways {pool['llc_way_mask']:#x} for instances; "
                   + ("enforced through resctrl" if llc.get("enforced") else
                      f"NOT ENFORCED: {llc.get('reason') or 'no resctrl'}"))
    if m.get("shared"):
        out.append("SHARED  " + ", ".join(
            f"{r['name']} {format_size(r['size'])} (used {format_size(r['used']) if r['used'] else '0'})"
            for r in m["shared"]) + " at /mnt/shared/NAME in the instances naming them")
    sig = m.get("signatures") or {}
    if sig.get("keyring"):
        out.append(f"SIGNED  images {'must be' if sig.get('required') else 'may be'} signed "
                   f"by a key of {sig['keyring']} ({len(sig.get('keys') or [])} keys)"
                   + ("" if sig.get("required") else "; unsigned ones load"))
    rows: list[tuple[str, ...]] = [("ID", "NAME", "STATE", "CPUS", "MEMORY", "BASE", "KERNEL",
                                    "PID", "LAST EXIT")]
    for i in snapshot["instances"]:
        cpus = format_cpulist(i["cpus"]) + ("*" if i["shared_cpus"] else "")
        last = i["last_exit"]["reason"] if i["last_exit"] else "-"
        if i["failure"]:
            last = f"FAILED: {i['failure']}"
        # an exit reason and a failure are the kernel's own words: no control sequence of
        # its reaches the terminal, no newline of its starts a row
        rows.append(tuple(printable(c, one_line=True) for c in (
            str(i["id"]), i["name"], i["state"], cpus, _held(i),
            f"0x{i['memory_base']:x}", i["kernel"] or "-", str(i["pid"]) if i["pid"] else "-",
            last)))
    txs = snapshot.get("overlays", [])
    if txs:
        counts = {st: sum(1 for t in txs if t["status"] == st) for st in ("applied", "failed")}
        last = txs[-1]
        out.append(printable(f"overlays {counts['applied']} applied, {counts['failed']} failed; "
                             f"last tx_{last['id']} {last['status']}: "
                             f"{'; '.join(last['operations']) or '-'}"
                             + (f" ({last['error']})" if last["error"] else "")
                             + _gone_since(last, snapshot["instances"]), one_line=True))
    if len(rows) == 1:
        out.append("no instances")
    else:
        widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]) - 1)]
        for r in rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if any(i["shared_cpus"] for i in snapshot["instances"]):
            out.append(SHARED_NOTE)
        ways = [f"{i['name']} {i['llc_way_mask']}" for i in snapshot["instances"]
                if i.get("llc_way_mask")]
        if ways:
            out.append("llc-way-mask: " + ", ".join(ways))
    return "\n".join(out) + "\n"


def _gone_since(tx: dict[str, Any], instances: list[dict[str, Any]]) -> str:
    """The instances a transaction changed that have been deleted since (by another
    transaction or ``mkctl delete``): said, so that its line is not read as their state."""
    live = {i["name"] for i in instances}
    removed = {op.split()[1] for op in tx["operations"] if op.startswith("instance-remove ")}
    gone = [n for n in dict.fromkeys(tx.get("names", [])) if n not in live and n not in removed]
    return f" [{', '.join(gone)} deleted since]" if gone else ""


def format_metrics(metrics: dict[str, float]) -> str:
    """A kernel's published metrics (``Kernel.metric``) as ``name=value`` words."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sorted(metrics.items()))

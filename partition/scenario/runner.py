"""Running a scenario: build the machine, boot, drive traffic and faults on a timeline, measure,
tear down.

Order of a run, and why:
1. the machine is built and every instance created and loaded *before any boots*: a scenario
   that does not fit this machine (CPUs, memory, an unloadable kernel) fails as invalid with
   nothing started;
2. instances with ``start = true`` boot (primaries before their standbys), the clock starts,
   and the probes start;
3. the loop fires faults and actions when due, steps the host's own probes, restarts a probe
   whose source instance rebooted, and drives the machine (deaths, reports) in between;
4. at ``duration`` every probe is flushed, metrics are read, the machine is closed. Teardown
   happens whatever happened before, Ctrl-C included.

Every time in the report is seconds from the start of the clock (step 2), taken from
CLOCK_MONOTONIC, which instances and host share.

Slightly over 400 lines because a run is one timeline: its steps share the clock, the fired
faults and the probe bookkeeping; metrics collection is measure.py's, the report report.py's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from partition.abi import message as M
from partition.abi.ring import RingError
from partition.errors import BootFailed, BootTimeout, MKError
from partition.guest import probes as P
from partition.host import rundir
from partition.host.machine import Machine
from partition.host.writewatch import foreign_mappers
from partition.scenario import expr as E
from partition.scenario.hints import in_scenario_words
from partition.scenario.measure import Collector, ProbeRecord
from partition.scenario.runstep import Programs
from partition.scenario.schema import Scenario, ScenarioInvalid

#: console lines of each instance the JSON report keeps (the whole console is mkctl console's)
CONSOLE_TAIL = 20
#: events the timeline keeps (the full stream is in the run directory's events.log)
TIMELINE_EVENTS = {"state_change", "fault_injected", "failure", "restart", "takeover",
                   "takeover_failed", "watchdog_expired", "foreign_write", "restart_failed",
                   "halt_timeout", "claims_abandoned", "probe_started", "probe_start_failed",
                   "probe_flush_failed", "fault_fired", "action_fired", "scenario_clock_start",
                   "boot_failed", "died_in_boot", "not_adopted"}


@dataclass
class Expectation:
    text: str
    passed: bool
    value: Any
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"expect": self.text, "passed": self.passed, "value": self.value,
                "detail": self.detail}


@dataclass
class RunResult:
    scenario: Scenario
    machine: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    timeline: list[dict[str, Any]]
    expectations: list[Expectation]
    records: dict[str, ProbeRecord]
    t0_ns: int
    elapsed_s: float
    interrupted: bool = False
    bad_reports: list[str] = field(default_factory=list)
    consoles: dict[str, list[str]] = field(default_factory=dict)   # each instance's last lines
    #: every boot program's status in every kept boot: instance, index, argv, generation,
    #: status (an exit status, running, lost), reason (host/userlands.py)
    programs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.interrupted and all(e.passed for e in self.expectations)

    @property
    def verdict(self) -> str:
        return "interrupted" if self.interrupted else ("pass" if self.passed else "fail")

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario.to_dict(), "machine": self.machine,
                "metrics": self.metrics, "timeline": self.timeline,
                "expectations": [e.to_dict() for e in self.expectations],
                "verdict": self.verdict, "elapsed_s": round(self.elapsed_s, 3),
                "bad_reports": self.bad_reports, "consoles": self.consoles,
                "programs": self.programs}


class Runner:
    def __init__(self, scenario: Scenario,
                 progress: Callable[[Runner, float], None] | None = None,
                 watch: Callable[[Machine], Any] | None = None) -> None:
        self.sc = scenario
        self.progress = progress
        #: makes a read-only server of the machine (``step()``, ``close()``), stepped each turn
        #: of the loop, so that mkctl top / show / console -f can watch the run
        self.watch = watch
        self._watcher: Any = None
        self.m: Machine | None = None
        self.collector = Collector()
        self.timeline: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.fired: dict[str, dict[str, Any]] = {}      # fault/action name -> what happened
        self._host_agent: P.ProbeAgent | None = None
        self._probe_pids: dict[str, int | None] = {}    # probe name -> pid that runs it
        self._probe_ids: dict[str, int] = {}
        self._finished = False
        #: instance name -> why its boot failed (at time 0 or by an exec action): an instance
        #: that never came up fails the verdict unless the scenario expects it (``_came_up``)
        self.boot_failed: dict[str, str] = {}
        #: the programs of ``run`` actions (runstep.py)
        self.programs = Programs()

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> RunResult:
        interrupted = False
        try:
            self._build()
            assert self.m is not None
            self._boot()
            self.t0 = time.monotonic()
            self._note("scenario_clock_start", duration_s=self.sc.duration)
            self._start_probes()
            try:
                self._loop()
            except KeyboardInterrupt:
                interrupted = True
            stopped = time.monotonic_ns()
            for rec in self.collector.records.values():
                rec.stopped_ns = stopped
            self._flush()
            if not interrupted:         # (Ctrl-C: what still runs is killed, not waited for)
                self.programs.finish(self.m.poll)
            return self._result(interrupted)
        finally:
            self.programs.close()
            if self._watcher is not None:
                self._watcher.close()
            if self.m is not None:
                self.m.close(timeout=5.0)

    def _build(self) -> None:
        mc = self.sc.machine
        cpus = mc["cpus"] if mc["cpus"] is not None else sorted(os.sched_getaffinity(0))
        host = mc["host_cpus"] if mc["host_cpus"] is not None else cpus[:1]
        crash = any(a["do"] == "host-crash" for a in self.sc.actions)
        try:
            self.m = Machine(cpus=cpus, memory=mc["memory"], host_cpus=host,
                             oversubscribe=mc["oversubscribe"], protection=mc["protection"],
                             kill_timeout=5.0, survive_host=crash,
                             llc_way_mask=mc["llc_way_mask"], shared=mc.get("shared"))
        except MKError as exc:
            raise ScenarioInvalid(self.sc.path, [in_scenario_words(
                f"[machine]: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))]) from None
        m = self.m
        self._attach(m)
        if self.watch is not None:
            self._watcher = self.watch(m)
        order = sorted(self.sc.instances, key=lambda i: i["standby_for"] is not None)
        # every instance must fit before any kernel image is loaded: a file found invalid
        # has run no kernel code at all
        for step in ("create", "load"):
            problems = []
            for i in order:
                try:
                    if step == "create":
                        m.create(i["name"], memory=i["memory"], cpus=i["cpus"], id=i["id"],
                                 cpu_count=None if i["cpus"] is not None else i["cpu_count"],
                                 recovery=i["recovery"], max_restarts=i["max_restarts"],
                                 restart_window=i["restart_window"], watchdog=i["watchdog"],
                                 standby_for=i["standby_for"],
                                 preserve_memory=i["preserve_memory"],
                                 llc_way_mask=i["llc_way_mask"], pids_max=i["pids_max"],
                                 shared=i.get("shared"))
                    else:
                        m.load(i["name"], i["kernel"], _cmdline(i), i.get("programs"))
                except MKError as exc:
                    problems.append(in_scenario_words(
                        f"[[instance]] {i['name']!r}: {exc.message}"
                        + (f" ({exc.hint})" if exc.hint else "")))
            if problems:
                raise ScenarioInvalid(self.sc.path, problems)

    def _attach(self, m: Machine) -> None:
        """The run's hooks on a host: events to the timeline, the host's probe handlers."""
        m.events.subscribe(self._on_event)
        m.register_handler(M.MK_EMU_PROBE_REPORT,
                           lambda msg: self.collector.on_report(msg.sender, msg.payload) and None)
        m.register_handler(M.MK_EMU_PROBE_PING, lambda msg: msg.payload)
        m.register_handler(M.MK_EMU_PROBE_DATA, self._host_data)

    def _host_crash(self) -> dict[str, Any]:
        """The host dies now: its state is thrown away, nothing halted (Machine.abandon); a new
        host adopts the instances from the same run directory (host/adoption.py). The run
        goes on with the new host."""
        assert self.m is not None
        old = self.m
        running = {i.name: i.pid for i in old.instances.values() if i.pid is not None}
        if self._watcher is not None:       # the dead host's socket goes with it
            self._watcher.close()
            self._watcher = None
        cfg = old.abandon()
        run = rundir.claim(old.run_dir)
        run.owned = True                  # the run's private directory: removed at the end
        self.m = Machine(run_dir=run, adopt=True, **cfg)
        self._attach(self.m)
        if self.watch is not None:
            self._watcher = self.watch(self.m)
        if self._host_agent is not None:
            self._host_agent.rebind(self.m.ipc.messenger, self.m.send)
        kept = {i.name: i.pid for i in self.m.instances.values() if i.pid is not None}
        why = {r["name"]: r["why"] for r in self.m.adopt_refused}
        for name in old.instances:
            if name not in self.m.instances:    # a record refused alone (adoption.py): gone
                self.boot_failed[name] = f"not adopted by the new host: " \
                                         f"{why.get(name, 'its record was refused')}"
                self._note("not_adopted", instance=name, why=self.boot_failed[name])
        return {"adopted": kept == running, "adopt_ms": self.m.adopt_ms}

    def _boot(self) -> None:
        assert self.m is not None
        order = sorted(self.sc.instances, key=lambda i: i["standby_for"] is not None)
        for i in order:
            if i["start"]:
                try:
                    self.m.exec(i["name"])
                except (BootFailed, BootTimeout) as exc:
                    # a measured failure (the verdict, its metrics, the timeline), not the
                    # end of the experiment: the others still run
                    self._boot_failed(i["name"], exc)

    def _boot_failed(self, name: str, exc: MKError) -> None:
        self.boot_failed.setdefault(name, exc.message)
        self._note("boot_failed", instance=name, error=exc.message)

    def _on_event(self, event: str, fields: dict[str, Any], now: float) -> None:
        if event in TIMELINE_EVENTS and not self._finished:
            self.timeline.append({"t": now, "event": event, **fields})   # made relative at the end

    # -- probes ----------------------------------------------------------------------------
    def _id_of(self, name: str) -> int:
        assert self.m is not None
        return 0 if name == "host" else self.m.get(name).id   # (NoSuchInstance: refused
                                                               # at a host-crash's adoption)

    def _start_probes(self) -> None:
        assert self.m is not None
        for n, p in enumerate(self.sc.probes, start=1):
            target = self._id_of(p["to"])
            served = {target} | {self._id_of(i["name"]) for i in self.sc.instances
                                 if i["standby_for"] == p["to"]}
            rec = ProbeRecord(id=n, name=p["name"], kind=p["kind"], source=p["from"],
                              target=p["to"], source_ids={self._id_of(p["from"])},
                              target_ids=served, started_ns=time.monotonic_ns())
            self.collector.add(rec)
            self._probe_ids[p["name"]] = n
            self._probe_pids[p["name"]] = None
            if p["from"] == "host":
                if self._host_agent is None:
                    self._host_agent = P.ProbeAgent(self.m.ipc.messenger, self.m.send,
                                                    self.collector.host_report)
                self._host_agent.start(self._spec(p, n))
                rec.starts += 1
            else:
                self._start_on_instance(p)

    def _spec(self, p: dict[str, Any], n: int) -> P.ProbeSpec:
        return P.ProbeSpec(id=n, target=self._id_of(p["to"]), kind=p["kind"], rate=p["rate"],
                           payload=p["payload"], timeout=p["timeout"], seed=self.sc.seed)

    def _start_on_instance(self, p: dict[str, Any]) -> None:
        """(Re)start a probe on its source instance if that runs a process we have not asked."""
        assert self.m is not None
        # the instance record, not show(): this runs every 50 ms during the experiment, and a
        # snapshot (with its view files) would be host work on a core the instances share
        inst = self.m.instances.get(p["from"])
        if inst is None or (p["to"] != "host" and p["to"] not in self.m.instances):
            return                              # gone: refused at a host-crash's adoption
        pid = inst.pid
        if inst.state.value != "active" or pid is None or pid == self._probe_pids[p["name"]]:
            return
        n = self._probe_ids[p["name"]]
        try:
            answer = self.m.command(p["from"], M.MK_EMU_PROBE_START,
                                    self._spec(p, n).to_wire(), timeout=2.0)
        except RingError as exc:
            self._note("probe_start_failed", probe=p["name"], error=exc.strerror)
            return
        if not (isinstance(answer, dict) and answer.get("ok")):
            self._note("probe_start_failed", probe=p["name"], error=repr(answer))
            return
        self._probe_pids[p["name"]] = pid
        self.collector.records[n].starts += 1
        self._note("probe_started", probe=p["name"], on=p["from"], pid=pid)

    def _host_data(self, msg: M.Message) -> None:
        p = msg.payload
        if isinstance(p, list) and p and isinstance(p[0], int):
            rec = self.collector.records.get(p[0])
            if rec is not None and 0 in rec.target_ids:
                rec.received += 1

    def _note(self, event: str, **fields: Any) -> None:
        """A scenario event: to the machine's events.log like any other, and so to the timeline."""
        assert self.m is not None
        self.m.events.info(event, scenario=self.sc.name, **fields)

    # -- the timeline ----------------------------------------------------------------------
    def _loop(self) -> None:
        assert self.m is not None
        m = self.m
        due = sorted([("fault", f) for f in self.sc.faults] + [("action", a) for a in self.sc.actions],
                     key=lambda x: x[1]["at"])
        end = self.t0 + self.sc.duration
        next_progress = 0.0
        instance_probes = [p for p in self.sc.probes if p["from"] != "host"]
        next_restart_check = 0.0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            while due and now - self.t0 >= due[0][1]["at"]:
                kind, item = due.pop(0)
                self._fire(kind, item)
                now = time.monotonic()
            busy = False
            if self._host_agent is not None and self._host_agent.active():
                busy = self._host_agent.step()
            if instance_probes and now >= next_restart_check:
                next_restart_check = now + 0.05
                for p in instance_probes:
                    self._start_on_instance(p)
            self.programs.step()
            if self._watcher is not None:
                self._watcher.step()
            if self.progress is not None and now >= next_progress:
                next_progress = now + 0.25
                self.progress(self, now - self.t0)
            wait = 0.0 if busy else min(0.01, end - now)
            if due:
                wait = min(wait, max(0.0, self.t0 + due[0][1]["at"] - now))
            if self._host_agent is not None and self._host_agent.active() and not busy:
                wait = min(wait, self._host_agent.wait_hint(0.01))
            m.poll(wait)

    def _fire(self, kind: str, item: dict[str, Any]) -> None:
        assert self.m is not None
        name = item["name"]
        at = round(time.monotonic() - self.t0, 6)
        rec: dict[str, Any] = {"kind": kind, "at": at, "target": item["target"], "error": None}
        self.fired[name] = rec
        t = time.monotonic()
        try:
            if kind == "fault":
                rec["mono"] = t
                self.m.fault(item["target"], item["kind"], **self._fault_options(item))
            else:
                rec.update(self._act(item))
        except MKError as exc:
            rec["error"] = exc.message
        rec["duration_ms"] = round((time.monotonic() - t) * 1e3, 3)
        self._note(f"{kind}_fired", name=name, target=item["target"],
                   what=item.get("kind") or item.get("do"), error=rec["error"])

    def _fault_options(self, f: dict[str, Any]) -> dict[str, Any]:
        assert self.m is not None
        k = f["kind"]
        if k == "wild-write":
            addr = f["address"] if f["address"] is not None else \
                self.m.get(f["victim"]).memory_base + f["offset"]
            return {"address": addr, "bytes": f["bytes"] or 64}
        if k == "ipi-storm":
            return {"target": self._id_of(f["victim"]), "count": f["count"] or 100_000}
        if k == "cpu-hog":
            return {"seconds": f["seconds"] or 2.0}
        if k == "mem-hog" and f["bytes"]:
            return {"bytes": f["bytes"]}
        return {}

    def _act(self, a: dict[str, Any]) -> dict[str, Any]:
        assert self.m is not None
        m, target, args = self.m, a["target"], a["args"]
        if a["do"] == "host-crash":
            return self._host_crash()
        if a["do"] == "run":                 # a program inside the target (runstep.py)
            return self.programs.start(m, a)
        if a["do"] == "update":              # a live update (host/liveupdate.py)
            r = m.live_update(target, str(args["kernel"]),
                              str(args["cmdline"]) if "cmdline" in args else None)
            return {"update_gap_ms": r["gap_ms"], "rolled_back": r["rolled_back"]}
        if a["do"] in ("start", "exec"):
            try:
                m.exec(target)
            except (BootFailed, BootTimeout) as exc:
                self._boot_failed(target, exc)
                raise
        elif a["do"] in ("kill", "kill --force"):
            m.kill(target, force=a["do"] == "kill --force", timeout=args.get("timeout"))
        elif a["do"] == "load":
            m.load(target, str(args["kernel"]), str(args.get("cmdline", "")))
        elif a["do"] == "unload":
            m.unload(target)
        return {}

    # -- the end ---------------------------------------------------------------------------
    def _flush(self) -> None:
        assert self.m is not None
        m = self.m
        # Round 1 stops every source; round 2 collects what targets counted since. One round
        # would lose the messages a source sent after its target had already been flushed.
        for _ in range(2):
            if self._host_agent is not None:
                self._host_agent.flush()
            for i in self.sc.instances:
                if i["name"] in m.instances and m.show(i["name"])["state"] == "active":
                    try:
                        m.command(i["name"], M.MK_EMU_PROBE_FLUSH, None, timeout=3.0)
                    except RingError as exc:
                        self._note("probe_flush_failed", instance=i["name"], error=exc.strerror)
        m.poll(0)

    def _result(self, interrupted: bool) -> RunResult:
        assert self.m is not None
        m = self.m
        self._finished = True          # teardown's halts are not part of the experiment
        for ev in self.timeline:       # seconds from the start of the clock (boots are < 0)
            ev["t"] = round(ev["t"] - self.t0, 6)
        snap = m.show()
        metrics: dict[str, dict[str, Any]] = {}
        consoles: dict[str, list[str]] = {}
        programs: list[dict[str, Any]] = []
        by_id = {d["id"]: d["name"] for d in snap["instances"]}
        for i in self.sc.instances:
            if i["name"] not in m.instances:    # refused at a host-crash's adoption: gone
                metrics[i["name"]] = {"state": "empty"}
                consoles[i["name"]] = []
                continue
            d = m.show(i["name"])
            # protected: nobody else may map it (checked in /proc); unprotected: everybody
            # maps it, and what counts is who wrote (the write watch, writewatch.py)
            mappers = foreign_mappers(m.instances, m.arena.tag, i["name"]) if m.protection else []
            metrics[i["name"]] = {
                "state": d["state"], "restarts": d["counters"]["restarts"],
                "failures": d["failures"], "crashes": d["counters"]["crashes"],
                "boot_failures": d["counters"]["boot_failures"],
                "boots": d["boots"], "foreign_pages": d["counters"]["foreign_pages"],
                "memory_intact": d["counters"]["foreign_pages"] == 0 and not mappers,
                "foreign_writers": d["foreign_writes"], "foreign_mappers": mappers,
                "served_by": by_id.get(d["served_by"]) if d["served_by"] is not None else None,
                "last_exit": (d["last_exit"] or {}).get("how"),
                "ipi_received": d["counters"]["ipi_received"],
                "ipi_dropped": sum(d["counters"][k] for k in (
                    "ipi_dropped_bad_size", "ipi_dropped_unknown_type", "ipi_dropped_abandoned",
                    "ipi_dropped_filtered")),
                "ipi_ring_full": d["counters"]["ipi_ring_full"],
                "ipi_doorbells": d["counters"]["ipi_doorbells"],
                "ipi_dropped_filtered": d["counters"]["ipi_dropped_filtered"],
                "cpus": d["cpus"], "shared_cpus": d["shared_cpus"],
                # what its kernel published (self.metric); None: never published
                **{k: d["metrics"].get(k) for k in i.get("metrics", [])},
            }
            consoles[i["name"]] = m.console(i["name"]).splitlines()[-CONSOLE_TAIL:]
            programs += [{"instance": i["name"], **p}
                         for p in m.userlands.history(m.get(i["name"]))]
        first_fault = min((f["mono"] for f in self.fired.values() if "mono" in f), default=None)
        first_ns = int(first_fault * 1e9) if first_fault is not None else None
        for rec in self.collector.records.values():
            metrics[rec.name] = rec.metrics(first_ns)
        for f in self.sc.faults:
            metrics[f["name"]] = self._fault_metrics(f)
        for a in self.sc.actions:
            fired = self.fired.get(a["name"])
            metrics[a["name"]] = {"done": fired is not None and fired["error"] is None,
                                  "error": fired["error"] if fired else "never fired",
                                  "duration_ms": fired["duration_ms"] if fired else None,
                                  "update_gap_ms": (fired or {}).get("update_gap_ms"),
                                  "rolled_back": (fired or {}).get("rolled_back"),
                                  "adopted": (fired or {}).get("adopted"),
                                  "adopt_ms": (fired or {}).get("adopt_ms"), "exit_status": None}
            if a["do"] == "run":                # its program's status and figures
                metrics[a["name"]].update(self.programs.metrics(a))
        machine = {**snap["machine"], "pool_cpus": snap["pool"]["cpus"],
                   "shared_cores": any(v.get("shared_cpus") for v in metrics.values()
                                       if isinstance(v, dict))}
        return RunResult(scenario=self.sc, machine=machine, metrics=metrics,
                         timeline=self.timeline,
                         expectations=evaluate(self.sc, metrics) + self._came_up(),
                         records={r.name: r for r in self.collector.records.values()},
                         t0_ns=int(self.t0 * 1e9), elapsed_s=time.monotonic() - self.t0,
                         interrupted=interrupted, bad_reports=self.collector.bad_reasons,
                         consoles=consoles, programs=programs)

    def _came_up(self) -> list[Expectation]:
        """What every verdict checks without being asked: an instance that never came up (its
        boot failed) is a failed run, not a quiet ``loaded`` with one failure, unless the
        scenario says so (``expect_boot_failure``; then it must fail). Only those lines."""
        assert self.m is not None
        out = []
        for i in self.sc.instances:
            why = self.boot_failed.get(i["name"])
            inst = self.m.instances.get(i["name"])
            if inst is None:                    # (a host-crash's adoption refused it)
                why = why or "it is not in the machine"
            elif why is not None and inst.state.value == "active" and \
                    self.m.arena.own(inst.id).booted == inst.generation:
                why = None          # a restart brought it up after all: its boot() returned
            if i["expect_boot_failure"]:
                out.append(Expectation(
                    f"{i['name']} fails to boot (expect_boot_failure)", why is not None,
                    why is not None, why or "it came up: expect_boot_failure = true says it "
                    "should not"))
            elif why is not None:
                out.append(Expectation(
                    f"{i['name']} came up", False, False,
                    f"{why}; if that is the experiment, say expect_boot_failure = true in "
                    "its [[instance]]"))
        return out

    def _fault_metrics(self, f: dict[str, Any]) -> dict[str, Any]:
        fired = self.fired.get(f["name"])
        out: dict[str, Any] = {"fired": fired is not None and fired["error"] is None,
                               "detected": False, "detect_ms": None, "recovered": False,
                               "recover_ms": None,
                               "failure_kind": None,
                               "error": fired["error"] if fired else "never fired"}
        if not out["fired"]:
            return out
        assert fired is not None
        t_fault = fired["at"]
        target = f["target"]
        detected_at = None
        for ev in self.timeline:
            if ev["t"] < t_fault or ev.get("name") != target:
                continue
            if detected_at is None and ev["event"] == "failure":
                detected_at = ev["t"]
                out.update(detected=True, failure_kind=ev.get("kind"),
                           detect_ms=ev.get("detect_ms"))
            elif detected_at is None and ev["event"] == "foreign_write":
                detected_at = ev["t"]
                out.update(detected=True, failure_kind="foreign-write",
                           detect_ms=round((ev["t"] - t_fault) * 1e3, 3))
            elif detected_at is not None and (
                    ev["event"] == "takeover"
                    or (ev["event"] == "state_change" and ev.get("new") == "active")):
                out["recover_ms"] = round((ev["t"] - t_fault) * 1e3, 3)
                break
        out["recovered"] = out["recover_ms"] is not None
        return out


def _cmdline(i: dict[str, Any]) -> str:
    words = i["cmdline"].split()
    if not any(w.startswith("mk_mode=") for w in words):
        words.append(f"mk_mode={i['mode']}")
    return " ".join(words)


def evaluate(sc: Scenario, metrics: dict[str, dict[str, Any]]) -> list[Expectation]:
    out = []
    for text, node in sc.expect:
        used = {str(r): metrics.get(r.name, {}).get(r.metric) for r in E.refs(node)}
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in used.items())
        try:
            value = E.evaluate(node, lambda r: metrics.get(r.name, {}).get(r.metric))
        except E.EvalError as exc:
            out.append(Expectation(text, False, None, f"{exc} ({shown})" if shown else str(exc)))
            continue
        passed = value is True
        detail = shown if isinstance(value, bool) else f"{shown}; the expression is {value!r}, " \
                                                       "not true or false"
        out.append(Expectation(text, passed, value, detail))
    return out


def _fmt(v: Any) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".") if isinstance(v, float) else repr(v)

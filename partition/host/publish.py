"""Publication: every change of an instance's state goes to the arena, the views, the event
log and (on a machine whose instances outlive it) the state file, in that order, from here.

``transition`` writes an instance's ``state`` (and ``set_quietly``, for a live update's
handover; adoption sets the state of the instances it rebuilds); every collaborator that
changes something a view shows calls ``publish``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from partition.abi.constants import STATE_CODES
from partition.host.arena import Arena
from partition.host.events import EventLog
from partition.host.instance import Instance, State
from partition.host.table import InstanceTable
from partition.host.views import ViewWriter

#: writes the state file: (the instances changed, None: all; prune records no instance has)
SaveState = Callable[[list[Instance] | None, bool], None]


class Publisher:
    """Publishes the changes of one machine's instances."""

    def __init__(self, table: InstanceTable, arena: Arena, events: EventLog, views: ViewWriter,
                 pool_fields: Callable[[], dict[str, Any]],
                 view_fields: Callable[[Instance], dict[str, Any]],
                 overlays: Callable[[], list[dict[str, Any]]], oversubscribe: bool,
                 save_state: SaveState | None) -> None:
        self.table = table
        self.arena = arena
        self.events = events
        self.views = views
        self.pool_fields = pool_fields
        self.view_fields = view_fields
        self.overlays = overlays
        self.oversubscribe = oversubscribe
        self.save_state = save_state        # None: no state file (instances die with the host)
        #: write the state file when told (flush), not at every change: the daemon's way
        self.defer_state = False
        self._dirty: list[Instance | None] = []

    def transition(self, inst: Instance, new: State, cause: str, old: State | None = None,
                   **fields: Any) -> None:
        before = inst.state if old is None else old
        inst.enter(new)
        peer = self.arena.peer(inst.id)
        peer.peer_state = STATE_CODES[new.value]
        peer.pid = inst.pid or 0
        self.events.info("state_change", instance=inst.id, name=inst.name, old=before.value,
                         new=new.value, cause=cause, **fields)
        self.publish(inst)

    def set_quietly(self, inst: Instance, new: State) -> None:
        """A state nobody is told of: a live update's old kernel has exited, and its service
        stays up in the peer table for the new one (lifecycle.py's handover)."""
        inst.enter(new)

    def publish(self, inst: Instance | None = None) -> None:
        self.table.changes += 1
        if inst is not None:
            le = inst.last_exit
            self.arena.write_record(
                inst.id, state=inst.state.value, name=inst.name, memory_base=inst.memory_base,
                memory_bytes=inst.memory_bytes, cpus=inst.cpus, pid=inst.pid or 0,
                boots=inst.boots, last_exit_ns=int(le.time * 1e9) if le else 0,
                last_exit_signal=(le.signal or 0) if le else 0,
                last_exit_code=(le.code or 0) if le else 0,
                kernel=inst.kimage.label if inst.kimage else "")
        self._publish_views(inst)
        if self.save_state is not None:
            if self.defer_state:
                self._dirty.append(inst)
            else:
                self.save_state([inst] if inst is not None else None, False)

    def flush(self) -> None:
        """Write the state file for the changes published since the last write, and the
        ``kimage`` and ``iomem`` views (with ``defer_state``; all three are whole tables)."""
        self.views.flush()
        dirty, self._dirty = self._dirty, []
        if dirty and self.save_state is not None:
            # by identity (a verb may delete an instance and create another of the same name);
            # None is a change of the machine (a delete among them): records no instance has
            # any more are removed
            self.save_state(list({id(i): i for i in dirty if i is not None}.values()),
                            None in dirty)

    def _publish_views(self, inst: Instance | None) -> None:
        """The views follow one change: the changed instance alone, unless the set of
        instances or of their CPUs moved (then every instance is looked at, and only those
        whose files differ are written: who shares a CPU may have changed)."""
        v = self.views
        names = self.table.by_name
        v.pool(self.pool_fields(), self.oversubscribe)
        if inst is not None and inst.name in names and v.has(inst.name, inst.cpus):
            v.instance(self.view_fields(inst))
        else:
            for gone in v.names - set(names):
                v.remove(gone)
            for i in names.values():
                v.instance(self.view_fields(i))
        v.overlays(self.overlays())
        if not self.defer_state:        # (else once per verb and turn: flush)
            v.flush()

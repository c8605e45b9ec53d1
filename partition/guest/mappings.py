"""What a booted instance maps of the arena, and nothing more: its partition, its console, the
shared control area and the shared ring area (every instance writes into its peers' IPI rings).
The trampoline makes these mappings after unmapping everything it inherited from the host."""

from __future__ import annotations

import mmap

from partition.abi import layout as L
from partition.abi.slot import ControlSlot, slot_of


class InstanceMappings:
    """What a booted instance maps: its partition, its console, the shared control area and the
    shared ring area (every instance writes into its peers' IPI rings)."""

    def __init__(self, fd: int, layout: L.ArenaLayout, instance_id: int, memory_base: int,
                 memory_bytes: int) -> None:
        self.partition = mmap.mmap(fd, memory_bytes, offset=memory_base)
        self.console = mmap.mmap(fd, layout.console_bytes, offset=layout.console_at(instance_id))
        self.control = mmap.mmap(fd, layout.control_bytes, offset=layout.control_offset)
        self.slot: ControlSlot = slot_of(memoryview(self.control), instance_id)
        self.rings = mmap.mmap(fd, layout.ring_area_bytes, offset=layout.ring_offset)

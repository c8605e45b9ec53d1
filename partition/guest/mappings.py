"""What a booted instance maps of the arena, and nothing more: its partition, its console, the
host's peer table and instance table read-only, its own control page, and the shared ring area.
The trampoline makes these mappings after unmapping everything it inherited from the host."""

from __future__ import annotations

import mmap

from partition.abi import layout as L
from partition.abi.constants import MAX_INSTANCES
from partition.abi.slot import OWN_BYTES, OwnPage


class InstanceMappings:
    """What a booted instance maps: its partition, its console, the host's peer table (read
    only), its own page of the control area, and the shared ring area (every instance writes
    into its peers' IPI rings)."""

    def __init__(self, fd: int, layout: L.ArenaLayout, instance_id: int, memory_base: int,
                 memory_bytes: int) -> None:
        self.partition = mmap.mmap(fd, memory_bytes, offset=memory_base)
        self.console = mmap.mmap(fd, layout.console_bytes, offset=layout.console_at(instance_id))
        self.peers = mmap.mmap(fd, layout.peer_table_bytes, offset=layout.control_offset,
                               prot=mmap.PROT_READ)
        self.own_map = mmap.mmap(fd, OWN_BYTES, offset=layout.own_at(instance_id))
        self.own = OwnPage(self.own_map, 0)
        self.rings = mmap.mmap(fd, layout.ring_area_bytes, offset=layout.ring_offset)
        # the instance table, read-only: peers' names (Kernel.peer_id); the host writes it
        self.table = mmap.mmap(fd, MAX_INSTANCES * L.TABLE_RECORD_BYTES,
                               offset=layout.table_offset, prot=mmap.PROT_READ)

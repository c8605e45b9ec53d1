"""The emulated physical memory: one sparse shared-memory object, mapped whole by the host only.

Two kinds, by what must outlive what:

* an in-process machine (tests, scenarios) uses a memfd: its lifetime is that of the last
  process holding it, so a crashed test cannot leak a multi-GiB object, and two machines never
  collide on a name;
* a supervisor's machine (``mkctl init``) uses a named POSIX shared-memory object
  (``/dev/shm/mk-arena-<key>``, ``rundir.machine_key``, through ``posix_ipc``): its instances
  outlive a host that dies,
  and a new host finds the arena again by that name and adopts them (host/adoption.py). The
  name is removed at shutdown, and by ``mkctl shutdown`` of an abandoned machine. Instances
  cannot reach it: their /dev holds five device nodes and no shm.

Instances receive the descriptor across fork, map just their own regions, and close it before any
kernel code runs (see guest/trampoline.py), so they cannot reach what they were not given.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import weakref

import posix_ipc

from partition import linux
from partition.abi import layout as L
from partition.abi.constants import MAX_INSTANCES, STATE_CODES
from partition.abi.slot import OWN_BYTES, PEER_BYTES, OwnPage, PeerEntry, own_of, peer_of
from partition.units import PAGE_SIZE

# Every whole-arena mapping alive in this process, by address: a forked instance unmaps them
# all. Keyed to the mmap object itself, not to the Arena: an arena whose close() could not unmap
# (a memoryview of it still alive somewhere) stays mapped, and must still be unmapped in a child.
_HOST_MAPPINGS: dict[int, tuple[int, weakref.ref[mmap.mmap]]] = {}


def inherited_mappings() -> list[tuple[int, int]]:
    """(address, length) of each whole-arena mapping alive here: what a forked instance must
    unmap before it maps its own regions (handed to it in its boot parameters)."""
    out = []
    for addr, (length, ref) in list(_HOST_MAPPINGS.items()):
        m = ref()
        if m is None or m.closed:
            _HOST_MAPPINGS.pop(addr, None)
        else:
            out.append((addr, length))
    return out


class Arena:
    """Host view of the arena: header, instance table, control area, consoles, partitions."""

    def __init__(self, layout: L.ArenaLayout, tag: str = "mk-arena", flags: int = 0,
                 shm_name: str | None = None, attach: bool = False) -> None:
        layout.validate()
        self.layout = layout
        self.tag = tag                  # the memfd's name: /proc/PID/maps shows "/memfd:<tag>"
        self.shm_name = shm_name        # a named arena (survivable machines), else a memfd
        if shm_name is None:
            self.fd = os.memfd_create(tag, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        else:
            shm = posix_ipc.SharedMemory(shm_name, 0 if attach else posix_ipc.O_CREX, mode=0o600)
            self.fd = shm.fd
        try:
            if attach:
                if os.fstat(self.fd).st_size != layout.arena_bytes:
                    raise ValueError(f"arena {shm_name} is {os.fstat(self.fd).st_size} bytes, "
                                     f"the machine's layout says {layout.arena_bytes}")
            else:
                os.ftruncate(self.fd, layout.arena_bytes)   # sparse: costs nothing until touched
            if shm_name is None:
                # its size is final: whoever reaches the memfd can neither cut it short (every
                # mapping past the new end would SIGBUS, the host's first) nor grow it
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                            | fcntl.F_SEAL_SEAL)
            os.set_inheritable(self.fd, False)
            self.map = mmap.mmap(self.fd, layout.arena_bytes)
            self._peers: dict[int, PeerEntry] = {}
            self._owns: dict[int, OwnPage] = {}
        except BaseException:
            os.close(self.fd)
            if shm_name is not None and not attach:
                posix_ipc.unlink_shared_memory(shm_name)
            raise
        self.address = linux.buffer_address(self.map)
        _HOST_MAPPINGS[self.address] = (layout.arena_bytes, weakref.ref(self.map))
        if attach:
            head = self.header()
            if head["magic"] != L.MAGIC or head["version"] != L.VERSION:
                self.close()
                raise ValueError(f"arena {shm_name} is not a version-{L.VERSION} arena")
            self._generation = int(str(head["generation"]))
        else:
            self._generation = 0
            self._write_header(flags)

    def adopted(self) -> None:
        """A new host took the arena over: the header names it."""
        self._write_header(int(str(self.header()["flags"])))

    def unlink(self) -> None:
        """Remove the arena's name (a survivable machine's shutdown): the memory goes with the
        last mapping."""
        if self.shm_name is not None:
            try:
                posix_ipc.unlink_shared_memory(self.shm_name)
            except posix_ipc.ExistentialError:
                pass

    # -- header and table ------------------------------------------------------------------
    def _write_header(self, flags: int) -> None:
        lay = self.layout
        L.HEADER.pack_into(
            self.map, 0, L.MAGIC, L.VERSION, PAGE_SIZE, lay.arena_bytes, MAX_INSTANCES, flags,
            lay.table_offset, L.TABLE_RECORD_BYTES, 0, lay.control_offset, PEER_BYTES,
            OWN_BYTES, lay.console_offset, lay.console_bytes, lay.pool_offset, lay.pool_bytes,
            self._generation, os.getpid(), lay.ring_offset, lay.ring_bytes, lay.ring_slots,
            lay.ring_slot_bytes,
        )

    def header(self) -> dict[str, object]:
        return dict(zip(L.HEADER_FIELDS, L.HEADER.unpack_from(self.map, 0)))

    def write_record(self, instance_id: int, *, state: str, name: str, memory_base: int,
                     memory_bytes: int, cpus: list[int], pid: int, boots: int,
                     last_exit_ns: int, last_exit_signal: int, last_exit_code: int,
                     kernel: str) -> None:
        bitmap = bytearray(64)
        for c in cpus:
            if c < 512:
                bitmap[c // 8] |= 1 << (c % 8)
        off = self.layout.table_record_at(instance_id)
        L.TABLE_RECORD.pack_into(
            self.map, off, STATE_CODES[state], instance_id,
            name.encode()[: L.NAME_BYTES], memory_base, memory_bytes, bytes(bitmap), pid, boots,
            last_exit_ns, last_exit_signal, last_exit_code, kernel.encode()[: L.KERNEL_BYTES],
        )
        self._generation += 1
        # generation lives at a fixed header offset; bump it so outside readers see changes
        gen_off = L.GENERATION_OFFSET
        self.map[gen_off:gen_off + 8] = self._generation.to_bytes(8, "little")

    def clear_record(self, instance_id: int) -> None:
        off = self.layout.table_record_at(instance_id)
        self.map[off:off + L.TABLE_RECORD_BYTES] = bytes(L.TABLE_RECORD_BYTES)

    def read_record(self, instance_id: int) -> dict[str, object]:
        off = self.layout.table_record_at(instance_id)
        return dict(zip(L.TABLE_FIELDS, L.TABLE_RECORD.unpack_from(self.map, off)))

    # -- control slots ---------------------------------------------------------------------
    def peer(self, instance_id: int) -> PeerEntry:
        """The host's entry for ``instance_id`` in the peer table (the host writes it)."""
        entry = self._peers.get(instance_id)
        if entry is None:
            entry = self._peers[instance_id] = peer_of(self.map, instance_id,
                                                        self.layout.control_offset)
        return entry

    def own(self, instance_id: int) -> OwnPage:
        """What instance ``instance_id`` wrote about itself (untrusted). The record objects
        are kept (they hold only the map and an offset): ``show`` asks for 511 of them."""
        page = self._owns.get(instance_id)
        if page is None:
            page = self._owns[instance_id] = own_of(self.map, instance_id,
                                                    self.layout.own_pages_offset)
        return page

    # -- memory ----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        return self.map[offset:offset + size]

    def scrub(self, offset: int, size: int) -> None:
        """Zero a page-aligned range and return its pages to the kernel."""
        linux.punch_hole(self.fd, offset, size)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            # a memoryview is still alive somewhere; unmapping under it would make it dangle.
            # The mapping goes when the last view does (mmap's finalizer unmaps it).
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

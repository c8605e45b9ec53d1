"""What a boot's host side costs in page faults (issue 21's exec -> active bound).

After ``load`` the host has forked the parked successor, so every host page the boot path
writes, and every fresh page it reads, faults once on exec's clock. A ring's reset must not
be a fresh ring-sized buffer per boot: its 64 pages (64 slots of 4 KiB) faulted each time,
about a third of the boot's faults.
"""

import mmap
import os
import resource
import signal

import pytest

from partition import linux
from partition.abi import layout as L
from partition.abi.ring import Ring

pytestmark = pytest.mark.system


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def test_a_ring_reset_after_a_fork_faults_far_fewer_pages_than_the_ring_has():
    lay = L.ArenaLayout(pool_bytes=4 << 20, console_bytes=4096, ring_slots=64,
                        ring_slot_bytes=4096)
    area = mmap.mmap(-1, lay.ring_area_bytes)
    view = memoryview(area)
    r = Ring(view, linux.buffer_address(area), lay, 1)
    r.reset()                          # a host that booted this instance before
    pages = len(r.buf) // mmap.PAGESIZE
    pid = os.fork()                    # the parked successor, sharing the host's pages
    if pid == 0:
        try:
            signal.pause()
        finally:
            os._exit(0)
    try:
        minor_faults()                 # the measuring's own first faults after the fork
        before = minor_faults()
        r.reset()
        faults = minor_faults() - before
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        r.buf.release()
        view.release()
        area.close()
    assert pages >= 64
    assert faults < pages // 4, f"{faults} faults resetting a ring of {pages} pages"

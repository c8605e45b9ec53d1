"""The ring fixtures test_ring.py and test_ring_port.py share: a ring in an anonymous mapping,
bound to one implementation (C or Python) per test."""

import mmap

import pytest

from helpers import without_c
from partition import linux
from partition.abi import impl, ring
from partition.abi import layout as L
from partition.abi.ring import Ring


@pytest.fixture(params=["c", "python"])
def implementation(request):
    """Ring's hot paths bound to one implementation for the test, and back after it."""
    if request.param == "c" and impl.FAST is None:
        without_c("the C extension is not built here")
    ring.use(impl.FAST if request.param == "c" else None)
    yield request.param
    ring.use(impl.FAST)


def a_ring(slots, slot_bytes):
    """A ring in an anonymous mapping (one process plays every side), and its clean-up."""
    lay = L.ArenaLayout(pool_bytes=4 << 20, console_bytes=4096, ring_slots=slots,
                        ring_slot_bytes=slot_bytes)
    area = mmap.mmap(-1, lay.ring_area_bytes)
    view = memoryview(area)
    r = Ring(view, linux.buffer_address(area), lay, 1)
    yield r
    r.buf.release()
    view.release()
    area.close()


@pytest.fixture
def rg(implementation):
    yield from a_ring(8, 256)


def drain_all(r):
    got = []
    r.drain(lambda t, s, c, p: got.append((t, s, c, p)) or True, 64)
    return got

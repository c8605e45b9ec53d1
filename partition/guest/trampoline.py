"""The SMP INIT trampoline: an instance's process from fork to kernel, in two halves.

At ``load`` (the host forks it then), in order, each step before the next: pin to the
instance's host cores; take it out of the host's session (Ctrl-C on the host's terminal is the
host's business); die with the host; unmap every whole-arena mapping inherited from the host;
map only the partition, the console, the host's peer table (read-only), its own control page
and the ring area; close every descriptor but its doorbells and channels; contain it
(guest/containment.py); import the kernel image (guest/loader.py) and report to the host; then
park on its doorbell, loaded, as a CPU waits in the real system's holding pen.

At ``exec``: the host publishes the spawn mailbox and rings; the process answers it, makes the
kernel and hands over. Nothing here may return into the host's code: every path ends in
``os._exit``, so the host's atexit handlers, buffered files and finalizers never run twice.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, NoReturn

import setproctitle

from partition import linux
from partition.abi import layout as L
from partition.abi.console import ConsoleWriter
from partition.abi.constants import (
    EXIT_HALTED,
    EXIT_PANIC,
    EXIT_TRAMPOLINE,
    IPI_SIGNAL,
    STATE_ACTIVE,
)
from partition.abi.slot import OwnPage, PeerEntry, peer_of
from partition.errors import BadKernelImage
from partition.guest.containment import contain
from partition.guest.kernel import KernelContext, KernelPanic, heap_of, parse_cmdline
from partition.guest.loader import resolve
from partition.guest.mappings import InstanceMappings
from partition.guest.runtime import KernelRuntime


@dataclass
class BootParams:
    id: int
    name: str
    cpus: list[int]
    physical_cpus: list[int]
    cmdline: str
    spec: str                        # the kernel image, imported here (guest/loader.py)
    arena_fd: int
    layout: L.ArenaLayout
    memory_base: int
    memory_bytes: int
    doorbell_fd: int
    host_doorbell_fd: int
    channel_fd: int                  # the instance's end of its doorbell channel
    report_fd: int                   # the loader's report to the host (a pipe), then closed
    host_pid: int
    oversubscribed: bool
    protection: bool = True
    #: (address, length) of every whole-arena mapping the host holds: the child unmaps them
    inherited: list[tuple[int, int]] = field(default_factory=list)
    #: the ``cgroup.procs`` files of the instance's cgroups (host/cgroups.py), joined first
    cgroups: list[str] = field(default_factory=list)
    #: directories covered in its mount namespace (the machine's run directory)
    hide: list[str] = field(default_factory=list)
    #: the instance outlives its host (a supervisor's machine): no parent-death signal
    survive_host: bool = False
    #: the image's checked content (a signed or ELF image, host/signing.py): imported instead
    #: of the spec's file
    image: bytes = b""


def readable_label(label: str, source: str) -> str:
    """What to call an image in ps and top: ``module:Class``, or ``file.py:Class`` for an
    image loaded by path (its module has a generated name)."""
    module, _, cls = label.partition(":")
    if module.startswith("mk_kimage_") and source:
        return f"{os.path.basename(source)}:{cls}"
    return label


def _close_all_except(keep: set[int]) -> None:
    """close_range(2) around the kept descriptors: one system call per gap, no /proc walk."""
    low = 0
    for fd in sorted(keep) + [2 ** 31 - 1]:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1


def _watch_foreign_writes(arena_all: memoryview, layout: L.ArenaLayout,
                          console: ConsoleWriter) -> None:
    """Write-protect the pool through the whole-arena mapping (asynchronously: writes still
    land, the page tables remember them) so that the host can tell who wrote where. The
    userfaultfd stays open for the life of the process; its number is not needed again."""
    try:
        addr = linux.buffer_address(arena_all.obj) + layout.pool_offset
        linux.watch_writes(addr, layout.pool_bytes)
    except OSError as exc:
        console.printk(f"multikernel: write watch unavailable ({exc}); foreign writes into other "
                       "partitions will not be attributed")


def _limit_heap(boot: BootParams) -> None:
    """RLIMIT_AS = what is mapped now + the partition + a private heap (``mk_heap=``, 256M):
    a kernel that allocates beyond it gets MemoryError (a panic) and fails alone."""
    heap = heap_of(boot.cmdline)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = mapped + heap
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _report(fd: int, **fields: object) -> None:
    """The loader's one message to the host: JSON, then the pipe is closed."""
    try:
        os.write(fd, json.dumps(fields).encode())
    finally:
        os.close(fd)


def _inert_until_start(spec: str, trace: Any, profile: Any, callbacks: list[Any]) -> None:
    """A parked image must be inert until start: the host shows it ``loaded``, its CPUs may be
    shared, and none of its code may run before ``exec``. Hooks its import set, which would run
    its code under the trampoline's own (a trace or profile function, a collector callback),
    are put back as they were; a thread or an interval timer it started refuses it. The host
    counts the process's real threads too (host/loading.py): ``threading`` knows only its own,
    and an image can lie to it."""
    sys.settrace(trace)
    sys.setprofile(profile)
    gc.callbacks[:] = callbacks
    if threading.active_count() > 1:
        raise BadKernelImage(f"kernel {spec!r} started {threading.active_count() - 1} "
                             "thread(s) while it was imported",
                             "start threads in boot(), not at import")
    armed = [name for name in ("ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF")
             if any(signal.getitimer(getattr(signal, name)))]
    if armed:
        raise BadKernelImage(f"kernel {spec!r} armed a timer ({', '.join(armed)}) while it "
                             "was imported", "arm timers in boot(), not at import")


def _park(doorbell_fd: int, mailbox: PeerEntry) -> int:
    """Loaded and parked: sleep on the doorbell until the host publishes the spawn mailbox for
    a generation (``exec``); returns it. Like a CPU in the real system's holding pen."""
    while True:
        if mailbox.ready == 1 and mailbox.generation:
            return mailbox.generation
        linux.wait_readable(doorbell_fd, None)
        linux.doorbell_clear(doorbell_fd)


def _online(doorbell_fd: int, mailbox: PeerEntry, generation: int) -> None:
    """Wait until the host has marked this incarnation active in the peer table (it rings when
    it has): before that, a peer could not answer a message the kernel sends, since peers
    route by the host's table only."""
    while not (mailbox.peer_state == STATE_ACTIVE and mailbox.ready == 0):
        if mailbox.generation != generation:
            raise RuntimeError(f"the host revoked generation {generation}")
        linux.wait_readable(doorbell_fd, 0.05)
        linux.doorbell_clear(doorbell_fd)


def enter(boot: BootParams) -> NoReturn:
    """The instance's process, from fork to exit. Never returns.

    At ``load``: pin, map, contain, import the kernel image, report to the host, park. At
    ``exec``: answer the spawn mailbox, make the kernel, run it."""
    code = EXIT_TRAMPOLINE
    slot: OwnPage | None = None
    console: ConsoleWriter | None = None
    runtime: KernelRuntime | None = None
    report_fd = boot.report_fd
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, IPI_SIGNAL})
        # a host that set a signal wake-up fd (the daemon does) passes it on across fork;
        # the descriptors are closed below, and every signal would then print an
        # "Exception ignored ... Bad file descriptor" on the console
        signal.set_wakeup_fd(-1)
        os.sched_setaffinity(0, boot.cpus)
        os.setsid()
        if not boot.survive_host:
            linux.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != boot.host_pid:      # the host died between fork and here
            os._exit(EXIT_TRAMPOLINE)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        for addr, length in boot.inherited:
            linux.munmap(addr, length)
        maps = InstanceMappings(boot.arena_fd, boot.layout, boot.id,
                                boot.memory_base, boot.memory_bytes)
        slot = maps.own
        mailbox = peer_of(maps.peers, boot.id)
        arena_all = None if boot.protection else \
            memoryview(mmap.mmap(boot.arena_fd, boot.layout.arena_bytes))
        devnull = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(devnull, std)
        _close_all_except({0, 1, 2, boot.doorbell_fd, boot.host_doorbell_fd, boot.channel_fd,
                           report_fd})
        console = ConsoleWriter(memoryview(maps.console))
        sys.stdout = sys.stderr = console
        _limit_heap(boot)
        if arena_all is not None:              # unprotected: the host attributes foreign writes
            _watch_foreign_writes(arena_all, boot.layout, console)
        missing = contain(boot.cgroups, boot.hide)  # guest/containment.py: before any kernel code,
        if missing:                            # the image's import-time code included
            console.printk(f"multikernel: not contained here: {', '.join(missing)}")
        try:
            hooks = (sys.gettrace(), sys.getprofile(), list(gc.callbacks))
            kernel_cls, label, source = resolve(boot.spec, boot.image)
            _inert_until_start(boot.spec, *hooks)
        except BadKernelImage as exc:
            _report(report_fd, ok=False, message=exc.message, hint=exc.hint)
            report_fd = -1
            os._exit(EXIT_TRAMPOLINE)
        _report(report_fd, ok=True, label=label, source=source)
        report_fd = -1
        title = f"mk[{boot.id}:{boot.name}] {readable_label(label, source)}"
        setproctitle.setproctitle(f"{title} (parked)")
        generation = _park(boot.doorbell_fd, mailbox)
        if parse_cmdline(boot.cmdline).get("mk_debug") == "stall_boot":
            while True:                        # test hook: a boot CPU that never answers
                time.sleep(3600)
        slot.ack_cpu = linux.sched_getcpu()
        slot.ack_generation = generation       # the answer; the host marks us active
        linux.ring_doorbell(boot.host_doorbell_fd)     # (a full pipe is rung already)
        _online(boot.doorbell_fd, mailbox, generation)
        setproctitle.setproctitle(title)       # after the answer: off the boot's clock
        ctx = KernelContext(
            id=boot.id, name=boot.name, cpus=list(boot.cpus),
            physical_cpus=list(boot.physical_cpus), cmdline=boot.cmdline,
            memory_base=boot.memory_base, memory=memoryview(maps.partition), console=console,
            own=slot, peers=memoryview(maps.peers), doorbell_fd=boot.doorbell_fd,
            host_doorbell_fd=boot.host_doorbell_fd,
            channel=socket.socket(fileno=boot.channel_fd),
            oversubscribed=boot.oversubscribed, boot_generation=generation,
            layout=boot.layout, rings=memoryview(maps.rings),
            rings_address=linux.buffer_address(maps.rings), arena_all=arena_all,
            table=memoryview(maps.table),
        )
        code = EXIT_PANIC                      # from here on, any escape is a kernel panic
        runtime = KernelRuntime(kernel_cls, ctx)   # (guest/runtime.py: it makes the kernel)
        # install the runtime's handlers, then let pending halt requests and IPIs in
        signal.signal(signal.SIGTERM, runtime.on_halt_request)
        signal.signal(IPI_SIGNAL, runtime.on_ipi)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, IPI_SIGNAL})
        reason = runtime.main()
        slot.reason = reason
        code = EXIT_HALTED
    except KernelPanic as exc:
        if console is not None:
            console.printk(f"Kernel panic - not syncing: {exc.reason}")
        if slot is not None:
            slot.reason = f"panic: {exc.reason}"
        if runtime is not None:
            runtime.tell_halted(f"panic: {exc.reason}")
        code = EXIT_PANIC
    except BaseException as exc:
        what = "panic" if code == EXIT_PANIC else "trampoline"
        if report_fd >= 0:                     # before the image was resolved: tell the host
            _report(report_fd, ok=False, message=f"trampoline: {type(exc).__name__}: {exc}",
                    hint=None)
        if console is not None:
            console.printk("Oops: " + "".join(traceback.format_exception(exc)).rstrip())
            console.printk(f"Kernel panic - not syncing: {type(exc).__name__}: {exc}")
        if slot is not None:
            slot.reason = f"{what}: {type(exc).__name__}: {exc}"
        if runtime is not None:
            runtime.tell_halted(f"{what}: {type(exc).__name__}: {exc}")
    finally:
        os._exit(code)

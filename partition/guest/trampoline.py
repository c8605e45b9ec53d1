"""The SMP INIT trampoline: what runs in a freshly forked instance before any kernel code.

In order, and each step before the next: pin to the instance's host cores; take the instance out
of the host's session (Ctrl-C on the host's terminal is the host's business); die with the host;
unmap every whole-arena mapping inherited from the host; map only the partition, the console and
the control area; close every descriptor except the two doorbells; answer the spawn mailbox; then
hand over to the kernel. Nothing here may return into the host's code: every path ends in
``os._exit``, so the host's atexit handlers, buffered files and finalizers never run twice.
"""

from __future__ import annotations

import mmap
import os
import resource
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import NoReturn

from partition import linux
from partition.abi import layout as L
from partition.abi.console import ConsoleWriter
from partition.abi.constants import DEFAULT_HEAP, EXIT_HALTED, EXIT_PANIC, EXIT_TRAMPOLINE, IPI_SIGNAL
from partition.abi.slot import OwnPage, peer_of
from partition.guest.containment import contain
from partition.guest.kernel import KernelContext, KernelPanic, parse_cmdline
from partition.guest.mappings import InstanceMappings


@dataclass
class BootParams:
    id: int
    name: str
    cpus: list[int]
    physical_cpus: list[int]
    cmdline: str
    kernel_cls: type
    arena_fd: int
    layout: L.ArenaLayout
    memory_base: int
    memory_bytes: int
    doorbell_fd: int
    host_doorbell_fd: int
    channel_fd: int                  # the instance's end of its doorbell channel
    host_pid: int
    generation: int
    oversubscribed: bool
    protection: bool = True
    #: (address, length) of every whole-arena mapping the host holds: the child unmaps them
    inherited: list[tuple[int, int]] = field(default_factory=list)
    #: the ``cgroup.procs`` files of the instance's cgroups (host/cgroups.py), joined first
    cgroups: list[str] = field(default_factory=list)


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
    heap = DEFAULT_HEAP
    text = parse_cmdline(boot.cmdline).get("mk_heap")
    if text:
        from partition.units import parse_size
        heap = parse_size(text, "mk_heap")
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = mapped + heap
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def enter(boot: BootParams) -> NoReturn:
    """Child side of exec. Never returns."""
    code = EXIT_TRAMPOLINE
    slot: OwnPage | None = None
    console: ConsoleWriter | None = None
    kernel = None
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, IPI_SIGNAL})
        # a host that set a signal wake-up fd (the daemon does) passes it on across fork;
        # the descriptors are closed below, and every signal would then print an
        # "Exception ignored ... Bad file descriptor" on the console
        signal.set_wakeup_fd(-1)
        os.sched_setaffinity(0, boot.cpus)
        os.setsid()
        linux.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != boot.host_pid:      # the host died between fork and prctl
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
        _close_all_except({0, 1, 2, boot.doorbell_fd, boot.host_doorbell_fd, boot.channel_fd})
        console = ConsoleWriter(memoryview(maps.console))
        sys.stdout = sys.stderr = console
        # spawn mailbox: check it is addressed to us, then clear `ready` (the answer)
        if mailbox.ready != 1 or mailbox.generation != boot.generation:
            raise RuntimeError(f"spawn mailbox not published for generation {boot.generation}")
        stall = parse_cmdline(boot.cmdline).get("mk_debug") == "stall_boot"
        if stall:                              # test hook: a boot CPU that never answers
            while True:
                time.sleep(3600)
        slot.ack_cpu = linux.sched_getcpu()
        slot.ack_generation = boot.generation      # the answer; the host marks us active
        os.eventfd_write(boot.host_doorbell_fd, 1)
        _limit_heap(boot)                      # after the answer (off the boot-latency path),
                                               # before any kernel code
        if arena_all is not None:              # unprotected: the host attributes foreign writes
            _watch_foreign_writes(arena_all, boot.layout, console)
        missing = contain(boot.cgroups)        # guest/containment.py: the last step before
        if missing:                            # any kernel code
            console.printk(f"multikernel: not contained here: {', '.join(missing)}")
        ctx = KernelContext(
            id=boot.id, name=boot.name, cpus=list(boot.cpus),
            physical_cpus=list(boot.physical_cpus), cmdline=boot.cmdline,
            memory_base=boot.memory_base, memory=memoryview(maps.partition), console=console,
            own=slot, peers=memoryview(maps.peers), doorbell_fd=boot.doorbell_fd,
            host_doorbell_fd=boot.host_doorbell_fd,
            channel=socket.socket(fileno=boot.channel_fd),
            oversubscribed=boot.oversubscribed, boot_generation=boot.generation,
            layout=boot.layout, rings=memoryview(maps.rings),
            rings_address=linux.buffer_address(maps.rings), arena_all=arena_all,
        )
        code = EXIT_PANIC                      # from here on, any escape is a kernel panic
        kernel = boot.kernel_cls(ctx)
        # install the kernel's handlers, then let pending halt requests and IPIs in
        signal.signal(signal.SIGTERM, kernel._on_halt_request)
        signal.signal(IPI_SIGNAL, kernel._on_ipi)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, IPI_SIGNAL})
        reason = kernel._main()
        slot.reason = reason
        code = EXIT_HALTED
    except KernelPanic as exc:
        if console is not None:
            console.printk(f"Kernel panic - not syncing: {exc.reason}")
        if slot is not None:
            slot.reason = f"panic: {exc.reason}"
        if kernel is not None:
            kernel._tell_halted(f"panic: {exc.reason}")
        code = EXIT_PANIC
    except BaseException as exc:
        what = "panic" if code == EXIT_PANIC else "trampoline"
        if console is not None:
            console.printk("Oops: " + "".join(traceback.format_exception(exc)).rstrip())
            console.printk(f"Kernel panic - not syncing: {type(exc).__name__}: {exc}")
        if slot is not None:
            slot.reason = f"{what}: {type(exc).__name__}: {exc}"
        if kernel is not None:
            kernel._tell_halted(f"{what}: {type(exc).__name__}: {exc}")
    finally:
        os._exit(code)

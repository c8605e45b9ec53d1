"""The host's commands as a kernel's runtime obeys them: checked, then carried out.

Any instance can write a message into this kernel's ring, the sender id included; the host
alone can write the peer table. So a command (abi/message.py HOST_COMMANDS) is obeyed only
when the host's peer entry for this instance publishes its digest (``verify``). The commands:
SHUTDOWN (a graceful halt, or a live update's hand-over), EMU_FAULT (guest/faults.py), and the
RESOURCE family (CPU_ADD/REMOVE, MEM_ADD/REMOVE: the kernel's ``on_*`` hook decides, the
RES_ACK goes into the own page; QUERY answers as a response) and MKTY input (a line typed on the
console, to ``on_console_input``). The probe commands are
probes.py's, which calls ``verify`` too.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from partition import linux
from partition.abi import message as M
from partition.abi import slot as S
from partition.guest.kernel import KernelContext, RefuseResource

if TYPE_CHECKING:
    from partition.guest.endpoint import Messenger
    from partition.guest.kernel import Kernel


class HostCommands:
    """The host's commands to one kernel run: registered on its messenger at construction.
    ``halt_gracefully`` ends the run's loop (a SHUTDOWN); ``fault`` carries out an injected
    fault (kind, options)."""

    def __init__(self, ctx: KernelContext, messenger: Messenger,
                 halt_gracefully: Callable[[], None],
                 fault: Callable[[str, dict[str, Any]], None]) -> None:
        self._ctx = ctx
        assert ctx.peers is not None
        self._peers = ctx.peers             # the host's peer table (read-only)
        self._halt_gracefully = halt_gracefully
        self._fault = fault
        #: the kernel whose ``on_*`` hooks decide a RESOURCE command (set once it is made)
        self.kernel: Kernel | None = None
        # the last host command obeyed: a run starts past its predecessors'
        self.last_command = S.peer_of(ctx.peers, ctx.id).cmd_seq
        #: memory added at run time (base, size): announced, not mapped (docs/kerf.md)
        self.added_memory: list[tuple[int, int]] = []
        #: this halt hands over to a new image (a live update): shutdown() may kho_preserve
        self.handing_over = False
        messenger.register(M.MK_MSG_SHUTDOWN, self._on_shutdown)
        messenger.register(M.MK_EMU_FAULT, self._on_fault)
        messenger.register(M.MK_EMU_MKTY, self._on_console)
        for op in (M.MK_MSG_CPU_ADD, M.MK_MSG_CPU_REMOVE, M.MK_MSG_MEM_ADD, M.MK_MSG_MEM_REMOVE,
                   M.MK_MSG_QUERY):
            messenger.register(op, self._on_resource)

    def verify(self, msg: M.Message) -> Any:
        """The body of a host command, or ``M.NOT_FROM_HOST``.

        A command is obeyed only when the host's peer entry for this instance publishes its
        digest: its number is new, within the last ``COMMAND_WINDOW``, and type, number and
        body hash to what the host wrote. Anything else is counted (``forged_commands`` in
        the own page) and said on the console."""
        p = msg.payload
        ctx = self._ctx
        peer = S.peer_of(self._peers, ctx.id)
        if msg.sender == 0 and isinstance(p, dict) and \
                isinstance(p.get("seq"), int) and set(p) == {"seq", "body"}:
            seq, last = p["seq"], peer.cmd_seq
            if self.last_command < seq <= last and last - seq < S.COMMAND_WINDOW and \
                    peer.digest(seq) == M.command_digest(seq, ctx.boot_generation,
                                                         msg.msg_type, p["body"]):
                self.last_command = seq
                return p["body"]
        S.bump(ctx.own.buf, ctx.own.base + S.OWN_FORGED_COMMANDS)
        ctx.console.printk(f"ipi: a command of type {msg.msg_type:#x} not from the host, "
                           f"ignored (claimed sender {msg.sender})")
        return M.NOT_FROM_HOST

    def _on_shutdown(self, msg: M.Message) -> None:
        body = self.verify(msg)
        if body is not M.NOT_FROM_HOST:
            self.handing_over = isinstance(body, dict) and body.get("handover") is True
            self._halt_gracefully()

    def _on_fault(self, msg: M.Message) -> None:
        p = self.verify(msg)
        if p is M.NOT_FROM_HOST or not isinstance(p, dict):
            return
        self._fault(str(p.get("kind")), dict(p.get("options") or {}))

    def _on_console(self, msg: M.Message) -> None:
        """MKTY input: a line typed on the console, to the kernel's ``on_console_input``. The
        host checked the line (text, one line, bounded); what a forged message says never
        reaches the hook. An exception escaping the hook is the kernel's panic, as from any
        handler (the host records it; nothing of the host's is at stake)."""
        body = self.verify(msg)
        if body is M.NOT_FROM_HOST or not isinstance(body, dict) or \
                body.get("op") != M.MKTY_INPUT or not isinstance(body.get("line"), str):
            return
        kernel = self.kernel
        assert kernel is not None, "console input before the kernel was made"
        kernel.on_console_input(body["line"])

    def _on_resource(self, msg: M.Message) -> Any:
        """A RESOURCE command: the hook decides; the RES_ACK goes into this kernel's own
        control page (the one place no peer can write), then the host's doorbell rings. QUERY
        answers as a request's response (informational only). A panic in a hook is a panic:
        the host sees the death."""
        body = self.verify(msg)
        if body is M.NOT_FROM_HOST or not isinstance(body, dict):
            return None
        seq = self.last_command
        op = msg.msg_type
        ctx = self._ctx
        if op == M.MK_MSG_QUERY:
            return {"type": M.MK_MSG_RES_ACK, "status": 0, "cpus": list(ctx.physical_cpus),
                    "logical": list(ctx.cpus), "memory_base": ctx.memory_base,
                    "memory_bytes": len(ctx.memory), "added": self.added_memory}
        kernel = self.kernel
        assert kernel is not None, "a RESOURCE command before the kernel was made"
        try:
            if op in (M.MK_MSG_CPU_ADD, M.MK_MSG_CPU_REMOVE):
                phys = [int(c) for c in body.get("cpus", [])]
                logical = [int(c) for c in body.get("logical", [])]
                (kernel.on_cpu_add if op == M.MK_MSG_CPU_ADD else kernel.on_cpu_remove)(phys)
                pairs = dict(zip(ctx.cpus, ctx.physical_cpus))
                if op == M.MK_MSG_CPU_ADD:
                    pairs.update(zip(logical, phys))
                else:
                    for c in logical:
                        pairs.pop(c, None)
                ctx.cpus, ctx.physical_cpus = list(pairs), list(pairs.values())
            else:
                base, size = int(body.get("base", 0)), int(body.get("size", 0))
                if op == M.MK_MSG_MEM_ADD:
                    kernel.on_memory_add(base, size)
                    self.added_memory.append((base, size))
                else:
                    kernel.on_memory_remove(base, size)
                    if (base, size) in self.added_memory:
                        self.added_memory.remove((base, size))
        except RefuseResource as exc:
            ctx.console.printk(f"multikernel: refused {msg.msg_type:#x}: {exc}")
            self._res_ack(seq, errno.ECANCELED, str(exc))
            return None
        self._res_ack(seq, 0)
        return None

    def _res_ack(self, seq: int, status: int, reason: str = "") -> None:
        self._ctx.own.res_ack(seq, status, reason)
        linux.ring_doorbell(self._ctx.host_doorbell_fd)

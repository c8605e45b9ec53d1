"""How an instance's run ended: from its exit status and what the host had asked for."""

from __future__ import annotations

import os
import signal
import time

from partition.abi.constants import EXIT_HALTED, EXIT_PANIC, EXIT_TRAMPOLINE
from partition.host.instance import ExitRecord

# how -> failure kind; the other ways out (graceful, forced, voluntary) are not failures
FAILURE_KINDS = {"killed": "crash", "exited": "crash", "panic": "panic", "hang": "hang",
                 "boot-failed": "boot"}


#: the halt a reboot(2) inside asked for (``Instance.halt_requested``, supervision.py): a forced
#: halt whose exit is followed by a restart
REBOOT = "reboot"


def classify_exit(status: int, asked: str | None, slot_reason: str) -> ExitRecord:
    """``asked`` is the halt the host requested (graceful, forced, reboot, forced-after-timeout,
    boot-timeout, boot-return-timeout, or fault: a kill it injected on request) or None;
    ``slot_reason`` is the instance's own, untrusted, account."""
    now = time.time()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGKILL and asked == "forced":
            return ExitRecord("forced halt (SIGKILL)", "forced", sig, None, now)
        if sig == signal.SIGKILL and asked == REBOOT:
            return ExitRecord("reboot(2) in its userland: forced halt (SIGKILL), booted again",
                              "forced", sig, None, now)
        if sig == signal.SIGKILL and asked == "forced-after-timeout":
            return ExitRecord("forced halt: graceful halt not acknowledged in time",
                              "forced", sig, None, now)
        if sig == signal.SIGKILL and asked == "watchdog":
            return ExitRecord("hung: no progress within its watchdog period; forced halt",
                              "hang", sig, None, now)
        if sig == signal.SIGKILL and asked == "fault":
            return ExitRecord("killed by SIGKILL: an injected kill fault (mkctl fault)",
                              "killed", sig, None, now)
        if sig == signal.SIGKILL and asked == "boot-timeout":
            return ExitRecord("boot CPU did not answer the spawn mailbox in time",
                              "boot-failed", sig, None, now)
        if sig == signal.SIGKILL and asked == "boot-return-timeout":
            return ExitRecord("its boot() did not return in time; forced halt",
                              "boot-failed", sig, None, now)
        if sig == signal.SIGSYS:
            return ExitRecord("killed by SIGSYS: a system call no instance may make (seccomp; "
                              "see docs/architecture.md, containment)", "killed", sig, None, now)
        return ExitRecord(f"killed by {name} (not sent by the host)", "killed", sig, None, now)
    code = os.WEXITSTATUS(status)
    if code == EXIT_HALTED:
        how = "graceful" if asked == "graceful" else "voluntary"
        return ExitRecord(slot_reason or "halted", how, None, code, now)
    if code == EXIT_PANIC:
        return ExitRecord(slot_reason or "panic (no reason recorded)", "panic", None, code, now)
    if code == EXIT_TRAMPOLINE:
        return ExitRecord(slot_reason or "trampoline failed", "boot-failed", None, code, now)
    return ExitRecord(f"exit status {code}", "exited", None, code, now)

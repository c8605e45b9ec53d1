"""The numbers host and instances agree on and no other module owns: the host's instance id,
the IPI signal, the trampoline's exit codes and the peer-state codes.

Kept in one place because each is read on one side and written on the other: a host that
classified exit 77 as something other than what the trampoline meant by it would record every
panic wrongly, and nothing but a shared definition keeps the two in step."""

from __future__ import annotations

import signal

HOST_ID = 0                      # the host kernel is instance 0
MAX_INSTANCES = 512              # ids 0..511, as the real tree's MK_MAX_INSTANCES

#: the doorbell of a busy instance (the real machine's MULTIKERNEL_VECTOR, 0xea). A standard
#: signal, not a real-time one: a standard signal is pending at most once, as an interrupt line
#: is, so a peer that rings a million times costs its receiver a few handler runs, where a
#: queued real-time signal would be delivered a million times (a 4 s stall, measured). SIGURG's
#: default action is to ignore it: one that arrives before the handler does no harm.
IPI_SIGNAL = signal.SIGURG

# how an instance process exits (the trampoline's ``os._exit`` codes)
EXIT_HALTED = 0
EXIT_PANIC = 77                  # the kernel panicked; reason in the control slot
EXIT_TRAMPOLINE = 78             # the trampoline itself failed (pinning, mapping); reason in the slot

#: an instance's private heap unless its cmdline says ``mk_heap=``: RLIMIT_AS in the
#: trampoline, and part of its memory cgroup's limit in the host
DEFAULT_HEAP = 256 << 20

#: state codes of the instance table and the peer-state table (the real system's names)
STATE_CODES = {"empty": 0, "ready": 1, "loaded": 2, "active": 3, "failed": 4}
STATE_ACTIVE = STATE_CODES["active"]

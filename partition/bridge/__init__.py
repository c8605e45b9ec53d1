"""The kerf bridge: the real kerf, unmodified, driving the emulator.

``mkctl kerf -- ARGS`` runs kerf in a private mount namespace where ``/sys/fs/multikernel`` is a
FUSE filesystem served from the host (``fuse``), ``/proc/iomem``, ``/proc/kimage`` and
``/proc/cpuinfo`` are the emulator's views, and a seccomp user-notification filter (``trap``)
answers kerf's ``kexec_file_load``, ``reboot`` and ``mount`` from the host.
"""

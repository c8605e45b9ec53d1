"""The host kernel (instance 0) and its kexec loader: the ``Machine`` and its verbs,
supervision, the host's IPC end, the pool, instances, kernel images, exit classification, fault
validation, write attribution, views and the event log. Never imports ``control``."""

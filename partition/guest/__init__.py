"""What runs inside an instance: the trampoline, the ``Kernel`` author API, the IPC endpoint
(which the host's end reuses), fault injection as carried out inside, the probe agent and the
instance's mappings. Never imports ``host`` or ``control``: an instance holds nothing of the
host but what the trampoline hands it (tests/test_layers.py checks it)."""

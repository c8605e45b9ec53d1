"""What host and instances share byte for byte: the arena's geometry, the control slot's fields,
the IPI ring protocol, the ``mk_message`` codec, the console format and the numbers both sides
use. Nothing here knows whether it runs in the host or in an instance: this package imports
neither ``guest``, ``host`` nor ``control`` (tests/test_layers.py checks it)."""

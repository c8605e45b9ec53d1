"""The control plane: ``mkctl``, the supervisor daemon, its client and their wire protocol.
The top of the house: nothing below it imports it."""

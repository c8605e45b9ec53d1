"""The live-update sample service, as a sample image: ``kernels.service:Service`` (and
``ServiceV2``, ``Pinger``). It is ``mkctl bench update``'s own (``partition/bench/service.py``,
where its state and result layout are documented)."""

from partition.bench.service import PING, Pinger, Service, ServiceV2

__all__ = ["PING", "Pinger", "Service", "ServiceV2"]

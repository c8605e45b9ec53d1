"""The echo kernel, as a sample image: ``kernels.echo:EchoKernel``.

It is the benchmarks' own kernel (``partition/bench/echo.py``, where its roles and its result
layout are documented), published here under the sample name that scenarios and the docs use,
so that there is one echo kernel to read and to measure."""

from partition.bench.echo import COUNT, RESULTS, STREAM, EchoKernel, read_results

__all__ = ["COUNT", "RESULTS", "STREAM", "EchoKernel", "read_results"]

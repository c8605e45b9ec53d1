"""Benchmarks: each prints the emulator's figure next to a raw baseline measured in the same run."""

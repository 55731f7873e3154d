"""Benchmarks: each measures xfer against its baseline in the same run."""

"""Benchmarks: each contender measured against its baseline tool in the same run."""

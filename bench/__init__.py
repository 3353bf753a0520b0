"""Benchmarks: the broadcast fan-out benchmark (`python -m bench.broadcast`) and its naive baseline server."""

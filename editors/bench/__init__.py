"""Benchmark harness: the lifelong protocol of PROTOCOL.md over edit datasets."""

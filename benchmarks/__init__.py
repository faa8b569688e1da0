"""Benchmark harnesses and their recorded results (not run by the test suite)."""

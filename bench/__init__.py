"""Benchmarks of freeatm_fast; results are JSON lines under bench/results/ (DESIGN.md §9)."""

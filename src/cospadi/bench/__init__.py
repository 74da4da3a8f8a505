"""Benchmarks that write BENCHMARKS.md: the methods x ratios sweep (bench), the solver
comparison (bench-solver) and inference size/speed (bench-infer)."""

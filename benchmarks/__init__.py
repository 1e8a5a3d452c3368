"""Side-by-side benchmarks (run by hand, not in CI)."""

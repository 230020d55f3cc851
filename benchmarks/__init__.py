"""Side-by-side benchmarks (`rtml bench ...`); figures go to benchmarks/RESULTS.md."""

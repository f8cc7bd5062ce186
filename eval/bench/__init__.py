"""Benchmarks behind `make bench`: each part is a module here with a `run(argv) -> None` that prints ratios."""

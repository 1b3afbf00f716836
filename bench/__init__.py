"""Benchmarks of lmbatch and its peers; run each script from the repository root as `python -m bench.<name>`."""

"""``python -m benchmarks``: timing of kdjax's hot train step against PyTorch."""

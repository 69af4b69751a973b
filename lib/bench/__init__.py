"""The benchmark: ``python -m lib.bench``."""

"""The whole queue loop on one machine: ``python -m lib.demo``."""

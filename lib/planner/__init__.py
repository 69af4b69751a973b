"""The endpoint planner: replay a job trace through the stand-in's scaling model (``python -m lib.planner``)."""

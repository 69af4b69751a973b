"""The worker process on each Vast instance: its one reservation, its routes and its control server.

``workers/null/worker.py`` is the entry point Vast's bootstrap runs; these are its parts.
"""

"""The recording autoscaler under its former name, for tests/e2e/test_examples.py and test_start_server.py only.

Everything else imports ``lib.bench.recorder.RecordingAutoscaler`` and
``tests.helpers``; this module goes once those two files do the same.
"""

from lib.bench.recorder import RecordingAutoscaler as FakeAutoscaler

__all__ = ["FakeAutoscaler"]

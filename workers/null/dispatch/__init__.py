"""The user's side, run on their own machines: the dispatcher that keeps Vast sessions in step with a queue."""

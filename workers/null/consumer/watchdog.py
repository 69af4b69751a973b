"""Stops a job whose consumer can no longer vouch for its claim, even when the consumer itself is frozen.

Run beside each COMMAND as ``python -S watchdog.py PGID`` (the standard
library only, so it starts in milliseconds). It reads deadlines from stdin,
one per line: a ``time.monotonic()`` value (the same clock across processes
on Linux) until which the consumer holds the job's claim. When a deadline
passes with no later one written, it SIGKILLs the job's process group: by
then the queue may hand the job to another consumer, so this one must not
be running it. A consumer frozen by SIGSTOP, or cut off from its queue,
writes nothing more, and its job is stopped on time all the same. End of
stdin (the job ended, or the consumer died) ends the watchdog.
"""

import math
import os
import select
import signal
import sys
import time


def watch(pgid: int, deadlines, now=time.monotonic) -> bool:
    """Kills ``pgid`` once a deadline read from ``deadlines`` (a text stream) passes; True when it did."""
    deadline = math.inf
    fd = deadlines.fileno()
    pending = b""
    while True:
        wait = None if deadline == math.inf else max(0.0, deadline - now())
        readable, _, _ = select.select([fd], [], [], wait)
        if not readable:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return True
        chunk = os.read(fd, 4096)
        if not chunk:
            return False
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            try:
                deadline = float(line)
            except ValueError:
                continue


if __name__ == "__main__":
    group = int(sys.argv[1])
    if watch(group, sys.stdin):
        print(f"watchdog: killed job process group {group}: its claim ran out unrenewed", file=sys.stderr, flush=True)

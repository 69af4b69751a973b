"""Beside the worker, on the instance: take one job from the queue for each session, run it, ack it, release.

``python -m workers.null.consumer --queue URL -- COMMAND [ARGS]`` runs it. For every session:

1. ``POST /claim`` on the worker's control server answers the moment a
   session is held (no polling);
2. exactly one job is claimed from the queue (none within ``--claim-timeout``:
   the session is released at once);
3. COMMAND runs with the job body on stdin and ``NULL_JOB_ID``,
   ``NULL_JOB_ATTEMPT`` and ``NULL_SESSION_ID`` in its environment (or a
   Python handler is called), while the queue's claim and the worker's lease
   are renewed every ack_wait / 3;
4. exit 0: ack (confirmed), then ``/release``; otherwise retry later, or
   dead-letter after ``--max-attempts``, then ``/release``. A lost lease
   stops the job and hands it back to the queue at once; a lost claim stops
   it and leaves it to the queue's redelivery: nothing is acked that this
   consumer no longer owns.

Its parts: ``loop`` (the session loop), ``lease`` (the lease and the claim,
renewed together), ``runs`` (a job's run), ``options``, ``serve``
(``run_consumer``), ``cli`` (the command line) and ``control`` (the client of
the worker's control server).
"""

from workers.null.consumer.loop import Consumer
from workers.null.consumer.options import ConsumerError, ConsumerOptions
from workers.null.consumer.runs import JobContext, Result
from workers.null.consumer.serve import run_consumer, serve

__all__ = [
    "Consumer",
    "ConsumerError",
    "ConsumerOptions",
    "JobContext",
    "Result",
    "run_consumer",
    "serve",
]

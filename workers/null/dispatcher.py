"""``python -m workers.null.dispatcher``: keep Vast sessions in step with a job queue, one session per job.

The dispatcher runs on the user's machines; its parts are in ``workers/null/dispatch/``.
"""

import sys

from workers.null.dispatch.cli import main

if __name__ == "__main__":
    sys.exit(main())

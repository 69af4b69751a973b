"""Runs beside the null worker, on the standard library only.

For each session the worker is reserved for, it runs the job named in the
session's on_close_payload ({"job": ID}), keeps the lease while the job runs
and releases the worker when it ends.

    python3 consumer.py RUN_JOB REQUEUE_JOB      both are called with the job id

LEASE_SECONDS (default 60) is the lease each renewal asks for; it renews
every LEASE_SECONDS/3.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

CONTROL = "http://127.0.0.1:{}".format(os.environ.get("NULL_CONTROL_PORT", "18999"))
LEASE = float(os.environ.get("LEASE_SECONDS", "60"))


def call(method, path, body=None):
    request = urllib.request.Request(
        CONTROL + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # 409 from /extend: nothing held
        return json.load(error)
    except OSError as error:  # the worker is starting, or gone
        return {"error": str(error)}


def keep_lease(session_id, job_ended):
    # Renews now and while the job runs. Should this process die, the renewals
    # stop, the lease lapses and the worker frees itself.
    while True:
        call("POST", "/extend", {"seconds": LEASE, "session_id": session_id})
        if job_ended.wait(LEASE / 3):
            return


def main(run_job, requeue_job):
    while True:
        session = call("GET", "/status").get("session") or {}
        job = (session.get("on_close_payload") or {}).get("job")
        if job is None:
            time.sleep(1)
            continue
        print(f"job {job}: started", flush=True)
        job_ended = threading.Event()
        session_id = session["session_id"]
        threading.Thread(target=keep_lease, args=(session_id, job_ended), daemon=True).start()
        try:
            if subprocess.run([run_job, str(job)]).returncode == 0:
                print(f"job {job}: done", flush=True)
            else:
                # Put it back for the dispatcher to open a new session for; the
                # worker is released either way.
                print(f"job {job}: failed, requeued", flush=True)
                subprocess.run([requeue_job, str(job)])
        finally:
            job_ended.set()
            # Naming the session: should the lease have lapsed meanwhile, the
            # worker may hold the next job's session, which this must not release.
            print(json.dumps(call("POST", "/release", {"session_id": session_id})), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])

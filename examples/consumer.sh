#!/usr/bin/env bash
# Runs beside the null worker. For each session the worker is reserved for, it
# runs the job named in the session's on_close_payload ({"job": ID}), keeps the
# lease while the job runs and releases the worker when it ends.
#   consumer.sh RUN_JOB REQUEUE_JOB      both are called with the job id
# Needs curl and jq. LEASE_SECONDS (whole seconds, default 60) is the lease
# each renewal asks for; it renews every LEASE_SECONDS/3.
# No set -e: a failed call is retried by the loop, not the end of the consumer.
set -uo pipefail

control="http://127.0.0.1:${NULL_CONTROL_PORT:-18999}"
lease=${LEASE_SECONDS:-60}
run_job=$1
requeue_job=$2

while true; do
    status=$(curl -fs "$control/status")
    job=$(jq -r '.session.on_close_payload.job // empty' <<<"$status")
    session=$(jq -r '.session.session_id // empty' <<<"$status")
    if [[ -z $job ]]; then
        sleep 1 # the worker is free (or still starting): no job for us yet
        continue
    fi
    echo "job $job: started"
    "$run_job" "$job" &
    job_pid=$!
    # Renew the lease now and while the job runs. Should this script die, the
    # renewals stop ($$ is gone), the lease lapses and the worker frees itself.
    (
        while kill -0 $$ 2>/dev/null; do
            curl -fsS -X POST -H 'Content-Type: application/json' \
                -d "{\"seconds\": $lease, \"session_id\": \"$session\"}" "$control/extend" >/dev/null
            sleep $((lease / 3))
        done
    ) &
    keeper_pid=$!
    if wait "$job_pid"; then
        echo "job $job: done"
    else
        # Put it back for the dispatcher to open a new session for; this
        # worker is released either way, holding it would only cost money.
        echo "job $job: failed, requeued"
        "$requeue_job" "$job"
    fi
    kill "$keeper_pid"
    # Naming the session: should the lease have lapsed meanwhile, the worker
    # may hold the next job's session, which this must not release.
    curl -fsS -X POST -H 'Content-Type: application/json' \
        -d "{\"session_id\": \"$session\"}" "$control/release"
    echo
done

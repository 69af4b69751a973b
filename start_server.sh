#!/usr/bin/env bash
# Instance bootstrap for the null worker on Vast Serverless.
#
# It reads the variables Vast's own start_server.sh reads, so a template can
# move between the two, and differs where that script would hurt this worker:
# it installs exactly what requirements.txt pins (never another vastai), a
# reboot makes no network call, and a failed step is reported to the
# autoscaler as the worker's error_msg instead of leaving a silent instance.
#
# Environment (default; effect):
#   WORKSPACE_DIR   /workspace; holds the log and is the worker's working directory
#   SERVER_DIR      $WORKSPACE_DIR/vast-pyworker; a checkout of this repo, used
#                   as it is when present, cloned when absent or empty
#   ENV_PATH        $WORKSPACE_DIR/worker-env; the venv, created when absent
#                   (with python3.10 when installed, else python3 >= 3.10)
#   PYWORKER_REPO   unset; git URL cloned when SERVER_DIR holds no checkout
#   PYWORKER_REF    unset (default branch); branch, tag or commit checked out after the clone
#   BACKEND         null; runs python -m workers.$BACKEND.worker
#   WORKER_PORT     3000
#   USE_SSL         true; "true" serves HTTPS with INSTANCE_CERT and INSTANCE_KEY:
#                   kept when valid for another day and matching, otherwise a new
#                   key is made and the console signs its certificate request
#   CONSOLE_URL     https://console.vast.ai; the console that signs the request,
#                   at $CONSOLE_URL/api/v0/sign_cert/?instance_id=$CONTAINER_ID
#   CERT_ATTEMPTS   5; how many times the console is asked before the boot fails
#   CERT_RETRY_DELAY 2; seconds before the second request, doubled before each next
#   INSTANCE_CERT   /etc/instance.crt; INSTANCE_KEY /etc/instance.key; where the
#                   framework loads them from (it reads only these paths, so only
#                   a test has a reason to change them)
#   REPORT_ADDR     https://run.vast.ai; comma-separated, first one that answers wins
#   SDK_VERSION     unset; when set it must equal the vastai pin in requirements.txt
#   PYWORKER_LOG    $WORKSPACE_DIR/pyworker.log; everything this script and the worker print
#   INSTALL_MARKER  $ENV_PATH/.null-pyworker-requirements.sha256; hash of the
#                   requirements.txt last installed into ENV_PATH
# Everything else (CONTAINER_ID, PUBLIC_IPADDR, VAST_TCP_PORT_*, MASTER_TOKEN,
# WORKER_HTTP_PORT, NULL_*, BACKEND_HEALTH_URL, UNSECURED) passes through to the worker.

set -Eeuo pipefail

WORKSPACE_DIR="${WORKSPACE_DIR:-/workspace}"
SERVER_DIR="${SERVER_DIR:-$WORKSPACE_DIR/vast-pyworker}"
ENV_PATH="${ENV_PATH:-$WORKSPACE_DIR/worker-env}"
PYWORKER_REPO="${PYWORKER_REPO:-}"
PYWORKER_REF="${PYWORKER_REF:-}"
BACKEND="${BACKEND:-null}"
WORKER_PORT="${WORKER_PORT:-3000}"
USE_SSL="${USE_SSL:-true}"
REPORT_ADDR="${REPORT_ADDR:-https://run.vast.ai}"
SDK_VERSION="${SDK_VERSION:-}"
PYWORKER_LOG="${PYWORKER_LOG:-$WORKSPACE_DIR/pyworker.log}"
INSTALL_MARKER="${INSTALL_MARKER:-$ENV_PATH/.null-pyworker-requirements.sha256}"

CONSOLE_URL="${CONSOLE_URL:-https://console.vast.ai}"
CERT_ATTEMPTS="${CERT_ATTEMPTS:-5}"
CERT_RETRY_DELAY="${CERT_RETRY_DELAY:-2}"
# The framework loads its certificate from these fixed paths when USE_SSL=true.
INSTANCE_CERT="${INSTANCE_CERT:-/etc/instance.crt}"
INSTANCE_KEY="${INSTANCE_KEY:-/etc/instance.key}"

CURRENT_STEP="starting"
STEP_OUTPUT=""
TEE_PID=""
CLEANUP=()

# A private PYWORKER_REPO may carry a token (https://user:token@host/...);
# the log and the autoscaler's error_msg get the URL without it.
redact() {
    printf '%s' "$1" | sed -E 's#(://)[^/@[:space:]]*@#\1***@#g'
}

log() {
    printf '%s start_server.sh: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(redact "$*")"
}

# A JSON string literal; control characters other than \n \r \t are dropped
# because the autoscaler would reject the whole report over one stray byte.
json_string() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    s=$(printf '%s' "$s" | tr -d '\000-\010\013\014\016-\037')
    printf '"%s"' "$s"
}

post_json() {
    local url=$1 body=$2
    if command -v curl >/dev/null 2>&1; then
        curl --silent --show-error --fail --max-time 10 --retry 2 \
            --header 'Content-Type: application/json' \
            --data-binary "$body" --output /dev/null "$url"
    elif command -v python3 >/dev/null 2>&1; then
        python3 -c '
import sys, urllib.request
request = urllib.request.Request(
    sys.argv[1], data=sys.argv[2].encode(), method="POST",
    headers={"Content-Type": "application/json"})
try:
    urllib.request.urlopen(request, timeout=10).close()
except Exception as exc:
    sys.exit("POST %s failed: %s" % (sys.argv[1], exc))
' "$url" "$body"
    else
        log "neither curl nor python3 is installed, so nothing can be reported"
        return 1
    fi
}

# The same fields the framework sends, zeroed, so the endpoint shows this
# instance as an errored worker with the reason.
report_error() {
    local msg=$1
    if [[ ! ${CONTAINER_ID:-} =~ ^[0-9]+$ ]]; then
        log "not reported to the autoscaler: CONTAINER_ID='${CONTAINER_ID:-}' is not a container id"
        return 0
    fi
    local scheme=http url="" port_var="" public_port=""
    if [[ $USE_SSL == true ]]; then
        scheme=https
    fi
    if [[ $WORKER_PORT =~ ^[0-9]+$ ]]; then
        port_var="VAST_TCP_PORT_$WORKER_PORT"
        public_port="${!port_var:-}"
    fi
    if [[ -n ${PUBLIC_IPADDR:-} && -n $public_port ]]; then
        url="$scheme://$PUBLIC_IPADDR:$public_port"
    fi
    local body
    body="{\"id\": $((10#$CONTAINER_ID)), \"mtoken\": $(json_string "${MASTER_TOKEN:-}"),"
    body+=" \"version\": \"0\", \"loadtime\": 0.0, \"cur_load\": 0.0, \"rej_load\": 0.0,"
    body+=" \"new_load\": 0.0, \"error_msg\": $(json_string "$msg"), \"max_perf\": 0.0,"
    body+=" \"cur_perf\": 0.0, \"cur_capacity\": 0, \"max_capacity\": 0,"
    body+=" \"num_requests_working\": 0, \"num_requests_recieved\": 0,"
    body+=" \"additional_disk_usage\": 0.0, \"disk_usage\": 0.0,"
    body+=" \"working_request_idxs\": [], \"url\": $(json_string "$url")}"

    # Like the framework: the addresses are fallbacks, the first that takes it wins.
    local addrs addr
    IFS=, read -r -a addrs <<<"$REPORT_ADDR"
    for addr in "${addrs[@]}"; do
        while [[ $addr == */ ]]; do
            addr=${addr%/}
        done
        [[ -n $addr ]] || continue
        if post_json "$addr/worker_status/" "$body"; then
            log "reported the error to $addr/worker_status/"
            return 0
        fi
        log "could not report the error to $addr/worker_status/"
    done
    return 1
}

# Waiting for tee makes the log file complete by the time this script exits.
finish() {
    if [[ -n $TEE_PID ]]; then
        exec 1>&3 2>&4 3>&- 4>&-
        wait "$TEE_PID" 2>/dev/null || true
    fi
    exit "$1"
}

fail() {
    # A failure inside $(...) is reported once, by the command that used it.
    if [[ $BASHPID != "$$" ]]; then
        exit 1
    fi
    trap - ERR
    set +e
    local msg
    msg=$(redact "$1")
    log "ERROR: $msg"
    local path
    for path in "${CLEANUP[@]}"; do
        rm -rf -- "$path"
    done
    [[ -z $STEP_OUTPUT ]] || rm -f -- "$STEP_OUTPUT"
    report_error "start_server.sh: $msg"
    finish 1
}

on_err() {
    fail "$CURRENT_STEP failed (exit $1) at line $2: $3"
}
trap 'on_err "$?" "$LINENO" "$BASH_COMMAND"' ERR

# The last few non-empty lines of a step's output: where git and pip say why.
last_lines() {
    awk '{ sub(/\r+$/, "") } NF { line[++n] = $0 }
        END {
            s = ""
            for (i = (n > 3 ? n - 2 : 1); i <= n; i++) s = s (s == "" ? "" : " | ") line[i]
            print substr(s, 1, 1000)
        }' "$1"
}

run_step() {
    local desc=$1 status=0
    shift
    CURRENT_STEP=$desc
    log "$desc"
    "$@" 2>&1 | tee "$STEP_OUTPUT" || status=$?
    if ((status != 0)); then
        fail "$desc failed (exit $status): $(last_lines "$STEP_OUTPUT")"
    fi
}

holds_checkout() {
    [[ -f $1/requirements.txt && -d $1/workers ]]
}

is_empty_dir() {
    [[ -d $1 && -z $(ls -A -- "$1") ]]
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        local sum
        sum=$(sha256sum -- "$1")
        printf '%s\n' "${sum%% *}"
    else
        "$ENV_PATH/bin/python" -c \
            'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
    fi
}

# Echoes the interpreter to build the venv with: python3.10 (the version
# Vast's own bootstrap uses) when it runs, else python3 if it is 3.10 or newer.
pick_python() {
    local candidate
    for candidate in python3.10 python3; do
        if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

clone_checkout() {
    CURRENT_STEP="preparing to clone into SERVER_DIR=$SERVER_DIR"
    if [[ -z $PYWORKER_REPO ]]; then
        fail "SERVER_DIR=$SERVER_DIR holds no checkout and PYWORKER_REPO is unset; set PYWORKER_REPO to this repo's git URL"
    fi
    if ! command -v git >/dev/null 2>&1; then
        fail "git is not installed, so PYWORKER_REPO=$PYWORKER_REPO cannot be cloned; use an image with git"
    fi
    local parent tmp
    parent=$(dirname -- "$SERVER_DIR")
    mkdir -p -- "$parent"
    # Clone beside SERVER_DIR and move it in at the end: an interrupted clone
    # must not look like a checkout on the next boot.
    tmp=$(mktemp -d "$parent/.$(basename -- "$SERVER_DIR").clone.XXXXXX")
    CLEANUP+=("$tmp")
    run_step "cloning PYWORKER_REPO=$PYWORKER_REPO" \
        env GIT_TERMINAL_PROMPT=0 git clone --quiet -- "$PYWORKER_REPO" "$tmp"
    if [[ -n $PYWORKER_REF ]]; then
        run_step "checking out PYWORKER_REF=$PYWORKER_REF" \
            git -C "$tmp" checkout --quiet "$PYWORKER_REF" --
    fi
    CURRENT_STEP="moving the clone into SERVER_DIR=$SERVER_DIR"
    if ! holds_checkout "$tmp"; then
        fail "PYWORKER_REPO=$PYWORKER_REPO${PYWORKER_REF:+ at $PYWORKER_REF} has no requirements.txt and workers/; is it this repo?"
    fi
    chmod 755 "$tmp"
    if [[ -d $SERVER_DIR ]]; then
        rmdir -- "$SERVER_DIR"
    fi
    mv -- "$tmp" "$SERVER_DIR"
    CLEANUP=()
    log "checked out $(git -C "$SERVER_DIR" rev-parse --short HEAD) into SERVER_DIR=$SERVER_DIR"
}

make_venv() {
    CURRENT_STEP="choosing a Python for ENV_PATH=$ENV_PATH"
    if [[ -e $ENV_PATH ]] && ! is_empty_dir "$ENV_PATH"; then
        fail "ENV_PATH=$ENV_PATH exists but is not a venv (no bin/python); remove it or point ENV_PATH elsewhere"
    fi
    local python version
    if ! python=$(pick_python); then
        fail "no Python 3.10 or newer with the venv module: python3.10 is not usable and python3 is $(python3 --version 2>&1 || echo missing)"
    fi
    version=$("$python" --version 2>&1)
    if [[ $python != python3.10 ]]; then
        log "python3.10 is not usable here; using python3 ($version)"
    fi
    CLEANUP+=("$ENV_PATH")
    run_step "creating the venv ENV_PATH=$ENV_PATH with $python ($version)" \
        "$python" -m venv -- "$ENV_PATH"
    CLEANUP=()
}

install_requirements() {
    local requirements=$SERVER_DIR/requirements.txt digest
    CURRENT_STEP="hashing $requirements"
    digest=$(sha256_of "$requirements")
    if [[ -f $INSTALL_MARKER && $(<"$INSTALL_MARKER") == "$digest" ]]; then
        log "requirements.txt is installed as it is now ($INSTALL_MARKER): reboot, no network"
        return 0
    fi
    run_step "installing $requirements into ENV_PATH=$ENV_PATH" \
        env PIP_DISABLE_PIP_VERSION_CHECK=1 "$ENV_PATH/bin/python" -m pip install --no-input -r "$requirements"
    CURRENT_STEP="writing INSTALL_MARKER=$INSTALL_MARKER"
    mkdir -p -- "$(dirname -- "$INSTALL_MARKER")"
    printf '%s\n' "$digest" >"$INSTALL_MARKER.tmp"
    mv -f -- "$INSTALL_MARKER.tmp" "$INSTALL_MARKER"
}

# POSTs a file and writes the answer's body to another; the reason on stderr when it fails.
post_file() {
    local url=$1 body_file=$2 out=$3
    if command -v curl >/dev/null 2>&1; then
        curl --silent --show-error --fail --max-time 30 \
            --header 'Content-Type: application/octet-stream' \
            --data-binary "@$body_file" --output "$out" "$url"
    elif command -v python3 >/dev/null 2>&1; then
        python3 -c '
import sys, urllib.request
url, body_file, out = sys.argv[1:]
with open(body_file, "rb") as f:
    body = f.read()
request = urllib.request.Request(
    url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
try:
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = response.read()
except Exception as exc:
    sys.exit("POST %s failed: %s" % (url, exc))
with open(out, "wb") as f:
    f.write(answer)
' "$url" "$body_file" "$out"
    else
        echo "neither curl nor python3 is installed"
        return 1
    fi
}

# Succeeds when $1 is a PEM certificate for the key in $2 that stays valid for
# $3 more seconds; otherwise prints what is wrong with it.
check_certificate() {
    local cert=$1 key=$2 seconds=$3 cert_pub key_pub
    if ! cert_pub=$(openssl x509 -in "$cert" -noout -pubkey 2>/dev/null); then
        echo "is not a PEM certificate"
        return 1
    fi
    if ! key_pub=$(openssl pkey -in "$key" -pubout 2>/dev/null); then
        echo "comes with a key that openssl cannot read"
        return 1
    fi
    if [[ $cert_pub != "$key_pub" ]]; then
        echo "does not match the key"
        return 1
    fi
    if ! openssl x509 -in "$cert" -noout -checkend "$seconds" >/dev/null 2>&1; then
        echo "expires within $seconds seconds"
        return 1
    fi
}

# Moves $1 onto $2 in one rename, so the framework never reads half a file.
install_file() {
    local src=$1 dest=$2 mode=$3 tmp
    mkdir -p -- "$(dirname -- "$dest")"
    tmp=$(mktemp "$(dirname -- "$dest")/.$(basename -- "$dest").XXXXXX")
    CLEANUP+=("$tmp")
    cat -- "$src" >"$tmp"
    chmod "$mode" -- "$tmp"
    mv -f -- "$tmp" "$dest"
}

# Vast's bootstrap does the same: a fresh key and certificate request, signed
# by the console for this container. Unlike it, a certificate that is still
# good is kept (a reboot makes no network call), and the answer is checked
# before it replaces anything the framework reads.
ensure_certificate() {
    CURRENT_STEP="checking the instance certificate"
    if ! command -v openssl >/dev/null 2>&1; then
        fail "USE_SSL=true but openssl is not installed, so no instance key can be made; use an image with openssl or set USE_SSL=false"
    fi
    local problem
    if [[ -r $INSTANCE_CERT && -r $INSTANCE_KEY ]]; then
        if problem=$(check_certificate "$INSTANCE_CERT" "$INSTANCE_KEY" 86400); then
            log "using the instance certificate $INSTANCE_CERT: it matches $INSTANCE_KEY and is valid for another day"
            return 0
        fi
        log "the instance certificate $INSTANCE_CERT $problem; asking the console for a new one"
    fi
    if [[ ! ${CONTAINER_ID:-} =~ ^[0-9]+$ ]]; then
        fail "USE_SSL=true needs the certificate signed for CONTAINER_ID, but CONTAINER_ID='${CONTAINER_ID:-}' is not a container id; run on a Vast instance or set USE_SSL=false"
    fi
    local dir url attempt=1 delay=$CERT_RETRY_DELAY
    dir=$(mktemp -d)
    CLEANUP+=("$dir")
    run_step "making the instance key and certificate request" \
        openssl req -new -newkey rsa:2048 -nodes -sha256 \
        -subj "/C=US/ST=CA/CN=pyworker.vast.ai" \
        -addext "basicConstraints=CA:FALSE" \
        -addext "keyUsage=nonRepudiation,digitalSignature,keyEncipherment" \
        -addext "subjectAltName=IP:0.0.0.0" \
        -keyout "$dir/instance.key" -out "$dir/instance.csr"
    while [[ $CONSOLE_URL == */ ]]; do
        CONSOLE_URL=${CONSOLE_URL%/}
    done
    url="$CONSOLE_URL/api/v0/sign_cert/?instance_id=$((10#$CONTAINER_ID))"
    while :; do
        CURRENT_STEP="asking $url to sign the certificate (attempt $attempt of $CERT_ATTEMPTS)"
        log "$CURRENT_STEP"
        if problem=$(post_file "$url" "$dir/instance.csr" "$dir/instance.crt" 2>&1); then
            if problem=$(check_certificate "$dir/instance.crt" "$dir/instance.key" 0); then
                break
            fi
            problem="its answer $problem"
        fi
        problem=$(printf '%s\n' "$problem" | awk 'NF { last = $0 } END { print substr(last, 1, 500) }')
        if ((attempt >= CERT_ATTEMPTS)); then
            fail "USE_SSL=true but $url gave no usable certificate in $attempt attempts; last: $problem; check CONSOLE_URL and CONTAINER_ID, or set USE_SSL=false"
        fi
        log "attempt $attempt failed: $problem; trying again in ${delay}s"
        sleep "$delay"
        delay=$(awk -v d="$delay" 'BEGIN { print d * 2 }')
        attempt=$((attempt + 1))
    done
    CURRENT_STEP="installing the certificate as $INSTANCE_CERT and its key as $INSTANCE_KEY"
    # The key first: a boot interrupted between the two leaves a pair that
    # does not match, which the next boot replaces.
    install_file "$dir/instance.key" "$INSTANCE_KEY" 600
    install_file "$dir/instance.crt" "$INSTANCE_CERT" 644
    rm -rf -- "$dir"
    CLEANUP=()
    log "installed the certificate signed by $CONSOLE_URL as $INSTANCE_CERT, its key as $INSTANCE_KEY"
}

main() {
    CURRENT_STEP="creating WORKSPACE_DIR=$WORKSPACE_DIR"
    if ! mkdir -p -- "$WORKSPACE_DIR"; then
        fail "cannot create WORKSPACE_DIR=$WORKSPACE_DIR"
    fi
    exec 3>&1 4>&2
    # tee ignores the signals meant for the worker so the worker can still log
    # its shutdown; it ends when the worker closes its output.
    exec > >(trap '' INT TERM HUP; exec tee -a "$PYWORKER_LOG") 2>&1
    TEE_PID=$!
    STEP_OUTPUT=$(mktemp)

    log "boot: BACKEND=$BACKEND WORKER_PORT=$WORKER_PORT USE_SSL=$USE_SSL REPORT_ADDR=$REPORT_ADDR CONSOLE_URL=$CONSOLE_URL"
    log "boot: SERVER_DIR=$SERVER_DIR ENV_PATH=$ENV_PATH PYWORKER_REPO=${PYWORKER_REPO:-unset} PYWORKER_REF=${PYWORKER_REF:-unset}"

    CURRENT_STEP="checking the settings"
    if [[ ! $BACKEND =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
        fail "BACKEND='$BACKEND' is not a Python package name; set BACKEND=null"
    fi
    if [[ ! $WORKER_PORT =~ ^[1-9][0-9]{0,4}$ ]] || ((WORKER_PORT > 65535)); then
        fail "WORKER_PORT='$WORKER_PORT' is not a TCP port; set a number from 1 to 65535 (Vast's default is 3000)"
    fi
    case $USE_SSL in
        true | false) ;;
        *) fail "USE_SSL='$USE_SSL' must be true or false (the framework serves plain HTTP for anything but \"true\")" ;;
    esac
    if [[ ! $CERT_ATTEMPTS =~ ^[1-9][0-9]*$ ]]; then
        fail "CERT_ATTEMPTS='$CERT_ATTEMPTS' is not a positive whole number; set it to how many times to ask the console (default 5)"
    fi
    if [[ ! $CERT_RETRY_DELAY =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
        fail "CERT_RETRY_DELAY='$CERT_RETRY_DELAY' is not a number of seconds; set it to the first pause between requests (default 2)"
    fi
    if [[ $USE_SSL == true ]]; then
        ensure_certificate
    fi

    if holds_checkout "$SERVER_DIR"; then
        log "using the checkout in SERVER_DIR=$SERVER_DIR as it is"
    elif [[ -e $SERVER_DIR ]] && ! is_empty_dir "$SERVER_DIR"; then
        fail "SERVER_DIR=$SERVER_DIR is not empty and holds no checkout of this repo (no requirements.txt and workers/); remove it or point SERVER_DIR elsewhere"
    else
        clone_checkout
    fi

    CURRENT_STEP="checking the checkout"
    if [[ ! -f $SERVER_DIR/workers/$BACKEND/worker.py ]]; then
        fail "BACKEND=$BACKEND but SERVER_DIR=$SERVER_DIR has no workers/$BACKEND/worker.py; set BACKEND=null"
    fi
    local pin
    pin=$(sed -n 's/^vastai==\([^[:space:];#]*\).*$/\1/p' "$SERVER_DIR/requirements.txt")
    pin=${pin%%$'\n'*}
    if [[ -n $SDK_VERSION ]]; then
        # Vast's bootstrap would install SDK_VERSION over the pin; this worker
        # reaches into framework internals of the pinned version, so a
        # mismatch is refused rather than silently ignored.
        if [[ -z $pin ]]; then
            fail "SDK_VERSION=$SDK_VERSION is set but requirements.txt pins no vastai==VERSION to check it against; unset SDK_VERSION"
        elif [[ $SDK_VERSION != "$pin" ]]; then
            fail "SDK_VERSION=$SDK_VERSION differs from vastai==$pin in requirements.txt, the version this worker is tested with; set SDK_VERSION=$pin or unset it"
        fi
    fi
    if [[ -n $pin ]]; then
        log "vastai is pinned to $pin"
    fi

    if [[ -x $ENV_PATH/bin/python ]]; then
        log "using the venv ENV_PATH=$ENV_PATH ($("$ENV_PATH/bin/python" --version 2>&1))"
    else
        make_venv
    fi
    install_requirements

    rm -f -- "$STEP_OUTPUT"
    # The framework writes its benchmark cache to the working directory; the
    # workspace keeps it out of the checkout.
    cd -- "$WORKSPACE_DIR"
    export WORKSPACE_DIR SERVER_DIR ENV_PATH BACKEND WORKER_PORT USE_SSL REPORT_ADDR
    export PYTHONUNBUFFERED=1
    export PYTHONPATH="$SERVER_DIR${PYTHONPATH:+:$PYTHONPATH}"
    log "starting python -m workers.$BACKEND.worker"
    trap - ERR
    # exec: SIGTERM from the platform goes straight to the worker, which ends
    # the held session before it exits.
    exec "$ENV_PATH/bin/python" -m "workers.$BACKEND.worker" 3>&- 4>&-
}

main "$@"

#!/usr/bin/env bash
# A local Ray cluster for this machine only: bound to 127.0.0.1, started, queried and stopped from
# any shell (interactive or not). It stops exactly the processes it started, never another user's
# or another script's Ray (no `ray stop`). See docs/training.md, "A local Ray cluster".
#
#   scripts/ray_local.sh start     # head node on 127.0.0.1:$RAY_LOCAL_PORT; prints the address
#   RAY_ADDRESS=127.0.0.1:6379 python pipelines/train.py configs/small_cpu.yaml
#   scripts/ray_local.sh status    # exit 0 running, 3 not running
#   scripts/ray_local.sh stop      # SIGTERM, then SIGKILL after RAY_LOCAL_STOP_WAIT s; exit 1 if any survive
#
# Settings (environment): RAY_LOCAL_DIR (state folder: pid file, log, Ray's temp dir; default
# /tmp/actr_ray_$UID, kept short because Ray's socket paths must fit 107 bytes), RAY_LOCAL_PORT
# (6379), RAY_LOCAL_CPUS (2), RAY_LOCAL_STORE_MB (object store, 256), RAY_LOCAL_START_WAIT (60 s),
# RAY_LOCAL_STOP_WAIT (15 s).
#
# How it stops only its own: `ray start --block` runs as the leader of a new session (setsid), and
# every process Ray starts for the cluster (GCS, raylet, workers) stays in that session; `stop`
# signals the processes of that session, and of no other.
set -euo pipefail

dir=${RAY_LOCAL_DIR:-/tmp/actr_ray_$(id -u)}
port=${RAY_LOCAL_PORT:-6379}
pidfile=$dir/head.pid

die() { echo "ray_local.sh: $*" >&2; exit "${2:-2}"; }
# live processes of session $1 (zombies, already dead but not yet reaped by their parent, are left out)
session_pids() { ps -e -o pid=,sid=,stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'; }
leader() { [[ -s $pidfile ]] && cat "$pidfile"; }
running() { local pid; pid=$(leader) && [[ -n $(session_pids "$pid") ]]; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

start() {
    command -v ray >/dev/null || die "the ray command is not on PATH (pip install -e '.[train]')"
    if running; then echo "already running: 127.0.0.1:$(cat "$dir/port") (leader pid $(leader))"; return 0; fi
    port_open && die "127.0.0.1:$port is in use by another program; set RAY_LOCAL_PORT"
    mkdir -p "$dir/tmp"
    rm -f "$pidfile"
    echo "$port" >"$dir/port"
    # setsid: a new session whose id is the leader's pid ($$ of the inner shell, kept by exec)
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pidfile" \
        ray start --head --block --node-ip-address=127.0.0.1 --port="$port" \
        --num-cpus="${RAY_LOCAL_CPUS:-2}" --object-store-memory=$((${RAY_LOCAL_STORE_MB:-256} * 1048576)) \
        --include-dashboard=false --disable-usage-stats --temp-dir="$dir/tmp" \
        </dev/null >"$dir/ray.log" 2>&1 &
    local waited=0 limit=${RAY_LOCAL_START_WAIT:-60}
    until [[ -s $pidfile ]] && port_open && grep -q "Ray runtime started" "$dir/ray.log"; do
        if ! kill -0 $! 2>/dev/null; then tail -n 20 "$dir/ray.log" >&2; die "ray start failed (log: $dir/ray.log)" 1; fi
        if ((waited >= limit)); then stop >/dev/null || true; die "Ray did not start within ${limit}s (log: $dir/ray.log)" 1; fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "started: RAY_ADDRESS=127.0.0.1:$port (leader pid $(leader), log $dir/ray.log)"
}

stop() {
    local pid pids left waited=0 limit=${RAY_LOCAL_STOP_WAIT:-15}
    pid=$(leader) || { echo "not running (no $pidfile)"; return 0; }
    pids=$(session_pids "$pid")
    if [[ -n $pids ]]; then
        kill -TERM $pids 2>/dev/null || true
        while left=$(session_pids "$pid") && [[ -n $left ]] && ((waited < limit)); do
            sleep 1
            waited=$((waited + 1))
        done
        left=$(session_pids "$pid")
        if [[ -n $left ]]; then
            kill -KILL $left 2>/dev/null || true
            sleep 1
        fi
    fi
    left=$(session_pids "$pid")
    [[ -z $left ]] || die "processes of the cluster still alive: $left" 1
    rm -f "$pidfile"
    echo "stopped (leader pid $pid)"
}

status() {
    if running; then
        echo "running: RAY_ADDRESS=127.0.0.1:$(cat "$dir/port") (leader pid $(leader), $(session_pids "$(leader)" | wc -l) processes)"
    else
        echo "not running"
        return 3
    fi
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
*) die "usage: scripts/ray_local.sh start|stop|status" ;;
esac

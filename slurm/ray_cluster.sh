# Ray on a SLURM allocation, sourced by slurm/train.sbatch (and by tests/slurm/test_sbatch.py with fake
# srun/scontrol/ray/python on PATH). One `ray start --block` job step per node: the head on the first node of
# SLURM_JOB_NODELIST, a worker on each other node.
#
# Stopping gives each of our own `ray start --block` processes a SIGTERM: Ray then drains the node and kills
# exactly the processes it started. We never run `ray stop`, which kills every Ray process on the node, other
# jobs' too. srun turns a SIGTERM it receives into SIGKILL for its tasks, but forwards SIGUSR2 as is, so each
# step runs `ray start` under a small wrapper that turns SIGUSR2 into that SIGTERM.
#
# Settings (environment): PYTHON, RAY (executables), RAY_PORT, RAY_HEAD_IP (default: the head's IPv4 address),
# RAY_CPUS_PER_NODE, RAY_GPUS_PER_NODE, RAY_TMPDIR, RAY_START_ARGS (extra `ray start` flags), RAY_JOIN_TIMEOUT,
# RAY_STOP_TIMEOUT, RAY_POLL_INTERVAL (seconds).

PYTHON=${PYTHON:-.venv/bin/python}
RAY=${RAY:-$(dirname "$PYTHON")/ray}
RAY_PORT=${RAY_PORT:-6379}
RAY_CPUS_PER_NODE=${RAY_CPUS_PER_NODE:-${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}}
RAY_GPUS_PER_NODE=${RAY_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
# A per-job temp dir: Ray records "the latest cluster" in its temp dir, and a bare ray.init() by anyone else on
# the node would otherwise join this job's cluster (or a stale address of it after the job).
RAY_TMPDIR=${RAY_TMPDIR:-/tmp/ray_${SLURM_JOB_ID:-job}}
RAY_JOIN_TIMEOUT=${RAY_JOIN_TIMEOUT:-300}
RAY_STOP_TIMEOUT=${RAY_STOP_TIMEOUT:-60}
RAY_POLL_INTERVAL=${RAY_POLL_INTERVAL:-5}
RAY_START_ARGS=${RAY_START_ARGS:-}
# train/workers/ray_session.py init_ray defaults the driver to RAY_AUTH_MODE=disabled; the cluster must agree with it.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# The GCS keeps 100,000 task events by default (~3 MiB per 1,000 actor calls, growing for hours); as a local Ray.
export RAY_task_events_max_num_task_in_gcs=${RAY_task_events_max_num_task_in_gcs:-1000}

RAY_STEP_WRAPPER='trap "kill -TERM \$child; wait \$child; exit 0" USR2; "$@" & child=$!; wait $child'
RAY_NODES=()      # hostnames of the allocation, head first
RAY_STEP_PIDS=()  # the srun processes running `ray start --block`
RAY_HEAD_ADDRESS=""

ray_cluster_nodes() {
    mapfile -t RAY_NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM job}")
    if ((${#RAY_NODES[@]} == 0)); then
        echo "ray_cluster: scontrol show hostnames '$SLURM_JOB_NODELIST' gave no hosts" >&2
        return 1
    fi
}

ray_cluster_head_ip() {
    local addresses address
    addresses=$(srun --nodes=1 --ntasks=1 --overlap -w "${RAY_NODES[0]}" hostname --ip-address) || return 1
    # Hosts with IPv6 list several addresses; Ray's --node-ip-address wants the IPv4 one.
    for address in $addresses; do
        if [[ $address =~ ^[0-9]+(\.[0-9]+){3}$ ]]; then echo "$address"; return 0; fi
    done
    echo "${addresses%% *}"
}

ray_cluster_alive_nodes() {
    # One short-lived driver asks the GCS; prints 0 while the head is not up yet (the socket check keeps that fast).
    timeout 60 "$PYTHON" -c '
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
try:
    socket.create_connection((host, int(port)), timeout=2).close()
    import ray
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    print(sum(node["Alive"] for node in ray.nodes()))
except Exception:
    print(0)
' "$RAY_HEAD_ADDRESS" 2>/dev/null || echo 0
}

ray_cluster_wait() {  # $1: number of nodes that must have joined
    local want=$1 alive pid deadline=$((SECONDS + RAY_JOIN_TIMEOUT))
    while true; do
        alive=$(ray_cluster_alive_nodes | tail -n 1)
        alive=${alive//[!0-9]/}
        if ((${alive:-0} >= want)); then
            echo "ray_cluster: ${alive} of ${#RAY_NODES[@]} nodes joined $RAY_HEAD_ADDRESS"
            return 0
        fi
        for pid in "${RAY_STEP_PIDS[@]}"; do  # a node whose `ray start` already exited will never join
            if ! kill -0 "$pid" 2>/dev/null; then
                echo "ray_cluster: a ray start step exited early (see its output above); ${alive:-0} of $want nodes up" >&2
                return 1
            fi
        done
        if ((SECONDS >= deadline)); then
            echo "ray_cluster: only ${alive:-0} of $want nodes joined $RAY_HEAD_ADDRESS within ${RAY_JOIN_TIMEOUT}s" \
                 "(raise RAY_JOIN_TIMEOUT, or check the nodes' ray start output above)" >&2
            return 1
        fi
        sleep "$RAY_POLL_INTERVAL"
    done
}

ray_cluster_start() {
    ray_cluster_nodes || return 1
    local head_ip node
    head_ip=${RAY_HEAD_IP:-$(ray_cluster_head_ip)} || return 1
    RAY_HEAD_ADDRESS="$head_ip:$RAY_PORT"
    local resources=(--num-cpus="$RAY_CPUS_PER_NODE" --num-gpus="$RAY_GPUS_PER_NODE")
    # shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags
    srun --nodes=1 --ntasks=1 --overlap --cpus-per-task="$RAY_CPUS_PER_NODE" -w "${RAY_NODES[0]}" \
        bash -c "$RAY_STEP_WRAPPER" ray-head "$RAY" start --head --block --node-ip-address="$head_ip" --port="$RAY_PORT" --temp-dir="$RAY_TMPDIR" \
        "${resources[@]}" $RAY_START_ARGS &
    RAY_STEP_PIDS+=($!)
    ray_cluster_wait 1 || return 1  # workers give up if the head's GCS is not there when they start
    for node in "${RAY_NODES[@]:1}"; do
        # shellcheck disable=SC2086
        srun --nodes=1 --ntasks=1 --overlap --cpus-per-task="$RAY_CPUS_PER_NODE" -w "$node" \
            bash -c "$RAY_STEP_WRAPPER" ray-worker "$RAY" start --block --address="$RAY_HEAD_ADDRESS" "${resources[@]}" $RAY_START_ARGS &
        RAY_STEP_PIDS+=($!)
    done
    ((${#RAY_NODES[@]} == 1)) || ray_cluster_wait "${#RAY_NODES[@]}"
}

wait_for_exit() {  # $1: timeout in seconds, then pids; fails if any is still running at the timeout
    local deadline=$((SECONDS + $1)) pid running
    shift
    while true; do
        running=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && running=1; done
        ((running)) || { wait "$@" 2>/dev/null; return 0; }
        ((SECONDS >= deadline)) && return 1
        sleep 0.2
    done
}

ray_cluster_stop() {  # idempotent: the EXIT trap calls it again after a signal handler did
    ((${#RAY_STEP_PIDS[@]} == 0)) && return 0
    echo "ray_cluster: stopping Ray on ${#RAY_STEP_PIDS[@]} node(s)"
    kill -USR2 "${RAY_STEP_PIDS[@]}" 2>/dev/null
    if ! wait_for_exit "$RAY_STOP_TIMEOUT" "${RAY_STEP_PIDS[@]}"; then
        echo "ray_cluster: Ray still up after ${RAY_STOP_TIMEOUT}s (RAY_STOP_TIMEOUT); killing the steps" >&2
        kill -TERM "${RAY_STEP_PIDS[@]}" 2>/dev/null  # srun: SIGKILL to its tasks
        wait_for_exit 30 "${RAY_STEP_PIDS[@]}" || kill -KILL "${RAY_STEP_PIDS[@]}" 2>/dev/null
    fi
    RAY_STEP_PIDS=()
}

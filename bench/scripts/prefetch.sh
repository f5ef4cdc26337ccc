#!/usr/bin/env bash
# Fetching ahead on one machine: `kiln serve` (embedded worker off) and one `kiln worker`
# running one action at a time, no directory cache, under ROOT. Runs kiln-bench's `execute`
# with the arguments given (use --concurrency 2 or more so that actions wait for the worker,
# and --sleep-ms so that there is time to fetch while one runs), then prints the placements.
#
#   bench/scripts/prefetch.sh ROOT --sleep-ms 300 --input-size 1MiB --input-files 32 \
#       --ops 12 --connections 1 --concurrency 2
#
# Env: KILN, KILN_BENCH (the binaries, default target/release/…). Needs curl.
set -euo pipefail
root=$1; shift
kiln=${KILN:-target/release/kiln}; bench=${KILN_BENCH:-target/release/kiln-bench}
run="$root/prefetch.$$"; mkdir -p "$run/server"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"; }
trap cleanup EXIT
printf '[worker]\nembedded = false\n' > "$run/server.toml"
printf '[worker]\ndircache_bytes = 0\n' > "$run/worker.toml"
. "$(dirname "$0")/farm-lib.sh"
start_server
start_worker w1
"$bench" execute "$@" --endpoint "grpc://$addr" --server-pid "$server"
curl -s "http://$admin/metrics" | grep -E '^kiln_scheduler_placements_total' || true

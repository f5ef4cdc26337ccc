#!/usr/bin/env bash
# A farm on one machine: `kiln serve` with its embedded worker off and two `kiln worker`s
# (one action at a time each), all under ROOT; runs one kiln-bench scenario against it and
# prints the server's placement and the workers' directory-cache counters.
#
#   bench/scripts/farm.sh ROOT LOCALITY_WAIT_MS DIRCACHE_BYTES kiln-bench-args...
#   bench/scripts/farm.sh /mnt/scratch 100 4GiB execute --input-size 1KiB --input-files 2000 \
#       --files-per-dir 20 --shared-inputs --ops 60 --connections 2 --concurrency 2
#
# DIRCACHE_BYTES 0 turns the workers' directory caches off. Env: KILN, KILN_BENCH (the
# binaries, default target/release/…). Needs curl. ROOT/farm.PID is removed afterwards.
set -euo pipefail
root=$1; wait_ms=$2; dircache=$3; shift 3
kiln=${KILN:-target/release/kiln}; bench=${KILN_BENCH:-target/release/kiln-bench}
run="$root/farm.$$"; mkdir -p "$run/server" "$run/w1" "$run/w2"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"; }
trap cleanup EXIT
printf '[worker]\nembedded = false\n[execution]\nlocality_wait_ms = %s\n' "$wait_ms" > "$run/server.toml"
if [ "$dircache" = 0 ]; then
  printf '[worker]\ndircache_bytes = 0\n' > "$run/worker.toml"
else
  printf '[worker]\ndircache_bytes = "%s"\n' "$dircache" > "$run/worker.toml"
fi
. "$(dirname "$0")/farm-lib.sh"
start_server
start_worker w1
start_worker w2
"$bench" "$@" --endpoint "grpc://$addr" --server-pid "$server"
curl -s "http://$admin/metrics" | grep -E '^kiln_(scheduler_placements|worker_dircache_(hits|misses))_total' || true

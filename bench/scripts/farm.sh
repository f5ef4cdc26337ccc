#!/usr/bin/env bash
# A farm on one machine: `kiln serve` with its embedded worker off and WORKERS `kiln worker`s
# (default 2, one action at a time each), all under ROOT; runs one kiln-bench scenario
# against it RUNS times (default 1; pass --seed so that each run has the same inputs under
# new salts, a rebuild), and prints after each run the server's placements, the workers'
# directory-cache counters, their fetch and served bytes, and the blob bytes the server sent.
#
#   bench/scripts/farm.sh ROOT LOCALITY_WAIT_MS DIRCACHE_BYTES kiln-bench-args...
#   bench/scripts/farm.sh /mnt/scratch 100 4GiB execute --input-size 1KiB --input-files 2000 \
#       --files-per-dir 20 --shared-inputs --ops 60 --connections 2 --concurrency 2
#   WORKERS=3 RUNS=2 bench/scripts/farm.sh /tmp 100 4GiB execute --input-size 128KiB \
#       --input-files 2000 --files-per-dir 20 --shared-inputs --seed 7 --ops 30 \
#       --connections 1 --concurrency 3
#
# DIRCACHE_BYTES 0 turns the workers' directory caches off; LAYOUT=overlay sets their
# worker.dircache_layout (needs root). Env: KILN, KILN_BENCH (the binaries, default
# target/release/…). Needs curl. ROOT/farm.PID is removed afterwards.
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
  printf '[worker]\ndircache_bytes = "%s"\ndircache_layout = "%s"\n' "$dircache" "${LAYOUT:-links}" > "$run/worker.toml"
fi
. "$(dirname "$0")/farm-lib.sh"
start_server
for i in $(seq "${WORKERS:-2}"); do start_worker "w$i"; done
for r in $(seq "${RUNS:-1}"); do
  echo "== run $r"
  "$bench" "$@" --endpoint "grpc://$addr" --server-pid "$server"
  # The workers report with their next keep-alive at the latest.
  sleep 6
  metrics=$(curl -s "http://$admin/metrics")
  grep -E '^kiln_(scheduler_placements|worker_(dircache_(hits|misses)|fetch_bytes|served_bytes))_total' <<< "$metrics" || true
  awk '/^kiln_sent_bytes_total\{method="(ByteStream.Read|CAS.BatchReadBlobs)"\}/ { s += $2 } END { printf "server sent %d bytes of blobs so far\n", s }' <<< "$metrics"
done

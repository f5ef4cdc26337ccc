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
# Waits until FILE contains TEXT (the process logs it when ready), or fails.
await() {
  for _ in $(seq 200); do grep -q "$2" "$1" && return 0; sleep 0.05; done
  cat "$1" >&2; return 1
}
"$kiln" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$run/server" \
  --config "$run/server.toml" > "$run/server.log" 2>&1 &
pids+=($!); server=$!
await "$run/server.log" "listening"
addr=$(grep -o "listening on 127.0.0.1:[0-9]*" "$run/server.log" | grep -o "127.0.0.1:[0-9]*")
admin=$(grep -o "admin on http://127.0.0.1:[0-9]*" "$run/server.log" | grep -o "127.0.0.1:[0-9]*")
for w in w1 w2; do
  "$kiln" worker --scheduler "grpc://$addr" --cas-dir "$run/$w/cas" --work-dir "$run/$w/work" \
    --name "$w" --listen 127.0.0.1:0 --shards 1 --max-inflight 1 --config "$run/worker.toml" \
    > "$run/$w.log" 2>&1 &
  pids+=($!)
  await "$run/$w.log" "session open"
done
"$bench" "$@" --endpoint "grpc://$addr" --server-pid "$server"
curl -s "http://$admin/metrics" | grep -E '^kiln_(scheduler_placements|worker_dircache_(hits|misses))_total' || true

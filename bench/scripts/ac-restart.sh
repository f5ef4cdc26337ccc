#!/usr/bin/env bash
# Restart of an action cache of N results: `kiln serve` (fsync off, to fill it quickly) is
# filled by kiln-bench's `action-cache` scenario (N distinct results), stopped cleanly (which
# writes {data_dir}/ac.index), and started again from the snapshot, warm and with the page
# cache dropped, then without it (a full scan), warm and cold. Prints the time from starting
# the process to its "listening" line (the action cache is indexed before the server
# listens). Needs bc; the cold runs need root (/proc/sys/vm/drop_caches), and are warm without.
#
#   bench/scripts/ac-restart.sh 200000
#
# Env: KILN, KILN_BENCH (the binaries, default target/release/…).
set -euo pipefail
n=$1
kiln=${KILN:-target/release/kiln}; bench=${KILN_BENCH:-target/release/kiln-bench}
d=$(mktemp -d); pid=
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$d"' EXIT
printf '[storage]\nfsync = false\n[action_cache]\nmax_bytes = "4 GiB"\n' > "$d/c.toml"
start() {
  local t0; t0=$(date +%s.%N)
  "$kiln" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$d/data" \
    --config "$d/c.toml" > "$d/log" 2>&1 &
  pid=$!
  for _ in $(seq 6000); do grep -q "kiln listening" "$d/log" && break; sleep 0.01; done
  echo "$1: ready after $(echo "$(date +%s.%N) - $t0" | bc) s; $(grep -o 'action cache [0-9]* entries' "$d/log")"
  addr=$(grep -o "listening on 127.0.0.1:[0-9]*" "$d/log" | grep -o "127.0.0.1:[0-9]*")
}
stop() { kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(not root: page cache kept)"; }
start empty
"$bench" action-cache --endpoint "grpc://$addr" --update-fraction 1 --hit-fraction 0 \
  --blobs "$n" --ops 1 --connections 4 --concurrency 16 > /dev/null
stop
start "from the snapshot"; stop
cold; start "from the snapshot, cold"; stop
rm "$d/data/ac.index"; start "scan"; stop
rm -f "$d/data/ac.index"; cold; start "scan, cold"; stop

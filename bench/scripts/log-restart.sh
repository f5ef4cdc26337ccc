#!/usr/bin/env bash
# Restart of a small-blob log of about N blobs: `kiln serve` with blobs up to 64 KiB in a log
# (fsync off, to fill it quickly) is filled by kiln-bench's `batch` scenario (1 KiB blobs in
# batches of 64), stopped cleanly, and started again, warm and with the page cache dropped;
# then with every index file removed (each segment read through), warm and cold. Prints the
# time from starting the process to its "listening" line (a log is indexed before the server
# listens) and the "log indexed" line. Needs bc; the cold runs need root.
#
#   bench/scripts/log-restart.sh 1000000
#
# Env: KILN, KILN_BENCH (the binaries, default target/release/…).
set -euo pipefail
n=$1
kiln=${KILN:-target/release/kiln}; bench=${KILN_BENCH:-target/release/kiln-bench}
d=$(mktemp -d); pid=
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$d"' EXIT
cat > "$d/c.toml" <<TOML
[storage]
fsync = false
chain = ["split"]
[storage.tiers.split]
kind = "size_partition"
threshold_bytes = "64 KiB"
small = ["memory", "log"]
large = ["filesystem"]
[storage.tiers.log]
kind = "log"
bytes = "64 GiB"
TOML
start() {
  local t0; t0=$(date +%s.%N)
  "$kiln" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$d/data" \
    --config "$d/c.toml" > "$d/log" 2>&1 &
  pid=$!
  for _ in $(seq 30000); do grep -q "kiln listening" "$d/log" && break; sleep 0.01; done
  echo "$1: ready after $(echo "$(date +%s.%N) - $t0" | bc) s; $(grep -o 'blobs=[0-9]* records=[0-9]* segments_from_index_files=[0-9]*.*elapsed_ms=[0-9]*' "$d/log")"
  addr=$(grep -o "listening on 127.0.0.1:[0-9]*" "$d/log" | grep -o "127.0.0.1:[0-9]*")
}
stop() { kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(not root: page cache kept)"; }
start empty
"$bench" batch --endpoint "grpc://$addr" --size 1KiB --batch 64 --ops $((n / 64)) \
  --connections 4 --concurrency 16 > /dev/null
stop
start "from index files"; stop
cold; start "from index files, cold"; stop
rm -f "$d"/data/log/log/*.idx; start "read through"; stop
rm -f "$d"/data/log/log/*.idx; cold; start "read through, cold"; stop

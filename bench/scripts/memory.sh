#!/usr/bin/env bash
# Resident memory of a server holding a store: starts `kiln serve` on DATA_DIR (fill it first
# with restart.sh, which also leaves the index snapshot a start uses), waits until it listens
# and then SETTLE seconds, and prints its resident memory (VmRSS), the allocator's allocated
# bytes and the blob count from /metrics; then stops it cleanly. Run it for two binaries in
# turn to compare them.
#
#   bench/scripts/memory.sh DATA_DIR [LABEL] [SETTLE=5]
#
# Env: KILN (the binary, default target/release/kiln). Needs curl; Linux (/proc).
set -euo pipefail
data=$1; label=${2:-kiln}; settle=${3:-5}
kiln=${KILN:-target/release/kiln}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$kiln" serve --listen 127.0.0.1:0 --data-dir "$data" --admin-listen 127.0.0.1:0 >"$log" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q "listening" "$log" && break; sleep 0.1; done
admin=$(grep -o "admin on http://127.0.0.1:[0-9]*" "$log" | grep -o "127.0.0.1:[0-9]*")
sleep "$settle"
metrics=$(curl -s "http://$admin/metrics")
rss_kb=$(awk '/^VmRSS/ {print $2}' /proc/$pid/status)
allocated=$(echo "$metrics" | awk '/^kiln_allocator_allocated_bytes/ {print $2}')
blobs=$(echo "$metrics" | awk '/^kiln_cas_blobs/ {print $2}')
indexed=$(grep -o "indexed in [0-9.]*m\?s" "$log" || true)
echo "$label: resident $((rss_kb / 1024)) MiB, allocated $((allocated / 1048576)) MiB, $blobs blobs, $indexed"
kill "$pid"; wait "$pid" || true

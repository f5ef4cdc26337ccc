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
detail='blobs=[0-9]* records=[0-9]* segments_from_index_files=[0-9]*.*elapsed_ms=[0-9]*'
. "$(dirname "$0")/restart-lib.sh"
start empty
"$bench" batch --endpoint "grpc://$addr" --size 1KiB --batch 64 --ops $((n / 64)) \
  --connections 4 --concurrency 16 > /dev/null
stop
start "from index files"; stop
cold; start "from index files, cold"; stop
rm -f "$d"/data/log/log/*.idx; start "read through"; stop
rm -f "$d"/data/log/log/*.idx; cold; start "read through, cold"; stop

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
detail='action cache [0-9]* entries'
. "$(dirname "$0")/restart-lib.sh"
start empty
"$bench" action-cache --endpoint "grpc://$addr" --update-fraction 1 --hit-fraction 0 \
  --blobs "$n" --ops 1 --connections 4 --concurrency 16 > /dev/null
stop
start "from the snapshot"; stop
cold; start "from the snapshot, cold"; stop
rm "$d/data/ac.index"; start "scan"; stop
rm -f "$d/data/ac.index"; cold; start "scan, cold"; stop

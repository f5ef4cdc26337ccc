#!/usr/bin/env bash
# Peer transfers on one machine: `kiln serve` (embedded worker off) and two `kiln worker`s,
# w1 offering pool=a and w2 pool=b, all under ROOT. kiln-bench's `execute` runs first on
# pool=a (w1 fetches every input from the server), then the same inputs (same --seed) on
# pool=b: w2 fetches them from w1 when PEERS is 1, from the server when 0. Prints the second
# run's report, the bytes the server sent during it, and w2's fetch counters.
#
#   bench/scripts/peers.sh ROOT PEERS kiln-bench-execute-args...
#   bench/scripts/peers.sh /tmp 1 --input-size 1MiB --input-files 64 --ops 8 \
#       --connections 1 --concurrency 1
#
# Env: KILN, KILN_BENCH (the binaries, default target/release/…). Needs curl.
# ROOT/peers.PID is removed afterwards.
set -euo pipefail
root=$1; peers=$2; shift 2
kiln=${KILN:-target/release/kiln}; bench=${KILN_BENCH:-target/release/kiln-bench}
run="$root/peers.$$"; mkdir -p "$run/server" "$run/w1" "$run/w2"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"; }
trap cleanup EXIT
printf '[worker]\nembedded = false\n' > "$run/server.toml"
flag=$([ "$peers" = 1 ] && echo true || echo false)
# No directory cache: every action's inputs are fetched.
printf '[worker]\ndircache_bytes = 0\npeers = %s\n' "$flag" > "$run/worker.toml"
. "$(dirname "$0")/farm-lib.sh"
start_server
start_worker w1 --property pool=a
start_worker w2 --property pool=b
sent() {
  curl -s "http://$admin/metrics" | awk '/^kiln_sent_bytes_total\{method="(ByteStream.Read|CAS.BatchReadBlobs)"\}/ { s += $2 } END { printf "%d\n", s }'
}
seed=$RANDOM
"$bench" execute --endpoint "grpc://$addr" --seed "$seed" --platform pool=a "$@" > "$run/first.txt"
# w1 reports what it holds after each action: wait until the scheduler's count settles.
facts() { curl -s "http://$admin/metrics" | awk '/^kiln_scheduler_blob_facts / { print $2 }'; }
last=-1
for _ in $(seq 100); do
  now=$(facts)
  [ "$now" = "$last" ] && { [ "$peers" = 0 ] || [ "${now:-0}" != 0 ]; } && break
  last=$now; sleep 0.5
done
echo "the scheduler knows $(facts) blob facts"
before=$(sent)
"$bench" execute --endpoint "grpc://$addr" --seed "$seed" --platform pool=b --server-pid "$server" "$@"
after=$(sent)
echo "server sent $((after - before)) bytes of blobs during the second run"
curl -s "http://$admin/metrics" | grep -E '^kiln_worker_(fetch_bytes|served_bytes|peer_failures)_total' || true

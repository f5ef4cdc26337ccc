#!/usr/bin/env bash
# How long a farm takes to take over a dead server's operations: a redis-server on a free
# port under ROOT, servers a and b sharing it (operations, the action cache, and blobs up to
# 64 KiB through a redis tier; redis.lease_secs as given, default 10), one worker serving
# both (one action at a time). kiln-bench sends OPS sleeping actions to a (so most wait in
# a's queue); once a has
# accepted them all, a is killed with SIGKILL. Prints the time from the kill to b noticing
# a's lease lapsed, and to b having taken every operation over (queued, adopted where it
# runs, or ended from the action cache).
#
#   bench/scripts/takeover.sh /tmp [OPS] [LEASE_SECS] [TIMEOUT_MS]
#
# Env: KILN, KILN_BENCH (the binaries, default target/release/…). Needs redis-server, curl.
set -euo pipefail
root=$1; ops=${2:-100}; lease=${3:-10}; timeout=${4:-2000}
kiln=${KILN:-target/release/kiln}; bench=${KILN_BENCH:-target/release/kiln-bench}
run="$root/takeover.$$"; mkdir -p "$run"
pids=()
cleanup() { kill -9 "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$run" > "$run/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do redis-cli -p "$port" ping > /dev/null 2>&1 && break; sleep 0.05; done
. "$(dirname "$0")/farm-lib.sh"
printf '[redis]\nurl = "redis://127.0.0.1:%s"\nlease_secs = %s\ntimeout_ms = %s\n[storage]\nchain = ["memory", "shared", "filesystem"]\n[storage.tiers.shared]\nkind = "redis"\nmax_blob_bytes = "64 KiB"\n[worker]\nembedded = false\n[execution]\nmax_queued = 100000\n' "$port" "$lease" "$timeout" > "$run/server.toml"
declare -A addrs admins spids
for s in a b; do
  "$kiln" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$run/$s" \
    --config "$run/server.toml" > "$run/$s.log" 2>&1 &
  pids+=($!); spids[$s]=$!
  await "$run/$s.log" "listening"
  addrs[$s]=$(grep -o "listening on 127.0.0.1:[0-9]*" "$run/$s.log" | grep -o "127.0.0.1:[0-9]*")
  admins[$s]=$(grep -o "admin on http://127.0.0.1:[0-9]*" "$run/$s.log" | grep -o "127.0.0.1:[0-9]*")
done
printf '\n' > "$run/worker.toml"
addr=${addrs[a]}
start_worker w --scheduler "grpc://${addrs[b]}"
metric() { curl -s "http://$1/metrics" | awk -v m="$2" '$1 == m { print $2 }'; }
"$bench" execute --endpoint "grpc://${addrs[a]}" --sleep-ms 3000 --ops "$ops" \
  --connections 1 --concurrency "$ops" > "$run/bench.log" 2>&1 &
bench_pid=$!
for _ in $(seq 600); do
  [ "$(( $(metric "${admins[a]}" kiln_scheduler_queued) + $(metric "${admins[a]}" kiln_scheduler_running) ))" -ge "$ops" ] && break
  sleep 0.05
done
echo "a holds $(metric "${admins[a]}" kiln_scheduler_queued) queued and $(metric "${admins[a]}" kiln_scheduler_running) running"
killed=$(date +%s.%N)
kill -9 "${spids[a]}"
for _ in $(seq 3000); do grep -q "took over a dead server's operations" "$run/b.log" && break; sleep 0.02; done
# Both times from b's log (UTC, like date's): noticing the lapsed lease, and done taking over.
at() { date -d "$(grep "$1" "$run/b.log" | head -1 | cut -c1-27)" +%s.%N; }
noticed=$(at "stopped renewing its lease"); done=$(at "took over a dead server's operations")
awk -v k="$killed" -v n="$noticed" -v d="$done" 'BEGIN { printf "kill to b noticing: %.2f s; to b having taken them all over: %.2f s\n", n - k, d - k }'
grep "took over a dead server's operations" "$run/b.log" | head -1 | sed 's/.*took over/b: took over/'
kill "$bench_pid" 2>/dev/null || true

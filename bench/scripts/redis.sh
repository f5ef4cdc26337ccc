#!/usr/bin/env bash
# One server with and without Redis behind it: a redis-server on a free port under ROOT, then
# `kiln serve` twice — its own action cache and files only, then `[redis]` with the action
# cache shared and a redis tier for blobs up to 64 KiB — each running the kiln-bench scenario
# given. Prints each run's report and, for the Redis run, the commands and round trips Redis
# saw (its `total_writes_processed`: replies written, one or a few per pipeline).
#
#   bench/scripts/redis.sh /tmp action-cache --duration 8 --connections 4 --concurrency 16
#   bench/scripts/redis.sh /tmp find-missing --digests-per-call 1000 --duration 8
#
# Env: KILN, KILN_BENCH (the binaries, default target/release/…). Needs redis-server, curl.
set -euo pipefail
root=$1; shift
kiln=${KILN:-target/release/kiln}; bench=${KILN_BENCH:-target/release/kiln-bench}
run="$root/redis.$$"; mkdir -p "$run"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$run" > "$run/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do redis-cli -p "$port" ping > /dev/null 2>&1 && break; sleep 0.05; done
stat() { redis-cli -p "$port" info "$1" | tr -d '\r' | grep "^$2:" | cut -d: -f2 | cut -d, -f1 | sed 's/calls=//'; }
. "$(dirname "$0")/farm-lib.sh"
for mode in local redis; do
  echo "== $mode"
  rm -rf "$run/server"; mkdir -p "$run/server"
  if [ "$mode" = redis ]; then
    printf '[redis]\nurl = "redis://127.0.0.1:%s"\n[storage]\nchain = ["memory", "shared", "filesystem"]\n[storage.tiers.shared]\nkind = "redis"\nmax_blob_bytes = "64 KiB"\n' "$port" > "$run/server.toml"
  else
    printf '\n' > "$run/server.toml"
  fi
  start_server
  writes=$(stat stats total_writes_processed); commands=$(stat stats total_commands_processed)
  "$bench" "$@" --endpoint "grpc://$addr" --server-pid "$server"
  if [ "$mode" = redis ]; then
    echo "redis: $(( $(stat stats total_commands_processed) - commands )) commands, $(( $(stat stats total_writes_processed) - writes )) replies written"
  fi
  kill "$server"; wait "$server" 2>/dev/null || true
done

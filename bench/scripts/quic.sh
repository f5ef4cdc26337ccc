#!/usr/bin/env bash
# Peer transfers over TCP (TLS) and over QUIC between two network namespaces: `kiln serve`
# (TLS auto, its embedded worker off) in this namespace, and two enrolled `kiln worker`s,
# w1 (pool=a) and w2 (pool=b), each in a namespace of its own on a bridge. For each run,
# kiln-bench's `execute` runs an action on pool=a (w1 fetches its inputs from the server),
# then the same inputs on pool=b: w2 fetches every one from w1, over the transport chosen.
# Prints each run's input-fetch time on w2 and w2's fetch counters.
#
# With LINK=server it measures w1's link to the server instead (`server.quic` on, and
# TRANSPORT as w1's worker.server_transport): each run's action runs on pool=a only, and the
# script prints its input-fetch and output-upload times (use --input-size and --output-size).
#
#   bench/scripts/quic.sh TRANSPORT RUNS kiln-bench-execute-args...
#   bench/scripts/quic.sh quic 5 --input-size 32MiB --input-files 8
#   LINK=server bench/scripts/quic.sh quic 5 --input-size 64MiB --output-size 64MiB
#
# TRANSPORT is worker.peer_transport (tcp, quic, both), or with LINK=server
# worker.server_transport. Needs root (ip netns), curl.
# Env: KILN, KILN_BENCH (default target/release/…). Removes what it made on exit.
set -euo pipefail
transport=$1; runs=$2; shift 2
kiln=$(realpath "${KILN:-target/release/kiln}"); bench=$(realpath "${KILN_BENCH:-target/release/kiln-bench}")
run=$(mktemp -d); tag="kq$$"; br="${tag}br"; net=10.77.$(( $$ % 250 ))
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true
  ip netns del "${tag}a" 2>/dev/null || true; ip netns del "${tag}b" 2>/dev/null || true
  ip link del "$br" 2>/dev/null || true; rm -rf "$run"
}
trap cleanup EXIT
ip link add "$br" type bridge && ip addr add "$net.254/24" dev "$br" && ip link set "$br" up
i=0
for ns in a b; do
  i=$((i + 1))
  ip netns add "$tag$ns"
  ip link add "$tag${ns}v" type veth peer name eth0 netns "$tag$ns"
  ip link set "$tag${ns}v" master "$br" up
  ip -n "$tag$ns" addr add "$net.$i/24" dev eth0
  ip -n "$tag$ns" link set eth0 up; ip -n "$tag$ns" link set lo up
done
await() { for _ in $(seq 300); do grep -q "$2" "$1" && return 0; sleep 0.05; done; cat "$1" >&2; return 1; }
link=${LINK:-peer}
quic=$([ "$link" = server ] && echo true || echo false)
printf '[server]\nquic = %s\n[tls]\nmode = "auto"\nnames = ["%s.254"]\n[worker]\nembedded = false\n[auth]\nenabled = true\nanonymous_roles = ["execute", "cache-read", "cache-write"]\n' "$quic" "$net" > "$run/server.toml"
"$kiln" serve --listen 0.0.0.0:0 --admin-listen 127.0.0.1:0 --data-dir "$run/server" \
  --config "$run/server.toml" > "$run/server.log" 2>&1 &
pids+=($!); server=$!
await "$run/server.log" "listening"
port=$(grep -o "listening on 0.0.0.0:[0-9]*" "$run/server.log" | grep -o "[0-9]*$")
if [ "$link" = server ]; then
  printf '[worker]\ndircache_bytes = 0\nserver_transport = "%s"\n' "$transport" > "$run/worker.toml"
else
  printf '[worker]\ndircache_bytes = 0\npeer_race_delay_ms = 60000\npeer_transport = "%s"\n' "$transport" > "$run/worker.toml"
fi
i=0
for w in w1 w2; do
  i=$((i + 1)); ns=$tag$([ $w = w1 ] && echo a || echo b); pool=$([ $w = w1 ] && echo a || echo b)
  token=$("$kiln" join-token create --ttl 10m --server-address "$net.254:$port" --data-dir "$run/server" 2>/dev/null)
  mkdir -p "$run/$w"
  ip netns exec "$ns" "$kiln" worker --join "$token" --scheduler "grpcs://$net.254:$port" \
    --cas-dir "$run/$w/cas" --work-dir "$run/$w/work" --name "$w" --listen "$net.$i:0" \
    --max-inflight 1 --property "pool=$pool" --admin-listen 127.0.0.1:0 \
    --config "$run/worker.toml" > "$run/$w.log" 2>&1 &
  pids+=($!)
  await "$run/$w.log" "session open"
done
w2_admin=$(grep -o "worker metrics on http://127.0.0.1:[0-9]*" "$run/w2.log" | grep -o "127.0.0.1:[0-9]*")
common=(--endpoint "grpcs://127.0.0.1:$port" --tls-ca "$run/server/tls/ca.pem" --ops 1 --connections 1 --concurrency 1)
# The blobs the scheduler knows w1 holds.
held() { curl -s --cacert "$run/server/tls/ca.pem" "https://localhost:$(grep -o "admin on https://[^:]*:[0-9]*" "$run/server.log" | grep -o "[0-9]*$")/metrics" | awk '/^kiln_worker_held_blobs\{worker="w1"\} / { print $2 }'; }
if [ "$link" = server ]; then
  for r in $(seq "$runs"); do
    "$bench" execute "${common[@]}" --seed "$((RANDOM * 100 + r))" --platform pool=a "$@" > "$run/first.txt"
    echo "run $r:"; grep -E '^ *(input-fetch|output-upload)' "$run/first.txt"
  done
  exit 0
fi
for r in $(seq "$runs"); do
  seed=$((RANDOM * 100 + r))
  before=$(held); before=${before:-0}
  "$bench" execute "${common[@]}" --seed "$seed" --platform pool=a "$@" > "$run/first.txt"
  # Until w1's report of the new inputs has arrived (it grows, then stays).
  last=-1
  for _ in $(seq 100); do now=$(held); [ "${now:-0}" != "$before" ] && [ "$now" = "$last" ] && break; last=$now; sleep 0.3; done
  "$bench" execute "${common[@]}" --seed "$seed" --platform pool=b "$@" > "$run/second.txt"
  echo "run $r: $(grep -E '^ *input-fetch' "$run/second.txt" | head -1)"
done
ip netns exec "${tag}b" curl -s "http://$w2_admin/metrics" | grep -E '^kiln_worker_(fetch_bytes|fetch_quic_bytes|peer_failures)_total' || true

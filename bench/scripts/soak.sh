#!/usr/bin/env bash
# Memory soak: starts a release `kiln serve` on a fresh data directory, runs `kiln-bench mixed`
# against it for DURATION seconds while kiln-bench samples the server's RSS, and scrapes the
# server's /metrics once a minute into a table (RSS split into anonymous and file pages, blobs,
# memory tier, action cache, finished operations, allocator figures when exported).
#
# Usage: bench/scripts/soak.sh OUT_DIR DURATION_SECS [kiln serve flags...]
#   e.g. bench/scripts/soak.sh /tmp/soak 1800
#        bench/scripts/soak.sh /tmp/soak-nomem 1800 --config bench/scripts/no-memory-tier.toml
# Env: KILN, KILN_BENCH (binaries; default target/release), PORT (50091), ADMIN_PORT (9191),
#      DATA_DIR (an existing data directory to serve, e.g. a full store from an earlier soak;
#      default a fresh OUT_DIR/data),
#      BENCH_FLAGS (extra kiln-bench flags; default "--connections 4 --concurrency 16").
# Writes OUT_DIR/bench.json, OUT_DIR/soak.rss.svg, OUT_DIR/metrics.tsv, OUT_DIR/server.log.
set -euo pipefail
out=$1
duration=$2
shift 2
root=$(cd "$(dirname "$0")/../.." && pwd)
kiln=${KILN:-$root/target/release/kiln}
bench=${KILN_BENCH:-$root/target/release/kiln-bench}
port=${PORT:-50091}
admin_port=${ADMIN_PORT:-9191}
flags=${BENCH_FLAGS:---connections 4 --concurrency 16}

rm -rf "$out"
data=${DATA_DIR:-$out/data}
mkdir -p "$out" "$data"
"$kiln" serve --data-dir "$data" --listen "127.0.0.1:$port" \
    --admin-listen "127.0.0.1:$admin_port" "$@" >"$out/server.log" 2>&1 &
server=$!
sampler=
cleanup() {
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null || true
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
}
trap cleanup EXIT

# A full store takes a while to scan at start-up: wait for /readyz as long as the server lives.
until curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "kiln serve exited; see $out/server.log" >&2
        exit 1
    fi
    sleep 0.2
done

# One metric's value (first sample without labels, or summed over labels).
metric() { awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%.0f", s }' "$2"; }
kib() { awk -v k="$1:" '$1 == k { print int($2 / 1024) }' "/proc/$server/status"; }

sample() {
    local start=$SECONDS
    printf 'min\trss_mib\tanon_mib\tfile_mib\tblobs\tmemory_tier_mib\tac_entries\tcompleted_kept\talloc_mib\talloc_resident_mib\n'
    while kill -0 "$server" 2>/dev/null; do
        local m
        m=$(mktemp)
        if curl -fsS "http://127.0.0.1:$admin_port/metrics" >"$m" 2>/dev/null; then
            printf '%.1f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                "$(echo "($SECONDS - $start) / 60" | bc -l)" \
                "$(kib VmRSS)" "$(kib RssAnon)" "$(kib RssFile)" \
                "$(metric kiln_cas_blobs "$m")" \
                "$(($(metric kiln_cas_memory_bytes "$m") / 1048576))" \
                "$(metric kiln_action_cache_entries "$m")" \
                "$(metric kiln_scheduler_completed_kept "$m")" \
                "$(($(metric kiln_allocator_allocated_bytes "$m") / 1048576))" \
                "$(($(metric kiln_allocator_resident_bytes "$m") / 1048576))"
        fi
        rm -f "$m"
        sleep 60
    done
}
sample >"$out/metrics.tsv" &
sampler=$!

# shellcheck disable=SC2086
"$bench" mixed --endpoint "grpc://127.0.0.1:$port" --duration "$duration" $flags \
    --server-pid "$server" --rss-every 10 --plot "$out/soak.svg" --json "$out/bench.json"
kill "$sampler" 2>/dev/null || true
sampler=
column -t "$out/metrics.tsv"

#!/usr/bin/env bash
# Drive a real Bazel (Debian bazel-bootstrap 4.2.3, /usr/bin/bazel-4) against a
# remote cache, fully offline:
#   build //...  ->  bazel clean  ->  build //... again
# and report Bazel's "INFO: N processes: ..." summary for both builds.
#
# Usage: run_bazel.sh ENDPOINT SALT SCRATCH_DIR [extra bazel build flags...]
#   ENDPOINT     grpc://127.0.0.1:PORT (passed as --remote_cache), or
#                disk:/abs/dir to use Bazel's own --disk_cache (self-test).
#   SALT         any string; exported to every action as KILN_SALT so a new
#                salt gives brand-new action keys (build 1 = all misses).
#   SCRATCH_DIR  created if missing; gets ws/ (workspace copy), root/ (bazel
#                --output_user_root, deleted at exit) and logs/ (kept).
# Env:
#   BAZEL=/usr/bin/bazel-4     bazel binary
#   REQUIRE_FIRST_MISS=1       also fail unless build 1 had 0 cache hits
#   REQUIRE_REMOTE=1           also fail unless every spawn of build 1 ran remotely
#                              (pass --remote_executor=... among the extra flags)
#   BAZEL_COMMAND=test         run `bazel test` instead of `bazel build`
#   KEEP_OUTPUT_ROOT=1         don't delete SCRATCH_DIR/root at exit
#   ALLOW_BUILD1_WARNINGS=1    build 1 may print remote warnings (its server is
#                              killed and restarted while it runs)
#
# Output (stdout), machine-readable lines:
#   BUILD1_SUMMARY: INFO: 15 processes: 6 internal, 9 linux-sandbox.
#   BUILD2_SUMMARY: INFO: 15 processes: 9 remote cache hit, 6 internal.
#   KILN_BAZEL build=N exit=E secs=S total=T hits=H internal=I executed=X remote_warnings=W
#   KILN_BAZEL_RESULT PASS|FAIL reason...
# Exit status: 0 = both builds OK, build 2 executed nothing (all non-internal
# spawns were "remote cache hit") and no remote-cache warnings; 1 otherwise;
# 64 = usage error.
set -u -o pipefail

if [ $# -lt 3 ]; then
    sed -n '2,28p' "$0" >&2
    exit 64
fi
ENDPOINT=$1
SALT=$2
SCRATCH=$3
shift 3
EXTRA_FLAGS=("$@")

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BAZEL=${BAZEL:-/usr/bin/bazel-4}

mkdir -p "$SCRATCH"
SCRATCH=$(cd "$SCRATCH" && pwd)
WS=$SCRATCH/ws
ROOT=$SCRATCH/root
LOGS=$SCRATCH/logs

# Fresh copy of the workspace (chmod first: a previous run may have left
# read-only files behind).
[ -e "$WS" ] && chmod -R u+w "$WS" && rm -rf "$WS"
mkdir -p "$LOGS" "$ROOT/tmp"
cp -a "$HERE/workspace" "$WS"

# Startup options.  --ignore_all_rc_files = no system (/etc/bazel/bazelrc),
# home or workspace rc files (and no "rc files are no longer being read"
# warning).  The Debian binary is not self-extracting, so it MUST be pointed
# at the unpacked install base.  --max_idle_secs is only a safety net; we
# shut the server down explicitly below.
STARTUP=(
    --ignore_all_rc_files
    --install_base=/usr/share/bazel
    --trust_install_base
    --output_user_root="$ROOT"
    --max_idle_secs=300
    # Bazel's JVM writes temp files (the raw execution log, exec*.log) to
    # java.io.tmpdir and does not remove them: keep them under ROOT, which goes;
    # and no /tmp/hsperfdata_* directory.
    --host_jvm_args=-Djava.io.tmpdir="$ROOT/tmp"
    --host_jvm_args=-XX:-UsePerfData
)

case "$ENDPOINT" in
    disk:*) CACHE_FLAGS=(--disk_cache="${ENDPOINT#disk:}") ;;
    *)      CACHE_FLAGS=(--remote_cache="$ENDPOINT" --remote_timeout=30) ;;
esac

BUILD_FLAGS=(
    --noshow_progress --color=no --curses=no
    --verbose_failures
    --repository_cache=             # nothing to fetch; never use ~/.cache
    "${CACHE_FLAGS[@]}"
    --remote_upload_local_results=true
    --incompatible_strict_action_env  # fixed PATH => keys independent of caller env
    --action_env=KILN_SALT="$SALT"
    --host_action_env=KILN_SALT="$SALT"
    --test_env=KILN_SALT="$SALT"
)

bz() { (cd "$WS" && "$BAZEL" "${STARTUP[@]}" "$@"); }

cleanup() {
    bz shutdown >>"$LOGS/shutdown.log" 2>&1 || true
    if [ -z "${KEEP_OUTPUT_ROOT:-}" ] && [ -e "$ROOT" ]; then
        chmod -R u+w "$ROOT" 2>/dev/null
        rm -rf "$ROOT"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# parse_summary LOG -> "total=T hits=H internal=I executed=X"
# Bazel 4.2.3 prints e.g.
#   INFO: 15 processes: 6 internal, 9 linux-sandbox.
#   INFO: 15 processes: 9 remote cache hit, 6 internal.
#   INFO: 1 process: 1 internal.      INFO: 0 processes.
parse_summary() {
    local line
    line=$(grep -E '^INFO: [0-9]+ process(es)?[:.]' "$1" | tail -n 1)
    echo "$line" | awk '{
        sub(/^INFO: /, ""); sub(/\.$/, "");
        total = $1 + 0; hits = 0; internal = 0; executed = 0;
        p = index($0, ":");
        if (p > 0) {
            n = split(substr($0, p + 1), parts, ",");
            for (i = 1; i <= n; i++) {
                s = parts[i]; sub(/^ +/, "", s);
                c = s + 0; kind = s; sub(/^[0-9]+ /, "", kind);
                if (kind == "remote cache hit") hits += c;
                else if (kind == "internal") internal += c;
                else executed += c;
            }
        }
        printf "total=%d hits=%d internal=%d executed=%d\n", total, hits, internal, executed;
    }'
}

declare -A RES_EXIT RES_STATS RES_WARN
run_build() {
    local n=$1 log=$LOGS/build$1.log start end rc
    start=$(date +%s.%N)
    bz "${BAZEL_COMMAND:-build}" "${BUILD_FLAGS[@]}" \
        --execution_log_json_file="$LOGS/exec$n.json" \
        "${EXTRA_FLAGS[@]}" //... >"$log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    RES_EXIT[$n]=$rc
    RES_STATS[$n]=$(parse_summary "$log")
    # Bazel 4 degrades remote-cache errors to warnings such as
    # "WARNING: Reading from Remote Cache:" / "WARNING: Writing to Remote Cache:".
    RES_WARN[$n]=$(grep -iE '^(WARNING|ERROR)' "$log" | grep -ciE 'remote|cache|grpc')
    echo "BUILD${n}_SUMMARY: $(grep -E '^INFO: [0-9]+ process(es)?[:.]' "$log" | tail -n 1)"
    printf 'KILN_BAZEL build=%s exit=%s secs=%.2f %s remote_warnings=%s\n' \
        "$n" "$rc" "$(awk -v a="$start" -v b="$end" 'BEGIN{print b-a}')" "${RES_STATS[$n]}" "${RES_WARN[$n]}"
    if [ "$rc" -ne 0 ] || [ "${RES_WARN[$n]}" -ne 0 ]; then
        echo "---- tail of $log ----" >&2
        tail -n 40 "$log" >&2
    fi
}

get() { echo "${RES_STATS[$1]}" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

run_build 1
bz clean >"$LOGS/clean.log" 2>&1 || echo "WARNING: bazel clean failed (see $LOGS/clean.log)" >&2
run_build 2

reason=""
[ "${RES_EXIT[1]}" -eq 0 ] || reason+=" build1_failed"
[ "${RES_EXIT[2]}" -eq 0 ] || reason+=" build2_failed"
[ "${RES_WARN[1]}" -eq 0 ] || [ -n "${ALLOW_BUILD1_WARNINGS:-}" ] || reason+=" build1_remote_warnings"
[ "${RES_WARN[2]}" -eq 0 ] || reason+=" build2_remote_warnings"
[ "$(get 2 hits)" -gt 0 ] || reason+=" build2_no_hits"
[ "$(get 2 executed)" -eq 0 ] || reason+=" build2_executed_$(get 2 executed)"
[ "$(get 2 hits)" -eq $(( $(get 1 hits) + $(get 1 executed) )) ] || reason+=" build2_hits_ne_build1_spawns"
if [ -n "${REQUIRE_REMOTE:-}" ]; then
    # Every non-internal spawn of build 1 must say "remote" (not linux-sandbox, local...).
    kinds=$(grep -E '^INFO: [0-9]+ process(es)?[:.]' "$LOGS/build1.log" | tail -n 1 | sed 's/^[^:]*: [0-9]* processes*[:.]//; s/\.$//' |
        tr ',' '\n' | sed 's/^ *[0-9]* //' | grep -v -x -e internal -e remote -e '' || true)
    [ -z "$kinds" ] || reason+=" build1_not_all_remote($(echo $kinds | tr ' ' '_'))"
    [ "$(get 1 executed)" -gt 0 ] || reason+=" build1_executed_nothing"
fi
if [ -n "${REQUIRE_FIRST_MISS:-}" ] && [ "$(get 1 hits)" -ne 0 ]; then
    reason+=" build1_had_$(get 1 hits)_hits"
fi

if [ -z "$reason" ]; then
    echo "KILN_BAZEL_RESULT PASS"
    exit 0
fi
echo "KILN_BAZEL_RESULT FAIL${reason} (logs: $LOGS)"
exit 1

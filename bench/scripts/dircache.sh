#!/usr/bin/env bash
# A cached input root put in place by each layout: `kiln serve` (its embedded worker and
# directory cache) under ROOT with `worker.dircache_layout = LAYOUT` (links or overlay; overlay
# needs root), then kiln-bench's `execute` with the arguments given; use --shared-inputs so
# that every action after the first has the same, cached, input root. Prints the worker's
# cache counts after the run.
#
#   bench/scripts/dircache.sh /tmp overlay --input-size 1KiB --input-files 2000 \
#       --files-per-dir 20 --shared-inputs --ops 40 --connections 1 --concurrency 1
#
# Env: KILN, KILN_BENCH (the binaries, default target/release/…). Needs curl.
set -euo pipefail
root=$1; layout=$2; shift 2
kiln=${KILN:-target/release/kiln}; bench=${KILN_BENCH:-target/release/kiln-bench}
run="$root/dircache.$$"; mkdir -p "$run/server"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$run"; }
trap cleanup EXIT
printf '[worker]\ndircache_layout = "%s"\n' "$layout" > "$run/server.toml"
. "$(dirname "$0")/farm-lib.sh"
start_server
if [ "$layout" = overlay ] && ! grep -q "mounted as overlays" "$run/server.log"; then
  echo "overlays cannot be mounted here:" >&2; grep -i overlay "$run/server.log" >&2; exit 1
fi
"$bench" execute "$@" --endpoint "grpc://$addr" --server-pid "$server"
curl -s "http://$admin/metrics" | grep -E '^kiln_worker_dircache_(hits|misses)_total' || true

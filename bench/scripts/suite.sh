#!/usr/bin/env bash
# The standard kiln-bench suite against one endpoint, plus raw loopback TCP for scale.
# Usage: bench/scripts/suite.sh grpc://HOST:PORT OUT_DIR [LABEL]
# Writes one JSON file per scenario into OUT_DIR and prints every table.
set -euo pipefail
endpoint=$1
out=$2
label=${3:-$endpoint}
bench=${KILN_BENCH:-$(dirname "$0")/../../target/release/kiln-bench}
mkdir -p "$out"
run() {
    local name=$1
    shift
    "$bench" "$@" --quiet --label "$label" --json "$out/$name.json"
}
run tcp-1g tcp --size 1GiB --ops 5 --connections 1 --concurrency 1
run write-1g write --endpoint "$endpoint" --digest-function blake3 --size 1GiB --ops 3 --connections 1 --concurrency 1
run read-1g read --endpoint "$endpoint" --digest-function blake3 --size 1GiB --ops 5 --blobs 1 --connections 1 --concurrency 1
run write-mix write --endpoint "$endpoint" --digest-function blake3 --size 4KiB-4MiB --duration 10 --connections 4 --concurrency 32
run read-mix read --endpoint "$endpoint" --digest-function blake3 --size 4KiB-4MiB --duration 10 --connections 4 --concurrency 32
run batch batch --endpoint "$endpoint" --size 4KiB --batch 64 --duration 10 --connections 4 --concurrency 16
run find-missing find-missing --endpoint "$endpoint" --digests-per-call 1000 --duration 10 --connections 4 --concurrency 16
run action-cache action-cache --endpoint "$endpoint" --duration 10 --connections 4 --concurrency 32
run mixed mixed --endpoint "$endpoint" --size 1KiB-64KiB --batch 16 --duration 10 --connections 4 --concurrency 32

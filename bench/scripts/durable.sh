#!/usr/bin/env bash
# Durable small writes: per-blob syncs against group commit against fsync off, each run on a
# fresh journaled ext4 (a loop device, so earlier runs' deleted inodes cannot skew it): 64 KiB
# ByteStream writes, 1 KiB blobs in batches of 64, and UpdateActionResult (each result syncs its
# own file and directory: sharing group commit measured no gain, docs/architecture.md).
#
#   sudo bench/scripts/durable.sh [SECONDS=10] [LABEL...]
#
# LABELs (default all): per-blob, group, log (blobs up to 64 KiB in a small-blob log, one data
# sync per batch), fsync-off.
#
# Needs root (losetup, mkfs.ext4, mount) and about 20 GB free under TMPDIR. Prints kiln-bench's
# tables (writes/s, latency percentiles, server CPU per operation) and the group-commit
# counters. Env: KILN, KILN_BENCH (the binaries, default target/release/...).
set -euo pipefail
secs=${1:-10}
kiln=$(realpath "${KILN:-target/release/kiln}")
bench=$(realpath "${KILN_BENCH:-target/release/kiln-bench}")
work=$(mktemp -d)
mnt=$work/mnt
server=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  umount "$mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
declare -A configs=(
  [per-blob]=$'[storage]\ngroup_commit = false'
  [group]=$'[storage]\ngroup_commit = true'
  [fsync-off]=$'[storage]\nfsync = false'
  [log]=$'[storage]\nchain = ["split"]\n[storage.tiers.split]\nkind = "size_partition"\nthreshold_bytes = "64 KiB"\nsmall = ["memory", "log"]\nlarge = ["filesystem"]\n[storage.tiers.log]\nkind = "log"\nbytes = "8 GiB"'
)
shift || true
labels=("$@")
[ ${#labels[@]} -eq 0 ] && labels=(per-blob group log fsync-off)
run() {
  local label=$1; shift
  mkdir -p "$mnt"
  truncate -s 20G "$work/img"
  mkfs.ext4 -q -F "$work/img"
  mount -o loop "$work/img" "$mnt"
  printf '%s\n' "${configs[$label]}" > "$work/kiln.toml"
  "$kiln" serve --config "$work/kiln.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --data-dir "$mnt/data" > "$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do grep -q "listening" "$work/server.log" && break; sleep 0.1; done
  local addr admin
  addr=$(grep -o "127.0.0.1:[0-9]*" "$work/server.log" | head -1)
  admin=$(grep -o "admin on http://[0-9.:]*" "$work/server.log" | sed 's|admin on ||')
  "$bench" "$@" --endpoint "grpc://$addr" --server-pid "$server" --label "$label" \
    --duration "$secs" --connections 4 --concurrency 16 --quiet
  curl -s "$admin/metrics" | grep -E "^kiln_cas_group_sync|^kiln_log_(batches|appended)" || true
  kill "$server"; wait "$server" || true; server=
  umount "$mnt"; rm -f "$work/img"
}
for label in "${labels[@]}"; do
  run "$label" write --size 64KiB
  run "$label" batch --size 1KiB --batch 64
  run "$label" action-cache --update-fraction 1
done

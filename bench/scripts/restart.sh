#!/usr/bin/env bash
# Restart time of a large store: fills DATA_DIR with BLOBS small blobs written straight into
# the CAS's layout (when it has none yet), then starts `kiln serve` RUNS times, timing each
# start until /readyz answers and until the background rebuild has indexed every directory,
# and stops it cleanly (which writes the index snapshot the next start uses). The first start
# of a fresh store has no snapshot and scans every file.
#
#   bench/scripts/restart.sh DATA_DIR [BLOBS=1000000] [RUNS=4] [cold|warm] [crash]
#
# Needs curl, and python3 to write the blobs. "cold" drops the page cache before each start
# (needs root). "crash" removes the index snapshot before each start, as after a crash of a
# server that never stopped cleanly: the server is ready at once and indexes the files in the
# background; the script also reports when that rebuild is done. Env: KILN (the binary,
# default target/release/kiln), PORT, ADMIN_PORT.
set -euo pipefail
data=$1; blobs=${2:-1000000}; runs=${3:-4}; cold=${4:-}; crash=${5:-}
kiln=${KILN:-target/release/kiln}
port=${PORT:-50391}; admin=${ADMIN_PORT:-9491}
if [ ! -d "$data/cas" ]; then
  echo "writing $blobs blobs into $data ..."
  python3 - "$data" "$blobs" <<'PY'
import hashlib, os, sys
root, n = sys.argv[1], int(sys.argv[2])
inst = os.path.join(root, "cas", "i_")
os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
os.makedirs(inst, exist_ok=True)
open(os.path.join(inst, "INSTANCE"), "wb").close()
base = os.path.join(inst, "sha256")
for b in range(256):
    os.makedirs(os.path.join(base, "%02x" % b), exist_ok=True)
for i in range(n):
    data = i.to_bytes(8, "little") * 12
    h = hashlib.sha256(data).hexdigest()
    fd = os.open(os.path.join(base, h[:2], "%s-%d" % (h, len(data))), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
    os.write(fd, data)
    os.close(fd)
PY
fi
for run in $(seq "$runs"); do
  if [ "$crash" = crash ]; then rm -f "$data/cas.index"; fi
  if [ "$cold" = cold ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
  log=$(mktemp)
  start=$(date +%s%N)
  "$kiln" serve --data-dir "$data" --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin >"$log" 2>&1 &
  pid=$!
  until curl -fsS http://127.0.0.1:$admin/readyz >/dev/null 2>&1; do
    kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.01
  done
  ready=$(date +%s%N)
  ms=$(( (ready - start) / 1000000 ))
  printf 'run %s: ready after %d.%03d s; %s\n' "$run" $((ms / 1000)) $((ms % 1000)) \
    "$(grep -o 'CAS: .*background' "$log" || true)"
  until [ "$(curl -fsS http://127.0.0.1:$admin/metrics | awk '$1 == "kiln_cas_pending_directories" {print $2}')" = 0 ]; do
    sleep 0.01
  done
  done_at=$(date +%s%N)
  ms=$(( (done_at - start) / 1000000 ))
  printf '        index complete after %d.%03d s (%s blobs)\n' $((ms / 1000)) $((ms % 1000)) \
    "$(curl -fsS http://127.0.0.1:$admin/metrics | awk '$1 == "kiln_cas_blobs" {print $2}')"
  grep -o 'index rebuilt in the background.*' "$log" | sed 's/^/        /' || true
  kill $pid; wait $pid || true
  grep -o 'index snapshot written.*' "$log" | sed 's/^/        /' || true
  rm -f "$log"
done

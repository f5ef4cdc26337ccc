# Sourced by the restart scripts (ac-restart.sh, log-restart.sh): one `kiln serve` started,
# timed to its listening line and stopped, over and over on the same data.
# Expects $kiln (the binary), $d (the work directory, holding c.toml) and $detail (a grep -o
# pattern for what the log says of the start); sets pid and addr.

# Starts the server and prints LABEL, the time to its listening line, the detail and the
# process's resident memory then.
start() {
  local t0; t0=$(date +%s.%N)
  "$kiln" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$d/data" \
    --config "$d/c.toml" > "$d/log" 2>&1 &
  pid=$!
  for _ in $(seq 30000); do grep -q "kiln listening" "$d/log" && break; sleep 0.01; done
  echo "$1: ready after $(echo "$(date +%s.%N) - $t0" | bc) s; $(grep -o "$detail" "$d/log");" \
    "resident $(awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' "/proc/$pid/status")"
  addr=$(grep -o "listening on 127.0.0.1:[0-9]*" "$d/log" | grep -o "127.0.0.1:[0-9]*")
}

# Stops it cleanly (SIGTERM), so that it writes its index snapshot.
stop() { kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; }

# Drops the page cache (root only).
cold() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(not root: page cache kept)"; }

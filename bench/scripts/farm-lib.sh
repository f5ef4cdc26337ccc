# Sourced by the farm scripts: starting `kiln serve` and `kiln worker`s on 127.0.0.1.
# Expects $kiln (the binary), $run (the run's directory) and the array pids; sets server,
# addr and admin.

# Waits until FILE contains TEXT (the process logs it when ready), or fails.
await() {
  for _ in $(seq 200); do grep -q "$2" "$1" && return 0; sleep 0.05; done
  cat "$1" >&2; return 1
}

# Starts the server with the config $run/server.toml, data under $run/server.
start_server() {
  "$kiln" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$run/server" \
    --config "$run/server.toml" > "$run/server.log" 2>&1 &
  pids+=($!); server=$!
  await "$run/server.log" "listening"
  addr=$(grep -o "listening on 127.0.0.1:[0-9]*" "$run/server.log" | grep -o "127.0.0.1:[0-9]*")
  admin=$(grep -o "admin on http://127.0.0.1:[0-9]*" "$run/server.log" | grep -o "127.0.0.1:[0-9]*")
}

# Starts worker NAME (one action at a time, config $run/worker.toml, data under $run/NAME)
# with the extra arguments given, and waits for its session.
start_worker() {
  local name=$1; shift
  mkdir -p "$run/$name"
  "$kiln" worker --scheduler "grpc://$addr" --cas-dir "$run/$name/cas" \
    --work-dir "$run/$name/work" --name "$name" --listen 127.0.0.1:0 --shards 1 \
    --max-inflight 1 --config "$run/worker.toml" "$@" > "$run/$name.log" 2>&1 &
  pids+=($!)
  await "$run/$name.log" "session open"
}

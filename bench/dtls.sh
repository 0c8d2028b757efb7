#!/usr/bin/env bash
# TURN over DTLS (RFC 7350), turnpike beside Debian's coturn: handshakes
# (a DTLS handshake, an Allocate and a delete per cycle) and relayed
# ChannelData over established associations. Each server is pinned to
# core 0 with one relay thread, `turnpike bench` to core 1; both servers
# use the same ECDSA P-256 certificate. Prints one JSON report per run.
#
#   bash bench/dtls.sh                 # 10 s per run
#   DURATION=3 bash bench/dtls.sh      # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${DURATION:-10}"
cargo build --release --quiet -p turnpike
bin="$PWD/target/release/turnpike"
dir="$(mktemp -d /tmp/turnpike-dtls-bench.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null

run_bench() { # server-pid mode allocations window label
  taskset -c 1 "$bin" bench --server 127.0.0.1:5349 --transport dtls --mode "$2" \
    --allocations "$3" --window "$4" --size 160 --user bench --password bench \
    --duration "$duration" --warmup 2 --pid "$1" --server-core 0 --label "$5" --json
}

wait_port() { # a DTLS server answers a hello once it listens
  for _ in $(seq 50); do
    if "$bin" probe turn turn:127.0.0.1:5349 --transport dtls --insecure \
        --user bench --password bench --timeout-ms 500 >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "server did not answer DTLS on 127.0.0.1:5349" >&2; return 1
}

for server in turnpike coturn; do
  case "$server" in
    turnpike)
      taskset -c 0 "$bin" serve --listen 127.0.0.1:3478 --tls-listen 127.0.0.1:5349 \
        --cert "$dir/cert.pem" --key "$dir/key.pem" --user bench:bench --realm turnpike \
        --allow-loopback-peers --rate-limit-per-ip 0 --auth-fail-limit 0 --threads 1 \
        --fast-path off --log-level warn 2>"$dir/$server.log" &
      ;;
    coturn)
      taskset -c 0 turnserver -n --listening-ip=127.0.0.1 --listening-port=3478 \
        --tls-listening-port=5349 --cert="$dir/cert.pem" --pkey="$dir/key.pem" \
        --relay-ip=127.0.0.1 --lt-cred-mech --user=bench:bench --realm=turnpike --no-cli \
        --allow-loopback-peers --relay-threads=1 --min-port=49152 --max-port=65535 \
        --no-software-attribute --simple-log --log-file=/dev/null --total-quota=0 \
        --user-quota=0 2>"$dir/$server.log" &
      ;;
  esac
  pid=$!
  pids+=("$pid")
  wait_port
  run_bench "$pid" allocate 4 1 "$server handshakes"
  run_bench "$pid" channel 16 16 "$server channel 16x16"
  run_bench "$pid" channel 256 1 "$server channel 256x1"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 1
done

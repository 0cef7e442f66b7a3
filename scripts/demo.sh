#!/usr/bin/env bash
# The quickstart: builds everything, starts the daemon on a temporary socket
# with the bundled hasher guest, pushes a batch of passwords through the
# client example, and stops the daemon.
#
#   scripts/demo.sh [PASSWORD_FILE]     (default: examples/hasher/passwords.txt)
set -euo pipefail
cd "$(dirname "$0")/.."

passwords=${1:-examples/hasher/passwords.txt}

rustup target add wasm32-wasip1
cargo build --release --target wasm32-wasip1 -p hasher-guest
cargo build -p wasm-task -p hasher-client

target=${CARGO_TARGET_DIR:-target}
tmp=$(mktemp -d)
socket="$tmp/wasm-task.sock"
daemon_pid=
cleanup() {
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid"
        wait "$daemon_pid" || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

"$target/debug/wasm-task" serve --listen "unix:$socket" \
    --module hasher="$target/wasm32-wasip1/release/hasher_guest.wasm" 2>"$tmp/daemon.log" &
daemon_pid=$!

# Wait (bounded) until the daemon listens.
for _ in $(seq 300); do
    [ -S "$socket" ] && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$tmp/daemon.log"; exit 1; }
    sleep 0.1
done
[ -S "$socket" ] || { echo "daemon did not start" >&2; cat "$tmp/daemon.log"; exit 1; }

"$target/debug/hasher-client" --address "unix:$socket" "$passwords"

kill -TERM "$daemon_pid"
wait "$daemon_pid"
daemon_pid=
echo "daemon stopped cleanly"

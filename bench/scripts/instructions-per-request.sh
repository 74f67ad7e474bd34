#!/usr/bin/env bash
# Userspace instructions router-daemon executes per small routed request,
# counted by callgrind (repeatable, unlike timings on a shared VM).
#
# Usage: bench/scripts/instructions-per-request.sh [ROUTER_BIN] [REQUESTS]
# Needs valgrind and curl, and `cargo build --release -p router-bench
# -p router-daemon` first. The requests are case (a) of
# `cargo xtask bench dataplane`: a 1,500-byte prefix shared by all, one of 64
# 500-byte suffixes, on one kept-alive connection, to two fake backends.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUTER=${1:-target/release/router-daemon}
REQUESTS=${2:-2000}
BASE=${BASE_PORT:-19400}
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$TMP"' EXIT

target/release/router-bench serve --listen 127.0.0.1:$((BASE + 1)) \
    --listen 127.0.0.1:$((BASE + 2)) >"$TMP/backend.log" 2>&1 &
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.%p" \
    "$ROUTER" --listen 127.0.0.1:$BASE --dataplane userspace \
    --backend http://127.0.0.1:$((BASE + 1)) \
    --backend http://127.0.0.1:$((BASE + 2)) >"$TMP/router.log" 2>&1 &
for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$BASE/health" && break
    sleep 0.2
done

prefix=$(printf 'p%.0s' $(seq 1500))
# One curl process sends `$1` requests over one kept-alive connection.
send() {
    : >"$TMP/curl.cfg"
    for i in $(seq "$1"); do
        suffix=$(printf "%03d" $((i % 64)))
        body="{\"model\":\"m\",\"prompt\":\"$prefix$(printf "s$suffix%.0s" $(seq 125))\",\"max_tokens\":16}"
        printf 'url = "http://127.0.0.1:%s/v1/completions"\nrequest = "POST"\nheader = "content-type: application/json"\ndata = %s\noutput = "/dev/null"\n' \
            "$BASE" "$(printf '%s' "$body" | sed 's/\\/\\\\/g; s/"/\\"/g; s/^/"/; s/$/"/')" >>"$TMP/curl.cfg"
        [ "$i" -lt "$1" ] && echo next >>"$TMP/curl.cfg"
    done
    curl -s --fail --config "$TMP/curl.cfg"
}
send 200 # warm-up: pooled connections, index entries
callgrind_control -z "$ROUTER" >/dev/null 2>&1
send "$REQUESTS"
callgrind_control -d "$ROUTER" >/dev/null 2>&1
sleep 1
dump=$(ls -t "$TMP"/cg.*.* | head -1)
total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
echo "router-daemon: $((total / REQUESTS)) instructions per request ($total over $REQUESTS requests; $ROUTER)"

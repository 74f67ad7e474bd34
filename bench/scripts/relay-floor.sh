#!/usr/bin/env bash
# Case (b) of the dataplane benchmark with the cheapest userspace relay
# (`router-bench relay`: no HTTP, bytes copied both ways, one event loop per
# CPU) in router-daemon's place, side by side with nginx and direct: a floor
# for what any proxy that moves each streamed event through userspace costs
# on this machine. The report's "router userspace" row is the relay.
#
# Usage: bench/scripts/relay-floor.sh [router-bench dataplane options]
# Needs `cargo build --release -p router-bench` first (and nginx, as the
# benchmark does).
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH=$PWD/target/release/router-bench
WRAPPER=$(mktemp)
trap 'rm -f "$WRAPPER"' EXIT
printf '#!/bin/sh\nexec %s relay "$@"\n' "$BENCH" >"$WRAPPER"
chmod +x "$WRAPPER"
"$BENCH" dataplane --cases b --dataplanes userspace --router-bin "$WRAPPER" "$@"

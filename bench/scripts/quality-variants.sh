#!/usr/bin/env bash
# router-daemon flag variants side by side in one `router-bench quality`
# run, next to round-robin and the daemon with its defaults: each NAME=FLAGS
# becomes a row named NAME, a daemon started with those flags in front of
# its own fresh simulators, with the environment the bench gives its own
# daemon (warnings only, no drain delay). No peers.
#
# Usage: bench/scripts/quality-variants.sh "BENCH_OPTIONS" [NAME[@BINARY]=FLAGS ...]
# e.g.   bench/scripts/quality-variants.sh "--quick --levels c8,c32" \
#            "lw.5=--load-weight 0.5" "pe.25=--placement-epsilon 0.25"
# NAME@BINARY runs another router-daemon build, e.g. one of an earlier
# commit, built with its own CARGO_TARGET_DIR (cargo reuses artifacts
# across checkouts that share one):
#        bench/scripts/quality-variants.sh "--workloads no-sharing" \
#            "base@/tmp/base-target/release/router-daemon="
# Needs `cargo build --release -p router-bench -p router-daemon` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH_OPTIONS=${1:-}
shift || true
DAEMON=$PWD/target/release/router-daemon
PEERS=()
for variant in "$@"; do
    name=${variant%%=*}
    flags=${variant#*=}
    daemon=$DAEMON
    if [[ $name == *@* ]]; then
        daemon=${name#*@}
        name=${name%%@*}
    fi
    # $PORT and $BACKEND_URLS are the bench's, expanded when it starts the row.
    PEERS+=(--peer "$name=RUST_LOG=warn ROUTER_DRAIN_DELAY_MS=0 exec $daemon --listen 127.0.0.1:\$PORT \$(for u in \${BACKEND_URLS//,/ }; do printf -- '--backend %s ' \$u; done) $flags")
done
# shellcheck disable=SC2086 # the bench options are words on purpose
exec target/release/router-bench quality --no-peers --routers round-robin,router-daemon \
    --router-bin "$DAEMON" $BENCH_OPTIONS "${PEERS[@]}"

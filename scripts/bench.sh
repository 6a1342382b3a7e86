#!/usr/bin/env bash
# Runs every benchmark scenario, one after the other, and prints one markdown summary.
#
#   bash scripts/bench.sh            # S1, S1b, S1c, S2 (edgebridge, Mosquitto bridge, direct;
#                                    # S2 in 3 rounds, also edgebridge with ack = received),
#                                    # S3 backlog drain, S3o uplink outage (edgebridge and
#                                    # Mosquitto bridge), S4 idle connections, S5 sinks, rules
#   bash scripts/bench.sh quick      # everything but S3, S3o and S4 (the long ones)
#
# Each bench keeps its own detailed file (benches/RESULTS*.md); this script prints their
# main tables together with the machine's load average before and after each bench, so a
# run on a busy machine shows as one. Needs: mosquitto (apt), tansu (cargo install tansu
# --version 0.6.0 --locked --features dynostore) for the Kafka half of S5.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=${1:-}
summary=$(mktemp)
rules=$(mktemp)
trap 'rm -f "$summary" "$rules"' EXIT

load() { cut -d' ' -f1-3 /proc/loadavg; }

run() {
    local name=$1; shift
    local before after status=ok out=${OUT:-/dev/null}
    before=$(load)
    echo "== $name: cargo bench $*" >&2
    if ! cargo bench "$@" | tee -a "$out" >&2; then status=FAILED; fi
    after=$(load)
    printf '| %s | `cargo bench %s` | %s | %s | %s |\n' "$name" "$*" "$status" "$before" "$after" >>"$summary"
}

run "S1, S1b, S1c, S2" --bench forward
if [ "$quick" != quick ]; then
    run "S3" --bench forward -- S3
    run "S3o" --bench forward -- S3o
    run "S4" --bench idle
fi
run "S5" --bench sinks
OUT=$rules run "rules" --bench rules

section() { # prints the part of $1 from the line matching $2 to the next blank line after a table
    awk -v start="$2" 'index($0, start) == 1 { on = 1 } on { print } on && /^$/ && seen { exit } on && /^\|/ { seen = 1 }' "$1"
}

echo
echo "# edgebridge benchmarks ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(git rev-parse --short HEAD))"
echo
echo "| bench | command | status | load before (1/5/15 min) | load after |"
echo "|---|---|---|---|---|"
cat "$summary"
echo
echo "## S1, S2: forwarding (benches/RESULTS.md)"
echo
section benches/RESULTS.md "| scenario | target | msg/s"
if [ "$quick" != quick ]; then
    echo "## S3: backlog drain (benches/RESULTS.md)"
    echo
    section benches/RESULTS.md "| phase | measure"
    echo "## S3o: uplink outage, edgebridge and Mosquitto bridge (benches/RESULTS.md)"
    echo
    section benches/RESULTS.md "| target | end"
    echo "## S4: idle connections (benches/RESULTS-idle.md)"
    echo
    section benches/RESULTS-idle.md "| target | connections"
fi
echo "## S5: sinks (benches/RESULTS-sinks.md)"
echo
section benches/RESULTS-sinks.md "|"
echo "## Rule evaluation (benches/rules.rs)"
echo
echo '```'
cat "$rules"
echo '```'

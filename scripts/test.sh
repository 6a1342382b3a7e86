#!/usr/bin/env bash
# The test command (README): installs what the tests need, then lints and runs every test.
# Tests start their own peers (Mosquitto and tansu on free ports, an HTTP server in the
# test, certificates generated per test, headless Chromium for the status page).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
# The status page is tested in headless Chromium (tests/operations.rs).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${need_apt[*]} (Debian packages)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# paho-mqtt from PyPI: an independent MQTT client for the device-side tests
# (tests/paho_clients.rs runs tests/paho/device_checks.py).
PAHO_VERSION=2.1.0
if ! python3 -c "import paho.mqtt, sys; sys.exit(paho.mqtt.__version__ != '$PAHO_VERSION')" 2>/dev/null; then
  echo "installing paho-mqtt $PAHO_VERSION (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check "paho-mqtt==$PAHO_VERSION"
fi

# tansu: the Kafka-protocol broker of the Kafka sink tests (DESIGN.md). Its install takes
# several minutes, so it builds in the background while the linters run.
TANSU_VERSION=0.6.0
tansu_bin="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
tansu_pid=""
tansu_log=$(mktemp)
if ! "$tansu_bin" --version 2>/dev/null | grep -q "$TANSU_VERSION" \
   && ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  echo "installing tansu $TANSU_VERSION from crates.io (in the background)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore >"$tansu_log" 2>&1 &
  tansu_pid=$!
fi

cargo fmt --check
cargo clippy --all-targets -- -D warnings
if [ -n "$tansu_pid" ]; then
  if ! wait "$tansu_pid"; then
    cat "$tansu_log"
    echo "cargo install tansu failed" >&2
    exit 1
  fi
  echo "tansu installed"
fi
# Unit and integration tests (benches are run by `cargo bench`, not here).
# --no-fail-fast: every test binary runs even when an earlier one failed, so one failure
# does not hide others. Under pipefail the pipeline's status is cargo's (tee succeeds);
# `||` keeps `set -e` from exiting before the summary is printed.
log=$(mktemp)
trap 'rm -f "$log" "$tansu_log"' EXIT
status=0
cargo test --no-fail-fast --lib --bins --tests 2>&1 | tee "$log" || status=$?
# One "test result:" line per test binary that ran to its end.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
if [ "$status" -ne 0 ]; then
  # Also when no test failed: a build error, or a test binary that crashed before its
  # result line (cargo lists those targets above).
  echo "cargo test failed (exit status $status)" >&2
fi
exit "$status"

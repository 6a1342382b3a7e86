#!/usr/bin/env bash
# The test command (README): installs what the tests need, then lints and runs every test.
# Tests start their own peers (Mosquitto on free ports, certificates generated per test,
# headless Chromium for the status page).
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

cargo fmt --check
cargo clippy --all-targets -- -D warnings
# Unit and integration tests (benches are run by `cargo bench`, not here).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --lib --bins --tests 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

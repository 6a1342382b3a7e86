#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each (default 60), from
# its seed corpus in fuzz/corpus/<target> (kept in the repository; the inputs a run
# finds go to fuzz/work/<target>, not committed). Not part of CI: needs the nightly toolchain and cargo-fuzz (installed when
# missing). A crash stops that target, leaves its input in fuzz/artifacts/<target>/ and
# makes the script exit non-zero after the other targets ran; reproduce one with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# Usage: bash scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (crates.io)"
  cargo +nightly install cargo-fuzz --locked
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

failed=()
for target in "${targets[@]}"; do
  mkdir -p "fuzz/work/$target" "fuzz/corpus/$target"
  echo "== $target: ${seconds}s"
  # -rss_limit_mb: a record or packet must never make the gateway allocate without bound.
  # -s none: no AddressSanitizer. The crate forbids unsafe code, so ASan would watch only
  # the C dependencies, and under it librdkafka's configure (rdkafka-sys's build script)
  # fails with "Argument list too long"; libFuzzer still finds panics, hangs and
  # unbounded memory.
  if ! cargo +nightly fuzz run -O -s none "$target" "fuzz/work/$target" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1; then
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzzing: ${#targets[@]} target(s), ${seconds}s each, no crash"

#!/usr/bin/env bash
# Run every fuzz target (or the ones named) for SECONDS each (default 60) over the committed
# corpus. Needs a nightly toolchain and cargo-fuzz; installs both when missing.
#   fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(validate plan forward)
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  # Fuzzer-found inputs go to a scratch folder; the committed corpus is only read.
  scratch=$(mktemp -d)
  echo "== fuzz $t for ${secs}s"
  cargo +nightly fuzz run -O "$t" "$scratch" "corpus/$t" -- -max_total_time="$secs" -max_len=4096 2>&1 \
    | grep -E 'DONE|Done|ERROR|panicked|SUMMARY|deadly' || true
  rm -rf "$scratch"
  # A crash leaves an artifact behind and makes this script fail.
  if ls "artifacts/$t"/crash-* "artifacts/$t"/oom-* "artifacts/$t"/timeout-* >/dev/null 2>&1; then
    echo "fuzz target $t found a failing input:"; ls "artifacts/$t"; exit 1
  fi
done

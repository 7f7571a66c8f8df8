#!/usr/bin/env bash
# moe-cpu on aarch64 (its NEON kernels) from an x86-64 machine: clippy for the aarch64 target
# over the workspace, then moe-cpu's tests (golden conformance, property and rule suites, the
# SIMD-against-portable checks, edge shapes, ...) cross-built and run under qemu-user.
# Installs what it needs: the rustup target, and (Debian, as root) qemu-user and the aarch64
# cross linker. Exit status 3 when they cannot be had (CI warns and goes on); any failure of
# the checks themselves is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target" || exit 3
fi
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross; } || exit 3
fi
# The cross C compiler first: clippy for the target builds dependencies' build scripts that
# compile C for it (criterion's `alloca`), so a clean machine needs it before clippy too.
# The CUDA kernels' device code does not depend on the host: not compiled a second time here.
env -u NVCC -u MOE_REQUIRE_NVCC cargo clippy --workspace --target "$target" --all-targets -- -D warnings
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# Under qemu the CPU reports NEON: the suites run Isa::Neon (the default) and, in fast_paths,
# every available instruction set (portable and NEON) against the portable path.
cargo test -p moe-cpu --release --target "$target"

#!/usr/bin/env bash
# Cross-compiles the workspace for aarch64 Linux and runs the native-kernel tests (the NEON and scalar
# paths of backbone/src/ops, against candle's reference convolution) under qemu-user emulation.
#
#   tools/cross/aarch64.sh            # build everything, run the kernel tests
#   tools/cross/aarch64.sh --all      # run every test of the `mobileone` crate (slow under emulation)
#
# Installs what it needs: the Rust target (rustup) and, on Debian/Ubuntu, the cross linker and
# qemu-user (apt-get, as root or through sudo). Not part of .ci/run: emulated tests take minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

TARGET=aarch64-unknown-linux-gnu
if ! rustup target list --installed | grep -qx "$TARGET"; then
    rustup target add "$TARGET"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get install -y gcc-aarch64-linux-gnu qemu-user
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# mozjpeg's bundled libjpeg-turbo sources are compiled by the cc crate for the target.
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

echo "== building the workspace for $TARGET"
cargo build --release --workspace --target "$TARGET"
echo "== kernel tests under $(qemu-aarch64 --version | head -1)"
if [ "${1:-}" = "--all" ]; then
    cargo test --release -p mobileone --target "$TARGET"
else
    cargo test --release -p mobileone --target "$TARGET" --test ops -- --nocapture
fi

#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine: the Rust targets for firmware
# (thumbv7em-none-eabihf) and Arm SIMD (aarch64-unknown-linux-gnu), QEMU to run them, and the aarch64
# cross linker. Idempotent: a second run only checks, and takes about a second.
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf '\nsetup: FATAL: %s\n\n' "$*" >&2
    exit 1
}

# --- Rust targets ---------------------------------------------------------------------------------
targets=(thumbv7em-none-eabihf aarch64-unknown-linux-gnu)
command -v rustup >/dev/null || die "rustup not found on PATH; install Rust through rustup first (https://rustup.rs)."
installed_targets=$(rustup target list --installed) || die "'rustup target list --installed' failed."
missing_targets=()
for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$installed_targets" || missing_targets+=("$t")
done
if ((${#missing_targets[@]})); then
    say "adding Rust targets: ${missing_targets[*]}"
    rustup target add "${missing_targets[@]}" ||
        die "'rustup target add ${missing_targets[*]}' failed. The firmware (thumbv7em) and Arm SIMD (aarch64)
       tests cannot build without these targets. Check network access to static.rust-lang.org and retry."
    installed_targets=$(rustup target list --installed)
    for t in "${missing_targets[@]}"; do
        grep -qx "$t" <<<"$installed_targets" || die "rustup reported success but target $t is still not installed."
    done
else
    say "Rust targets present: ${targets[*]}"
fi

# --- Debian packages --------------------------------------------------------------------------------
# package -> a command it provides (the fast check); dpkg is asked as well, so a half-removed package counts as missing.
declare -A provides=(
    [qemu-system-arm]=qemu-system-arm
    [qemu-user]=qemu-aarch64
    [gcc-aarch64-linux-gnu]=aarch64-linux-gnu-gcc
    [libc6-dev-arm64-cross]=
)
pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}
missing_pkgs=()
for p in qemu-system-arm qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross; do
    cmd=${provides[$p]}
    if [[ -n $cmd ]] && ! command -v "$cmd" >/dev/null; then
        missing_pkgs+=("$p")
    elif ! pkg_installed "$p"; then
        missing_pkgs+=("$p")
    fi
done
if ((${#missing_pkgs[@]})); then
    command -v apt-get >/dev/null || die "apt-get not found: this script expects Debian 12. Install by hand: ${missing_pkgs[*]}"
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "not root and no sudo: run as root to install ${missing_pkgs[*]}"
        sudo=(sudo)
    fi
    say "installing: ${missing_pkgs[*]}"
    # Lock timeout: wait for another apt (a concurrent setup, unattended-upgrades) instead of failing.
    "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update || die "apt-get update failed."
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends \
        "${missing_pkgs[@]}" || die "apt-get install ${missing_pkgs[*]} failed."
else
    say "Debian packages present: qemu-system-arm qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
fi

# --- Verify -----------------------------------------------------------------------------------------
for c in qemu-system-arm qemu-aarch64 aarch64-linux-gnu-gcc; do
    command -v "$c" >/dev/null || die "$c still not on PATH after installing."
done
nm_tool=""
for c in llvm-nm rust-nm llvm-nm-19 llvm-nm-16 llvm-nm-15 llvm-nm-14 arm-none-eabi-nm nm; do
    if command -v "$c" >/dev/null; then nm_tool=$c; break; fi
done
[[ -n $nm_tool ]] || die "no nm tool (llvm-nm, nm) for scripts/check-no-std.sh: apt-get install llvm or binutils."
say "OK ($(qemu-system-arm --version | head -n1); $(aarch64-linux-gnu-gcc --version | head -n1); nm: $nm_tool)"

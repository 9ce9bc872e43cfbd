#!/usr/bin/env bash
# The whole test suite (README.md's test command; .ci/run calls it). Installs what it needs first
# (scripts/setup.sh: Rust targets, QEMU, cross toolchains; idempotent), then:
#   1. cargo test --release --workspace        every crate's unit, integration and doc tests
#   2. scripts/check-no-std.sh                 mantissa-core builds and links for thumbv7em without std/alloc
#   3. scripts/test-kernels.sh                 the SIMD backend's tests once per kernel this CPU has
#   4. cargo build --features cuda             the CUDA backend compiles without CUDA installed
#   5. mantissa-core with defmt for thumbv7em  the firmware logging feature builds
# Ends with one line: `test-suite: N passed, M failed` (cargo's test counts plus one per script check).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT
checks_passed=0
checks_failed=0
failed_names=()

check() {
    local name=$1
    shift
    printf '\n=== %s\n' "$name"
    if "$@" 2>&1 | tee -a "$log"; then
        checks_passed=$((checks_passed + 1))
    else
        checks_failed=$((checks_failed + 1))
        failed_names+=("$name")
    fi
}

bash scripts/setup.sh || { echo "test-suite: setup failed (see above)"; echo "0 passed, 1 failed"; exit 1; }

check "cargo test --release --workspace" cargo test --release --workspace
check "no_std / no alloc core (thumbv7em-none-eabihf)" bash scripts/check-no-std.sh
if [[ -f scripts/test-kernels.sh ]]; then
    check "SIMD kernels, one run per kernel" bash scripts/test-kernels.sh
fi
check "aarch64 kernels under qemu-user" bash scripts/test-aarch64.sh
check "cargo build --release --features cuda (no CUDA needed)" cargo build --release --features cuda --examples
check "mantissa-core with defmt for thumbv7em-none-eabihf" \
    cargo build -p mantissa-core --features defmt --target thumbv7em-none-eabihf --release
check "firmware under QEMU (Cortex-M4F fine-tuning, budgets, host checksum)" bash scripts/firmware.sh

# Sum cargo's per-binary results: "test result: ok. 12 passed; 0 failed; ..."
read -r tests_passed tests_failed < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
    END { print p + 0, f + 0 }' "$log")

echo
if ((checks_failed > 0)); then
    echo "failed: ${failed_names[*]}"
fi
echo "test-suite: $((tests_passed + checks_passed)) passed, $((tests_failed + checks_failed)) failed"
((checks_failed == 0))

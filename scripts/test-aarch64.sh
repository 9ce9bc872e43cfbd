#!/usr/bin/env bash
# The AArch64 SIMD kernels (neon, neon-fhm, neon-bf16) under qemu-user, on three emulated CPUs:
#   max          FP16 + FHM + BF16: all three kernels must be available and tested
#   neoverse-n1  FP16 without FHM/BF16: neon-bf16 must be absent (the widening fallback serves bf16/f16)
#   cortex-a57   ARMv8.0 NEON only: exactly `scalar neon`; forcing neon-fhm / neon-bf16 must be an error
# On each: cpu-simd's `tests/gemm.rs` once unforced (its matrix runs every kernel the CPU has), then once per
# available kernel forced through MANTISSA_KERNEL (the tests that read it: the forced kernel must be the one
# detect() returns). Then the workspace's `tests/backends.rs` under `-cpu max`, unforced and forced to each
# Arm kernel. Correctness only: timings under emulation mean nothing.
#
# Cross settings live in environment variables set here, not in a .cargo/config.toml, so native builds are
# unaffected; the aarch64 build has its own target directory (target/aarch64).
#
#   scripts/test-aarch64.sh            # from anywhere; about 3 minutes on 2 cores, most of it the first build
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
if ! rustup target list --installed | grep -qx "$target" || ! command -v qemu-aarch64 >/dev/null ||
    ! command -v aarch64-linux-gnu-gcc >/dev/null || [[ ! -d $sysroot ]]; then
    bash scripts/setup.sh
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# Every run below says which kernel it wants.
unset MANTISSA_KERNEL

gemm=(cargo test --release -p mantissa-cpu-simd --target "$target" --target-dir target/aarch64 --test gemm)
backends=(cargo test --release --target "$target" --target-dir target/aarch64 --test backends)
arm_kernels=(neon neon-fhm neon-bf16)

# on_cpu CPU CMD...: runs CMD with cargo's runner set to qemu-user emulating CPU.
on_cpu() {
    local cpu=$1
    shift
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu -L $sysroot" "$@"
}

failed=()
fail() {
    echo "== FAILED: $*"
    failed+=("$*")
}
has() { [[ " $1 " == *" $2 "* ]]; }

echo "== building the aarch64 test binaries (target/aarch64)"
"${gemm[@]}" --no-run
"${backends[@]}" --no-run

for cpu in max neoverse-n1 cortex-a57; do
    case $cpu in
        max) want=(neon neon-fhm neon-bf16) absent=() ;;
        neoverse-n1) want=(neon) absent=(neon-bf16) ;;
        cortex-a57) want=(neon) absent=(neon-fhm neon-bf16) ;;
    esac
    kernels=$(on_cpu "$cpu" "${gemm[@]}" -- --exact list_kernels --nocapture 2>/dev/null | sed -n 's/^kernels: //p')
    echo "== -cpu $cpu: kernels available: ${kernels:-none}"
    for k in "${want[@]}"; do
        has "$kernels" "$k" || fail "-cpu $cpu: kernel $k should be available"
    done
    for k in "${absent[@]}"; do
        ! has "$kernels" "$k" || fail "-cpu $cpu: kernel $k should be unavailable"
    done
    if [[ $cpu == cortex-a57 && $kernels != "scalar neon" ]]; then
        fail "-cpu cortex-a57: expected exactly 'scalar neon', got '$kernels'"
    fi

    echo "== -cpu $cpu: tests/gemm.rs on every available kernel ($kernels)"
    on_cpu "$cpu" "${gemm[@]}" || fail "-cpu $cpu: tests/gemm.rs"

    # The matrix above already ran every kernel; forced runs check selection (the tests reading the variable).
    for k in $kernels; do
        echo "== -cpu $cpu: MANTISSA_KERNEL=$k"
        MANTISSA_KERNEL=$k on_cpu "$cpu" "${gemm[@]}" -- forced_kernel_is_available_and_used detect_from_names ||
            fail "-cpu $cpu: MANTISSA_KERNEL=$k"
    done
    # Forcing a kernel the CPU lacks must be an error, never a silent fallback. The failing run's output is
    # kept out of the log (test.sh counts `test result:` lines).
    for k in "${absent[@]}"; do
        if out=$(MANTISSA_KERNEL=$k on_cpu "$cpu" "${gemm[@]}" -- --exact forced_kernel_is_available_and_used 2>&1); then
            fail "-cpu $cpu: MANTISSA_KERNEL=$k was accepted"
        elif grep -q "kernel \`$k\` is not supported by this CPU" <<<"$out"; then
            echo "== -cpu $cpu: MANTISSA_KERNEL=$k rejected as expected (kernel \`$k\` is not supported by this CPU)"
        else
            fail "-cpu $cpu: MANTISSA_KERNEL=$k failed without the expected error"
            tail -n 20 <<<"$out"
        fi
    done
done

echo "== -cpu max: tests/backends.rs (SimdBackend against the reference), best kernel"
on_cpu max "${backends[@]}" || fail "-cpu max: tests/backends.rs"
for k in "${arm_kernels[@]}"; do
    echo "== -cpu max: tests/backends.rs, MANTISSA_KERNEL=$k"
    MANTISSA_KERNEL=$k on_cpu max "${backends[@]}" || fail "-cpu max: tests/backends.rs MANTISSA_KERNEL=$k"
done

if ((${#failed[@]})); then
    printf 'aarch64: %d check(s) failed:\n' "${#failed[@]}" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "aarch64: all kernels passed on max, neoverse-n1 and cortex-a57"

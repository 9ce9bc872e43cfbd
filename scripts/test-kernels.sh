#!/usr/bin/env bash
# Runs the backend tests once per SIMD kernel this CPU has (MANTISSA_KERNEL forces it; the test
# `forced_kernel_is_used` fails if the backend did not use it). Kernels the CPU lacks are reported and skipped;
# any failing run fails the script.
#
#   scripts/test-kernels.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."

run=(cargo test --release --features simd --test backends)

# The test binary says which kernels this CPU runs (through mantissa_cpu_simd's run-time detection).
available=$(env -u MANTISSA_KERNEL "${run[@]}" -- --exact list_kernels --nocapture 2>/dev/null | sed -n 's/^kernels: //p')
echo "kernels available on this CPU: ${available:-none}"

failed=()
for kernel in scalar avx2 avx512 avx512bf16 amx; do
    if [[ " $available " != *" $kernel "* ]]; then
        echo "== $kernel: skipped (this CPU lacks it)"
        continue
    fi
    echo "== MANTISSA_KERNEL=$kernel"
    if MANTISSA_KERNEL=$kernel "${run[@]}"; then
        echo "== $kernel: passed"
    else
        echo "== $kernel: FAILED"
        failed+=("$kernel")
    fi
done

if ((${#failed[@]})); then
    echo "failed kernels: ${failed[*]}" >&2
    exit 1
fi
echo "all available kernels passed"

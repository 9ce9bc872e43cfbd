#!/usr/bin/env bash
# Checks that mantissa-core is no_std and allocation-free for a Cortex-M4F (thumbv7em-none-eabihf):
#   1. core builds for the target (no `std` there: a std-only dependency fails here);
#   2. no dependency has its `std` or `alloc` feature switched on (cargo tree, with and without `defmt`);
#   3. tests/no-std-probe, a program with no global allocator, links core into an ELF (a use of `alloc`
#      fails here: rustc demands a #[global_allocator], or the linker finds __rust_alloc unresolved);
#   4. that ELF holds no allocator symbols (__rust_alloc, __rust_alloc_error_handler, alloc::...).
# Prints one PASS or FAIL line at the end; exits non-zero on failure. Needs scripts/setup.sh first.
set -euo pipefail

TARGET=thumbv7em-none-eabihf
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROBE="$ROOT/tests/no-std-probe"
PROBE_TARGET_DIR="$ROOT/target/no-std-probe"
ELF="$PROBE_TARGET_DIR/$TARGET/release/mantissa-no-std-probe"
cd "$ROOT"

step() { printf '\n== %s\n' "$*"; }
fail() {
    printf '\ncheck-no-std: FAIL: %s\n' "$*" >&2
    exit 1
}

step "Rust target $TARGET"
rustup target list --installed 2>/dev/null | grep -qx "$TARGET" ||
    fail "Rust target $TARGET is not installed: run scripts/setup.sh (or 'rustup target add $TARGET')"
echo "installed"

step "cargo build -p mantissa-core --target $TARGET --release"
cargo build -p mantissa-core --target "$TARGET" --release ||
    fail "mantissa-core does not build for $TARGET (errors above: a std-only dependency, or core itself)"

step "dependency tree of mantissa-core for $TARGET"
cargo tree -p mantissa-core -e normal,no-proc-macro --target "$TARGET" ||
    fail "cargo tree -p mantissa-core failed"
# Proc-macro crates run on the host and may use std; only what ends up in the firmware counts.
for features in "" "defmt"; do
    args=(-p mantissa-core -e normal,features,no-proc-macro --target "$TARGET" --prefix none)
    [[ -n $features ]] && args+=(--features "$features")
    tree=$(cargo tree "${args[@]}") || fail "cargo tree ${args[*]} failed"
    bad=$(grep -E 'feature "(std|alloc)"' <<<"$tree" | sort -u || true)
    [[ -z $bad ]] || fail "with features '${features:-default}', dependencies of mantissa-core enable std/alloc:
$bad
(cargo tree ${args[*]} -i <crate> shows who enables them)"
    echo "features '${features:-default}': no dependency has its std or alloc feature enabled"
done

step "build and link tests/no-std-probe (no global allocator) for $TARGET"
cargo build --manifest-path "$PROBE/Cargo.toml" --target "$TARGET" --release --target-dir "$PROBE_TARGET_DIR" ||
    fail "the no_std probe does not build: if the error mentions a global allocator or 'alloc', core uses the heap"
[[ -f $ELF ]] || fail "probe ELF not found at $ELF"

step "allocator symbols in $(basename "$ELF")"
NM=""
for c in llvm-nm rust-nm llvm-nm-19 llvm-nm-18 llvm-nm-17 llvm-nm-16 llvm-nm-15 llvm-nm-14 arm-none-eabi-nm nm; do
    if command -v "$c" >/dev/null; then NM=$c; break; fi
done
[[ -n $NM ]] || fail "no nm found (llvm-nm, rust-nm, arm-none-eabi-nm or nm): apt-get install llvm"
echo "using $NM"
raw=$("$NM" "$ELF" 2>/dev/null) || fail "$NM could not read $ELF"
demangled=$("$NM" -C "$ELF" 2>/dev/null) || demangled=$raw
# Symbol names only (address and type letter stripped; demangled names may hold spaces), member headers dropped.
names() { sed -nE 's/^[[:xdigit:]]*[[:space:]]+[A-Za-z?-][[:space:]]+//p'; }
# Allocator shims and hooks, and paths into the crate `alloc`: mangled legacy (_ZN5alloc..., $LT$alloc..)
# and v0 (crate root `C<disambiguator>_5alloc`), and demangled (`alloc::`, `<alloc::`). Not `core::alloc::`
# (the allocation-free Layout API), which is `4core5alloc` in v0 and `core::alloc::` demangled.
alloc_re='__rust_(alloc|dealloc|realloc|alloc_zeroed|alloc_error_handler|no_alloc_shim)|__r[dg]l_alloc|__rg_oom'
alloc_re+='|^_ZN5alloc|\$LT\$alloc\.\.|^_R.*C(s[[:alnum:]]*_)?5alloc'
demangled_re='(^|[^:[:alnum:]_])alloc::'
found=$( { names <<<"$raw" | grep -E "$alloc_re"; names <<<"$demangled" | grep -E "$demangled_re"; } | sort -u || true)
[[ -z $found ]] || fail "allocator symbols in the no_std probe (mantissa-core must not use alloc):
$(head -n 20 <<<"$found")"
echo "none"
"$NM" --defined-only "$ELF" 2>/dev/null | grep -qE '[[:space:]]T[[:space:]]+probe$' ||
    fail "symbol 'probe' is not defined in $ELF: the probe did not link"
core_syms=$(names <<<"$demangled" | grep -c 'mantissa_core::' || true)
echo "probe defined; $core_syms mantissa_core functions linked (the rest inlined into probe)"
if command -v llvm-size >/dev/null; then llvm-size "$ELF"; fi

printf '\ncheck-no-std: PASS: mantissa-core builds for %s with no std and no alloc\n' "$TARGET"

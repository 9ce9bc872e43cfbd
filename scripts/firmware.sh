#!/usr/bin/env bash
# The firmware example under QEMU (examples/firmware-cortex-m), checked from its own output and from llvm-size:
#   1. the Rust target and QEMU are there (scripts/setup.sh installs them; if not, this fails loudly);
#   2. `cargo run --release` boots it in QEMU (mps2-an386, Cortex-M4F) and it exits 0;
#   3. its result line: accuracy gain >= 10 points on held-out shifted digits, static RAM + painted stack peak
#      <= 128 KiB, flash <= 512 KiB, final-weight checksum equal to the host's recorded one;
#   4. llvm-size agrees: .data + .bss (+ .uninit) + stack peak <= 128 KiB, vector table + .text + .rodata + .data <= 512 KiB;
#   5. the host replays the same fine-tuning from the same assets (firmware_export --replay) to the same checksum,
#      and a fresh export reproduces the committed assets bit for bit (--check);
#   6. a forced panic (--features force-panic) exits non-zero, not by timeout;
#   7. the defmt build (--features defmt) compiles and links.
# Prints one PASS or FAIL line at the end; exits non-zero on failure.
set -euo pipefail

TARGET=thumbv7em-none-eabihf
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FW="$ROOT/examples/firmware-cortex-m"
ELF="$FW/target/$TARGET/release/mantissa-firmware-cortex-m"
OUT="$ROOT/target/firmware"
RAM_BUDGET=$((128 * 1024))
FLASH_BUDGET=$((512 * 1024))
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }
fail() {
    printf '\n######################################################################\n' >&2
    printf 'firmware: FAIL: %s\n' "$*" >&2
    printf '######################################################################\n' >&2
    exit 1
}

step "Rust target $TARGET and QEMU"
command -v rustup >/dev/null || fail "rustup not found: cannot install the $TARGET target"
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    echo "target $TARGET missing: rustup target add $TARGET"
    rustup target add "$TARGET" || fail "the Rust target $TARGET is not installed and 'rustup target add $TARGET' failed:
    the firmware cannot be built. Run scripts/setup.sh with network access to static.rust-lang.org."
fi
command -v qemu-system-arm >/dev/null || fail "qemu-system-arm not found: run scripts/setup.sh (apt-get install qemu-system-arm)"
SIZE=""
for c in llvm-size rust-size llvm-size-19 llvm-size-16 llvm-size-15 llvm-size-14 arm-none-eabi-size; do
    if command -v "$c" >/dev/null; then SIZE=$c; break; fi
done
[[ -n $SIZE ]] || fail "no llvm-size (apt-get install llvm)"
echo "ok ($(qemu-system-arm --version | head -n1); $SIZE)"

step "cargo run --release (boots in QEMU)"
set +e
(cd "$FW" && cargo run --release) 2>&1 | tee "$OUT/run.txt"
rc=${PIPESTATUS[0]}
set -e
((rc == 0)) || fail "the firmware exited with $rc (124: QEMU timed out); output in $OUT/run.txt"

step "the firmware's own result line"
line=$(grep '^result: ' "$OUT/run.txt" | tail -n1) || fail "no 'result:' line in the firmware output"
field() { sed -nE "s/.* $1=([^ ]+).*/\1/p" <<<" $line"; }
gain=$(field gain_pp); before=$(field acc_before); after=$(field acc_after)
static_ram=$(field static_ram); stack=$(field stack_peak); flash=$(field flash)
checksum=$(field checksum); host_checksum=$(field host_checksum); ips=$(field instr_per_step)
for v in gain before after static_ram stack flash checksum host_checksum ips; do
    [[ -n ${!v} ]] || fail "the result line lacks $v: $line"
done
awk -v g="$gain" 'BEGIN { exit !(g >= 10) }' || fail "accuracy gain $gain points < 10 ($before -> $after)"
echo "accuracy on held-out shifted digits: $before -> $after (+$gain points)"
[[ $checksum == "$host_checksum" ]] || fail "firmware checksum $checksum != host checksum $host_checksum"
echo "final-weight checksum $checksum equals the host's"

step "sizes (llvm-size -A)"
"$SIZE" -A "$ELF" | tee "$OUT/size.txt"
sec() { awk -v s="$1" '$1 == s { print $2; found = 1 } END { if (!found) print 0 }' "$OUT/size.txt"; }
size_static=$(($(sec .data) + $(sec .bss) + $(sec .uninit)))
size_flash=$(($(sec .vector_table) + $(sec .text) + $(sec .rodata) + $(sec .data)))
ram_total=$((size_static + stack))
echo "RAM:   .data + .bss + .uninit = $size_static B (firmware says $static_ram), stack peak $stack B, total $ram_total B of $RAM_BUDGET"
echo "flash: vector table + .text + .rodata + .data = $size_flash B (firmware says $flash) of $FLASH_BUDGET"
((size_static == static_ram)) || fail "llvm-size's static RAM ($size_static) differs from the firmware's ($static_ram)"
((ram_total <= RAM_BUDGET)) || fail "RAM $ram_total B > $RAM_BUDGET B"
((size_flash <= FLASH_BUDGET)) || fail "flash $size_flash B > $FLASH_BUDGET B"
echo "instructions per training step: $ips"

step "host replay of the same fine-tuning (firmware_export --replay, --check)"
(cd "$ROOT" && cargo run --release --example firmware_export -- --replay) 2>&1 | tee "$OUT/host.txt" ||
    fail "the host replay failed"
host=$(sed -nE 's/^host: checksum=(0x[0-9a-f]+).*/\1/p' "$OUT/host.txt")
[[ $host == "$checksum" ]] || fail "host replay checksum '$host' != firmware checksum $checksum"
echo "host replay checksum $host == firmware checksum $checksum"
(cd "$ROOT" && cargo run --release --example firmware_export -- --check) 2>&1 | tail -n 3 ||
    fail "a fresh export does not reproduce the committed assets"

step "a forced panic exits non-zero"
set +e
(cd "$FW" && cargo run --release --features force-panic --target-dir target/force-panic) 2>&1 | tail -n 3
rc=${PIPESTATUS[0]}
set -e
((rc != 0 && rc != 124)) || fail "a forced panic exited with $rc (want non-zero, not the 124 of a timeout)"
echo "exit code $rc"

step "defmt build (--features defmt)"
(cd "$FW" && cargo build --release --features defmt --target-dir target/defmt) || fail "the defmt build failed"

printf '\nfirmware: PASS: accuracy %s -> %s (+%s points), RAM %s B (static %s + stack %s) <= %s, flash %s B <= %s, %s instructions/step, checksum %s == host\n' \
    "$before" "$after" "$gain" "$ram_total" "$size_static" "$stack" "$RAM_BUDGET" "$size_flash" "$FLASH_BUDGET" "$ips" "$checksum"

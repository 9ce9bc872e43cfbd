// Written by `cargo run --release --example firmware_export`: the host's run of the same fine-tuning.
pub const HOST_CHECKSUM: u64 = 0x60d70b630dba32f1;
pub const HOST_CORRECT_BEFORE: usize = 221;
pub const HOST_CORRECT_AFTER: usize = 378;
/// The memory plan's total for this scenario: the firmware's static arena.
pub const PLAN_TOTAL: usize = 89344;

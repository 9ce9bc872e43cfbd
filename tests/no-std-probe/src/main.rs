//! A no_std, no-alloc program whose only job is to link mantissa-core for thumbv7em-none-eabihf, with
//! `probe` as its entry point. There is no `#[global_allocator]`: any use of `alloc` in the core makes the
//! build or the link fail, and scripts/check-no-std.sh also looks for allocator symbols in the ELF.
#![no_std]
#![no_main]

use mantissa_core::arena::Arena;
use mantissa_core::dtype::DType;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The entry point (see build.rs): what it reaches of the core is what gets linked and checked.
#[no_mangle]
pub extern "C" fn probe(x: f32) -> f32 {
    let mut arena = Arena::new(1024);
    let bytes = match arena.alloc(DType::F32, 8) {
        Ok(buf) => buf.bytes(),
        Err(_) => 0,
    };
    DType::BF16.round(x) + bytes as f32
}

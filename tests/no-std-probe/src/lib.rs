//! A no_std, no-alloc static library whose only job is to link mantissa-core for thumbv7em-none-eabihf.
//! There is no `#[global_allocator]`: any use of `alloc` in the core makes the build fail, and
//! scripts/check-no-std.sh also looks for allocator symbols in the archive.
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

/// Called from nothing; `#[no_mangle]` keeps it (and the core code it reaches) in the archive.
#[no_mangle]
pub extern "C" fn probe(x: f32) -> f32 {
    let mut arena = Arena::new(1024);
    let bytes = match arena.alloc(DType::F32, 8) {
        Ok(buf) => buf.bytes(),
        Err(_) => 0,
    };
    DType::BF16.round(x) + bytes as f32
}

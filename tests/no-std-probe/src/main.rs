//! A no_std, no-alloc program whose only job is to link mantissa-core for thumbv7em-none-eabihf, with
//! `probe` as its entry point. There is no `#[global_allocator]`: any use of `alloc` in the core makes the
//! build or the link fail, and scripts/check-no-std.sh also looks for allocator symbols in the ELF.
//! `probe` runs a whole mixed-precision training step (plan, arena, forward, backward, loss scaling,
//! AdamW, prediction), so everything a training run reaches is linked and checked.
#![no_std]
#![no_main]

use core::cell::UnsafeCell;

use mantissa_core::{AdamW, MemoryPlan, Model, Optimizer, Policy, Reference, Shape, TrainConfig, Trainer};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

#[repr(C, align(64))]
struct Arena(UnsafeCell<[u8; 16 * 1024]>);

// SAFETY: only `probe` touches the arena, and it is the program's single entry point (never re-entered).
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; 16 * 1024]));

/// The entry point (see build.rs): what it reaches of the core is what gets linked and checked.
#[no_mangle]
pub extern "C" fn probe(x: f32) -> f32 {
    let Ok(model) = Model::sequential(Shape::image(1, 4, 4)).conv2d(2, 3, 1, 1).relu().maxpool2d(2, 2).flatten().linear(3).gelu().linear(2).build()
    else {
        return -1.0;
    };
    let opt: Optimizer = AdamW::new(1e-2).into();
    let Ok(plan) = MemoryPlan::new(&model, Policy::MIXED_FLOAT16, &opt, 2) else {
        return -2.0;
    };
    // SAFETY: see `impl Sync for Arena`: this is the only reference to the arena's bytes.
    let buf = unsafe { &mut *ARENA.0.get() };
    let config = TrainConfig::new(2, Policy::MIXED_FLOAT16);
    let Ok(mut trainer) = Trainer::new(Reference::new(buf), model, Policy::MIXED_FLOAT16, opt, config) else {
        return -3.0;
    };
    let xs = [x; 32];
    let Ok(report) = trainer.step(&xs, &[0, 1]) else {
        return -4.0;
    };
    let mut pred = [0u32; 2];
    if trainer.predict(&xs, &mut pred).is_err() {
        return -5.0;
    }
    report.loss + plan.total as f32 + pred[0] as f32
}

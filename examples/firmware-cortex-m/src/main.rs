//! On-device personalisation on a Cortex-M4F: a digit classifier trained on the host meets thicker digits from
//! an off-centre sensor, and fine-tunes its last two layers on 300 of them, in one static arena, with the same
//! code path (and bit for bit the same result) as the host.
//!
//! Memory is the static arena (sized by the memory plan the host computed, checked again at start) plus the
//! stack (painted at reset by cortex-m-rt, measured at the end). Output goes through semihosting as text, or
//! through defmt with `--features defmt`. Exit code 0 when everything held, 1 otherwise (panics and faults
//! included).
#![no_std]
#![no_main]

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{entry, exception, ExceptionFrame};
#[cfg(feature = "defmt")]
use defmt_semihosting as _;
use mantissa_core as mc;
use mc::plan::SideBySide;
use mc::{MemoryPlan, Reference, Trainer};

#[macro_use]
mod fmt;
mod scenario;
#[allow(dead_code)]
mod expected {
    include!("../assets/expected.rs");
}

use scenario::{DataBlob, ModelBlob, Split};

static MODEL: &[u8] = include_bytes!("../assets/model.bin");
static DATA: &[u8] = include_bytes!("../assets/data.bin");

/// The arena: the plan's total as the host computed it for this scenario (`expected.rs`), checked against the
/// plan computed here at start.
const ARENA_BYTES: usize = expected::PLAN_TOTAL;

/// The budgets this firmware is held to (also enforced by memory.x and checked by scripts/firmware.sh).
const RAM_BUDGET: usize = 128 * 1024;
const FLASH_BUDGET: usize = 512 * 1024;

/// Instructions per SysTick tick under `-icount shift=0` (1 instruction per virtual ns; SysTick at 25 MHz).
const INSTRUCTIONS_PER_TICK: u64 = 40;

#[repr(C, align(64))]
struct Arena(UnsafeCell<[u8; ARENA_BYTES]>);

// SAFETY: the bytes are only reached through `take_arena`, which hands out one `&mut` for the whole program.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_BYTES]));
static ARENA_TAKEN: AtomicBool = AtomicBool::new(false);

fn take_arena() -> Option<&'static mut [u8]> {
    if ARENA_TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: the flag above makes this the only reference to the arena's bytes, ever.
    Some(unsafe { &mut *ARENA.0.get() })
}

#[entry]
fn main() -> ! {
    if cfg!(feature = "force-panic") {
        panic!("forced panic (feature force-panic): the runner must exit non-zero");
    }
    let code = match run() {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            out!("error: {}", e);
            1
        }
    };
    exit(code)
}

fn exit(code: i32) -> ! {
    let status =
        if code == 0 { cortex_m_semihosting::debug::EXIT_SUCCESS } else { cortex_m_semihosting::debug::EXIT_FAILURE };
    cortex_m_semihosting::debug::exit(status);
    loop {
        cortex_m::asm::bkpt();
    }
}

/// Returns whether every check held.
fn run() -> mc::Result<bool> {
    let mut core = cortex_m::Peripherals::take().ok_or(mc::Error::InvalidConfig("peripherals taken twice"))?;
    start_systick(&mut core.SYST);

    let model = scenario::model()?;
    let arena = take_arena().ok_or(mc::Error::InvalidConfig("arena taken twice"))?;
    let backend = Reference::new(arena).with_device_name("Cortex-M4F (QEMU mps2-an386)");
    let (policy, why) = scenario::policy(&backend);
    let opt = scenario::optimizer();
    let cfg = scenario::config(policy);
    let plan = MemoryPlan::for_config(&model, policy, &opt, &cfg)?;
    out!("mantissa firmware: on-device fine-tuning on a Cortex-M4F, reference backend, no heap");
    out!("policy {} (auto: {})", policy, why);
    if plan.total > ARENA_BYTES {
        out!(
            "error: the static arena is too small: the memory plan needs {} bytes, ARENA_BYTES is {}; rerun \
             `cargo run --release --example firmware_export` in the repository root to update it",
            plan.total,
            ARENA_BYTES
        );
        return Ok(false);
    }
    let f32_frozen = MemoryPlan::for_config(&model, policy, &opt, &cfg.frozen_storage(mc::DType::F32))?;
    let full = MemoryPlan::for_config(&model, policy, &opt, &scenario::config_full(policy))?;
    out!("");
    out!("{}", plan);
    out!("full training vs {} (frozen weights in float32, then in bfloat16):", plan.trainable);
    out!("{}", SideBySide(&[("full", full), ("partial f32", f32_frozen), ("partial bf16", plan)]));
    let blob = ModelBlob::parse(MODEL, &model)?;
    out!(
        "model blob: {} bytes of weights in flash (frozen bf16, trainable f32; all-f32 would be {} bytes)",
        blob.data_len(),
        4 * model.param_len()
    );

    let mut t = Trainer::new(backend, model, policy, opt, cfg)?;
    scenario::load(&mut t, &blob)?;
    let data = DataBlob::parse(DATA)?;
    let (n_test, n_clean, n_tune) = (data.len(Split::Test), data.len(Split::Clean), data.len(Split::Tune));
    let before = scenario::correct(&mut t, &data, Split::Test)?;
    let clean_before = scenario::correct(&mut t, &data, Split::Clean)?;
    out!("");
    out!(
        "before: shifted held-out accuracy {} ({}/{}), clean {} ({}/{})",
        Pct(before, n_test),
        before,
        n_test,
        Pct(clean_before, n_clean),
        clean_before,
        n_clean
    );

    let mut steps = 0u64;
    let mut ticks = 0u64;
    let mut last = now();
    let loss = scenario::fine_tune(&mut t, &data, |_, _| {
        let t1 = now();
        ticks += t1 - last;
        steps += 1;
        last = now();
    })?;
    let instr_per_step = ticks * INSTRUCTIONS_PER_TICK / steps.max(1);
    out!(
        "fine-tuned on {} shifted samples: {} epochs, batch {}, {} steps, last-epoch loss {}",
        n_tune,
        scenario::EPOCHS,
        scenario::BATCH,
        steps,
        loss
    );
    let after = scenario::correct(&mut t, &data, Split::Test)?;
    let clean_after = scenario::correct(&mut t, &data, Split::Clean)?;
    out!(
        "after:  shifted held-out accuracy {} ({}/{}), clean {} ({}/{})",
        Pct(after, n_test),
        after,
        n_test,
        Pct(clean_after, n_clean),
        clean_after,
        n_clean
    );

    let checksum = scenario::checksum(&mut t)?;
    let high_water = t.arena().high_water();
    drop(t);
    let (static_ram, stack_peak, free_ram) = ram();
    let flash = flash();
    let gain_pp = 100.0 * (after as f32 - before as f32) / n_test as f32;
    let matches = checksum == expected::HOST_CHECKSUM;
    out!("");
    out!(
        "instructions per training step: {} (QEMU -icount shift=0, SysTick: {} ticks over {} steps)",
        instr_per_step,
        ticks,
        steps
    );
    out!(
        "ram: static {} bytes (.data + .bss; arena {} of which {} used), stack peak {} bytes (painted), total {} of {}",
        static_ram,
        ARENA_BYTES,
        high_water,
        stack_peak,
        static_ram + stack_peak,
        RAM_BUDGET
    );
    out!("flash: {} bytes (.vector_table + .text + .rodata + .data image) of {}", flash, FLASH_BUDGET);
    out!(
        "final weights: checksum 0x{:016x}, host 0x{:016x}: {}",
        checksum,
        expected::HOST_CHECKSUM,
        if matches { "bit-identical" } else { "DIFFERENT" }
    );
    out!(
        "result: acc_before={} acc_after={} gain_pp={} clean_before={} clean_after={} steps={} instr_per_step={} static_ram={} stack_peak={} ram_total={} flash={} arena={} checksum=0x{:016x} host_checksum=0x{:016x}",
        Frac(before, n_test),
        Frac(after, n_test),
        gain_pp,
        Frac(clean_before, n_clean),
        Frac(clean_after, n_clean),
        steps,
        instr_per_step,
        static_ram,
        stack_peak,
        static_ram + stack_peak,
        flash,
        ARENA_BYTES,
        checksum,
        expected::HOST_CHECKSUM
    );
    let mut ok = true;
    let mut require = |cond: bool, what: &str| {
        if !cond {
            out!("FAILED: {}", what);
            ok = false;
        }
    };
    require(gain_pp >= 10.0, "accuracy on shifted held-out digits rose by at least 10 percentage points");
    require(matches, "final weights bit-identical to the host's run");
    require(static_ram + stack_peak <= RAM_BUDGET, "static RAM + peak stack <= 128 KiB");
    require(stack_peak + 1024 <= free_ram, "the stack stayed clear of the static data (1 KiB margin)");
    require(flash <= FLASH_BUDGET, "flash <= 512 KiB");
    Ok(ok)
}

/// `c / n` as a percentage with one decimal.
struct Pct(usize, usize);

impl core::fmt::Display for Pct {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:.1}%", 100.0 * self.0 as f32 / self.1.max(1) as f32)
    }
}

/// `c / n` with four decimals.
struct Frac(usize, usize);

impl core::fmt::Display for Frac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:.4}", self.0 as f32 / self.1.max(1) as f32)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Instruction counting: SysTick from the core clock, reload 2^24, wraps counted in its exception.

const RELOAD: u32 = 0x00ff_ffff;
static WRAPS: AtomicU32 = AtomicU32::new(0);

fn start_systick(syst: &mut cortex_m::peripheral::SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(RELOAD);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
    // The counter reads 0 until its first reload (see EMBEDDED.md): wait for it.
    while cortex_m::peripheral::SYST::get_current() == 0 {}
}

#[exception]
fn SysTick() {
    WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// SysTick ticks since start (monotonic; a wrap between the two reads is retried).
fn now() -> u64 {
    loop {
        let w = WRAPS.load(Ordering::Acquire);
        let cur = cortex_m::peripheral::SYST::get_current();
        if WRAPS.load(Ordering::Acquire) == w {
            return u64::from(w) * (u64::from(RELOAD) + 1) + u64::from(RELOAD - cur);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Memory, from the linker's symbols.

extern "C" {
    static __sdata: u32;
    static __ebss: u32;
    static _stack_end: u32;
    static _stack_start: u32;
    static __erodata: u32;
    static __edata: u32;
}

/// `(static RAM bytes, peak stack bytes, free RAM bytes between the statics and the stack top)`.
fn ram() -> (usize, usize, usize) {
    // SAFETY: only the addresses of linker symbols are taken; the painted region [_stack_end, _stack_start)
    // is RAM this program owns, read a word at a time below the current stack pointer's frames.
    unsafe {
        let sdata = core::ptr::addr_of!(__sdata) as usize;
        let ebss = core::ptr::addr_of!(__ebss) as usize;
        let bottom = core::ptr::addr_of!(_stack_end) as usize;
        let top = core::ptr::addr_of!(_stack_start) as usize;
        let mut p = bottom;
        while p < top && core::ptr::read_volatile(p as *const u32) == cortex_m_rt::STACK_PAINT_VALUE {
            p += 4;
        }
        (ebss - sdata, top - p, top - bottom)
    }
}

/// Flash bytes: the vector table, code and read-only data (model and data blobs included), and the
/// initial values of `.data`.
fn flash() -> usize {
    // Taking the address of an extern static is safe; flash starts at 0.
    let erodata = core::ptr::addr_of!(__erodata) as usize;
    let data_image = core::ptr::addr_of!(__edata) as usize - core::ptr::addr_of!(__sdata) as usize;
    erodata + data_image
}

// ---------------------------------------------------------------------------------------------------------
// Failure paths: print and exit non-zero (cortex-m-rt's defaults spin, and QEMU would never exit).

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    out!("panic: {}", info);
    exit(101)
}

#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    out!("hard fault at pc 0x{:08x}", frame.pc());
    exit(1)
}

#[exception]
unsafe fn DefaultHandler(irqn: i16) {
    out!("unexpected interrupt {}", irqn);
    exit(1)
}

//! Threads (std only): a persistent worker pool, and the split of one GEMM into independent sub-GEMMs.
//!
//! The pool is one per process, created on first use and grown to the largest thread count asked for. Its
//! workers live as long as the process: a GEMM call posts one part to each worker it uses, runs part 0 on the
//! calling thread, and waits for the rest. An idle worker spins for [`SPIN`] (GEMMs of a training step come
//! tens of microseconds apart) and then parks on a condition variable. Each thread, worker or caller, packs
//! into its own scratch (`SCRATCH`, grown on demand and kept), so a warm call allocates nothing. While
//! another caller holds the pool (two backends on two threads, or a nested call), a call runs its parts one
//! after another on its own thread: the same results, since the parts are independent.
//!
//! A GEMM is split along its larger output dimension (N, else M) in chunks that are multiples of the register
//! tile, so every C element is summed in the same order as single-threaded: the result is bit-identical for
//! any thread count. It is split only when every thread gets at least [`min_macs_per_part`] multiply-adds.

use std::cell::{RefCell, UnsafeCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, TryLockError};
use std::time::{Duration, Instant};

use crate::detect::{Kernel, KernelId};
use crate::gemm::{kernel_scratch_len, kernel_tile, run_one, Elem, ElemKind, Task};

/// How long an idle worker spins before it parks. Waking a parked thread costs ~20-50 us (futex and
/// scheduler), a spinning one well under 1 us; the training step's GEMMs come closer together than this.
const SPIN: Duration = Duration::from_micros(500);

/// One unit of pool work: part `i` of a call.
type Work<'a> = dyn Fn(usize) + Sync + 'a;

/// A worker's mailbox: the caller writes `work` and `part`, then publishes them by storing `posted`; the
/// worker runs them and stores the same sequence number in `done`.
struct Slot {
    posted: AtomicU64,
    done: AtomicU64,
    work: UnsafeCell<Option<&'static Work<'static>>>,
    part: AtomicUsize,
    panicked: AtomicBool,
    /// Set (under `lock`) while the worker waits on `wake`.
    parked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `work` is written only by the pool's holder while the worker is idle (after `done` caught up with
// `posted`) and read only by the worker between seeing `posted` (Acquire) and storing `done` (Release).
unsafe impl Sync for Slot {}

impl Slot {
    /// Waits until `posted` moves past `seen`; returns the new sequence number.
    fn next(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let p = self.posted.load(Ordering::Acquire);
            if p != seen {
                return p;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                break;
            }
        }
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // SeqCst pairs with `post`: either the caller sees `parked` and notifies under the lock, or this load
        // sees its `posted`.
        self.parked.store(true, Ordering::SeqCst);
        while self.posted.load(Ordering::SeqCst) == seen {
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        self.parked.store(false, Ordering::Relaxed);
        self.posted.load(Ordering::Acquire)
    }

    /// Hands `work(part)` to the worker as job `seq`.
    ///
    /// # Safety
    /// The worker is idle (`done` equals the last `posted`), and `work` outlives the wait for `done == seq`.
    unsafe fn post(&self, seq: u64, work: &'static Work<'static>, part: usize) {
        debug_assert_eq!(self.done.load(Ordering::Acquire), self.posted.load(Ordering::Relaxed));
        // SAFETY: the worker is idle (caller), so nothing reads `work` now.
        unsafe { *self.work.get() = Some(work) };
        self.part.store(part, Ordering::Relaxed);
        self.posted.store(seq, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            // Taking the lock orders this notify after the worker's wait began.
            drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
            self.wake.notify_one();
        }
    }

    fn wait_done(&self, seq: u64) {
        let mut spins = 0u32;
        while self.done.load(Ordering::Acquire) != seq {
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// `seen` starts at the job sequence the slot was created with (not 0): a worker created after earlier jobs
/// must not take its slot's initial `posted` value for a posted job.
fn worker(slot: Arc<Slot>, mut seen: u64) {
    loop {
        seen = slot.next(seen);
        // SAFETY: published by `post` before `posted` (Acquire in `next`); valid until `done` is stored.
        let work = unsafe { (*slot.work.get()).expect("posted work") };
        let part = slot.part.load(Ordering::Relaxed);
        if catch_unwind(AssertUnwindSafe(|| work(part))).is_err() {
            slot.panicked.store(true, Ordering::Relaxed);
        }
        slot.done.store(seen, Ordering::Release);
    }
}

struct Pool {
    slots: Vec<Arc<Slot>>,
    seq: u64,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { slots: Vec::new(), seq: 0 });

/// Waits for the posted parts, also while unwinding, so no worker outlives the borrowed work.
struct Join<'p> {
    slots: &'p [Arc<Slot>],
    seq: u64,
}

impl Drop for Join<'_> {
    fn drop(&mut self) {
        for s in self.slots {
            s.wait_done(self.seq);
        }
    }
}

/// Runs `work(0)`, ..., `work(parts - 1)`: part 0 on the calling thread, the others on pool workers (or on
/// the calling thread as well, in order, when the pool is busy or a worker cannot be started).
pub(crate) fn run_parts(parts: usize, work: &Work<'_>) {
    if parts <= 1 {
        if parts == 1 {
            work(0);
        }
        return;
    }
    let mut pool = match POOL.try_lock() {
        Ok(p) => p,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => {
            (0..parts).for_each(work);
            return;
        }
    };
    while pool.slots.len() < parts - 1 {
        let slot = Arc::new(Slot {
            posted: AtomicU64::new(pool.seq),
            done: AtomicU64::new(pool.seq),
            work: UnsafeCell::new(None),
            part: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let (s, first) = (slot.clone(), pool.seq);
        let spawned = std::thread::Builder::new()
            .name(format!("mantissa-gemm-{}", pool.slots.len() + 1))
            .spawn(move || worker(s, first));
        if spawned.is_err() {
            break;
        }
        pool.slots.push(slot);
    }
    let used = (parts - 1).min(pool.slots.len());
    pool.seq += 1;
    let seq = pool.seq;
    // SAFETY: `Join` below waits for every posted part before this function returns or unwinds, so the
    // 'static lifetime is never relied on past the borrow of `work`.
    let work_static = unsafe { std::mem::transmute::<&Work<'_>, &'static Work<'static>>(work) };
    let slots = &pool.slots[..used];
    for (i, s) in slots.iter().enumerate() {
        // SAFETY: every worker is idle (the previous holder joined them), and `join` waits for `seq`.
        unsafe { s.post(seq, work_static, i + 1) };
    }
    let join = Join { slots, seq };
    work(0);
    (used + 1..parts).for_each(work);
    drop(join);
    if slots.iter().any(|s| s.panicked.swap(false, Ordering::Relaxed)) {
        panic!("a GEMM worker thread panicked");
    }
}

thread_local! {
    /// Packing scratch of this thread (caller or worker), grown on demand and reused.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch, 64-byte aligned, of at least `len - 64` bytes.
fn with_scratch(len: usize, f: impl FnOnce(*mut u8)) {
    SCRATCH.with(|cell| {
        let mut fresh = Vec::new();
        // A nested call (impossible through this crate's API) gets its own buffer.
        let mut guard = cell.try_borrow_mut();
        let buf: &mut Vec<u8> = match guard {
            Ok(ref mut b) => b,
            Err(_) => &mut fresh,
        };
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let base = buf.as_mut_ptr();
        // SAFETY: align_offset < 64 <= len (scratch lengths include 64 bytes of slack).
        f(unsafe { base.add(base.align_offset(64)) })
    })
}

/// Multiply-adds each thread must get before a GEMM is split. Handing a part to a spinning worker and joining
/// it costs ~1-2 us; at 2^19 bf16 multiply-adds on AMX (~1 us) or 2^17 f32 ones on AVX-512 (~1.5 us) per
/// thread the split still pays. Measured on the 2-core Xeon (AMX) with `cpu_report`, 2 threads against 1:
/// bf16 128^3 ~1000 against ~790 GFLOP/s, f32 128^3 ~195 against ~130; 64^3 stays single-threaded either way.
fn min_macs_per_part<TA: Elem, TB: Elem>(kernel: Kernel) -> usize {
    if kernel.id() == KernelId::Amx && TA::KIND == ElemKind::Bf16 && TB::KIND == ElemKind::Bf16 {
        1 << 19
    } else {
        1 << 17
    }
}

/// Whether `macs` multiply-adds in all are enough to give each of `parts` threads its share.
pub(crate) fn worth_splitting<TA: Elem, TB: Elem>(kernel: Kernel, macs: usize, parts: usize) -> bool {
    macs / parts.max(1) >= min_macs_per_part::<TA, TB>(kernel)
}

/// How `t` is split: along N (else M), in `parts` chunks of `chunk` (a multiple of the register tile, so only
/// the last chunk has edge tiles), at most one per `min_macs` multiply-adds.
fn plan(threads: usize, m: usize, n: usize, k: usize, tile: (usize, usize), min_macs: usize) -> (bool, usize, usize) {
    let split_n = n >= m;
    let (dim, align) = if split_n { (n, tile.1) } else { (m, tile.0) };
    let by_work = (m.saturating_mul(n).saturating_mul(k) / min_macs.max(1)).max(1);
    let want = threads.max(1).min(dim.div_ceil(align)).min(by_work);
    let chunk = dim.div_ceil(want).next_multiple_of(align);
    (split_n, chunk, dim.div_ceil(chunk))
}

/// Raw-pointer work (a `Task`, a batched problem) shared with the pool's threads by reference; `get` makes a
/// closure capture the wrapper, not its field.
pub(crate) struct Shared<T>(pub T);

// SAFETY: only for work whose parts write disjoint memory and otherwise only read (`run_parallel`, the backend's
// batched GEMM), joined by `run_parts` before the pointers' owner moves on.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub(crate) fn get(&self) -> &T {
        &self.0
    }
}

/// # Safety
/// `t` valid as for `gemm_f32`, with m, n, k > 0.
pub(crate) unsafe fn run_parallel<TA: Elem, TB: Elem, TC: Elem>(kernel: Kernel, threads: usize, t: &Task<TA, TB, TC>) {
    // SAFETY: forwarded.
    unsafe { split_run(kernel, threads, t, min_macs_per_part::<TA, TB>(kernel), &|_| {}) }
}

/// The block of C that one part of a split GEMM wrote: rows `i0..i0 + m`, columns `j0..j0 + n`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Part {
    pub i0: usize,
    pub m: usize,
    pub j0: usize,
    pub n: usize,
}

/// [`run_parallel`], then `after(part)` on the thread that computed each part, while its block of C is still
/// in that core's cache (a fused epilogue). `after` must touch only its part's block of C (and memory no
/// other part writes).
///
/// # Safety
/// As [`run_parallel`].
pub(crate) unsafe fn run_parallel_then<TA: Elem, TB: Elem, TC: Elem>(
    kernel: Kernel,
    threads: usize,
    t: &Task<TA, TB, TC>,
    after: &(dyn Fn(Part) + Sync),
) {
    // SAFETY: forwarded.
    unsafe { split_run(kernel, threads, t, min_macs_per_part::<TA, TB>(kernel), after) }
}

/// [`run_parallel_then`] with the work threshold as an argument (tests split tiny GEMMs with it).
///
/// # Safety
/// As [`run_parallel`].
unsafe fn split_run<TA: Elem, TB: Elem, TC: Elem>(
    kernel: Kernel,
    threads: usize,
    t: &Task<TA, TB, TC>,
    min: usize,
    after: &(dyn Fn(Part) + Sync),
) {
    let tile = kernel_tile::<TA, TB>(kernel);
    let (split_n, chunk, parts) = plan(threads, t.m, t.n, t.k, tile, min);
    let (cm, cn) = if split_n { (t.m, chunk.min(t.n)) } else { (chunk.min(t.m), t.n) };
    // The first chunk is the largest, so its scratch size fits every part.
    let len = kernel_scratch_len::<TA, TB, TC>(kernel, cm, cn, t.k);
    let shared = Shared(*t);
    let part = |i: usize| {
        let t = shared.get();
        let lo = i * chunk;
        let part = if split_n {
            Part { i0: 0, m: t.m, j0: lo, n: chunk.min(t.n - lo) }
        } else {
            Part { i0: lo, m: chunk.min(t.m - lo), j0: 0, n: t.n }
        };
        // SAFETY: lo < dim; chunks tile C without overlap.
        let sub = unsafe { t.sub(part.i0, part.m, part.j0, part.n) };
        // SAFETY: t valid (caller), parts disjoint in C; the scratch holds `len - 64` aligned bytes.
        with_scratch(len, |s| unsafe { run_one(kernel, &sub, s) });
        after(part);
    };
    if parts == 1 {
        part(0);
    } else {
        run_parts(parts, &part);
    }
}

#[cfg(test)]
mod tests {
    use super::{plan, run_parts, split_run};
    use crate::detect::{available_kernels, Kernel};
    use crate::gemm::{Elem, Task};
    use half::bf16;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Regression: workers created after earlier jobs (the pool grows from 1 to 7 workers here) used to take
    /// their slot's initial sequence number for a posted job, panic on the empty slot and leave the next caller
    /// waiting forever. Runs on a helper thread so that a hang fails the test instead of stalling the suite.
    #[test]
    fn a_pool_that_grows_keeps_every_worker_alive() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for round in 0..3 {
                for parts in 2..=8 {
                    let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                    run_parts(parts, &|p| {
                        hits[p].fetch_add(1, Ordering::Relaxed);
                    });
                    let counts: Vec<usize> = hits.iter().map(|h| h.load(Ordering::Relaxed)).collect();
                    assert_eq!(counts, vec![1; parts], "round {round}, {parts} parts");
                }
            }
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the pool hung (a worker died?)");
    }

    /// C (m, n) row-major with A (m, k) row-major and B (k, n) transposed (column-major), beta 0.5.
    fn gemm_split<TI: Elem, TC: Elem>(threads: usize, m: usize, n: usize, k: usize) -> Vec<TC> {
        let kernels = available_kernels();
        let a: Vec<TI> = (0..m * k).map(|i| TI::from_f32(((i * 7919) % 61) as f32 / 61.0 - 0.5)).collect();
        let b: Vec<TI> = (0..k * n).map(|i| TI::from_f32(((i * 104729) % 53) as f32 / 53.0 - 0.5)).collect();
        let mut out = Vec::new();
        for kernel in kernels.into_iter().map(|id| Kernel::new(id).unwrap()) {
            let mut c: Vec<TC> = (0..m * n).map(|i| TC::from_f32((i % 13) as f32)).collect();
            let t = Task {
                m,
                n,
                k,
                alpha: 0.75,
                a: a.as_ptr(),
                rsa: k as isize,
                csa: 1,
                b: b.as_ptr(),
                rsb: 1,
                csb: k as isize,
                beta: 0.5,
                c: c.as_mut_ptr(),
                rsc: n as isize,
                csc: 1,
            };
            // SAFETY: the buffers match the shapes and strides; the kernel is available.
            unsafe { split_run(kernel, threads, &t, 1, &|_| {}) };
            out.extend(c);
        }
        out
    }

    /// Splitting changes no bit of the result, on every kernel, for splits along N and along M.
    #[test]
    fn split_is_bit_identical() {
        for (m, n, k) in [(67, 131, 45), (131, 67, 45), (40, 300, 1100), (300, 33, 70)] {
            for threads in [2, 3] {
                let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(gemm_split::<f32, f32>(1, m, n, k)), bits(gemm_split::<f32, f32>(threads, m, n, k)));
                assert_eq!(bits(gemm_split::<bf16, f32>(1, m, n, k)), bits(gemm_split::<bf16, f32>(threads, m, n, k)));
                let h = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(h(gemm_split::<bf16, bf16>(1, m, n, k)), h(gemm_split::<bf16, bf16>(threads, m, n, k)));
            }
        }
    }

    #[test]
    fn plan_splits_larger_dim_on_tile_multiples() {
        assert_eq!(plan(2, 1024, 1024, 1024, (14, 32), 1 << 15), (true, 512, 2));
        assert_eq!(plan(2, 1000, 10, 1000, (14, 32), 1 << 15), (false, 504, 2));
        assert_eq!(plan(8, 7, 7, 7, (14, 32), 1 << 15), (true, 32, 1));
        assert_eq!(plan(0, 64, 64, 64, (4, 8), 1 << 15), (true, 64, 1));
        // Too little work per thread: one part.
        assert_eq!(plan(2, 256, 10, 512, (14, 32), 1 << 20), (false, 256usize.next_multiple_of(14), 1));
    }

    #[test]
    fn pool_runs_every_part_once() {
        for parts in [1, 2, 3, 5, 2, 1, 4] {
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            run_parts(parts, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn pool_survives_a_panicking_part() {
        let r = std::panic::catch_unwind(|| run_parts(2, &|i| assert_ne!(i, 1)));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        run_parts(2, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }
}

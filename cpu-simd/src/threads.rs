//! Threads (std only): a GEMM is split along its larger output dimension into
//! independent sub-GEMMs, one per thread (`std::thread::scope`, the calling thread
//! takes the first part), each with its own slice of one packing buffer kept per
//! calling thread.

use std::cell::RefCell;

use crate::detect::Kernel;
use crate::gemm::{kernel_scratch_len, kernel_tile, run_one, Elem, Task};

/// Below this many multiply-adds per thread, extra threads cost more than they save
/// (spawning one is ~10-30 us).
const MIN_MACS_PER_THREAD: usize = 1 << 15;

thread_local! {
    /// Packing scratch of the calling thread, grown on demand and reused.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A sub-GEMM handed to a worker thread.
struct Job<TA, TB, TC> {
    kernel: Kernel,
    task: Task<TA, TB, TC>,
    scratch: *mut u8,
}

// SAFETY: a Job's task covers C rows/columns no other job touches, its scratch
// slice is its own, and A/B are only read; `run_parallel` joins every thread
// before returning, so the pointers outlive the jobs.
unsafe impl<TA, TB, TC> Send for Job<TA, TB, TC> {}

impl<TA: Elem, TB: Elem, TC: Elem> Job<TA, TB, TC> {
    /// # Safety
    /// As `run_one`.
    unsafe fn exec(self) {
        // SAFETY: forwarded (see `run_parallel`).
        unsafe { run_one(self.kernel, &self.task, self.scratch) }
    }
}

/// How `t` is split: along N (else M), in `parts` chunks of `chunk` (a multiple of
/// the register tile, so only the last chunk has edge tiles).
fn plan(threads: usize, m: usize, n: usize, k: usize, tile: (usize, usize)) -> (bool, usize, usize) {
    let split_n = n >= m;
    let (dim, align) = if split_n { (n, tile.1) } else { (m, tile.0) };
    let by_work = (m.saturating_mul(n).saturating_mul(k) / MIN_MACS_PER_THREAD).max(1);
    let want = threads.max(1).min(dim.div_ceil(align)).min(by_work);
    let chunk = dim.div_ceil(want).next_multiple_of(align);
    (split_n, chunk, dim.div_ceil(chunk))
}

/// # Safety
/// `t` valid as for `gemm_f32`, with m, n, k > 0.
pub(crate) unsafe fn run_parallel<TA: Elem, TB: Elem, TC: Elem>(kernel: Kernel, threads: usize, t: &Task<TA, TB, TC>) {
    let (split_n, chunk, parts) = plan(threads, t.m, t.n, t.k, kernel_tile::<TA, TB>(kernel));
    let (cm, cn) = if split_n { (t.m, chunk.min(t.n)) } else { (chunk.min(t.m), t.n) };
    // The first chunk is the largest, so its scratch fits every part.
    let per = kernel_scratch_len::<TA, TB, TC>(kernel, cm, cn, t.k).next_multiple_of(64);
    let mut fresh = Vec::new();
    SCRATCH.with(|cell| {
        // A nested call (impossible through this crate's API) gets its own buffer.
        let mut guard = cell.try_borrow_mut();
        let buf: &mut Vec<u8> = match guard {
            Ok(ref mut b) => b,
            Err(_) => &mut fresh,
        };
        if buf.len() < per * parts {
            buf.resize(per * parts, 0);
        }
        let base = buf.as_mut_ptr();
        let pad = base.align_offset(64);
        let part = |i: usize| -> Job<TA, TB, TC> {
            let lo = i * chunk;
            // SAFETY: lo < dim; chunks tile C without overlap.
            let task = unsafe {
                if split_n {
                    t.sub(0, t.m, lo, chunk.min(t.n - lo))
                } else {
                    t.sub(lo, chunk.min(t.m - lo), 0, t.n)
                }
            };
            // SAFETY: part i's region [pad + i * per, .. + per - 64) lies in buf,
            // since per includes 64 bytes of slack and pad < 64.
            let scratch = unsafe { base.add(pad + i * per) };
            Job { kernel, task, scratch }
        };
        if parts == 1 {
            // SAFETY: t valid (caller), scratch as above.
            unsafe { part(0).exec() };
            return;
        }
        std::thread::scope(|s| {
            for i in 1..parts {
                let job = part(i);
                // SAFETY: disjoint C parts and scratch slices; joined by the scope.
                s.spawn(move || unsafe { job.exec() });
            }
            // SAFETY: as above.
            unsafe { part(0).exec() };
        });
    });
}

#[cfg(test)]
mod tests {
    use super::plan;

    #[test]
    fn plan_splits_larger_dim_on_tile_multiples() {
        assert_eq!(plan(2, 1024, 1024, 1024, (14, 32)), (true, 512, 2));
        assert_eq!(plan(2, 1000, 10, 1000, (14, 32)), (false, 504, 2));
        assert_eq!(plan(8, 7, 7, 7, (14, 32)), (true, 32, 1));
        assert_eq!(plan(0, 64, 64, 64, (4, 8)), (true, 64, 1));
    }
}

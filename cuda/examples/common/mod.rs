//! Shared by the timing examples.

use std::time::Instant;

use mantissa_core::Backend;
use mantissa_cuda::CudaBackend;

const SAMPLES: usize = 20;
const CALLS: usize = 5;

/// Median milliseconds per call of `op`: 20 samples after 3 warm-up calls, each sample 5 back-to-back calls
/// between two synchronisations, divided by 5.
pub fn median_ms(be: &mut CudaBackend, mut op: impl FnMut(&mut CudaBackend)) -> f64 {
    for _ in 0..3 {
        op(be);
    }
    be.synchronize().unwrap();
    let mut t: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..CALLS {
                op(be);
            }
            be.synchronize().unwrap();
            start.elapsed().as_secs_f64() * 1e3 / CALLS as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[SAMPLES / 2 - 1] + t[SAMPLES / 2]) / 2.0
}

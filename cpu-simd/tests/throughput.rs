//! Rough GFLOP/s of 1024^3 GEMMs, by hand only:
//! `cargo test --release -p mantissa-cpu-simd --test throughput -- --ignored --nocapture`.
//! (Criterion benches are the place for tracked numbers; this is a smoke check.)
//! Times the detected kernel, and for bf16 also every other available kernel with a bf16 path of its own
//! (avx512's widening, avx512bf16's `vdpbf16ps`, amx's tiles) so they compare in one run.

use std::time::Instant;

use half::bf16;
use mantissa_cpu_simd::{available_kernels, detect, gemm, Elem, Kernel, KernelId, MatMut, MatRef};

fn time<T: Elem>(label: &str, kernel: Kernel, threads: usize) -> f64 {
    time_layout::<T, f32>(label, kernel, threads, false, false)
}

/// `ta` / `tb`: A / B stored column-major (the transposed operands of a backward pass); `TC`: C's type.
fn time_layout<T: Elem, TC: Elem>(label: &str, kernel: Kernel, threads: usize, ta: bool, tb: bool) -> f64 {
    let n = 1024;
    let a: Vec<T> = (0..n * n).map(|i| T::from_f32(((i * 7 % 13) as f32 - 6.0) / 8.0)).collect();
    let b: Vec<T> = (0..n * n).map(|i| T::from_f32(((i * 5 % 11) as f32 - 5.0) / 8.0)).collect();
    let mut c = vec![TC::from_f32(0.0); n * n];
    let av = if ta { MatRef::col_major(&a, n, n) } else { MatRef::row_major(&a, n, n) };
    let bv = if tb { MatRef::col_major(&b, n, n) } else { MatRef::row_major(&b, n, n) };
    let mut run = || gemm(kernel, threads, 1.0, av, bv, 0.0, MatMut::row_major(&mut c, n, n)).unwrap();
    run();
    let mut best = f64::INFINITY;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < 1.0 {
        let t = Instant::now();
        run();
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (n * n * n) as f64 / best / 1e9;
    println!("{label} 1024^3 {:10} threads={threads}: {:.2} ms, {gflops:.1} GFLOP/s", kernel.name(), best * 1e3);
    gflops
}

#[test]
#[ignore = "timing, run by hand"]
fn gflops_1024() {
    let kernel = detect().unwrap();
    let others: Vec<Kernel> = [KernelId::Avx512, KernelId::Avx512Bf16, KernelId::Amx]
        .into_iter()
        .filter(|id| *id != kernel.id() && available_kernels().contains(id))
        .map(|id| Kernel::new(id).unwrap())
        .collect();
    for threads in [1, 2] {
        let f = time::<f32>("f32 ", kernel, threads);
        let h = time::<bf16>("bf16", kernel, threads);
        println!("bf16 / f32 = {:.2}x", h / f);
        for &k in &others {
            time::<bf16>("bf16", k, threads);
        }
    }
    // bf16 layouts of a training step on the detected kernel, 2 threads.
    time_layout::<bf16, f32>("bf16 A^T  ", kernel, 2, true, false);
    time_layout::<bf16, f32>("bf16 B^T  ", kernel, 2, false, true);
    time_layout::<bf16, bf16>("bf16->bf16", kernel, 2, false, false);
}

//! Rough GFLOP/s of 1024^3 GEMMs, by hand only:
//! `cargo test --release -p mantissa-cpu-simd --test throughput -- --ignored --nocapture`.
//! (Criterion benches are the place for tracked numbers; this is a smoke check.)

use std::time::Instant;

use half::bf16;
use mantissa_cpu_simd::{detect, gemm, Elem, MatMut, MatRef};

fn time<T: Elem>(label: &str, threads: usize) -> f64 {
    let n = 1024;
    let kernel = detect().unwrap();
    let a: Vec<T> = (0..n * n).map(|i| T::from_f32(((i * 7 % 13) as f32 - 6.0) / 8.0)).collect();
    let b: Vec<T> = (0..n * n).map(|i| T::from_f32(((i * 5 % 11) as f32 - 5.0) / 8.0)).collect();
    let mut c = vec![0f32; n * n];
    let mut run = || {
        gemm(
            kernel,
            threads,
            1.0,
            MatRef::row_major(&a, n, n),
            MatRef::row_major(&b, n, n),
            0.0,
            MatMut::row_major(&mut c, n, n),
        )
        .unwrap()
    };
    run();
    let mut best = f64::INFINITY;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < 1.5 {
        let t = Instant::now();
        run();
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (n * n * n) as f64 / best / 1e9;
    println!("{label} 1024^3 {} threads={threads}: {:.2} ms, {gflops:.1} GFLOP/s", kernel.name(), best * 1e3);
    gflops
}

#[test]
#[ignore = "timing, run by hand"]
fn gflops_1024() {
    for threads in [1, 2] {
        let f = time::<f32>("f32 ", threads);
        let h = time::<bf16>("bf16", threads);
        println!("bf16 / f32 = {:.2}x", h / f);
    }
}

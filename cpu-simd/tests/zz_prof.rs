use half::bf16;
use mantissa_cpu_simd::{gemm, Kernel, KernelId, MatMut, MatRef};
#[test]
#[ignore]
fn prof() {
    let n = 1024;
    let th: usize = std::env::var("TH").map(|s| s.parse().unwrap()).unwrap_or(1);
    let kernel = Kernel::new(KernelId::Amx).unwrap();
    let a: Vec<bf16> = (0..n * n).map(|i| bf16::from_f32(((i * 7 % 13) as f32 - 6.0) / 8.0)).collect();
    let b: Vec<bf16> = (0..n * n).map(|i| bf16::from_f32(((i * 5 % 11) as f32 - 5.0) / 8.0)).collect();
    let mut c = vec![0f32; n * n];
    let mut best = f64::INFINITY;
    for _ in 0..300 {
        let t = std::time::Instant::now();
        gemm(kernel, th, 1.0, MatRef::row_major(&a, n, n), MatRef::row_major(&b, n, n), 0.0, MatMut::row_major(&mut c, n, n)).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("th={th} best {:.3} ms {:.1} GFLOP/s", best * 1e3, 2.0 * 1024f64.powi(3) / best / 1e9);
}

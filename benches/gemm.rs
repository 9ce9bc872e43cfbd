//! GEMM throughput through each CPU backend's `Backend::gemm` (the path training takes): f32, bf16 and f16
//! inputs with f32 output, square sizes 256..2048, 1 and 2 threads. Criterion's "elements" are FLOPs (2 per
//! multiply-add), so its `elem/s` reads as FLOP/s. `cargo bench --bench gemm [-- 1024]`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mantissa::backend::Gemm;
use mantissa::cpu_simd::SimdBackend;
use mantissa::host::HostBuffer;
use mantissa::rng::Rng;
use mantissa::{Arena, Backend, DType};

fn bench(c: &mut Criterion) {
    for (dtype, name) in [(DType::F32, "f32"), (DType::BF16, "bf16"), (DType::F16, "f16")] {
        let mut group = c.benchmark_group(format!("gemm_{name}"));
        group.sample_size(10);
        for n in [256usize, 512, 1024, 2048] {
            let mut arena = Arena::unbounded();
            let a = arena.alloc(dtype, n * n).unwrap();
            let b = arena.alloc(dtype, n * n).unwrap();
            let out = arena.alloc(DType::F32, n * n).unwrap();
            let mut buf = HostBuffer::new(arena.high_water()).unwrap();
            let mut rng = Rng::new(1);
            let data: Vec<f32> = (0..n * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let g = Gemm::new(n, n, n, a, b, out);
            group.throughput(Throughput::Elements(g.flops()));
            for threads in [1usize, 2] {
                let mut be = SimdBackend::new(buf.as_mut_slice(), threads).unwrap();
                be.upload(a, &data).unwrap();
                be.upload(b, &data).unwrap();
                let id = BenchmarkId::new(format!("cpu-simd/{}/threads={threads}", be.kernel().name()), n);
                group.bench_function(id, |bench| bench.iter(|| be.gemm(&g).unwrap()));
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! CPU and GPU side by side (`cargo bench --features cuda --bench cpu_vs_gpu`): a bf16/f32 GEMM and a
//! training step of a mid-size MLP (784-1024-1024-10, GELU, AdamW, batch 1024) on the SIMD backend and on
//! the CUDA backend. The GPU variants synchronise the device before the clock stops, and are skipped with a
//! message when no GPU is present. Criterion "elements" are FLOPs for GEMM and samples for training.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mantissa::backend::Gemm;
use mantissa::cpu_simd::SimdBackend;
use mantissa::cuda::CudaBackend;
use mantissa::host::HostBuffer;
use mantissa::rng::Rng;
use mantissa::{AdamW, Arena, Backend, DType, MemoryPlan, Model, Optimizer, Policy, Shape, TrainConfig, Trainer};

fn gpu(bytes: usize) -> Option<CudaBackend> {
    match CudaBackend::new(0, bytes) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("cpu_vs_gpu: GPU variants skipped: {e}");
            None
        }
    }
}

fn gemm(c: &mut Criterion) {
    let n = 2048;
    for (dtype, name) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        let mut group = c.benchmark_group(format!("gemm_{name}_{n}"));
        group.sample_size(10);
        let mut arena = Arena::unbounded();
        let (a, b, out) = (
            arena.alloc(dtype, n * n).unwrap(),
            arena.alloc(dtype, n * n).unwrap(),
            arena.alloc(DType::F32, n * n).unwrap(),
        );
        let g = Gemm::new(n, n, n, a, b, out);
        group.throughput(Throughput::Elements(g.flops()));
        let mut rng = Rng::new(1);
        let data: Vec<f32> = (0..n * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut buf = HostBuffer::new(arena.high_water()).unwrap();
        let mut cpu = SimdBackend::new(buf.as_mut_slice(), 0).unwrap();
        cpu.upload(a, &data).unwrap();
        cpu.upload(b, &data).unwrap();
        group.bench_function(BenchmarkId::new("cpu-simd", n), |bench| bench.iter(|| cpu.gemm(&g).unwrap()));
        if let Some(mut dev) = gpu(arena.high_water()) {
            dev.upload(a, &data).unwrap();
            dev.upload(b, &data).unwrap();
            group.bench_function(BenchmarkId::new("cuda", n), |bench| {
                bench.iter(|| {
                    dev.gemm(&g).unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
        group.finish();
    }
}

fn train(c: &mut Criterion) {
    const BATCH: usize = 1024;
    let model =
        || Model::sequential(Shape::flat(784)).linear(1024).gelu().linear(1024).gelu().linear(10).build().unwrap();
    let mut rng = Rng::new(2);
    let x: Vec<f32> = (0..BATCH * 784).map(|_| rng.next_f32()).collect();
    let y: Vec<u32> = (0..BATCH).map(|_| rng.below(10) as u32).collect();
    let mut group = c.benchmark_group("train_step_mlp1024_b1024");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
        let opt: Optimizer = AdamW::new(1e-3).into();
        let plan = MemoryPlan::new(&model(), policy, &opt, BATCH).unwrap();
        let mut buf = HostBuffer::new(plan.total).unwrap();
        let cpu = SimdBackend::new(buf.as_mut_slice(), 0).unwrap();
        let mut t = Trainer::new(cpu, model(), policy, opt, TrainConfig::new(BATCH, policy)).unwrap();
        t.stage(&x, &y).unwrap();
        group.bench_function(BenchmarkId::new("cpu-simd", policy.name()), |b| b.iter(|| t.step_staged(BATCH).unwrap()));
        if let Some(dev) = gpu(plan.total) {
            let mut t = Trainer::new(dev, model(), policy, opt, TrainConfig::new(BATCH, policy)).unwrap();
            t.stage(&x, &y).unwrap();
            group.bench_function(BenchmarkId::new("cuda", policy.name()), |b| {
                b.iter(|| {
                    t.step_staged(BATCH).unwrap();
                    t.backend_mut().synchronize().unwrap();
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, gemm, train);
criterion_main!(benches);

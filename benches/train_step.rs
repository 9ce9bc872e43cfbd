//! One training step of the reference CPU workload (`cpu-mlp`: 784 -> 512 -> GELU -> 512 -> GELU -> 10,
//! softmax cross-entropy, AdamW, batch 256) per policy, on the SIMD backend (1 and 2 threads) and the scalar
//! reference. Criterion's "elements" are samples, so `elem/s` reads as samples/s.
//! `cargo bench --bench train_step`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mantissa::cpu_simd::SimdBackend;
use mantissa::host::HostBuffer;
use mantissa::rng::Rng;
use mantissa::{AdamW, Backend, MemoryPlan, Model, Optimizer, Policy, Reference, Shape, TrainConfig, Trainer};

const BATCH: usize = 256;

fn setup(policy: Policy) -> (Model, Optimizer, MemoryPlan, Vec<f32>, Vec<u32>) {
    let model = Model::sequential(Shape::flat(784)).linear(512).gelu().linear(512).gelu().linear(10).build().unwrap();
    let opt: Optimizer = AdamW::new(1e-3).weight_decay(0.01).into();
    let plan = MemoryPlan::new(&model, policy, &opt, BATCH).unwrap();
    let mut rng = Rng::new(2);
    let x = (0..BATCH * 784).map(|_| rng.next_f32()).collect();
    let y = (0..BATCH).map(|_| rng.below(10) as u32).collect();
    (model, opt, plan, x, y)
}

fn run<B: Backend>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    t: &mut Trainer<B>,
    x: &[f32],
    y: &[u32],
) {
    c.bench_function(id, |b| b.iter(|| t.step(x, y).unwrap()));
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step_cpu_mlp");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
        for threads in [1usize, 2] {
            let (model, opt, plan, x, y) = setup(policy);
            let mut buf = HostBuffer::new(plan.total).unwrap();
            let be = SimdBackend::new(buf.as_mut_slice(), threads).unwrap();
            let mut t = Trainer::new(be, model, policy, opt, TrainConfig::new(BATCH, policy)).unwrap();
            run(&mut group, BenchmarkId::new(format!("cpu-simd/threads={threads}"), policy.name()), &mut t, &x, &y);
        }
        let (model, opt, plan, x, y) = setup(policy);
        let mut buf = HostBuffer::new(plan.total).unwrap();
        let mut t =
            Trainer::new(Reference::new(buf.as_mut_slice()), model, policy, opt, TrainConfig::new(BATCH, policy))
                .unwrap();
        run(&mut group, BenchmarkId::new("reference", policy.name()), &mut t, &x, &y);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

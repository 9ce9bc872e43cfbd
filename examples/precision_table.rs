//! The precision table the mixed-precision guides publish per device, measured by mantissa on the hardware it
//! runs on: each policy's step time and memory, relative to float32, on every backend available.
//!
//! `cargo run --release --features cuda --example precision_table [-- --quick]`
//!
//! Workloads: on the CPU, cpu-mlp (784-512-512-10, GELU, AdamW, batch 256); on a GPU, gpu-mlp
//! (784-4096-4096-10, GELU, AdamW, batch 8192). Peak memory is the arena (CPU: every byte of the run) or the
//! device allocation (GPU: arena + cuBLAS workspace + op scratch).

use std::time::Instant;

use clap::Parser;
use mantissa::cpu_simd::SimdBackend;
use mantissa::cuda::CudaBackend;
use mantissa::host::HostBuffer;
use mantissa::rng::Rng;
use mantissa::{AdamW, Backend, MemoryPlan, Model, Optimizer, Policy, Shape, TrainConfig, Trainer};

#[derive(Parser, Debug)]
struct Args {
    /// Fewer timed steps.
    #[arg(long)]
    quick: bool,
    /// Leave out the GPU even if one is there.
    #[arg(long)]
    cpu_only: bool,
}

struct Row {
    device: String,
    capability: String,
    policy: Policy,
    step_ms: f64,
    bytes: usize,
}

const POLICIES: [Policy; 3] = [Policy::FLOAT32, Policy::MIXED_FLOAT16, Policy::MIXED_BFLOAT16];

fn mlp(hidden: usize) -> mantissa::Result<Model> {
    Model::sequential(Shape::flat(784)).linear(hidden).gelu().linear(hidden).gelu().linear(10).build()
}

fn time<B: Backend>(t: &mut Trainer<B>, batch: usize, warmup: usize, steps: usize) -> mantissa::Result<f64> {
    let mut rng = Rng::new(4);
    let x: Vec<f32> = (0..batch * 784).map(|_| rng.next_f32()).collect();
    let y: Vec<u32> = (0..batch).map(|_| rng.below(10) as u32).collect();
    t.stage(&x, &y)?;
    // Steps are queued (no wait on the host between them; a CUDA graph on the GPU) and reported at the end.
    for _ in 0..warmup {
        t.queue_staged(batch)?;
    }
    t.report()?;
    let start = Instant::now();
    for _ in 0..steps {
        t.queue_staged(batch)?;
    }
    t.report()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / steps as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (warmup, steps) = if args.quick { (2, 5) } else { (5, 30) };
    let mut rows = Vec::new();

    // CPU: the SIMD backend, both cores.
    for policy in POLICIES {
        let (model, batch) = (mlp(512)?, 256);
        let opt: Optimizer = AdamW::new(1e-3).weight_decay(0.01).into();
        let plan = MemoryPlan::new(&model, policy, &opt, batch)?;
        let mut buf = HostBuffer::new(plan.total)?;
        let be = SimdBackend::new(buf.as_mut_slice(), 0)?;
        let caps = be.capabilities();
        let kernel = be.kernel().name();
        let mut t = Trainer::new(be, model, policy, opt, TrainConfig::new(batch, policy))?;
        let step_ms = time(&mut t, batch, warmup, steps)?;
        rows.push(Row {
            device: format!("{} (cpu-mlp, batch 256)", caps.device),
            capability: format!("{kernel}; fast bf16: {}, fast f16: {}", caps.fast_bf16, caps.fast_f16),
            policy,
            step_ms,
            bytes: plan.total,
        });
    }

    // GPU: the CUDA backend on device 0, if there is one.
    if !args.cpu_only {
        for policy in POLICIES {
            let (model, batch) = (mlp(4096)?, 8192);
            let opt: Optimizer = AdamW::new(1e-3).weight_decay(0.01).into();
            let plan = MemoryPlan::new(&model, policy, &opt, batch)?;
            let be = match CudaBackend::new(0, plan.total) {
                Ok(be) => be,
                Err(e) => {
                    eprintln!("no GPU row: {e}");
                    break;
                }
            };
            let caps = be.capabilities();
            let (major, minor) = be.compute_capability();
            let bytes = be.device_bytes();
            let mut t = Trainer::new(be, model, policy, opt, TrainConfig::new(batch, policy))?;
            let step_ms = time(&mut t, batch, warmup, steps)?;
            rows.push(Row {
                device: format!("{} (gpu-mlp, batch 8192)", caps.device),
                capability: format!(
                    "compute {major}.{minor}; fast bf16: {}, fast f16: {}",
                    caps.fast_bf16, caps.fast_f16
                ),
                policy,
                step_ms,
                bytes,
            });
        }
    }

    println!("| device | capability | policy | step time | speedup vs float32 | peak memory | memory reduction |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let base =
            rows.iter().find(|b| b.device == r.device && b.policy == Policy::FLOAT32).expect("float32 row first");
        println!(
            "| {} | {} | {} | {:.3} ms | {:.2}x | {:.1} MiB | {:.2}x |",
            r.device,
            r.capability,
            r.policy,
            r.step_ms,
            base.step_ms / r.step_ms,
            r.bytes as f64 / 1048576.0,
            base.bytes as f64 / r.bytes as f64
        );
    }
    Ok(())
}

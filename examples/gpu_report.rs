//! Machine-readable GPU training lines (the benchmark document's GPU figures come from here and from
//! `benches/peers/pytorch_gpu.py`, run in the same call on the GPU machine):
//!
//! `cargo run --release --features cuda --example gpu_report` ->
//! `train: workload=gpu-mlp backend=cuda policy=mixed_bfloat16 step_ms=... samples_per_s=... peak_device_bytes=...`
//!
//! gpu-mlp: 784 -> Linear 4096 -> GELU(tanh) -> Linear 4096 -> GELU(tanh) -> Linear 10, softmax cross-entropy,
//! AdamW (lr 1e-3, weight decay 0.01), batch 8192, f32 master weights; mixed_float16 with dynamic loss
//! scaling. The batch is staged in the arena once (as the PyTorch peer keeps it on the GPU); step time is
//! the mean of 50 steps after 10 warm-up steps, synchronised at both ends.

use std::time::Instant;

use clap::Parser;
use mantissa::cuda::CudaBackend;
use mantissa::rng::Rng;
use mantissa::{AdamW, Backend, MemoryPlan, Model, Optimizer, Policy, Shape, TrainConfig, Trainer};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 8192)]
    batch: usize,
    #[arg(long, default_value_t = 4096)]
    hidden: usize,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    #[arg(long, default_value_t = 50)]
    steps: usize,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
        let (ms, peak) = time_policy(&args, policy)?;
        println!(
            "train: workload=gpu-mlp backend=cuda policy={policy} step_ms={ms:.3} samples_per_s={:.0} peak_device_bytes={peak}",
            args.batch as f64 / ms * 1e3
        );
    }
    Ok(())
}

/// Mean step time in ms and the device bytes held, for one policy.
fn time_policy(args: &Args, policy: Policy) -> Result<(f64, usize), Box<dyn std::error::Error>> {
    let h = args.hidden;
    let model = Model::sequential(Shape::flat(784)).linear(h).gelu().linear(h).gelu().linear(10).build()?;
    let optimizer: Optimizer = AdamW::new(1e-3).weight_decay(0.01).into();
    let plan = MemoryPlan::new(&model, policy, &optimizer, args.batch)?;
    let backend = CudaBackend::new(0, plan.total)?;
    let peak = backend.device_bytes();
    let mut t = Trainer::new(backend, model, policy, optimizer, TrainConfig::new(args.batch, policy))?;
    let mut rng = Rng::new(3);
    let x: Vec<f32> = (0..args.batch * 784).map(|_| rng.next_f32()).collect();
    let y: Vec<u32> = (0..args.batch).map(|_| rng.below(10) as u32).collect();
    t.stage(&x, &y)?;
    for _ in 0..args.warmup {
        t.step_staged(args.batch)?;
    }
    t.backend_mut().synchronize()?;
    let start = Instant::now();
    for _ in 0..args.steps {
        t.step_staged(args.batch)?;
    }
    t.backend_mut().synchronize()?;
    Ok((start.elapsed().as_secs_f64() * 1e3 / args.steps as f64, peak))
}

//! Machine-readable GPU training lines (the benchmark document's GPU figures come from here and from
//! `benches/peers/pytorch_gpu.py`, run in the same call on the GPU machine):
//!
//! `cargo run --release --features cuda --example gpu_report` ->
//! `train: workload=gpu-mlp backend=cuda policy=mixed_bfloat16 mode=graph step_ms=... samples_per_s=... peak_device_bytes=...`
//!
//! Modes: `graph` queues the steps (`Trainer::queue_staged`: no host round trip; the step is recorded as a
//! CUDA graph once and replayed) and reads one report at the end; `queued` is the same without the graph (every
//! kernel launched from the host); `per-step` reads a report after every step (`Trainer::step_staged`: one
//! wait per step, as a loop that logs every loss does).
//!
//! gpu-mlp: 784 -> Linear 4096 -> GELU(tanh) -> Linear 4096 -> GELU(tanh) -> Linear 10, softmax cross-entropy,
//! AdamW (lr 1e-3, weight decay 0.01), batch 8192, f32 master weights; mixed_float16 with dynamic loss
//! scaling. The batch is staged in the arena once (as the PyTorch peer keeps it on the GPU); step time is
//! the mean of 50 steps after 10 warm-up steps, synchronised at both ends.
//!
//! The first step of each run measures the candidates of every fused GEMM (`CudaBackend::set_autotune`; off
//! with `--no-autotune`); the `lt_tune:` lines after a policy's first `train:` line say what it measured and
//! chose.
//!
//! `--policy P` and `--mode M` restrict the runs. `--profile` instead times every op of a step alone
//! (`mantissa::profile::Profiled`: a wait before and after each op, no graph) and prints, per policy,
//! `profile: policy=... op="..." calls_per_step=... ms_per_step=... share_pct=... tflops=...` rows, largest first.

use std::time::Instant;

use clap::Parser;
use mantissa::cuda::CudaBackend;
use mantissa::profile::Profiled;
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
    /// Only this policy (default: float32, mixed_bfloat16, mixed_float16).
    #[arg(long)]
    policy: Option<String>,
    /// Only this mode: graph, queued or per-step.
    #[arg(long)]
    mode: Option<String>,
    /// Time each op of a step instead (see the module documentation).
    #[arg(long)]
    profile: bool,
    /// Without a measurement, run the GELU backward inside the GEMM (cuBLASLt DGELU epilogue).
    #[arg(long)]
    fuse_act_grad: bool,
    /// Take cuBLASLt's first heuristic algorithm for each fused GEMM instead of timing the candidates at the
    /// first step (`CudaBackend::set_autotune`).
    #[arg(long)]
    no_autotune: bool,
    /// Run the classifier layer's backward composed (cuBLAS's weight gradient, then the small-k input gradient)
    /// instead of as one pass (`CudaBackend::set_fused_head`).
    #[arg(long)]
    no_fused_head: bool,
    /// Run the loss of a step composed (softmax into f32, underflow count, cast, correct count) instead of as one
    /// pass (`CudaBackend::set_fused_loss`).
    #[arg(long)]
    no_fused_loss: bool,
    /// Launch every kernel only after the previous one has finished, instead of with programmatic dependent
    /// launch (`CudaBackend::set_pdl`; on by default from sm_90).
    #[arg(long)]
    no_pdl: bool,
}

const MODES: [&str; 3] = ["graph", "queued", "per-step"];

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
    let policies = match &args.policy {
        Some(p) => vec![Policy::from_name(p)?],
        None => vec![Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16],
    };
    if let Some(m) = &args.mode {
        if !MODES.contains(&m.as_str()) {
            return Err(format!("unknown --mode {m}: use one of {MODES:?}").into());
        }
    }
    if args.profile {
        for policy in policies {
            profile(&args, policy)?;
        }
        return Ok(());
    }
    for policy in policies {
        for mode in MODES.into_iter().filter(|m| args.mode.as_deref().is_none_or(|a| a == *m)) {
            let (ms, peak, tuning) = time_policy(&args, policy, mode)?;
            println!(
                "train: workload=gpu-mlp backend=cuda policy={policy} mode={mode}{}{}{}{}{} step_ms={ms:.3} samples_per_s={:.0} peak_device_bytes={peak}",
                if args.fuse_act_grad { " fuse_act_grad=1" } else { "" },
                if args.no_autotune { " autotune=0" } else { "" },
                if args.no_fused_head { " fused_head=0" } else { "" },
                if args.no_fused_loss { " fused_loss=0" } else { "" },
                if args.no_pdl { " pdl=0" } else { "" },
                args.batch as f64 / ms * 1e3
            );
            // What the first step measured (the same for every mode: printed once per policy).
            if mode == args.mode.as_deref().unwrap_or(MODES[0]) {
                for line in tuning {
                    println!("{line} policy={policy}");
                }
            }
        }
    }
    Ok(())
}

/// A gpu-mlp trainer under `policy` on GPU 0, with its backend wrapped by `wrap`, and one batch staged.
fn staged_trainer<B: Backend>(
    args: &Args,
    policy: Policy,
    wrap: impl FnOnce(CudaBackend) -> B,
) -> Result<Trainer<B>, Box<dyn std::error::Error>> {
    let h = args.hidden;
    let model = Model::sequential(Shape::flat(784)).linear(h).gelu().linear(h).gelu().linear(10).build()?;
    let optimizer: Optimizer = AdamW::new(1e-3).weight_decay(0.01).into();
    let plan = MemoryPlan::new(&model, policy, &optimizer, args.batch)?;
    let mut backend = CudaBackend::new(0, plan.total)?;
    backend.set_fuse_act_grad(args.fuse_act_grad);
    backend.set_autotune(!args.no_autotune);
    backend.set_fused_head(!args.no_fused_head);
    backend.set_fused_loss(!args.no_fused_loss);
    backend.set_pdl(!args.no_pdl);
    let mut t = Trainer::new(wrap(backend), model, policy, optimizer, TrainConfig::new(args.batch, policy))?;
    let mut rng = Rng::new(3);
    let x: Vec<f32> = (0..args.batch * 784).map(|_| rng.next_f32()).collect();
    let y: Vec<u32> = (0..args.batch).map(|_| rng.below(10) as u32).collect();
    t.stage(&x, &y)?;
    Ok(t)
}

/// Mean step time in ms, the device bytes held and the tuning log, for one policy.
fn time_policy(
    args: &Args,
    policy: Policy,
    mode: &str,
) -> Result<(f64, usize, Vec<String>), Box<dyn std::error::Error>> {
    let mut t = staged_trainer(args, policy, |b| b)?;
    let peak = t.backend().device_bytes();
    t.set_graphs(mode == "graph");
    let steps = |t: &mut Trainer<CudaBackend>, n: usize| -> mantissa::Result<()> {
        for _ in 0..n {
            if mode == "per-step" {
                t.step_staged(args.batch)?;
            } else {
                t.queue_staged(args.batch)?;
            }
        }
        t.report().map(|_| ())
    };
    steps(&mut t, args.warmup)?;
    let start = Instant::now();
    steps(&mut t, args.steps)?;
    let ms = start.elapsed().as_secs_f64() * 1e3 / args.steps as f64;
    let r = t.report()?;
    if !r.loss.is_finite() || t.updates() == 0 {
        return Err(format!("{policy} {mode}: training went wrong: {r:?}").into());
    }
    Ok((ms, peak, t.backend().tuning_log().to_vec()))
}

/// Per-op times of one policy's step (each op alone between two waits; no graph).
fn profile(args: &Args, policy: Policy) -> Result<(), Box<dyn std::error::Error>> {
    let mut t = staged_trainer(args, policy, Profiled::new)?;
    t.set_graphs(false);
    for _ in 0..args.warmup {
        t.queue_staged(args.batch)?;
    }
    t.report()?;
    let sync = t.backend_mut().sync_overhead()?;
    t.backend_mut().start()?;
    for _ in 0..args.steps {
        t.queue_staged(args.batch)?;
    }
    t.backend_mut().stop();
    t.report()?;
    let rows = t.backend().rows();
    let total: f64 = rows.iter().map(|r| r.seconds).sum();
    let n = args.steps as f64;
    println!(
        "profile: policy={policy} ops_ms_per_step={:.3} sync_overhead_us={:.1} (each op below includes one)",
        total * 1e3 / n,
        sync * 1e6
    );
    for r in rows {
        let tflops = if r.flops > 0 { format!("{:.0}", r.flops as f64 / r.seconds / 1e12) } else { "-".into() };
        println!(
            "profile: policy={policy} op=\"{}\" calls_per_step={} ms_per_step={:.4} share_pct={:.1} tflops={tflops}",
            r.op,
            r.calls as f64 / n,
            r.seconds * 1e3 / n,
            100.0 * r.seconds / total
        );
    }
    Ok(())
}

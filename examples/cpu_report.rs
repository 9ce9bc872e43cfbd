//! Machine-readable CPU performance lines for scripts (the benchmark document's figures come from here and
//! from `benches/peers/pytorch_cpu.py`, run side by side):
//!
//! ```text
//! gemm: dtype=bf16 m=1024 n=1024 k=1024 threads=2 kernel=avx512 gflops=...
//! train: workload=cpu-mlp backend=cpu-simd policy=mixed_bfloat16 threads=2 samples_per_s=... step_ms=...
//! ```
//! `cargo run --release --example cpu_report [-- --quick] [--sizes 256,512,1024,2048] [--threads 1,2]`
//!
//! cpu-mlp: 784 -> Linear 512 -> GELU(tanh) -> Linear 512 -> GELU(tanh) -> Linear 10, softmax cross-entropy,
//! AdamW (lr 1e-3, weight decay 0.01), batch 256, f32 master weights. Times are medians of repeated windows.

use std::time::Instant;

use clap::Parser;
use mantissa::backend::Gemm;
use mantissa::cpu_simd::SimdBackend;
use mantissa::host::HostBuffer;
use mantissa::rng::Rng;
use mantissa::{
    AdamW, Arena, Backend, DType, MemoryPlan, Model, Optimizer, Policy, Reference, Shape, TrainConfig, Trainer,
};

#[derive(Parser, Debug)]
struct Args {
    /// Fewer, shorter timing windows.
    #[arg(long)]
    quick: bool,
    /// Square GEMM sizes.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048")]
    sizes: Vec<usize>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Skip the GEMM lines.
    #[arg(long)]
    no_gemm: bool,
    /// Also time the scalar reference backend's training step (slow).
    #[arg(long)]
    reference: bool,
}

fn median_secs(windows: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..windows)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..reps {
                f();
            }
            start.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let windows = if args.quick { 3 } else { 7 };
    if !args.no_gemm {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &n in &args.sizes {
                for &threads in &args.threads {
                    let gflops = gemm_gflops(dtype, n, threads, windows)?;
                    println!("{gflops}");
                }
            }
        }
    }
    for &threads in &args.threads {
        for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
            println!("{}", train_line(policy, threads, windows, false)?);
        }
    }
    if args.reference {
        for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16] {
            println!("{}", train_line(policy, 1, 3, true)?);
        }
    }
    Ok(())
}

/// `C[n, n] (f32) = A[n, n] B[n, n]` through the SIMD backend's `gemm`, A and B in `dtype`.
fn gemm_gflops(dtype: DType, n: usize, threads: usize, windows: usize) -> Result<String, Box<dyn std::error::Error>> {
    let mut arena = Arena::unbounded();
    let a = arena.alloc(dtype, n * n)?;
    let b = arena.alloc(dtype, n * n)?;
    let c = arena.alloc(DType::F32, n * n)?;
    let mut buf = HostBuffer::new(arena.high_water())?;
    let mut be = SimdBackend::new(buf.as_mut_slice(), threads)?;
    let mut rng = Rng::new(1);
    let data: Vec<f32> = (0..n * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    be.upload(a, &data)?;
    be.upload(b, &data)?;
    let g = Gemm::new(n, n, n, a, b, c);
    let reps = (2e9 / g.flops() as f64).ceil().max(1.0) as usize;
    let mut result = Ok(());
    let secs = median_secs(windows, reps, || {
        if let Err(e) = be.gemm(&g) {
            result = Err(e);
        }
    });
    result?;
    let name = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I32 => "i32",
    };
    Ok(format!(
        "gemm: dtype={name} m={n} n={n} k={n} threads={threads} kernel={} gflops={:.1}",
        be.kernel().name(),
        g.flops() as f64 / secs / 1e9
    ))
}

fn train_line(
    policy: Policy,
    threads: usize,
    windows: usize,
    reference: bool,
) -> Result<String, Box<dyn std::error::Error>> {
    const BATCH: usize = 256;
    let model = Model::sequential(Shape::flat(784)).linear(512).gelu().linear(512).gelu().linear(10).build()?;
    let optimizer: Optimizer = AdamW::new(1e-3).weight_decay(0.01).into();
    let plan = MemoryPlan::new(&model, policy, &optimizer, BATCH)?;
    let mut buf = HostBuffer::new(plan.total)?;
    let mut rng = Rng::new(2);
    let x: Vec<f32> = (0..BATCH * 784).map(|_| rng.next_f32()).collect();
    let y: Vec<u32> = (0..BATCH).map(|_| rng.below(10) as u32).collect();
    let config = TrainConfig::new(BATCH, policy);
    let (secs, backend) = if reference {
        let mut t = Trainer::new(Reference::new(buf.as_mut_slice()), model, policy, optimizer, config)?;
        (time_steps(&mut t, &x, &y, windows)?, "reference")
    } else {
        let be = SimdBackend::new(buf.as_mut_slice(), threads)?;
        let mut t = Trainer::new(be, model, policy, optimizer, config)?;
        (time_steps(&mut t, &x, &y, windows)?, "cpu-simd")
    };
    Ok(format!(
        "train: workload=cpu-mlp backend={backend} policy={policy} threads={threads} samples_per_s={:.0} step_ms={:.3}",
        BATCH as f64 / secs,
        secs * 1e3
    ))
}

fn time_steps<B: Backend>(t: &mut Trainer<B>, x: &[f32], y: &[u32], windows: usize) -> mantissa::Result<f64> {
    for _ in 0..3 {
        t.step(x, y)?;
    }
    let mut result = Ok(());
    let secs = median_secs(windows, 10, || {
        if let Err(e) = t.step(x, y) {
            result = Err(e);
        }
    });
    result.map(|_| secs)
}

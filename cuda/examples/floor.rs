//! The least a gpu-mlp training step can take with mantissa's own GEMMs, timed the way `gpu_report` times the
//! step: the work no implementation on cuBLASLt can leave out, recorded as one CUDA graph and replayed.
//!
//! - `gemms`: the step's five large products, plain (no epilogue), 16-bit inputs, f32 accumulation, each on the
//!   algorithm the autotuner picks for it (as `Backend::gemm` does in the step): the two forward products
//!   (16-bit out), the second layer's input gradient (16-bit out) and the two weight gradients (f32 out).
//! - `adamw`: the fused AdamW update over the step's 20.04 M parameters (f32 master, moments and gradient, the
//!   16-bit working copy written).
//! - `bytes`: the 335.5 MB a step moves besides those even with every element-wise pass fused into a GEMM or
//!   the classifier kernel (`benches/peers/pytorch_floor.py` lists them), as a 16-bit copy kernel (the cast).
//! - `all`: the three in one graph.
//! - `fused`: the same with the epilogues cuBLASLt offers, as the step asks for them (`Backend::gemm_fused`,
//!   autotuned: layer 1's bias + GELU writing the pre-activation, layer 2's bias, the GELU backward with
//!   layer 1's bias gradient after the input-gradient product, each on its fastest form), AdamW, and only the
//!   bytes that are then left for a perfect classifier kernel: layer 2's pre-activation read by its forward
//!   and its backward, and its input gradient written (201.3 MB). What the step does besides this is the
//!   classifier's arithmetic, the loss and the step control.
//!
//! `cargo run --release -p mantissa-cuda --example floor -- --dtype bf16` prints
//! `floor: dtype=bf16 part=P step_ms=... warmup=W steps=N` per part (the mean of N replays after W warm-up
//! replays, synchronised at both ends, as `gpu_report`'s graph mode), then the autotuner's choices.

use std::time::Instant;

use clap::Parser;
use mantissa_core::backend::{Activation, Epilogue, Gemm, ParamBufs};
use mantissa_core::optim::AdamW;
use mantissa_core::rng::Rng;
use mantissa_core::{Arena, Backend, Buf, DType};
use mantissa_cuda::CudaBackend;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16"])]
    dtype: String,
    #[arg(long, default_value_t = 30)]
    warmup: usize,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Only this part (default: every part).
    #[arg(long, value_parser = ["gemms", "adamw", "bytes", "all", "fused"])]
    part: Option<String>,
}

const ROWS: usize = 8192;
const IN: usize = 784;
const HIDDEN: usize = 4096;
const OUT: usize = 10;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let args = Args::parse();
    let dt = match args.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        d => return Err(format!("--dtype {d}: bf16 or f16")),
    };
    let mut be = CudaBackend::new(0, 2 << 30).map_err(|e| format!("no GPU ({e})"))?;
    let mut arena = Arena::new(be.capacity());
    let mut rng = Rng::new(11);
    let mut buf = |be: &mut CudaBackend, dtype: DType, len: usize, lo: f32, hi: f32| -> Result<Buf, String> {
        let b = arena.alloc(dtype, len).map_err(|e| e.to_string())?;
        let v: Vec<f32> = (0..len).map(|_| rng.uniform(lo, hi)).collect();
        be.upload(b, &v).map_err(|e| e.to_string())?;
        Ok(b)
    };
    let params = HIDDEN * IN + HIDDEN + HIDDEN * HIDDEN + HIDDEN + OUT * HIDDEN + OUT;
    // The operands hold what a step's would at its start, and stay so: tensor cores draw more or less power
    // (and so run at other clocks under the board's limit) for other values. The batch as gpu_report's
    // (uniform in [0, 1)); weights and biases as PyTorch initialises them (uniform in +-1/sqrt(fan_in)); layer 1's
    // output and pre-activation and its input gradient computed from them below; layer 2's output gradient
    // of the size a step's has (the loss gradient 1/8192 through the classifier, ~3e-6; times 2^16, the
    // dynamic loss scale's start, in f16). AdamW updates its own copies, so the GEMMs' operands do not drift.
    let x = buf(&mut be, dt, ROWS * IN, 0.0, 1.0)?;
    let h1 = buf(&mut be, dt, ROWS * HIDDEN, 0.0, 0.0)?;
    let z = buf(&mut be, dt, ROWS * HIDDEN, 0.0, 0.0)?;
    let dz_amp = if dt == DType::F16 { 0.2 } else { 3e-6 };
    let dz2 = buf(&mut be, dt, ROWS * HIDDEN, -dz_amp, dz_amp)?;
    let dz1 = buf(&mut be, dt, ROWS * HIDDEN, 0.0, 0.0)?;
    let dh1 = buf(&mut be, dt, ROWS * HIDDEN, 0.0, 0.0)?;
    let z1 = buf(&mut be, dt, ROWS * HIDDEN, 0.0, 0.0)?;
    let db1 = buf(&mut be, DType::F32, HIDDEN, 0.0, 0.0)?;
    let (b_in, b_hid) = (1.0 / (IN as f32).sqrt(), 1.0 / (HIDDEN as f32).sqrt());
    let w1 = buf(&mut be, dt, HIDDEN * IN, -b_in, b_in)?;
    let b1 = buf(&mut be, dt, HIDDEN, -b_in, b_in)?;
    let w2 = buf(&mut be, dt, HIDDEN * HIDDEN, -b_hid, b_hid)?;
    let b2 = buf(&mut be, dt, HIDDEN, -b_hid, b_hid)?;
    let master = buf(&mut be, DType::F32, params, -b_hid, b_hid)?;
    let working = buf(&mut be, dt, params, -b_hid, b_hid)?;
    let grad = buf(&mut be, DType::F32, params, -1e-3, 1e-3)?;
    let m = buf(&mut be, DType::F32, params, -1e-4, 1e-4)?;
    let v = buf(&mut be, DType::F32, params, 0.0, 1e-6)?;
    // 335.5 MB read and written half and half by the 16-bit cast kernel; the fused variant copies 3/5 of it.
    let moved = 335_544_320 / 2 / 2;
    let copy_src = buf(&mut be, dt, moved, -1.0, 1.0)?;
    let copy_dst = buf(&mut be, dt, moved, 0.0, 0.0)?;
    let head_moved = moved / 5 * 3;
    // The gradient's layout: W1, b1, W2, b2, W3, b3 (f32).
    let (w1_at, w2_at) = (0, HIDDEN * IN + HIDDEN);
    let dw1 = grad.slice(w1_at, HIDDEN * IN);
    let dw2 = grad.slice(w2_at, HIDDEN * HIDDEN);
    let gelu = Activation::GeluTanh;
    let fused_gemms = [
        // h1 = GELU(z1), z1 = x W1^T + b1
        (Gemm::new(ROWS, HIDDEN, IN, x, w1, h1).b_t(IN), Some(Epilogue::BiasAct { bias: b1, act: gelu, pre: z1 })),
        // z2 = h1 W2^T + b2
        (Gemm::new(ROWS, HIDDEN, HIDDEN, h1, w2, z).b_t(HIDDEN), Some(Epilogue::Bias { bias: b2 })),
        // dW2 = dz2^T h1
        (Gemm::new(HIDDEN, HIDDEN, ROWS, dz2, h1, dw2).a_t(HIDDEN), None),
        // dz1 = (dz2 W2) * GELU'(z1), db1 = sum_rows dz1
        (
            Gemm::new(ROWS, HIDDEN, HIDDEN, dz2, w2, dz1),
            Some(Epilogue::ActGrad { act: gelu, pre: z1, dbias: Some(db1) }),
        ),
        // dW1 = dz1^T x
        (Gemm::new(HIDDEN, IN, ROWS, dz1, x, dw1).a_t(HIDDEN), None),
    ];
    let gemms = [
        // z1 = x W1^T
        Gemm::new(ROWS, HIDDEN, IN, x, w1, z).b_t(IN),
        // z2 = h1 W2^T
        Gemm::new(ROWS, HIDDEN, HIDDEN, h1, w2, z).b_t(HIDDEN),
        // dW2 = dz2^T h1
        Gemm::new(HIDDEN, HIDDEN, ROWS, dz2, h1, dw2).a_t(HIDDEN),
        // dh1 = dz2 W2
        Gemm::new(ROWS, HIDDEN, HIDDEN, dz2, w2, dh1),
        // dW1 = dz1^T x
        Gemm::new(HIDDEN, IN, ROWS, dz1, x, dw1).a_t(HIDDEN),
    ];
    let p = ParamBufs { master, working, grad, state1: m, state2: v };
    // gpu_report's optimizer, at its first update.
    let adamw = AdamW::new(1e-3).weight_decay(0.01);
    let err = |e: mantissa_core::Error| e.to_string();
    let part_gemms = |be: &mut CudaBackend| -> Result<(), String> {
        for g in &gemms {
            be.gemm(g).map_err(err)?;
        }
        Ok(())
    };
    let part_adamw = |be: &mut CudaBackend| adamw.step(be, &p, 1, 1.0).map_err(err);
    let part_bytes = |be: &mut CudaBackend| be.cast(copy_src, copy_dst).map_err(err);
    let fused = |be: &mut CudaBackend| -> Result<(), String> {
        for (g, ep) in &fused_gemms {
            match ep {
                Some(ep) => be.gemm_fused(g, ep).map_err(err)?,
                None => be.gemm(g).map_err(err)?,
            }
        }
        part_adamw(be)?;
        be.cast(copy_src.prefix(head_moved), copy_dst.prefix(head_moved)).map_err(err)
    };
    // The first calls tune the GEMMs (eagerly: the autotuner does not time while recording). The fused
    // variant's last run leaves h1, z1 and dz1 as a step computes them from x, the weights and dz2.
    part_gemms(&mut be)?;
    fused(&mut be)?;
    be.synchronize().map_err(err)?;
    type Part<'a> = &'a dyn Fn(&mut CudaBackend) -> Result<(), String>;
    let all = |be: &mut CudaBackend| -> Result<(), String> {
        part_gemms(be)?;
        part_adamw(be)?;
        part_bytes(be)
    };
    let parts: [(&str, Part); 5] =
        [("gemms", &part_gemms), ("adamw", &part_adamw), ("bytes", &part_bytes), ("all", &all), ("fused", &fused)];
    for (name, f) in parts {
        if args.part.as_deref().is_some_and(|p| p != name) {
            continue;
        }
        if !be.record_begin().map_err(err)? {
            return Err("this backend does not record graphs".into());
        }
        let recorded = f(&mut be);
        let id = be.record_end(recorded.is_ok()).map_err(err)?;
        recorded?;
        let id = id.ok_or("the recording was not kept")?;
        for _ in 0..args.warmup {
            be.replay(id).map_err(err)?;
        }
        be.synchronize().map_err(err)?;
        let start = Instant::now();
        for _ in 0..args.steps {
            be.replay(id).map_err(err)?;
        }
        be.synchronize().map_err(err)?;
        let ms = start.elapsed().as_secs_f64() * 1e3 / args.steps.max(1) as f64;
        println!("floor: dtype={} part={name} step_ms={ms:.4} warmup={} steps={}", args.dtype, args.warmup, args.steps);
        be.clear_recordings();
    }
    for line in be.tuning_log() {
        println!("{line}");
    }
    Ok(())
}

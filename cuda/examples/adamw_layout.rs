//! Memory layouts of the fused AdamW update on gpu-mlp's 20.04 M parameters (f32 master, moments and gradient,
//! bf16 working copy: ~30 bytes a parameter), against the production kernel (`adamw8_bf16` in
//! `kernels/optim.cu`) launched as one wave of at most 4 blocks an SM (`vs_production` is against this first
//! row: how `CudaBackend::optim` launched it before this example) and as one pass a thread (how it launches it
//! now), and a plain copy of the same bytes:
//!
//! `cargo run --release -p mantissa-cuda --example adamw_layout` prints one line per kernel:
//! `adamw_layout: kernel=... blocks=... ms=... tb_s=... vs_production=... same_bits=...`, where `tb_s` is the
//! bytes moved over the time, `same_bits` whether one update from the same state gives the production kernel's
//! master weights, moments and working copy bit for bit. Each time is the median of 15 single launches between
//! CUDA events, after 3 warm-up launches. The variants are described in `examples/adamw_layout.cu`.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::CompileOptions;

/// 20,037,642 rounded down to whole quads (the layouts have no scalar tail).
const N: usize = 20_037_640;

/// Master weights, working copy, first and second moments after one update.
type Result4 = (Vec<f32>, Vec<u16>, Vec<f32>, Vec<f32>);

struct State {
    master: CudaSlice<f32>,
    working: CudaSlice<u16>,
    grad: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("adamw_layout: {e}");
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = match CudaContext::new(0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("adamw_layout: no GPU ({e:?})");
            return Ok(());
        }
    };
    let stream = ctx.default_stream();
    let sms = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
    let src = format!(
        "{}\n#define CTL_LAST_APPLIED {}\n#define CTL_GRAD_MUL {}\n#define CTL_BIAS_CORRECTION1 {}\n\
         #define CTL_BIAS_CORRECTION2 {}\n{}\n{}",
        include_str!("../kernels/common.cuh"),
        mantissa_core::control::LAST_APPLIED,
        mantissa_core::control::GRAD_MUL,
        mantissa_core::control::BIAS_CORRECTION1,
        mantissa_core::control::BIAS_CORRECTION2,
        include_str!("../kernels/optim.cu"),
        include_str!("adamw_layout.cu"),
    );
    // The backend's options (kernels.rs): no contraction, IEEE division and square root.
    let opts = CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(false),
        arch: Some("sm_90"),
        ..Default::default()
    };
    let module = ctx.load_module(cudarc::nvrtc::compile_ptx_with_opts(src, opts)?)?;

    // The initial state, kept to restore before each bit check.
    let mut rng = mantissa_core::rng::Rng::new(5);
    let mut host = |amp: f32| -> Vec<f32> { (0..N).map(|_| rng.uniform(-amp, amp)).collect() };
    let (w0, g0, m0) = (host(0.05), host(1e-3), host(1e-4));
    let v0: Vec<f32> = host(1e-6).iter().map(|x| x.abs()).collect();
    let init = |stream: &Arc<CudaStream>| -> Result<State, Box<dyn std::error::Error>> {
        Ok(State {
            master: stream.clone_htod(&w0)?,
            working: stream.alloc_zeros::<u16>(N)?,
            grad: stream.clone_htod(&g0)?,
            m: stream.clone_htod(&m0)?,
            v: stream.clone_htod(&v0)?,
        })
    };
    // AdamW at step 3, lr 1e-3, weight decay 0.01 (the scalars the host derives).
    let (lr, b1, b2, eps, wd, t) = (1e-3f32, 0.9f32, 0.999f32, 1e-8f32, 0.01f32, 3);
    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    let scalars = [lr / bc1, bc2.sqrt(), 1.0 - lr * wd, b1, b2, eps, 1.0f32];
    let n = N as u64;
    let write = 1i32;
    // (kernel, blocks, takes write_working): the production kernel (8 parameters a thread a pass) as
    // CudaBackend::optim launched it until this example and as it launches it now, then the layouts (their blocks per SM are their
    // __launch_bounds__ minimum: one wave), one of them also as many blocks as one pass needs.
    let one_pass = (N / 4).div_ceil(2 * 256) as u32;
    let kernels: [(&str, u32, bool); 11] = [
        // Until this example: one wave of at most 4 blocks an SM (now CudaBackend::optim launches one pass a
        // thread, as the third row does for the same loads).
        ("adamw8_bf16", (N.div_ceil(8 * 256) as u32).clamp(1, 4 * sms), true),
        ("adamw8_bf16", N.div_ceil(8 * 256) as u32, true),
        ("adamw_lay_q2_strided", 4 * sms, false),
        ("adamw_lay_q2_strided", one_pass, false),
        ("adamw_lay_q2_contig", 4 * sms, false),
        ("adamw_lay_q1_contig_8", 8 * sms, false),
        ("adamw_lay_q4_contig_2", 2 * sms, false),
        ("adamw_lay_q4_strided_2", 2 * sms, false),
        ("adamw_lay_q2_strided_pf", 4 * sms, false),
        ("adamw_lay_q2_contig_pf", 4 * sms, false),
        ("adamw_lay_q4_contig_2_pf", 2 * sms, false),
    ];
    let launch =
        |f: &CudaFunction, s: &mut State, blocks: u32, production: bool| -> Result<(), Box<dyn std::error::Error>> {
            let mut b = stream.launch_builder(f);
            b.arg(&mut s.master).arg(&mut s.working).arg(&s.grad).arg(&mut s.m).arg(&mut s.v).arg(&n);
            for x in &scalars {
                b.arg(x);
            }
            if production {
                b.arg(&write);
            }
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments match the kernels' parameters (optim.cu, adamw_layout.cu); every array holds N
            // elements.
            unsafe { b.launch(cfg) }?;
            Ok(())
        };
    let bytes = N as f64 * 30.0;
    let time = |f: &dyn Fn() -> Result<(), Box<dyn std::error::Error>>| -> Result<f64, Box<dyn std::error::Error>> {
        for _ in 0..3 {
            f()?;
        }
        let mut t = Vec::new();
        for _ in 0..15 {
            let a = stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            f()?;
            let b = stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            b.synchronize()?;
            t.push(a.elapsed_ms(&b)? as f64);
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    };
    // The copy: 15 bytes of every parameter's 30 read, 15 written.
    {
        let copy = module.load_function("copy_quads")?;
        let half = N * 30 / 8 / 4 * 4;
        let (src, dst) = (stream.alloc_zeros::<f32>(half)?, stream.alloc_zeros::<f32>(half)?);
        let hn = half as u64;
        let ms = time(&|| {
            let mut b = stream.launch_builder(&copy);
            b.arg(&src).arg(&dst).arg(&hn);
            let cfg = LaunchConfig { grid_dim: (4 * sms, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: copy_quads(src, dst, n) over two arrays of `half` f32.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })?;
        println!(
            "adamw_layout: kernel=copy_quads blocks={} ms={ms:.4} tb_s={:.2}",
            4 * sms,
            (half * 8) as f64 / ms / 1e9
        );
    }
    // The production kernel's result after one update from the initial state.
    let mut reference: Option<Result4> = None;
    let mut production_ms = 0.0;
    for (name, blocks, production) in kernels {
        let f = module.load_function(name)?;
        let mut s = init(&stream)?;
        launch(&f, &mut s, blocks, production)?;
        let got = (
            stream.clone_dtoh(&s.master)?,
            stream.clone_dtoh(&s.working)?,
            stream.clone_dtoh(&s.m)?,
            stream.clone_dtoh(&s.v)?,
        );
        let same = match &reference {
            None => {
                reference = Some(got);
                true
            }
            Some(r) => {
                let bits = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                bits(&r.0, &got.0) && r.1 == got.1 && bits(&r.2, &got.2) && bits(&r.3, &got.3)
            }
        };
        let cell = std::cell::RefCell::new(s);
        let ms = time(&|| launch(&f, &mut cell.borrow_mut(), blocks, production))?;
        if production_ms == 0.0 {
            production_ms = ms;
        }
        println!(
            "adamw_layout: kernel={name} blocks={blocks} ms={ms:.4} tb_s={:.2} vs_production={:.3} same_bits={same}",
            bytes / ms / 1e9,
            ms / production_ms
        );
    }
    Ok(())
}

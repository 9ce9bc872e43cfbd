//! `CudaBackend::gemm_fused` (cuBLASLt epilogues) against the reference running `gemm_fused_composed`, the
//! specification, on identical inputs: every `Epilogue` variant, bf16 and f16, the two operand layouts the
//! Linear layer uses, odd and real sizes; then GELU's form inside cuBLASLt, and the composed fallbacks and errors.
//!
//! Tolerances are written per element from the exact (f64) product `p = AB` and `s = sum |a b|`:
//! - the GEMM: accumulation order, `(k + 2) 4 u32 s`, as in `ops.rs`;
//! - 16-bit roundings: the reference rounds every intermediate (`AB`, `AB + bias`, then the activation) where
//!   cuBLASLt rounds once, so each stored value may differ by the intermediate roundings it saw, `u(dt) |x|` each,
//!   carried through the activation (|GELU'| <= 1.13, |GELU''| small), plus one rounding of the result;
//! - the activation in f32 inside the epilogue: cuBLASLt's GELU may use the hardware tanh approximation
//!   (relative error about 2^-11), so GELU gets `2.5e-4 |x|` and its derivative `6e-4 (1 + |x| (1 + 0.15 x^2))`
//!   times `|AB|`; the printed maxima say what the H200 actually does.
//! - the bias gradient: the sum of the per-element bounds of its column, plus f32 summation order.

mod common;

use common::{act_derivative, rig_without_autotune as rig, u, Both};
use mantissa_core::backend::{gemm_fused_composed, Activation, Epilogue, Gemm};
use mantissa_core::{Arena, Backend, Buf, DType};

const GELU_S: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)
const GELU_C: f64 = 0.044_715;

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + (GELU_S * (x + GELU_C * x * x * x)).tanh())
}

/// erf by Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7): enough to tell the two GELU forms apart.
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let y = 1.0
        - t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))))
            * (-x * x).exp();
    y.copysign(x)
}

fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

fn gelu_erf_grad(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2)) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// Slack for the activation's f32 implementation inside the epilogue (see the module comment).
fn act_slack(act: Activation, x: f64) -> (f64, f64) {
    match act {
        Activation::Relu => (0.0, 0.0),
        Activation::GeluTanh => (2.5e-4 * x.abs(), 6e-4 * (1.0 + x.abs() * (1.0 + 0.15 * x * x))),
    }
}

/// The two operand layouts of `layers/linear.rs`: the forward pass (`A = x [m, k]`, `B = W [n, k]` read
/// transposed) and the input gradient (`A = dy [m, k]`, `B = W [k, n]` as stored).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    Forward,
    InputGrad,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Bias,
    BiasAct(Activation),
    /// The bias gradient's dtype, or none.
    ActGrad(Activation, Option<DType>),
}

/// Runs one fused GEMM on both sides, compares every output, and says whether cuBLASLt ran it.
fn case(t: &mut Both, dt: DType, vt: DType, (m, n, k): (usize, usize, usize), layout: Layout, kind: Kind) -> bool {
    let what = format!("{kind:?} {dt} vector {vt} {m}x{n}x{k} {layout:?}");
    // Products of about unit size, so the GELU sees its curved part: std(AB) ~ 2.
    let r = 6.0 / (k as f32).sqrt();
    let a = t.random(dt, m * k, -1.0, 1.0);
    let b = t.random(dt, n * k, -r, r);
    let c = t.nans(dt, m * n);
    let g = match layout {
        Layout::Forward => Gemm::new(m, n, k, a, b, c).b_t(k),
        Layout::InputGrad => Gemm::new(m, n, k, a, b, c),
    };
    let (_, av) = t.get(a);
    let (_, bv) = t.get(b);
    // bt[j * k + q] = op(B)[q, j]
    let bt: Vec<f64> = (0..n * k)
        .map(|x| {
            let (j, q) = (x / k, x % k);
            (if layout == Layout::Forward { bv[j * k + q] } else { bv[q * n + j] }) as f64
        })
        .collect();
    let (mut p, mut e) = (vec![0.0f64; m * n], vec![0.0f64; m * n]);
    for i in 0..m {
        let ar = &av[i * k..(i + 1) * k];
        for j in 0..n {
            let br = &bt[j * k..(j + 1) * k];
            let (mut sum, mut abs) = (0.0, 0.0);
            for (&x, &y) in ar.iter().zip(br) {
                sum += x as f64 * y;
                abs += (x as f64 * y).abs();
            }
            p[i * n + j] = sum;
            e[i * n + j] = (k as f64 + 2.0) * 4.0 * u(DType::F32) * abs + 1e-7;
        }
    }
    let ud = u(dt);
    let before = t.gpu.fused_epilogue_calls();
    match kind {
        Kind::Bias => {
            let bias = t.random(vt, n, -1.0, 1.0);
            let (_, bvv) = t.get(bias);
            let ep = Epilogue::Bias { bias };
            t.gpu.gemm_fused(&g, &ep).unwrap();
            t.re.gemm_fused(&g, &ep).unwrap();
            let tol = |i: usize, y: f32| e[i] + 2.0 * ud * (p[i].abs() + (bvv[i % n] as f64).abs() + (y as f64).abs());
            t.compare_with(c, &format!("{what}: C"), tol);
        }
        Kind::BiasAct(act) => {
            let bias = t.random(vt, n, -1.0, 1.0);
            let (_, bvv) = t.get(bias);
            let pre = t.nans(dt, m * n);
            let ep = Epilogue::BiasAct { bias, act, pre };
            t.gpu.gemm_fused(&g, &ep).unwrap();
            t.re.gemm_fused(&g, &ep).unwrap();
            let (_, pre_ref) = t.get(pre);
            let tol_pre: Vec<f64> = (0..m * n)
                .map(|i| e[i] + 2.0 * ud * (p[i].abs() + (bvv[i % n] as f64).abs() + (pre_ref[i] as f64).abs()))
                .collect();
            t.compare_with(pre, &format!("{what}: pre-activation"), |i, _| tol_pre[i]);
            t.compare_with(c, &format!("{what}: C"), |i, y| {
                1.2 * tol_pre[i] + 2.0 * ud * (y as f64).abs() + act_slack(act, pre_ref[i] as f64).0 + 1e-7
            });
        }
        Kind::ActGrad(act, dbias_dt) => {
            let pre = t.random(dt, m * n, -4.0, 4.0);
            let (_, xv) = t.get(pre);
            let dbias = dbias_dt.map(|d| t.nans(d, n));
            let ep = Epilogue::ActGrad { act, pre, dbias };
            t.gpu.gemm_fused(&g, &ep).unwrap();
            t.re.gemm_fused(&g, &ep).unwrap();
            let (_, cref) = t.get(c);
            let tol_c: Vec<f64> = (0..m * n)
                .map(|i| {
                    let x = xv[i] as f64;
                    let d = act_derivative(act, x).abs() + 1e-3;
                    d * (e[i] + 2.0 * ud * p[i].abs())
                        + 2.0 * ud * (cref[i] as f64).abs()
                        + act_slack(act, x).1 * p[i].abs()
                        + 1e-7
                })
                .collect();
            t.compare_with(c, &format!("{what}: C"), |i, _| tol_c[i]);
            if let (Some(db), Some(d)) = (dbias, dbias_dt) {
                let tol_db: Vec<f64> = (0..n)
                    .map(|j| {
                        let (mut bound, mut abs) = (0.0, 0.0);
                        for i in 0..m {
                            bound += tol_c[i * n + j];
                            abs += (cref[i * n + j] as f64).abs();
                        }
                        bound + m as f64 * 4.0 * u(DType::F32) * abs + 1e-6
                    })
                    .collect();
                t.compare_with(db, &format!("{what}: dbias"), |j, y| tol_db[j] + 2.0 * u(d) * (y as f64).abs());
            }
        }
    }
    let fused = t.gpu.fused_epilogue_calls() > before;
    println!("case: {what}: path={}", if fused { "cublaslt" } else { "composed" });
    fused
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn fused_epilogues_match_the_composed_reference() {
    let Some(mut t) = rig() else { return };
    t.gpu.set_fuse_act_grad(true);
    let gelu = Activation::GeluTanh;
    // Odd, small-but-real, and the gpu-mlp's first layer with 256 rows instead of 8192 (the reference is scalar).
    for shape in [(7, 24, 13), (64, 40, 72), (256, 512, 784)] {
        for dt in [DType::BF16, DType::F16, DType::F32] {
            for layout in [Layout::Forward, Layout::InputGrad] {
                // Vectors in the compute dtype (what the layers pass), then in f32.
                for vt in if dt == DType::F32 { vec![dt] } else { vec![dt, DType::F32] } {
                    let kinds =
                        [Kind::Bias, Kind::BiasAct(gelu), Kind::ActGrad(gelu, None), Kind::ActGrad(gelu, Some(vt))];
                    for kind in kinds {
                        if vt == DType::F32 && kind == Kind::ActGrad(gelu, None) {
                            continue; // has no vector: already run
                        }
                        let fused = case(&mut t, dt, vt, shape, layout, kind);
                        // Every operand 16-byte aligned with n % 8 == 0 and the default vector dtype: cuBLASLt must
                        // take it (the odd k = 13 leaves A's rows 2-byte aligned: cuBLASLt may decline, so no claim).
                        // f32: the bias inside cuBLASLt, the GELU (forward and backward) as the backend's kernels.
                        let strict_act_grad = dt == DType::F32 && matches!(kind, Kind::ActGrad(..));
                        if shape.2 % 8 == 0 && vt == dt && !strict_act_grad {
                            assert!(fused, "{kind:?} {dt} {shape:?} {layout:?} was expected to run in cuBLASLt");
                        }
                    }
                }
                t.arena = Arena::new(t.arena.capacity());
            }
        }
    }
}

/// cuBLASLt's GELU epilogues against the tanh form and the erf form, on a GEMM that reproduces its input
/// exactly (`A = [x | 0]`, `B = [1; 0]`), so that only the epilogue differs: the tanh form must hold within one
/// rounding of the output plus the f32 activation slack; the mean distances to both forms are printed.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn cublaslt_gelu_is_the_tanh_form() {
    let Some(mut t) = rig() else { return };
    t.gpu.set_fuse_act_grad(true);
    let (m, n, k) = (4096, 8, 8);
    for dt in [DType::BF16, DType::F16] {
        let xs: Vec<f32> = (0..m).map(|i| dt.round(-5.0 + 10.0 * i as f32 / (m - 1) as f32)).collect();
        let (mut av, mut bv) = (vec![0.0f32; m * k], vec![0.0f32; k * n]);
        for (i, &x) in xs.iter().enumerate() {
            av[i * k] = x;
        }
        bv[..n].fill(1.0);
        let (a, b, c) = (t.alloc(dt, m * k), t.alloc(dt, k * n), t.nans(dt, m * n));
        t.upload(a, &av);
        t.upload(b, &bv);
        let g = Gemm::new(m, n, k, a, b, c);
        let (bias, pre) = (t.alloc(dt, n), t.nans(dt, m * n));
        t.upload(bias, &[0.0; 8]);
        let before = t.gpu.fused_epilogue_calls();
        let ep = Epilogue::BiasAct { bias, act: Activation::GeluTanh, pre };
        t.gpu.gemm_fused(&g, &ep).unwrap();
        t.re.gemm_fused(&g, &ep).unwrap();
        t.exact(pre, &format!("gelu {dt}: pre-activation (= x exactly)"));
        let (cg, _) = t.get(c);
        // The derivative: A = [1 | 0] makes AB = 1, so C = GELU'(pre) with pre = x.
        let ones: Vec<f32> = (0..m * k).map(|i| if i % k == 0 { 1.0 } else { 0.0 }).collect();
        t.upload(a, &ones);
        t.upload(pre, &xs.iter().flat_map(|&x| [x; 8]).collect::<Vec<_>>());
        let ep = Epilogue::ActGrad { act: Activation::GeluTanh, pre, dbias: None };
        t.gpu.gemm_fused(&g, &ep).unwrap();
        t.re.gemm_fused(&g, &ep).unwrap();
        let (dg, _) = t.get(c);
        assert_eq!(t.gpu.fused_epilogue_calls(), before + 2, "both GELU epilogues must run in cuBLASLt");
        for (name, out, tanh_form, erf_form, slack) in [
            ("GELU", &cg, gelu_tanh as fn(f64) -> f64, gelu_erf as fn(f64) -> f64, 0),
            ("GELU'", &dg, |x| act_derivative(Activation::GeluTanh, x), gelu_erf_grad, 1),
        ] {
            let (mut worst, mut d_tanh, mut d_erf) = (0.0f64, 0.0f64, 0.0f64);
            for (i, &x) in xs.iter().enumerate() {
                let (x, y) = (x as f64, out[i * n] as f64);
                let tol = 2.0 * u(dt) * tanh_form(x).abs()
                    + if slack == 0 {
                        act_slack(Activation::GeluTanh, x).0
                    } else {
                        act_slack(Activation::GeluTanh, x).1
                    }
                    + 1e-7;
                let dev = (y - tanh_form(x)).abs();
                assert!(
                    dev <= tol,
                    "{name} {dt} at x = {x}: cuBLASLt {y} vs tanh form {}: {dev:e} > {tol:e}",
                    tanh_form(x)
                );
                worst = worst.max(dev);
                d_tanh += dev;
                d_erf += (y - erf_form(x)).abs();
            }
            let (d_tanh, d_erf) = (d_tanh / m as f64, d_erf / m as f64);
            println!(
                "{name} {dt}: max |cublaslt - tanh form| = {worst:e}; mean distance to the tanh form {d_tanh:e}, to the erf form {d_erf:e}"
            );
            // f16 resolves the two forms (they differ by up to 4.7e-4 near x = -2.7, where GELU is -0.01); bf16's
            // rounding mostly hides the difference, so it is only printed.
            if dt == DType::F16 {
                assert!(d_tanh < d_erf, "{name}: cuBLASLt's GELU is closer to the erf form than to the tanh form");
            }
        }
        t.arena = Arena::new(t.arena.capacity());
    }
}

/// What cuBLASLt does not take runs composed (same results as the reference, bit for bit where the ops are
/// exact), and bad handles are the composed version's errors.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn relu_f32_odd_n_run_composed_and_bad_handles_are_errors() {
    let Some(mut t) = rig() else { return };
    let (relu, gelu) = (Activation::Relu, Activation::GeluTanh);
    let before = t.gpu.fused_epilogue_calls();
    // ActGrad by default (set_fuse_act_grad is off).
    for kind in
        [Kind::ActGrad(gelu, Some(DType::F32)), Kind::ActGrad(gelu, Some(DType::BF16)), Kind::ActGrad(gelu, None)]
    {
        assert!(!case(&mut t, DType::BF16, DType::BF16, (64, 40, 72), Layout::InputGrad, kind));
    }
    // From here on ActGrad may fuse: what follows must still be composed.
    t.gpu.set_fuse_act_grad(true);
    // ReLU epilogues, bf16.
    for kind in [Kind::BiasAct(relu), Kind::ActGrad(relu, Some(DType::F32)), Kind::ActGrad(relu, None)] {
        assert!(!case(&mut t, DType::BF16, DType::BF16, (64, 40, 72), Layout::Forward, kind));
    }
    // f32 GEMMs: the GELU backward stays composed (cuBLASLt's GELU is not strict f32).
    assert!(!case(
        &mut t,
        DType::F32,
        DType::F32,
        (64, 40, 72),
        Layout::InputGrad,
        Kind::ActGrad(gelu, Some(DType::F32))
    ));
    // n = 7: the aux matrix's leading dimension is not a multiple of 8.
    for kind in [Kind::BiasAct(gelu), Kind::ActGrad(gelu, Some(DType::F32))] {
        assert!(!case(&mut t, DType::F16, DType::F16, (9, 7, 16), Layout::Forward, kind));
    }
    assert_eq!(t.gpu.fused_epilogue_calls(), before);
    t.arena = Arena::new(t.arena.capacity());

    // Errors: the same error kind on both sides.
    let (m, n, k) = (8, 16, 8);
    let a = t.random(DType::BF16, m * k, -1.0, 1.0);
    let b = t.random(DType::BF16, k * n, -1.0, 1.0);
    let c = t.alloc(DType::BF16, m * n);
    let pre = t.alloc(DType::BF16, m * n);
    let bias = t.random(DType::BF16, n, -1.0, 1.0);
    let g = Gemm::new(m, n, k, a, b, c);
    // Past the end of both arenas (the reference's is a little larger than the GPU's).
    let outside = Buf { offset: t.gpu.capacity().max(t.re.capacity()) - 16, len: n, dtype: DType::BF16 };
    let labels = t.alloc(DType::I32, n);
    let cases: Vec<(&str, Gemm, Epilogue)> = vec![
        ("batch 2", g.batched(2, 0, 0, m * n), Epilogue::Bias { bias }),
        ("alpha 0.5", Gemm { alpha: 0.5, ..g }, Epilogue::Bias { bias }),
        ("beta 1", g.beta(1.0), Epilogue::Bias { bias }),
        ("ldc != n", Gemm { ldc: n + 8, ..g }, Epilogue::Bias { bias }),
        ("C overlaps A", Gemm { c: Buf { len: m * n, ..a }, ..g }, Epilogue::Bias { bias }),
        ("bias outside the arena", g, Epilogue::Bias { bias: outside }),
        ("bias too short", g, Epilogue::Bias { bias: bias.prefix(n - 1) }),
        ("bias i32", g, Epilogue::Bias { bias: labels }),
        ("pre overlaps C", g, Epilogue::BiasAct { bias, act: gelu, pre: c }),
        ("pre in f32", g, Epilogue::ActGrad { act: gelu, pre: t.alloc(DType::F32, m * n), dbias: None }),
        ("pre too short", g, Epilogue::ActGrad { act: gelu, pre: pre.prefix(m * n - 1), dbias: None }),
        ("dbias i32", g, Epilogue::ActGrad { act: gelu, pre, dbias: Some(labels) }),
        ("dbias outside the arena", g, Epilogue::ActGrad { act: gelu, pre, dbias: Some(outside) }),
    ];
    for (what, g, ep) in cases {
        let got = t.gpu.gemm_fused(&g, &ep);
        let want = gemm_fused_composed(&mut t.re, &g, &ep);
        println!("{what}: cuda {got:?}, reference {want:?}");
        let (Err(got), Err(want)) = (got, want) else { panic!("{what}: both must be errors") };
        assert_eq!(std::mem::discriminant(&got), std::mem::discriminant(&want), "{what}: {got:?} vs {want:?}");
    }
    assert_eq!(t.gpu.fused_epilogue_calls(), before);
    // The backend is still usable after the errors.
    t.gpu.gemm_fused(&g, &Epilogue::Bias { bias }).unwrap();
    t.gpu.synchronize().unwrap();
}

/// Fused GEMMs are legal inside a recording (stream capture): one whose plan is cached, and one seen for the
/// first time while recording (its descriptor and heuristic query are host work). Nothing runs until the
/// replay, and the replay gives what direct calls give.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn fused_gemms_record_into_a_graph() {
    let Some(mut t) = rig() else { return };
    t.gpu.set_fuse_act_grad(true);
    let dt = DType::BF16;
    let gelu = Activation::GeluTanh;
    // Warm: BiasAct [64, 40, 72] (forward layout); cold: ActGrad [32, 48, 64] with an f32 bias gradient
    // (DGELU in the GEMM, bias_grad after it).
    let (x, w, bias) =
        (t.random(dt, 64 * 72, -1.0, 1.0), t.random(dt, 40 * 72, -0.5, 0.5), t.random(dt, 40, -1.0, 1.0));
    let (y, pre) = (t.nans(dt, 64 * 40), t.nans(dt, 64 * 40));
    let fwd = (Gemm::new(64, 40, 72, x, w, y).b_t(72), Epilogue::BiasAct { bias, act: gelu, pre });
    let (dy, w2, pre2) =
        (t.random(dt, 32 * 64, -1.0, 1.0), t.random(dt, 64 * 48, -0.5, 0.5), t.random(dt, 32 * 48, -4.0, 4.0));
    let (dx, db) = (t.nans(dt, 32 * 48), t.nans(DType::F32, 48));
    let bwd = (Gemm::new(32, 48, 64, dy, w2, dx), Epilogue::ActGrad { act: gelu, pre: pre2, dbias: Some(db) });
    t.gpu.gemm_fused(&fwd.0, &fwd.1).unwrap();
    let (direct_y, _) = t.get(y);
    t.gpu.fill(y, f32::NAN).unwrap();
    let before = t.gpu.fused_epilogue_calls();
    if !t.gpu.record_begin().unwrap() {
        eprintln!("skipped: this backend does not record");
        return;
    }
    let r1 = t.gpu.gemm_fused(&fwd.0, &fwd.1);
    let r2 = t.gpu.gemm_fused(&bwd.0, &bwd.1);
    let id = t.gpu.record_end(r1.is_ok() && r2.is_ok()).unwrap();
    r1.unwrap();
    r2.unwrap();
    let id = id.expect("a kept recording has an id");
    assert_eq!(t.gpu.fused_epilogue_calls(), before + 2);
    let (g, _) = t.get(y);
    assert!(g.iter().all(|v| v.is_nan()), "a recorded op ran before its replay");
    t.gpu.replay(id).unwrap();
    let (replayed_y, _) = t.get(y);
    let (replayed_dx, _) = t.get(dx);
    let (replayed_db, _) = t.get(db);
    // The same plan on the same inputs: the same values.
    assert_eq!(
        replayed_y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        direct_y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    t.gpu.gemm_fused(&bwd.0, &bwd.1).unwrap();
    let (direct_dx, _) = t.get(dx);
    let (direct_db, _) = t.get(db);
    assert_eq!(replayed_dx, direct_dx);
    for (r, d) in replayed_db.iter().zip(&direct_db) {
        assert!((r - d).abs() <= 1e-5 * (1.0 + d.abs()), "dbias: replayed {r} vs direct {d}");
    }
    // And the replay is right: against the reference.
    t.re.gemm_fused(&bwd.0, &bwd.1).unwrap();
    t.compare(dx, "recorded ActGrad dx (loose)", 0.05, 0.02);
    t.gpu.clear_recordings();
    println!("recorded and replayed: BiasAct (cached plan) and ActGrad + f32 dbias (planned while recording)");
}

/// With autotune on, a problem's first call outside a recording times its candidates (one line in the tuning
/// log) and, whichever candidate wins, the result holds the same tolerances against the reference as the fixed
/// paths; the same problem again is not tuned again, and a problem first seen while recording is not tuned.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn autotuned_choices_match_the_reference() {
    let Some(mut t) = rig() else { return };
    t.gpu.set_autotune(true);
    // These problems are small: below the default threshold nothing would be timed.
    t.gpu.set_autotune_min_work(0);
    let gelu = Activation::GeluTanh;
    for dt in [DType::BF16, DType::F16, DType::F32] {
        for kind in [Kind::Bias, Kind::BiasAct(gelu), Kind::ActGrad(gelu, Some(DType::F32)), Kind::ActGrad(gelu, None)]
        {
            if dt == DType::F32 && matches!(kind, Kind::ActGrad(..)) {
                continue; // composed without a measurement (cuBLASLt's GELU is not strict f32)
            }
            for layout in [Layout::Forward, Layout::InputGrad] {
                // Every buffer a multiple of 256 bytes: the second call's operands align as the first's.
                t.arena = Arena::new(t.arena.capacity());
                // The fused problem, and the plain GEMM inside its composed version when that was new.
                let before = t.gpu.tuning_log().len();
                case(&mut t, dt, dt, (256, 512, 784), layout, kind);
                let after = t.gpu.tuning_log().len();
                assert!(after > before, "{kind:?} {dt} {layout:?}: tuned");
                println!("{}", t.gpu.tuning_log().last().unwrap());
                t.arena = Arena::new(t.arena.capacity());
                case(&mut t, dt, dt, (256, 512, 784), layout, kind);
                assert_eq!(t.gpu.tuning_log().len(), after, "{kind:?} {dt} {layout:?}: not tuned again");
            }
        }
    }
    // First seen while recording: the heuristic's first algorithm, no timing (it would wait for the device).
    t.arena = Arena::new(t.arena.capacity());
    let (m, n, k) = (64, 128, 96);
    let a = t.random(DType::BF16, m * k, -1.0, 1.0);
    let b = t.random(DType::BF16, n * k, -1.0, 1.0);
    let (c, c2) = (t.nans(DType::BF16, m * n), t.nans(DType::BF16, m * n));
    let bias = t.random(DType::BF16, n, -1.0, 1.0);
    let before = t.gpu.tuning_log().len();
    if !t.gpu.record_begin().unwrap() {
        panic!("the CUDA backend records");
    }
    let recorded = t.gpu.gemm_fused(&Gemm::new(m, n, k, a, b, c).b_t(k), &Epilogue::Bias { bias });
    let id = t.gpu.record_end(recorded.is_ok()).unwrap().expect("kept");
    recorded.unwrap();
    assert_eq!(t.gpu.tuning_log().len(), before, "nothing is timed while recording");
    t.gpu.replay(id).unwrap();
    // The same problem outside the recording: tuned now; its result is the recorded one's within tolerance.
    t.gpu.gemm_fused(&Gemm::new(m, n, k, a, b, c2).b_t(k), &Epilogue::Bias { bias }).unwrap();
    assert!(t.gpu.tuning_log().len() > before, "tuned outside the recording");
    // Two algorithms may sum in different orders: one bf16 rounding apart, plus f32 accumulation slack.
    let ((x, _), (y, _)) = (t.get(c), t.get(c2));
    for (i, (x, y)) in x.iter().zip(&y).enumerate() {
        assert!((x - y).abs() <= 2.0 * u(DType::BF16) as f32 * x.abs().max(y.abs()) + 1e-4, "C[{i}]: {x} vs {y}");
    }
}

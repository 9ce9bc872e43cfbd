//! The skinny GEMM kernels (`kernels/skinny.cu`: m, n or k <= 16, one problem), the fused small-k `ActGrad`
//! and the few-channel `bias_grad` against the scalar reference: the gpu-mlp's 4096 -> 10 layer with 1024 rows
//! instead of 8192 (the reference is scalar), and odd sizes around the threshold (1, 3, 10, 16, 17) in every
//! transpose, with padded (scalar kernels) and packed (vector kernels) leading dimensions, beta 0 over NaN and
//! beta 0.5, A in bf16, f16 and f32, C in A's dtype and f32.
//!
//! The small-n and small-k kernels are off by default (`set_skinny_all`): every test here turns them on.
//!
//! Tolerances (as tests/backends.rs `gemm`, `gemm_fused`, `bias_grad`; `ulp(dt, v)` one unit in the last place
//! of `dt` at `|v|`, 0 for f32):
//! - gemm: `|d| <= 1e-5 sqrt(k) scale + ulp(C, ref)`, `scale = |alpha| sum_p |a_ip b_pj| + |beta c_ij|`;
//!   elements of C's buffer outside the problem (padding): bit-exact (untouched).
//! - fused small-k `ActGrad`: bit-exact against the same backend's composed version (`gemm`, then
//!   `activation_backward` and `bias_grad`); against the reference, the gemm_fused tolerance of
//!   tests/backends.rs.
//! - bias_grad: `|d| <= terms eps sum |dy| + ulp(out)`; two calls give the same bits.

mod common;

use common::{Both, GPU};
use mantissa_core::backend::{gemm_fused_composed, Activation, Epilogue, Gemm};
use mantissa_core::{Arena, Backend, Buf, DType};

/// One unit in the last place of `dt` at `|v|` (0 for f32).
fn ulp(dt: DType, v: f32) -> f64 {
    let e = (((v.abs().to_bits() >> 23) & 0xff) as i32 - 127).max(-126);
    match dt {
        DType::BF16 => 2f64.powi(e - 7),
        DType::F16 => 2f64.powi(e.max(-14) - 10),
        _ => 0.0,
    }
}

/// (A, C) dtype pairs the skinny kernels take.
const PAIRS: [(DType, DType); 5] = [
    (DType::BF16, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::F16, DType::F16),
    (DType::F16, DType::F32),
    (DType::F32, DType::F32),
];

/// One GEMM on both sides, compared with the tests/backends.rs `gemm` tolerance. `pad` is added to every
/// leading dimension (0: packed, the vector kernels where aligned).
#[allow(clippy::too_many_arguments)]
fn gemm_case(
    t: &mut Both,
    (ad, cd): (DType, DType),
    (m, n, k): (usize, usize, usize),
    ta: bool,
    tb: bool,
    pad: usize,
    beta: f32,
) {
    let (lda, ldb, ldc) = (if ta { m } else { k } + pad, if tb { k } else { n } + pad, n + pad);
    let (ar, br) = (if ta { k } else { m }, if tb { n } else { k });
    let a = t.random(ad, ar * lda, -1.0, 1.0);
    let b = t.random(ad, br * ldb, -1.0, 1.0);
    let c = if beta == 0.0 { t.nans(cd, m * ldc) } else { t.random(cd, m * ldc, -1.0, 1.0) };
    let mut g = Gemm::new(m, n, k, a, b, c).beta(beta);
    g.lda = lda;
    g.ldb = ldb;
    g.ldc = ldc;
    g.trans_a = ta;
    g.trans_b = tb;
    g.alpha = 0.75;
    let (_, av) = t.get(a);
    let (_, bv) = t.get(b);
    let (_, c0) = t.get(c);
    t.gpu.gemm(&g).unwrap();
    t.re.gemm(&g).unwrap();
    let mut tol = vec![0.0f64; c.len];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let ai = if ta { p * lda + i } else { i * lda + p };
                let bi = if tb { j * ldb + p } else { p * ldb + j };
                s += (av[ai] as f64 * bv[bi] as f64).abs();
            }
            let ci = i * ldc + j;
            let beta_c = if beta == 0.0 { 0.0 } else { (beta * c0[ci]).abs() as f64 };
            // The ulp term is added below at the reference's value; a tiny floor keeps 0 == inside-ness.
            tol[ci] = 1e-5 * (k as f64).sqrt() * (0.75 * s + beta_c) + 1e-30;
        }
    }
    let what = format!("gemm {ad}->{cd} {m}x{n}x{k} ta={ta} tb={tb} pad={pad} beta={beta}");
    t.compare_with(c, &what, |i, y| if tol[i] > 0.0 { tol[i] + ulp(cd, y) } else { 0.0 });
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn skinny_gemms_on_the_layer_shapes() {
    let _ = GPU;
    let mut t = Both::new();
    t.gpu.set_skinny_all(true);
    for pair in PAIRS {
        for beta in [0.0, 0.5] {
            // Forward Y = H W^T: H [1024, 4096], W [10, 4096].
            gemm_case(&mut t, pair, (1024, 10, 4096), false, true, 0, beta);
            // Weight gradient dW = dY^T H: dY [1024, 10] read transposed, H [1024, 4096].
            gemm_case(&mut t, pair, (10, 4096, 1024), true, false, 0, beta);
            // Input gradient dH = dY W: dY [1024, 10], W [10, 4096].
            gemm_case(&mut t, pair, (1024, 4096, 10), false, false, 0, beta);
            t.arena = Arena::new(t.arena.capacity());
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn skinny_gemms_on_odd_sizes_and_every_transpose() {
    let mut t = Both::new();
    t.gpu.set_skinny_all(true);
    for pair in PAIRS {
        for s in [1, 3, 10, 16, 17] {
            // Small n, small m and small k with the other two dimensions odd (or multiples of 8: the packed
            // vector kernels), all four transposes, padded and packed leading dimensions.
            for (m, n, k) in [(67, s, 136), (s, 136, 300), (67, 136, s), (s, s, 1000), (9, s, 24)] {
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    for pad in [0, 3] {
                        for beta in [0.0, 0.5] {
                            gemm_case(&mut t, pair, (m, n, k), ta, tb, pad, beta);
                        }
                    }
                }
            }
            t.arena = Arena::new(t.arena.capacity());
        }
    }
}

/// Split-k partial sums are added in a fixed order: the same call twice, and recorded then replayed, gives the
/// same bits.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn skinny_small_m_is_deterministic_and_records() {
    let mut t = Both::new();
    t.gpu.set_skinny_all(true);
    let (m, n, k) = (10, 4096, 8192);
    let a = t.random(DType::BF16, k * m, -1.0, 1.0);
    let b = t.random(DType::BF16, k * n, -1.0, 1.0);
    let c = t.nans(DType::F32, m * n);
    let g = Gemm::new(m, n, k, a, b, c).a_t(m);
    let bits = |t: &mut Both| {
        let mut v = vec![0u8; c.bytes()];
        t.gpu.download_bytes(c, &mut v).unwrap();
        v
    };
    t.gpu.gemm(&g).unwrap();
    let first = bits(&mut t);
    t.gpu.fill(c, f32::NAN).unwrap();
    t.gpu.gemm(&g).unwrap();
    assert_eq!(bits(&mut t), first, "two calls differ");
    t.gpu.fill(c, f32::NAN).unwrap();
    if t.gpu.record_begin().unwrap() {
        let r = t.gpu.gemm(&g);
        let id = t.gpu.record_end(r.is_ok()).unwrap();
        r.unwrap();
        t.gpu.replay(id.expect("kept")).unwrap();
        assert_eq!(bits(&mut t), first, "the replay differs");
        t.gpu.clear_recordings();
    }
    // And against the reference (a scalar 335M multiply-adds: a few seconds).
    t.re.gemm(&g).unwrap();
    let (_, av) = t.get(a);
    let (_, bv) = t.get(b);
    let mut tol = vec![0.0f64; m * n];
    for p in 0..k {
        for i in 0..m {
            let x = av[p * m + i].abs() as f64;
            for j in 0..n {
                tol[i * n + j] += x * bv[p * n + j].abs() as f64;
            }
        }
    }
    t.compare_with(c, "gemm bf16->f32 10x4096x8192 ta", |i, _| 1e-5 * (k as f64).sqrt() * tol[i]);
}

/// `ActGrad` with k <= 16 runs the fused skinny kernel: bit-exact against the composed version on the same
/// backend (C and the bias gradient), and close to the reference.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn skinny_act_grad_equals_the_composed_version() {
    let mut t = Both::new();
    t.gpu.set_skinny_all(true);
    let shapes = [(1024, 4096, 10), (67, 136, 1), (67, 136, 3), (67, 136, 16), (67, 137, 10), (33, 64, 17)];
    for dt in [DType::BF16, DType::F16, DType::F32] {
        for (m, n, k) in shapes {
            for act in [Activation::GeluTanh, Activation::Relu] {
                for (with_db, misalign) in [(true, false), (false, false), (true, true)] {
                    let off = misalign as usize;
                    let a = t.random(dt, m * k, -1.0, 1.0);
                    let b = t.random(dt, k * n, -1.0, 1.0);
                    // One element in: pre and C only 2- or 4-byte aligned (the scalar kernel).
                    let pre = t.random(dt, m * n + off, -3.0, 3.0).slice(off, m * n);
                    let c = t.nans(dt, m * n + off).slice(off, m * n);
                    let c2 = t.nans(dt, m * n + off).slice(off, m * n);
                    let (db, db2) = (t.nans(DType::F32, n), t.nans(DType::F32, n));
                    let g = Gemm::new(m, n, k, a, b, c);
                    let ep = Epilogue::ActGrad { act, pre, dbias: with_db.then_some(db) };
                    let ep2 = Epilogue::ActGrad { act, pre, dbias: with_db.then_some(db2) };
                    t.gpu.gemm_fused(&g, &ep).unwrap();
                    gemm_fused_composed(&mut t.gpu, &Gemm { c: c2, ..g }, &ep2).unwrap();
                    t.re.gemm_fused(&g, &ep).unwrap();
                    let what = format!("ActGrad {act:?} {dt} {m}x{n}x{k} dbias={with_db} misaligned={misalign}");
                    let same = |t: &mut Both, x: Buf, y: Buf, name: &str| {
                        let (mut u, mut v) = (vec![0u8; x.bytes()], vec![0u8; y.bytes()]);
                        t.gpu.download_bytes(x, &mut u).unwrap();
                        t.gpu.download_bytes(y, &mut v).unwrap();
                        assert!(u == v, "{what}: fused {name} differs from the composed one");
                    };
                    same(&mut t, c, c2, "C");
                    // k > 16 is not skinny: the CUDA backend's composed version sums the bias gradient in the
                    // one-pass kernel of act_grad.cu, in another order (checked against the reference below).
                    if with_db && k <= 16 {
                        same(&mut t, db, db2, "dbias");
                    }
                    // tests/backends.rs gemm_fused's tolerance against the reference.
                    let (_, av) = t.get(a);
                    let (_, bv) = t.get(b);
                    let mut tol = vec![0.0f64; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            let s: f64 = (0..k).map(|p| (av[i * k + p] as f64 * bv[p * n + j] as f64).abs()).sum();
                            tol[i * n + j] = 1.2 * (1e-5 * (k as f64).sqrt() * s + 2.0 * ulp(dt, s as f32));
                        }
                    }
                    let rel = if dt == DType::F32 { 2e-6 } else { 1e-3 };
                    t.compare_with(c, &what, |i, y| tol[i] + 2.0 * ulp(dt, y) + rel * (1.0 + y.abs() as f64));
                    if with_db {
                        let (cv, _) = t.get(c);
                        let tol_db: Vec<f64> = (0..n)
                            .map(|j| {
                                (0..m)
                                    .map(|i| {
                                        let y = cv[i * n + j];
                                        tol[i * n + j] + 2.0 * ulp(dt, y) + rel * (1.0 + y.abs() as f64)
                                    })
                                    .sum::<f64>()
                                    + m as f64
                                        * f32::EPSILON as f64
                                        * cv.iter().skip(j).step_by(n).map(|v| v.abs() as f64).sum::<f64>()
                            })
                            .collect();
                        t.compare_with(db, &format!("{what} dbias"), |j, _| tol_db[j]);
                    }
                    t.arena = Arena::new(t.arena.capacity());
                }
            }
        }
    }
}

/// `bias_grad` with few channels and inner == 1 (the classifier's [8192, 10]).
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn bias_grad_few_channels() {
    let mut t = Both::new();
    t.gpu.set_skinny_all(true);
    for yt in [DType::BF16, DType::F16, DType::F32] {
        for bt in [DType::F32, yt] {
            for (outer, ch) in [(8192, 10), (8192, 1), (1000, 64), (3, 10), (257, 63), (100_003, 7), (5000, 65)] {
                let dy = t.random(yt, outer * ch, -4.0, 4.0);
                let db = t.nans(bt, ch);
                t.gpu.bias_grad(dy, db, outer, ch, 1).unwrap();
                t.re.bias_grad(dy, db, outer, ch, 1).unwrap();
                let mut first = vec![0u8; db.bytes()];
                t.gpu.download_bytes(db, &mut first).unwrap();
                let (_, y) = t.get(dy);
                let terms = outer as f64;
                let tol: Vec<f64> = (0..ch)
                    .map(|c| terms * f32::EPSILON as f64 * (0..outer).map(|o| y[o * ch + c].abs() as f64).sum::<f64>())
                    .collect();
                t.compare_with(db, &format!("bias_grad {yt}->{bt} [{outer}, {ch}, 1]"), |c, v| tol[c] + ulp(bt, v));
                t.gpu.bias_grad(dy, db, outer, ch, 1).unwrap();
                let mut again = vec![0u8; db.bytes()];
                t.gpu.download_bytes(db, &mut again).unwrap();
                assert_eq!(first, again, "bias_grad [{outer}, {ch}]: two calls differ");
                t.arena = Arena::new(t.arena.capacity());
            }
        }
    }
}

//! The scalar reference backend against f64 math, op by op.
//!
//! Tolerances (u = unit roundoff: f32 2^-24, f16 2^-11, bf16 2^-8; inputs are first rounded to their dtype
//! with `DType::round` and the f64 reference is computed on the rounded values, so input rounding is not
//! error):
//! - gemm: `(k + 2) * u_f32 * (|alpha| sum_p |a||b| + |beta c|)` (f32 accumulation of k products, then the
//!   alpha/beta combination) plus the output store: `u_out * |ref| + subnormal floor` for 16-bit C.
//! - sums (bias_grad, col2im, maxpool_backward): `(terms + 1) * u_f32 * sum |terms|` plus the output store.
//! - GELU (f32 tanhf): a few f32 ulps of each term, see `gelu_tol`; activations then store to their dtype.
//! - softmax cross-entropy: `(classes + 8) * u_f32` relative to the magnitudes involved, see the test.
//! - everything that only moves data (im2col, cast, upload/download, maxpool forward, ReLU) is exact.

mod common;

use common::*;
use mantissa_core::arena::{Arena, Buf};
use mantissa_core::backend::{Activation, ConvGeom, Gemm, PoolGeom};
use mantissa_core::rng::Rng;
use mantissa_core::{Backend, DType, Error, Reference};

const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------------------
// gemm

#[derive(Clone, Copy, Debug)]
struct GemmCase {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    ad: DType,
    cd: DType,
    alpha: f32,
    beta: f32,
    batch: usize,
    /// Extra elements after every row (leading dimension > row length) and between batch problems.
    pad: usize,
    bcast_a: bool,
    bcast_b: bool,
}

impl GemmCase {
    fn dense(m: usize, n: usize, k: usize, ta: bool, tb: bool, ad: DType, cd: DType) -> Self {
        GemmCase { m, n, k, ta, tb, ad, cd, alpha: 1.0, beta: 0.0, batch: 1, pad: 0, bcast_a: false, bcast_b: false }
    }
}

/// Value of C's padding elements: exact in every dtype, so "untouched" is a bit comparison.
const C_SENTINEL: f32 = 123.0;

/// Runs one gemm on the reference backend and checks every element of C (and that padding is untouched)
/// against f64. Returns the largest error relative to the tolerance.
fn check_gemm(be: &mut Reference, case: GemmCase, rng: &mut Rng) -> f64 {
    let GemmCase { m, n, k, ta, tb, ad, cd, alpha, beta, batch, pad, bcast_a, bcast_b } = case;
    let mut arena = Arena::new(be.capacity());
    let (ar, ac) = if ta { (k, m) } else { (m, k) };
    let (br, bc) = if tb { (n, k) } else { (k, n) };
    let (lda, ldb, ldc) = (ac + pad, bc + pad, n + pad);
    let one = |rows: usize, ld: usize, cols: usize| (rows - 1) * ld + cols;
    let sa = if bcast_a { 0 } else { one(ar, lda, ac) + pad };
    let sb = if bcast_b { 0 } else { one(br, ldb, bc) + pad };
    let sc = one(m, ldc, n) + pad;
    let mut g = Gemm::new(m, n, k, Buf::EMPTY, Buf::EMPTY, Buf::EMPTY).batched(batch, sa, sb, sc).beta(beta);
    g.alpha = alpha;
    g.trans_a = ta;
    g.trans_b = tb;
    g.lda = lda;
    g.ldb = ldb;
    g.ldc = ldc;
    let (ea, eb, ec) = g.extents();

    let a = rounded(ad, &rand_vec(rng, ea, -1.0, 1.0));
    let b = rounded(ad, &rand_vec(rng, eb, -1.0, 1.0));
    // C: padding holds the sentinel; the problem's elements hold NaN when beta == 0 (BLAS does not read C
    // then, so NaN must not leak), random values otherwise.
    let mut c0 = vec![C_SENTINEL; ec];
    let mut in_problem = vec![false; ec];
    for t in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let ci = t * sc + i * ldc + j;
                in_problem[ci] = true;
                c0[ci] = if beta == 0.0 { f32::NAN } else { cd.round(rng.uniform(-1.0, 1.0)) };
            }
        }
    }
    g.a = buf_with(be, &mut arena, ad, &a);
    g.b = buf_with(be, &mut arena, ad, &b);
    g.c = buf_with(be, &mut arena, cd, &c0);
    assert_eq!(bits(&down(be, g.a)), bits(&a), "upload rounds like DType::round ({ad})");
    be.gemm(&g).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let c = down(be, g.c);

    let u_acc = (k as f64 + 2.0) * U_F32;
    let mut worst = 0.0f64;
    for t in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let (mut acc, mut abs) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let av = if ta { a[t * sa + p * lda + i] } else { a[t * sa + i * lda + p] } as f64;
                    let bv = if tb { b[t * sb + j * ldb + p] } else { b[t * sb + p * ldb + j] } as f64;
                    acc += av * bv;
                    abs += (av * bv).abs();
                }
                let ci = t * sc + i * ldc + j;
                let (mut want, mut mag) = (alpha as f64 * acc, alpha.abs() as f64 * abs);
                if beta != 0.0 {
                    want += beta as f64 * c0[ci] as f64;
                    mag += (beta as f64 * c0[ci] as f64).abs();
                }
                let tol = u_acc * mag + store_err(cd, want + u_acc * mag) + f64::MIN_POSITIVE;
                let got = c[ci] as f64;
                assert!(
                    (got - want).abs() <= tol,
                    "{case:?}: C[{t}][{i},{j}] = {got:e}, f64 reference {want:e}, |diff| {:e} > tol {tol:e}",
                    (got - want).abs()
                );
                worst = worst.max((got - want).abs() / tol);
            }
        }
    }
    for (ci, (&v, &inside)) in c.iter().zip(&in_problem).enumerate() {
        if !inside {
            assert_eq!(v, C_SENTINEL, "{case:?}: C padding element {ci} was written");
        }
    }
    worst
}

const TRANS: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

#[test]
fn gemm_all_transposes_dtypes_and_odd_sizes_match_f64() {
    let mut mem = AlignedBuf::new(4 * MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(1);
    let mut worst = 0.0f64;
    for (m, n, k) in [(1, 1, 1), (7, 5, 3), (63, 65, 67), (1, 257, 3), (3, 2, 257)] {
        for (ta, tb) in TRANS {
            for ad in FLOATS {
                for cd in FLOATS {
                    worst = worst.max(check_gemm(&mut be, GemmCase::dense(m, n, k, ta, tb, ad, cd), &mut rng));
                }
            }
        }
    }
    println!("gemm (beta = 0, NaN in C): worst |error| / tolerance = {worst:.3}");
}

#[test]
fn gemm_alpha_beta_match_f64() {
    let mut mem = AlignedBuf::new(4 * MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(2);
    let mut worst = 0.0f64;
    for (m, n, k) in [(1, 1, 1), (7, 5, 3), (63, 65, 67), (1, 257, 3)] {
        for (ta, tb) in TRANS {
            for ad in FLOATS {
                for cd in FLOATS {
                    for (alpha, beta) in [(-0.75, 0.5), (2.0, 1.0), (0.5, -1.0)] {
                        let case = GemmCase { alpha, beta, ..GemmCase::dense(m, n, k, ta, tb, ad, cd) };
                        worst = worst.max(check_gemm(&mut be, case, &mut rng));
                    }
                }
            }
        }
    }
    println!("gemm (alpha, beta): worst |error| / tolerance = {worst:.3}");
}

#[test]
fn gemm_batched_strided_and_broadcast_match_f64() {
    let mut mem = AlignedBuf::new(4 * MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(3);
    for (m, n, k) in [(7, 5, 3), (9, 70, 11), (1, 1, 1)] {
        for (ta, tb) in TRANS {
            for (ad, cd) in [(DType::F32, DType::F32), (DType::BF16, DType::F32), (DType::F16, DType::F16)] {
                for (batch, pad, bcast_a, bcast_b, beta) in [
                    (3, 0, false, false, 0.0),
                    (3, 2, false, false, 0.5),
                    (4, 1, true, false, 0.0),
                    (2, 3, false, true, 1.0),
                ] {
                    let case =
                        GemmCase { batch, pad, bcast_a, bcast_b, beta, ..GemmCase::dense(m, n, k, ta, tb, ad, cd) };
                    check_gemm(&mut be, case, &mut rng);
                }
            }
        }
    }
}

#[test]
fn gemm_rejects_bad_operands() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut arena = Arena::new(be.capacity());
    let a = arena.alloc(DType::F32, 6).unwrap();
    let b = arena.alloc(DType::F32, 6).unwrap();
    let c = arena.alloc(DType::F32, 4).unwrap();
    let a16 = arena.alloc(DType::BF16, 6).unwrap();
    let i = arena.alloc(DType::I32, 6).unwrap();
    assert!(be.gemm(&Gemm::new(2, 2, 3, a, b, c)).is_ok());
    // A and B must share a dtype; I32 is not a float.
    assert!(matches!(be.gemm(&Gemm::new(2, 2, 3, a16, b, c)), Err(Error::UnsupportedDType { .. })));
    assert!(matches!(be.gemm(&Gemm::new(2, 2, 3, i, i, c)), Err(Error::UnsupportedDType { .. })));
    // Too short: C needs 3 x 2 = 6 elements.
    assert!(matches!(be.gemm(&Gemm::new(3, 2, 2, a, b, c)), Err(Error::ShapeMismatch { .. })));
    // C overlapping an input.
    assert!(matches!(be.gemm(&Gemm::new(2, 2, 1, a, b, a.slice(2, 4))), Err(Error::InvalidConfig(_))));
    // A stride so large the batch extent overflows usize.
    let big = Gemm::new(2, 2, 3, a, b, c).batched(2, usize::MAX / 2 + 1, 0, 0);
    assert!(matches!(be.gemm(&big), Err(Error::ShapeMismatch { .. })), "a batch extent beyond A");
    // Strides and leading dimensions whose extent overflows usize (an unchecked sum wraps to a small number).
    let wraps = Gemm::new(2, 2, 3, a, b, c).batched(2, usize::MAX, 0, 0);
    assert!(be.gemm(&wraps).is_err(), "a batch stride that overflows the extent must be an error");
    let mut wraps = Gemm::new(2, 2, 3, a, b, c);
    wraps.ldb = usize::MAX;
    assert!(be.gemm(&wraps).is_err(), "a leading dimension that overflows the extent must be an error");
}

// ---------------------------------------------------------------------------------------------------------
// bias

#[test]
fn add_bias_and_bias_grad_match_f64() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(4);
    for (outer, channels, inner) in [(3, 5, 1), (2, 4, 7), (1, 1, 1), (4, 3, 33)] {
        for yd in FLOATS {
            for bd in [DType::F32, DType::BF16] {
                let mut arena = Arena::new(be.capacity());
                let n = outer * channels * inner;
                let y0 = rounded(yd, &rand_vec(&mut rng, n, -2.0, 2.0));
                let bias = rounded(bd, &rand_vec(&mut rng, channels, -1.0, 1.0));
                let y = buf_with(&mut be, &mut arena, yd, &y0);
                let b = buf_with(&mut be, &mut arena, bd, &bias);
                be.add_bias(y, b, outer, channels, inner).unwrap();
                let got = down(&mut be, y);
                for idx in 0..n {
                    let c = idx / inner % channels;
                    let want = y0[idx] as f64 + bias[c] as f64;
                    let tol = U_F32 * want.abs() + store_err(yd, want);
                    assert!(
                        (got[idx] as f64 - want).abs() <= tol,
                        "add_bias {yd}/{bd} [{outer},{channels},{inner}] at {idx}"
                    );
                }

                // bias_grad: dbias[c] = sum over outer and inner of dy[o, c, i].
                let db = arena.alloc(bd, channels).unwrap();
                be.fill(db, f32::NAN).unwrap(); // overwritten, not accumulated
                be.bias_grad(y, db, outer, channels, inner).unwrap();
                let got = down(&mut be, db);
                for (c, &g) in got.iter().enumerate().take(channels) {
                    let (mut want, mut abs) = (0.0f64, 0.0f64);
                    for o in 0..outer {
                        for i in 0..inner {
                            let v = down(&mut be, y.slice((o * channels + c) * inner + i, 1))[0] as f64;
                            want += v;
                            abs += v.abs();
                        }
                    }
                    let terms = (outer * inner) as f64;
                    let tol = (terms + 1.0) * U_F32 * abs + store_err(bd, want);
                    assert!((g as f64 - want).abs() <= tol, "bias_grad {yd}/{bd} [{outer},{channels},{inner}] c={c}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// activations

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh())
}

fn gelu_grad64(x: f64) -> f64 {
    let t = (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
}

/// Tolerance of the f32 GELU: `1 + tanh(u)` carries an absolute error of a few f32 ulps of 1 (tanhf, the
/// rounded constants), which `0.5 x` scales; the products add a few ulps of the result.
fn gelu_tol(x: f64, y: f64) -> f64 {
    8.0 * U_F32 * (0.5 * x.abs() + y.abs())
}

/// The derivative: both of its terms are O(1) for |x| < 10 with a few f32 ulps of error each (the second,
/// `0.5 x (1 - t^2) S (1 + 3 C x^2)`, up to a few ulps of its magnitude, below 1.2).
fn gelu_grad_tol(x: f64) -> f64 {
    16.0 * U_F32 * (1.0 + x.abs())
}

fn activation_inputs(rng: &mut Rng) -> Vec<f32> {
    let mut x = rand_vec(rng, 400, -6.0, 6.0);
    x.extend([0.0, -0.0, 1e-3, -1e-3, 1e-30, -1e-30, 10.0, -10.0, 3.0, -3.0, 0.5, -0.5]);
    x
}

#[test]
fn relu_forward_and_backward_are_exact() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(5);
    for dt in FLOATS {
        let mut arena = Arena::new(be.capacity());
        let mut x0 = rounded(dt, &activation_inputs(&mut rng));
        x0.push(f32::NAN);
        let n = x0.len();
        let dy0 = rounded(dt, &rand_vec(&mut rng, n, -1.0, 1.0));
        let x = buf_with(&mut be, &mut arena, dt, &x0);
        let y = arena.alloc(dt, n).unwrap();
        let dy = buf_with(&mut be, &mut arena, dt, &dy0);
        let dx = arena.alloc(dt, n).unwrap();
        be.activation(Activation::Relu, x, y).unwrap();
        be.activation_backward(Activation::Relu, x, dy, dx).unwrap();
        let (yv, dxv) = (down(&mut be, y), down(&mut be, dx));
        for i in 0..n {
            let xi = x0[i];
            if xi.is_nan() {
                assert!(yv[i].is_nan(), "ReLU propagates NaN ({dt})");
                continue;
            }
            assert_eq!(yv[i], if xi > 0.0 { xi } else { 0.0 }, "relu({xi}) {dt}");
            assert_eq!(dxv[i], if xi > 0.0 { dy0[i] } else { 0.0 }, "relu'({xi}) {dt}");
        }
        // In place: y == x.
        be.activation(Activation::Relu, x, x).unwrap();
        assert_eq!(bits(&down(&mut be, x)), bits(&yv), "in-place ReLU ({dt})");
    }
}

#[test]
fn gelu_forward_matches_f64() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(6);
    for xd in FLOATS {
        for yd in FLOATS {
            let mut arena = Arena::new(be.capacity());
            let x0 = rounded(xd, &activation_inputs(&mut rng));
            let x = buf_with(&mut be, &mut arena, xd, &x0);
            let y = arena.alloc(yd, x0.len()).unwrap();
            be.activation(Activation::GeluTanh, x, y).unwrap();
            let got = down(&mut be, y);
            let mut worst = 0.0f64;
            for (&xi, &gi) in x0.iter().zip(&got) {
                let want = gelu64(xi as f64);
                let tol = gelu_tol(xi as f64, want) + store_err(yd, want) + f64::MIN_POSITIVE;
                let err = (gi as f64 - want).abs();
                assert!(err <= tol, "gelu({xi:e}) {xd}->{yd}: {gi:e} vs {want:e}, err {err:e} > {tol:e}");
                worst = worst.max(err / tol);
            }
            println!("gelu {xd}->{yd}: worst error / tolerance {worst:.3}");
        }
    }
}

#[test]
fn gelu_derivative_matches_f64_analytic_and_finite_difference() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(7);
    // First the f64 formula itself against an f64 central difference (h = 1e-5: truncation h^2 f'''/6 and
    // cancellation 1e-16 / h are both ~1e-11), so the analytic reference is not trusted blindly.
    let h = 1e-5;
    for x in activation_inputs(&mut rng) {
        let x = x as f64;
        let fd = (gelu64(x + h) - gelu64(x - h)) / (2.0 * h);
        assert!((fd - gelu_grad64(x)).abs() < 1e-8, "f64 gelu' at {x}: analytic {} vs fd {fd}", gelu_grad64(x));
    }
    for dt in FLOATS {
        let mut arena = Arena::new(be.capacity());
        let x0 = rounded(dt, &activation_inputs(&mut rng));
        let n = x0.len();
        let ones = vec![1.0f32; n];
        let dy0 = rounded(dt, &rand_vec(&mut rng, n, -2.0, 2.0));
        let x = buf_with(&mut be, &mut arena, dt, &x0);
        let one = buf_with(&mut be, &mut arena, dt, &ones);
        let dy = buf_with(&mut be, &mut arena, dt, &dy0);
        let d = arena.alloc(dt, n).unwrap();
        let dx = arena.alloc(dt, n).unwrap();
        // dy = 1 gives the derivative itself; random dy checks the product.
        be.activation_backward(Activation::GeluTanh, x, one, d).unwrap();
        be.activation_backward(Activation::GeluTanh, x, dy, dx).unwrap();
        let (dv, dxv) = (down(&mut be, d), down(&mut be, dx));
        for i in 0..n {
            let xi = x0[i] as f64;
            let analytic = gelu_grad64(xi);
            let fd = (gelu64(xi + h) - gelu64(xi - h)) / (2.0 * h);
            let tol = gelu_grad_tol(xi) + store_err(dt, analytic);
            assert!((dv[i] as f64 - analytic).abs() <= tol, "gelu'({xi:e}) {dt}: {} vs analytic {analytic:e}", dv[i]);
            assert!((dv[i] as f64 - fd).abs() <= tol + 1e-8, "gelu'({xi:e}) {dt}: {} vs fd {fd:e}", dv[i]);
            let want = dy0[i] as f64 * analytic;
            let tol = dy0[i].abs() as f64 * gelu_grad_tol(xi) + U_F32 * want.abs() + store_err(dt, want);
            assert!((dxv[i] as f64 - want).abs() <= tol, "dy * gelu'({xi:e}) {dt}: {} vs {want:e}", dxv[i]);
        }
        // dx may alias dy.
        be.activation_backward(Activation::GeluTanh, x, dy, dy).unwrap();
        assert_eq!(bits(&down(&mut be, dy)), bits(&dxv), "in-place GELU backward ({dt})");
    }
}

#[test]
fn activation_backward_rejects_dx_of_another_dtype() {
    // dx is written with dy's element type: a dx of a different dtype would be written past its end.
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut arena = Arena::new(be.capacity());
    let x = buf_with(&mut be, &mut arena, DType::F32, &[1.0; 16]);
    let dy = buf_with(&mut be, &mut arena, DType::F32, &[1.0; 16]);
    let dx = arena.alloc(DType::BF16, 16).unwrap();
    let guard = buf_with(&mut be, &mut arena, DType::F32, &[7.0; 16]);
    let r = be.activation_backward(Activation::Relu, x, dy, dx);
    assert!(
        r.is_err() || down(&mut be, dx) == vec![1.0; 16],
        "activation_backward with dx {} and dy {}: {r:?}",
        dx.dtype,
        dy.dtype
    );
    assert_eq!(down(&mut be, guard), vec![7.0; 16], "activation_backward wrote past dx");
}

// ---------------------------------------------------------------------------------------------------------
// softmax cross-entropy

#[test]
fn softmax_cross_entropy_matches_f64() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(8);
    for (rows, classes) in [(1, 2), (5, 10), (3, 37), (4, 3)] {
        for ld in FLOATS {
            for dd in FLOATS {
                for grad_scale in [1.0f32, 1024.0, 0.125] {
                    let mut arena = Arena::new(be.capacity());
                    let mut logits0 = rand_vec(&mut rng, rows * classes, -4.0, 4.0);
                    // A row shifted far up: exp would overflow without subtracting the max first.
                    if rows > 1 {
                        logits0[classes..2 * classes].iter_mut().for_each(|v| *v += 100.0);
                    }
                    let logits0 = rounded(ld, &logits0);
                    let labels0: Vec<i32> = (0..rows).map(|_| rng.below(classes) as i32).collect();
                    let logits = buf_with(&mut be, &mut arena, ld, &logits0);
                    let labels = arena.alloc(DType::I32, rows).unwrap();
                    be.upload_i32(labels, &labels0).unwrap();
                    let loss = arena.alloc(DType::F32, 1).unwrap();
                    let dl = arena.alloc(dd, rows * classes).unwrap();
                    be.softmax_cross_entropy(logits, labels, rows, classes, loss, dl, grad_scale).unwrap();
                    let got_loss = down(&mut be, loss)[0] as f64;
                    let got_dl = down(&mut be, dl);

                    let u_row = (classes as f64 + 8.0) * U_F32;
                    let (mut want_loss, mut loss_tol) = (0.0f64, 0.0f64);
                    let g = grad_scale as f64 / rows as f64;
                    for r in 0..rows {
                        let row: Vec<f64> = logits0[r * classes..(r + 1) * classes].iter().map(|&v| v as f64).collect();
                        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
                        let lse = max + sum.ln();
                        let label = labels0[r] as usize;
                        want_loss += (lse - row[label]) / rows as f64;
                        loss_tol += u_row * (1.0 + lse.abs() + row[label].abs()) / rows as f64;
                        for j in 0..classes {
                            let p = (row[j] - lse).exp();
                            let onehot = if j == label { 1.0 } else { 0.0 };
                            let want = (p - onehot) * g;
                            let tol = u_row * (p + onehot) * g + store_err(dd, want) + f64::MIN_POSITIVE;
                            let got = got_dl[r * classes + j] as f64;
                            assert!(
                                (got - want).abs() <= tol,
                                "dlogits[{r},{j}] {ld}->{dd} scale {grad_scale}: {got:e} vs {want:e} (tol {tol:e})"
                            );
                        }
                    }
                    loss_tol += rows as f64 * U_F32 * want_loss.abs();
                    assert!(
                        (got_loss - want_loss).abs() <= loss_tol,
                        "loss [{rows}x{classes}] {ld}: {got_loss} vs {want_loss} (tol {loss_tol:e})"
                    );
                }
            }
        }
    }
}

#[test]
fn softmax_cross_entropy_rejects_bad_labels_and_dtypes() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut arena = Arena::new(be.capacity());
    let logits = buf_with(&mut be, &mut arena, DType::F32, &[0.5; 6]);
    let labels = arena.alloc(DType::I32, 2).unwrap();
    let loss = arena.alloc(DType::F32, 1).unwrap();
    let dl = arena.alloc(DType::F32, 6).unwrap();
    for (bad, classes) in [([0, 3], 3), ([-1, 0], 3), ([1, i32::MAX], 3)] {
        be.upload_i32(labels, &bad).unwrap();
        let label = if bad[0] < 0 { bad[0] } else { bad[1] };
        assert_eq!(
            be.softmax_cross_entropy(logits, labels, 2, classes, loss, dl, 1.0),
            Err(Error::LabelOutOfRange { label, classes })
        );
    }
    be.upload_i32(labels, &[0, 2]).unwrap();
    assert!(be.softmax_cross_entropy(logits, labels, 2, 3, loss, dl, 1.0).is_ok());
    // Labels must be I32 and the loss F32.
    assert!(matches!(
        be.softmax_cross_entropy(logits, dl.prefix(2), 2, 3, loss, dl, 1.0),
        Err(Error::UnsupportedDType { .. })
    ));
    let loss16 = arena.alloc(DType::BF16, 1).unwrap();
    assert!(matches!(
        be.softmax_cross_entropy(logits, labels, 2, 3, loss16, dl, 1.0),
        Err(Error::UnsupportedDType { .. })
    ));
}

// ---------------------------------------------------------------------------------------------------------
// im2col / col2im

fn conv_geom(channels: usize, height: usize, width: usize, kernel: usize, stride: usize, padding: usize) -> ConvGeom {
    ConvGeom {
        channels,
        height,
        width,
        kernel,
        stride,
        padding,
        out_height: (height + 2 * padding - kernel) / stride + 1,
        out_width: (width + 2 * padding - kernel) / stride + 1,
    }
}

const CONV_GEOMS: [(usize, usize, usize, usize, usize, usize); 7] = [
    (2, 7, 6, 3, 1, 0),
    (2, 7, 6, 3, 2, 1),
    (1, 5, 5, 2, 2, 0),
    (3, 8, 5, 3, 3, 2),
    (1, 4, 4, 4, 1, 0),
    (2, 3, 5, 1, 1, 0),
    (1, 6, 7, 3, 2, 2),
];

#[test]
fn im2col_matches_naive_unfold_and_col2im_is_its_adjoint() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(9);
    let images = 2;
    for (c, h, w, k, s, p) in CONV_GEOMS {
        let g = conv_geom(c, h, w, k, s, p);
        for dt in [DType::F32, DType::BF16] {
            let mut arena = Arena::new(be.capacity());
            let per = g.col_rows() * g.col_cols();
            let x0 = rounded(dt, &rand_vec(&mut rng, images * g.in_len(), -1.0, 1.0));
            let c0 = rounded(dt, &rand_vec(&mut rng, images * per, -1.0, 1.0));
            let x = buf_with(&mut be, &mut arena, dt, &x0);
            let cb = buf_with(&mut be, &mut arena, dt, &c0);
            let cols = arena.alloc(dt, images * per).unwrap();
            let dx = arena.alloc(DType::F32, images * g.in_len()).unwrap();
            be.fill(cols, f32::NAN).unwrap();
            be.fill(dx, f32::NAN).unwrap();
            be.im2col(x, &g, images, cols).unwrap();
            be.col2im(cb, &g, images, dx).unwrap();
            let (colv, dxv) = (down(&mut be, cols), down(&mut be, dx));

            // im2col is a copy: compare with the definition, exactly.
            let (mut lhs, mut rhs, mut abs) = (0.0f64, 0.0f64, 0.0f64);
            for n in 0..images {
                for ch in 0..c {
                    for ki in 0..k {
                        for kj in 0..k {
                            let r = (ch * k + ki) * k + kj;
                            for oh in 0..g.out_height {
                                for ow in 0..g.out_width {
                                    let ih = (oh * s + ki) as isize - p as isize;
                                    let iw = (ow * s + kj) as isize - p as isize;
                                    let inside = ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < w;
                                    let want = if inside {
                                        x0[n * g.in_len() + (ch * h + ih as usize) * w + iw as usize]
                                    } else {
                                        0.0
                                    };
                                    let ci = n * per + r * g.col_cols() + oh * g.out_width + ow;
                                    assert_eq!(colv[ci].to_bits(), want.to_bits(), "im2col {g:?} at {ci}");
                                    lhs += colv[ci] as f64 * c0[ci] as f64;
                                    abs += (colv[ci] as f64 * c0[ci] as f64).abs();
                                }
                            }
                        }
                    }
                }
            }
            for (xi, di) in x0.iter().zip(&dxv) {
                rhs += *xi as f64 * *di as f64;
            }
            // <im2col(x), c> == <x, col2im(c)>: col2im sums at most k*k values per pixel in f32.
            let tol = (k * k + 1) as f64 * U_F32 * abs + 1e-12;
            assert!((lhs - rhs).abs() <= tol, "adjoint {g:?} {dt}: <im2col x, c> = {lhs}, <x, col2im c> = {rhs}");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// max-pool

fn pool_geom(channels: usize, height: usize, width: usize, kernel: usize, stride: usize) -> PoolGeom {
    PoolGeom {
        channels,
        height,
        width,
        kernel,
        stride,
        out_height: (height - kernel) / stride + 1,
        out_width: (width - kernel) / stride + 1,
    }
}

#[test]
fn maxpool_and_backward_match_naive_with_ties_to_first() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(10);
    let images = 3;
    for (c, h, w, k, s) in [(2, 6, 6, 2, 2), (1, 7, 5, 3, 2), (3, 4, 5, 2, 1), (1, 5, 5, 5, 1), (2, 3, 7, 1, 2)] {
        let g = pool_geom(c, h, w, k, s);
        for dt in FLOATS {
            let mut arena = Arena::new(be.capacity());
            // Few distinct values: many ties.
            let x0: Vec<f32> = (0..images * g.in_len()).map(|_| rng.below(5) as f32 - 2.0).collect();
            let dy0 = rounded(dt, &rand_vec(&mut rng, images * g.out_len(), -1.0, 1.0));
            let x = buf_with(&mut be, &mut arena, dt, &x0);
            let y = arena.alloc(dt, images * g.out_len()).unwrap();
            let am = arena.alloc(DType::I32, images * g.out_len()).unwrap();
            let dy = buf_with(&mut be, &mut arena, dt, &dy0);
            let dx = arena.alloc(dt, images * g.in_len()).unwrap();
            be.fill(dx, f32::NAN).unwrap();
            be.maxpool(x, &g, images, y, am).unwrap();
            be.maxpool_backward(dy, am, &g, images, dx).unwrap();
            let (yv, amv, dxv) = (down(&mut be, y), down(&mut be, am), down(&mut be, dx));

            let mut want_dx = vec![0.0f64; images * g.in_len()];
            let mut dx_abs = vec![0.0f64; images * g.in_len()];
            for n in 0..images {
                for ch in 0..c {
                    for oh in 0..g.out_height {
                        for ow in 0..g.out_width {
                            let (mut best, mut best_i) = (f64::NEG_INFINITY, usize::MAX);
                            for ki in 0..k {
                                for kj in 0..k {
                                    let i = (ch * h + oh * s + ki) * w + ow * s + kj;
                                    let v = x0[n * g.in_len() + i] as f64;
                                    if v > best {
                                        (best, best_i) = (v, i);
                                    }
                                }
                            }
                            let o = n * g.out_len() + (ch * g.out_height + oh) * g.out_width + ow;
                            assert_eq!(yv[o] as f64, best, "maxpool {g:?} {dt} out {o}");
                            assert_eq!(amv[o] as usize, best_i, "maxpool argmax {g:?} {dt} out {o} (ties go first)");
                            want_dx[n * g.in_len() + best_i] += dy0[o] as f64;
                            dx_abs[n * g.in_len() + best_i] += dy0[o].abs() as f64;
                        }
                    }
                }
            }
            // Overlapping windows (stride < kernel) add several dy into one pixel. The backward stores each
            // partial sum in dx's dtype (unlike col2im, which accumulates in f32 and stores once), so a 16-bit
            // dx carries one rounding per term: `terms * u_dx * sum |dy|`.
            let terms = (k.div_ceil(s) * k.div_ceil(s)) as f64;
            for i in 0..want_dx.len() {
                let tol = (terms + 1.0) * U_F32 * dx_abs[i] + terms * store_err(dt, dx_abs[i]);
                assert!((dxv[i] as f64 - want_dx[i]).abs() <= tol, "maxpool_backward {g:?} {dt} at {i}");
            }
        }
    }
}

#[test]
fn maxpool_rejects_a_geometry_that_reads_outside_the_image() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut arena = Arena::new(be.capacity());
    // 3x3 windows of a 6x6 image claimed over a 4x4 input buffer.
    let g = PoolGeom { channels: 1, height: 4, width: 4, kernel: 2, stride: 2, out_height: 3, out_width: 3 };
    let x = buf_with(&mut be, &mut arena, DType::F32, &[0.0; 16]);
    let _beyond = buf_with(&mut be, &mut arena, DType::F32, &[1e9; 64]);
    let y = arena.alloc(DType::F32, 9).unwrap();
    let am = arena.alloc(DType::I32, 9).unwrap();
    let r = be.maxpool(x, &g, 1, y, am);
    assert!(r.is_err(), "maxpool with windows outside the input must be an error, got {r:?}: {:?}", down(&mut be, y));
    // A corrupted argmax is caught by the backward pass.
    let good = pool_geom(1, 4, 4, 2, 2);
    be.upload_i32(am.prefix(4), &[0, 2, 8, 16]).unwrap();
    let dy = buf_with(&mut be, &mut arena, DType::F32, &[1.0; 4]);
    assert!(matches!(be.maxpool_backward(dy, am.prefix(4), &good, 1, x), Err(Error::InvalidConfig(_))));
}

// ---------------------------------------------------------------------------------------------------------
// grad_stats, cast, upload/download, handles

#[test]
fn grad_stats_counts_non_finite_and_sums_squares_in_f64() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(11);
    for dt in FLOATS {
        for scale in [1.0f32, 1.0 / 1024.0, 3.0] {
            let mut arena = Arena::new(be.capacity());
            let mut g0 = rounded(dt, &rand_vec(&mut rng, 1000, -5.0, 5.0));
            let gb = buf_with(&mut be, &mut arena, dt, &g0);
            let s = be.grad_stats(gb, scale).unwrap();
            assert_eq!(s.non_finite, 0);
            let want: f64 = g0.iter().map(|&v| (v * scale) as f64 * (v * scale) as f64).sum();
            // Each (g * scale) is one f32 product (exact for power-of-two scales); squares and the sum are f64.
            assert!((s.sum_sq - want).abs() <= 1e-12 * want, "{dt} scale {scale}: {} vs {want}", s.sum_sq);
            let want_unrounded: f64 = g0.iter().map(|&v| (v as f64 * scale as f64).powi(2)).sum();
            assert!((s.sum_sq - want_unrounded).abs() <= 2.0 * U_F32 * want_unrounded);

            for (i, v) in [(3, f32::NAN), (17, f32::INFINITY), (500, f32::NEG_INFINITY), (999, f32::NAN)] {
                g0[i] = v;
            }
            let gb = buf_with(&mut be, &mut arena, dt, &g0);
            assert_eq!(be.grad_stats(gb, scale).unwrap().non_finite, 4, "{dt}");
        }
    }
    // A finite f32 gradient that overflows once scaled counts as non-finite (the unscale-and-check fuses).
    let mut arena = Arena::new(be.capacity());
    let gb = buf_with(&mut be, &mut arena, DType::F32, &[3e38, 1.0]);
    assert_eq!(be.grad_stats(gb, 2.0).unwrap().non_finite, 1);
    let ib = arena.alloc(DType::I32, 4).unwrap();
    assert!(matches!(be.grad_stats(ib, 1.0), Err(Error::UnsupportedDType { .. })));
}

#[test]
fn cast_round_trips_round_to_nearest_even() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut rng = Rng::new(12);
    let mut x0 = rand_vec(&mut rng, 500, -70000.0, 70000.0);
    x0.extend(rand_vec(&mut rng, 500, -1e-3, 1e-3));
    // Ties: 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7 (even: 1); 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
    // 1 + 2^-11 and 1 + 3 * 2^-11 are the same for f16. 65520 is f16's overflow threshold.
    x0.extend([
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        65504.0,
        65520.0,
        65519.0,
    ]);
    x0.extend([f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-8, 6e-8, 1e38, f32::MAX]);
    let n = x0.len();
    assert_eq!(DType::BF16.round(1.0 + 1.0 / 256.0), 1.0);
    assert_eq!(DType::BF16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    assert_eq!(DType::F16.round(65520.0), f32::INFINITY);
    for from in FLOATS {
        for to in FLOATS {
            let mut arena = Arena::new(be.capacity());
            let src = buf_with(&mut be, &mut arena, from, &x0);
            let dst = arena.alloc(to, n).unwrap();
            let back = arena.alloc(DType::F32, n).unwrap();
            be.cast(src, dst).unwrap();
            be.cast(dst, back).unwrap();
            let want: Vec<f32> = x0.iter().map(|&v| to.round(from.round(v))).collect();
            assert_eq!(bits(&down(&mut be, back)), bits(&want), "cast {from} -> {to} -> f32");
        }
    }
    // NaN survives every cast.
    let mut arena = Arena::new(be.capacity());
    for dt in FLOATS {
        let b = buf_with(&mut be, &mut arena, dt, &[f32::NAN]);
        let f = arena.alloc(DType::F32, 1).unwrap();
        be.cast(b, f).unwrap();
        assert!(down(&mut be, f)[0].is_nan(), "NaN through {dt}");
    }
    let a = arena.alloc(DType::F32, 4).unwrap();
    let i = arena.alloc(DType::I32, 4).unwrap();
    assert!(matches!(be.cast(a, i), Err(Error::UnsupportedDType { .. })));
    assert!(matches!(be.cast(a, a.prefix(3)), Err(Error::ShapeMismatch { .. })));
}

#[test]
fn upload_download_and_byte_encoding() {
    let mut mem = AlignedBuf::new(MIB);
    let mut be = Reference::new(mem.bytes());
    let mut arena = Arena::new(be.capacity());
    let f = buf_with(&mut be, &mut arena, DType::F32, &[1.0, -2.5]);
    assert_eq!(down_bytes(&mut be, f), [0, 0, 0x80, 0x3f, 0, 0, 0x20, 0xc0]);
    let b = buf_with(&mut be, &mut arena, DType::BF16, &[1.0, -2.5]);
    assert_eq!(down_bytes(&mut be, b), [0x80, 0x3f, 0x20, 0xc0]);
    let h = buf_with(&mut be, &mut arena, DType::F16, &[1.0, -2.5]);
    assert_eq!(down_bytes(&mut be, h), [0x00, 0x3c, 0x00, 0xc1]);
    // Bytes in, values out.
    be.upload_bytes(h, &[0x00, 0x40, 0x00, 0x7c]).unwrap();
    assert_eq!(down(&mut be, h), [2.0, f32::INFINITY]);
    let i = arena.alloc(DType::I32, 3).unwrap();
    be.upload_i32(i, &[-7, 0, 123456]).unwrap();
    assert_eq!(down(&mut be, i), [-7.0, 0.0, 123456.0]);
    assert_eq!(down_bytes(&mut be, i)[..4], (-7i32).to_le_bytes());
    be.fill(i, 5.0).unwrap();
    assert_eq!(down(&mut be, i), [5.0; 3]);
    // Length and dtype mistakes are errors.
    assert!(matches!(be.upload(f, &[1.0]), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(be.download(f, &mut [0.0; 3]), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(be.download_bytes(f, &mut [0; 7]), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(be.upload_bytes(f, &[0; 9]), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(be.upload_i32(f, &[1, 2]), Err(Error::UnsupportedDType { .. })));
    assert!(matches!(be.upload(i, &[1.0; 3]), Err(Error::UnsupportedDType { .. })));
}

#[test]
fn handles_outside_the_arena_are_errors() {
    let mut mem = AlignedBuf::new(4096 + 64);
    let mut be = Reference::new(mem.bytes());
    let cap = be.capacity();
    assert_eq!(cap, 4096 + 64, "an aligned buffer loses no bytes");
    let inside = Buf { offset: 0, len: 4, dtype: DType::F32 };
    let bad = [
        Buf { offset: cap, len: 1, dtype: DType::F32 },     // starts at the end
        Buf { offset: cap - 4, len: 2, dtype: DType::F32 }, // straddles the end
        Buf { offset: 2, len: 2, dtype: DType::F32 },       // misaligned for f32
        Buf { offset: usize::MAX - 63, len: 32, dtype: DType::F32 }, // offset + bytes wraps
        Buf { offset: 0, len: usize::MAX / 4 + 1, dtype: DType::F32 }, // len * 4 wraps to 0
        Buf { offset: 64, len: usize::MAX / 2 + 1, dtype: DType::BF16 }, // len * 2 wraps to 0
    ];
    let mut scratch = vec![0.0f32; 4];
    for b in bad {
        let what = format!("{b:?}");
        assert!(be.fill(b, 1.0).is_err(), "fill {what}");
        assert!(be.cast(inside, b).is_err(), "cast into {what}");
        assert!(be.cast(b, inside).is_err(), "cast from {what}");
        assert!(be.grad_stats(b, 1.0).is_err(), "grad_stats {what}");
        assert!(be.activation(Activation::Relu, b, b).is_err(), "activation {what}");
        if b.len == 4 {
            assert!(be.upload(b, &scratch).is_err(), "upload {what}");
            assert!(be.download(b, &mut scratch).is_err(), "download {what}");
        }
        assert!(be.gemm(&Gemm::new(1, 1, 1, inside, inside.slice(1, 1), b)).is_err(), "gemm C {what}");
        assert!(be.gemm(&Gemm::new(1, 1, 1, b, inside, inside.slice(2, 1))).is_err(), "gemm A {what}");
    }
    // The good handle still works, and nothing outside the arena was written.
    be.upload(inside, &[1.0, 2.0, 3.0, 4.0]).unwrap();
    be.download(inside, &mut scratch).unwrap();
    assert_eq!(scratch, [1.0, 2.0, 3.0, 4.0]);
}

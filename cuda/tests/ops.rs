//! Every `Backend` op of the CUDA backend against the scalar reference, on identical inputs, odd sizes and
//! every dtype pair. Tolerances are written per test: element-wise ops are compiled without FMA contraction,
//! so most match bit for bit; ops with expf/logf/tanhf (CUDA's differ from libm by an ulp or two) and
//! reductions (tree order instead of a sequential sum) get a few f32 ulps, plus one unit roundoff of the
//! output dtype where an f32 difference can flip a 16-bit rounding.

mod common;

use common::{u, Both, FLOATS, GPU};
use mantissa_core::backend::{Activation, AdamWStep, ConvGeom, Gemm, ParamBufs, PoolGeom, SgdStep};
use mantissa_core::{Backend, Buf, DType, Error};

/// A few f32 ulps of slack for math-library and summation-order differences, plus one 16-bit rounding.
fn tol(dt: DType) -> (f64, f64) {
    (1e-6 + subnormal_ulp(dt), 8.0 * u(DType::F32) + 2.0 * u(dt))
}

/// f16's subnormal step (2^-24): below 2^-14 a one-ulp f32 difference can flip a rounding by this much.
fn subnormal_ulp(dt: DType) -> f64 {
    if dt == DType::F16 {
        1.0 / 16_777_216.0
    } else {
        0.0
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn upload_download_bytes_fill_and_cast() {
    let _ = GPU;
    let mut t = Both::new();
    let specials = [0.0, -0.0, 1.0, -2.5, 65504.0, 65520.0, 1e-8, 3e-5, 1e30, f32::INFINITY, f32::NAN, 0.1];
    for dt in FLOATS {
        for len in [1usize, 7, 257, 100_003] {
            let mut v = t.random_vec(len, -3.0, 3.0);
            for (x, s) in v.iter_mut().zip(specials) {
                *x = s;
            }
            let b = t.alloc(dt, len);
            t.upload(b, &v);
            t.exact(b, &format!("upload {dt} x{len}"));
            let (mut gb, mut rb) = (vec![0u8; b.bytes()], vec![0u8; b.bytes()]);
            t.gpu.download_bytes(b, &mut gb).unwrap();
            t.re.download_bytes(b, &mut rb).unwrap();
            // NaN payloads may differ between roundings: compare the values instead of bits for NaNs.
            if !v.iter().any(|x| x.is_nan()) {
                assert_eq!(gb, rb, "download_bytes {dt}");
            }
            let c = t.alloc(dt, len);
            t.gpu.upload_bytes(c, &rb).unwrap();
            t.re.upload_bytes(c, &rb).unwrap();
            t.exact(c, &format!("upload_bytes {dt} x{len}"));
            for value in [1.5f32, -0.0, 1e-8, 70000.0, 0.1] {
                t.gpu.fill(c, value).unwrap();
                t.re.fill(c, value).unwrap();
                t.exact(c, &format!("fill {dt} {value}"));
            }
            for dst in FLOATS {
                let d = t.nans(dst, len + 3);
                t.gpu.cast(b, d).unwrap();
                t.re.cast(b, d).unwrap();
                t.exact(d, &format!("cast {dt} -> {dst} x{len}"));
            }
        }
    }
    let labels = t.alloc(DType::I32, 7);
    let l = [0, 1, -5, 9, i32::MAX, i32::MIN, 3];
    t.gpu.upload_i32(labels, &l).unwrap();
    t.re.upload_i32(labels, &l).unwrap();
    t.exact(labels, "upload_i32");
    for value in [3.7f32, -2.0, f32::NAN, 1e20] {
        t.gpu.fill(labels, value).unwrap();
        t.re.fill(labels, value).unwrap();
        t.exact(labels, &format!("fill i32 {value}"));
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn buffers_outside_the_arena_and_bad_dtypes_are_errors() {
    let mut t = Both::new();
    let cap = t.gpu.capacity();
    let outside = Buf { offset: cap - 8, len: 4, dtype: DType::F32 };
    assert!(matches!(t.gpu.fill(outside, 1.0), Err(Error::ShapeMismatch { .. })));
    assert!(t.gpu.upload(outside, &[0.0; 4]).is_err());
    let huge = Buf { offset: 64, len: usize::MAX / 2, dtype: DType::F32 };
    assert!(t.gpu.activation(Activation::Relu, huge, huge).is_err());
    let a = t.alloc(DType::F32, 16);
    let b = t.alloc(DType::BF16, 16);
    let c = t.alloc(DType::F32, 16);
    assert!(matches!(t.gpu.gemm(&Gemm::new(4, 4, 4, a, b, c)), Err(Error::UnsupportedDType { .. })));
    assert!(matches!(t.gpu.gemm(&Gemm::new(4, 4, 4, a, a, a)), Err(Error::InvalidConfig(_))));
    let i = t.alloc(DType::I32, 16);
    assert!(matches!(t.gpu.cast(i, a), Err(Error::UnsupportedDType { .. })));
}

/// One GEMM problem on both sides with C prefilled (NaN when beta == 0) and a per-element error bound from
/// `sum_p |a_ip b_pj|`.
#[allow(clippy::too_many_arguments)]
fn gemm_case(
    t: &mut Both,
    ab: DType,
    cd: DType,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    batch: usize,
    beta: f32,
) {
    let (lda, ldb, ldc) = (if ta { m } else { k } + 3, if tb { k } else { n } + 1, n + 2);
    let (ar, br) = (if ta { k } else { m }, if tb { n } else { k });
    let (sa, sb, sc) = (ar * lda + 5, br * ldb, m * ldc + 1);
    let (sa, sb) = if batch > 2 { (0, sb) } else { (sa, sb) }; // stride 0: A broadcast over the batch
    let a = t.random(ab, (batch - 1) * sa + ar * lda, -1.0, 1.0);
    let b = t.random(ab, (batch - 1) * sb + br * ldb, -1.0, 1.0);
    let c = if beta == 0.0 {
        t.nans(cd, (batch - 1) * sc + m * ldc)
    } else {
        t.random(cd, (batch - 1) * sc + m * ldc, -1.0, 1.0)
    };
    let mut g = Gemm::new(m, n, k, a, b, c).beta(beta).batched(batch, sa, sb, sc);
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
    // Bound per C element: accumulation-order differences (f32, k terms) on sum |a||b|, plus one rounding of
    // the output dtype, plus beta * C's share. Elements outside the problems (padding) must be untouched.
    let mut bound = vec![0.0f64; c.len];
    let mut inside = vec![false; c.len];
    for t_ in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let ai = t_ * sa + if ta { p * lda + i } else { i * lda + p };
                    let bi = t_ * sb + if tb { j * ldb + p } else { p * ldb + j };
                    s += (av[ai] as f64 * bv[bi] as f64).abs();
                }
                let ci = t_ * sc + i * ldc + j;
                let cprev = if beta == 0.0 { 0.0 } else { (beta as f64 * c0[ci] as f64).abs() };
                bound[ci] = (k as f64 + 2.0) * 4.0 * u(DType::F32) * (0.75 * s + cprev) + 1e-30;
                inside[ci] = true;
            }
        }
    }
    let what = format!("gemm {ab}->{cd} {m}x{n}x{k} ta={ta} tb={tb} batch={batch} beta={beta}");
    t.compare_with(c, &what, |i, y| if inside[i] { bound[i] + 2.0 * u(cd) * (y as f64).abs() } else { 0.0 });
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn gemm_every_transpose_dtype_pair_and_batch() {
    let mut t = Both::new();
    // cuBLAS pairs, then pairs only the naive kernel takes (f32 inputs into a 16-bit C, mixed 16-bit types).
    let pairs = [
        (DType::F32, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F16, DType::F16),
        (DType::F16, DType::F32),
        (DType::F32, DType::BF16),
        (DType::F16, DType::BF16),
    ];
    for (ab, cd) in pairs {
        for (m, n, k) in [(1, 1, 1), (7, 7, 7), (63, 65, 67), (257, 1, 7), (1, 257, 129)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                gemm_case(&mut t, ab, cd, m, n, k, ta, tb, 1, 0.0);
            }
        }
        for (ta, tb) in [(false, false), (true, true)] {
            gemm_case(&mut t, ab, cd, 17, 33, 9, ta, tb, 3, 0.0);
            gemm_case(&mut t, ab, cd, 17, 33, 9, ta, tb, 2, 1.0);
        }
        t.arena = mantissa_core::Arena::new(t.arena.capacity());
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn gemm_corner_cases_match() {
    let mut t = Both::new();
    // k == 0: C = beta * C (alpha times an empty sum); stride_c == 0: the batch accumulates into one C.
    for dt in FLOATS {
        let a = t.random(dt, 16, -1.0, 1.0);
        let c = t.random(DType::F32, 12, -1.0, 1.0);
        let g = Gemm::new(3, 4, 0, a, a.slice(8, 8), c).beta(0.5);
        t.gpu.gemm(&g).unwrap();
        t.re.gemm(&g).unwrap();
        t.exact(c, &format!("gemm k=0 {dt}"));
        let a = t.random(dt, 4 * 5 * 3, -1.0, 1.0);
        let b = t.random(dt, 5 * 6 * 3, -1.0, 1.0);
        let c = t.random(DType::F32, 4 * 6, -1.0, 1.0);
        let g = Gemm::new(4, 6, 5, a, b, c).beta(1.0).batched(3, 20, 30, 0);
        t.gpu.gemm(&g).unwrap();
        t.re.gemm(&g).unwrap();
        t.compare(c, &format!("gemm stride_c=0 beta=1 {dt}"), 1e-5, 1e-5);
    }
    // A larger problem on the tensor cores (bf16 and f16 in, f32 out): relative error against the reference.
    for dt in [DType::BF16, DType::F16, DType::F32] {
        let (m, n, k) = (512, 384, 1000);
        let a = t.random(dt, m * k, -1.0, 1.0);
        let b = t.random(dt, k * n, -1.0, 1.0);
        let c = t.nans(DType::F32, m * n);
        let g = Gemm::new(m, n, k, a, b, c);
        t.gpu.gemm(&g).unwrap();
        t.re.gemm(&g).unwrap();
        // |sum| of 1000 products of U(-1,1) values is ~10; order differences are ~k*u*sum|ab| ~ 1e-4 at most.
        t.compare(c, &format!("gemm {m}x{n}x{k} {dt}"), 2e-4, 0.0);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn bias_add_and_bias_grad() {
    let mut t = Both::new();
    for yt in FLOATS {
        for bt in FLOATS {
            for (outer, ch, inner) in [(1, 1, 1), (7, 5, 1), (257, 63, 1), (7, 5, 67), (3, 17, 257)] {
                let y = t.random(yt, outer * ch * inner, -2.0, 2.0);
                let b = t.random(bt, ch, -1.0, 1.0);
                t.gpu.add_bias(y, b, outer, ch, inner).unwrap();
                t.re.add_bias(y, b, outer, ch, inner).unwrap();
                t.exact(y, &format!("add_bias {yt}+{bt} [{outer},{ch},{inner}]"));
                let db = t.nans(bt, ch);
                t.gpu.bias_grad(y, db, outer, ch, inner).unwrap();
                t.re.bias_grad(y, db, outer, ch, inner).unwrap();
                // Tree order vs sequential: error ~ count * u * sum|dy| <= count^2 * 2 * u.
                let count = (outer * inner) as f64;
                let (abs, rel) = (count * 2.0 * 4.0 * u(DType::F32) * count.sqrt().max(1.0), 2.0 * u(bt));
                t.compare(db, &format!("bias_grad {yt}->{bt} [{outer},{ch},{inner}]"), abs, rel);
            }
        }
    }
    // Enough rows to split the column sums across many blocks (the MLP's shape, smaller).
    let (outer, ch) = (8192, 4096 / 8);
    let y = t.random(DType::BF16, outer * ch, -1.0, 1.0);
    let db = t.nans(DType::F32, ch);
    t.gpu.bias_grad(y, db, outer, ch, 1).unwrap();
    t.re.bias_grad(y, db, outer, ch, 1).unwrap();
    t.compare(db, "bias_grad bf16 [8192, 512, 1]", 1e-3, 0.0);
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn activations_forward_and_backward() {
    let mut t = Both::new();
    for act in [Activation::Relu, Activation::GeluTanh] {
        for xt in FLOATS {
            for yt in FLOATS {
                for len in [1usize, 7, 257, 65_537] {
                    let mut v = t.random_vec(len, -6.0, 6.0);
                    for (x, s) in v.iter_mut().zip([0.0, -0.0, f32::NAN, 20.0, -20.0]) {
                        *x = s;
                    }
                    let x = t.alloc(xt, len);
                    t.upload(x, &v);
                    let y = t.nans(yt, len);
                    t.gpu.activation(act, x, y).unwrap();
                    t.re.activation(act, x, y).unwrap();
                    let (abs, rel) = if act == Activation::Relu { (0.0, 0.0) } else { tol(yt) };
                    t.compare(y, &format!("{act:?} {xt}->{yt} x{len}"), abs, rel);
                    let dy = t.random(yt, len, -1.0, 1.0);
                    let dx = t.nans(yt, len);
                    t.gpu.activation_backward(act, x, dy, dx).unwrap();
                    t.re.activation_backward(act, x, dy, dx).unwrap();
                    t.compare(dx, &format!("{act:?}' {xt}, {yt} x{len}"), abs, rel);
                    // In place: dx == dy.
                    t.gpu.activation_backward(act, x, dy, dy).unwrap();
                    t.re.activation_backward(act, x, dy, dy).unwrap();
                    t.compare(dy, &format!("{act:?}' in place {xt}, {yt} x{len}"), abs, rel);
                }
                t.arena = mantissa_core::Arena::new(t.arena.capacity());
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn softmax_cross_entropy_loss_and_gradient() {
    let mut t = Both::new();
    for lt in FLOATS {
        for dt in FLOATS {
            for (rows, classes) in [(1, 1), (7, 10), (257, 67), (63, 1000), (9000, 10)] {
                let logits = t.random(lt, rows * classes, -8.0, 8.0);
                let labels = t.alloc(DType::I32, rows);
                let l: Vec<i32> = (0..rows).map(|r| ((r * 7919) % classes) as i32).collect();
                t.gpu.upload_i32(labels, &l).unwrap();
                t.re.upload_i32(labels, &l).unwrap();
                let loss = t.nans(DType::F32, 1);
                let d = t.nans(dt, rows * classes);
                for scale in [1.0f32, 1024.0] {
                    t.gpu.softmax_cross_entropy(logits, labels, rows, classes, loss, d, scale).unwrap();
                    t.re.softmax_cross_entropy(logits, labels, rows, classes, loss, d, scale).unwrap();
                    t.compare(loss, &format!("xent loss {lt} [{rows},{classes}]"), 1e-5, 1e-5);
                    let g = scale as f64 / rows as f64;
                    let abs = 1e-6 * g + subnormal_ulp(dt);
                    t.compare(
                        d,
                        &format!("xent dlogits {lt}->{dt} [{rows},{classes}] x{scale}"),
                        abs,
                        1e-5 + 2.0 * u(dt),
                    );
                }
            }
            t.arena = mantissa_core::Arena::new(t.arena.capacity());
        }
    }
    // A label outside 0..classes is an error value on both.
    let logits = t.random(DType::F32, 3 * 4, -1.0, 1.0);
    let labels = t.alloc(DType::I32, 3);
    t.gpu.upload_i32(labels, &[0, 4, 1]).unwrap();
    let (loss, d) = (t.alloc(DType::F32, 1), t.alloc(DType::F32, 12));
    let r = t.gpu.softmax_cross_entropy(logits, labels, 3, 4, loss, d, 1.0);
    assert!(matches!(r, Err(Error::LabelOutOfRange { label: 4, classes: 4 })), "{r:?}");
}

fn conv_geom(c: usize, h: usize, w: usize, k: usize, s: usize, p: usize) -> ConvGeom {
    ConvGeom {
        channels: c,
        height: h,
        width: w,
        kernel: k,
        stride: s,
        padding: p,
        out_height: (h + 2 * p - k) / s + 1,
        out_width: (w + 2 * p - k) / s + 1,
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn im2col_and_col2im() {
    let mut t = Both::new();
    for (xt, ct) in
        [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::F16, DType::F16), (DType::F32, DType::BF16)]
    {
        for g in [
            conv_geom(3, 7, 9, 3, 2, 1),
            conv_geom(1, 28, 28, 5, 1, 2),
            conv_geom(5, 6, 5, 4, 3, 0),
            conv_geom(2, 1, 1, 1, 1, 0),
        ] {
            let images = 3;
            let x = t.random(xt, images * g.in_len(), -1.0, 1.0);
            let cols = t.nans(ct, images * g.col_rows() * g.col_cols());
            t.gpu.im2col(x, &g, images, cols).unwrap();
            t.re.im2col(x, &g, images, cols).unwrap();
            t.exact(cols, &format!("im2col {xt}->{ct} {g:?}"));
            let dx = t.nans(xt, images * g.in_len());
            t.gpu.col2im(cols, &g, images, dx).unwrap();
            t.re.col2im(cols, &g, images, dx).unwrap();
            t.exact(dx, &format!("col2im {ct}->{xt} {g:?}"));
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn maxpool_forward_backward_with_ties_and_overlap() {
    let mut t = Both::new();
    for (xt, yt) in
        [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::F16, DType::F16), (DType::F32, DType::F16)]
    {
        for (c, h, w, k, s) in [(3, 8, 8, 2, 2), (2, 7, 9, 3, 2), (1, 5, 5, 3, 1), (4, 28, 28, 2, 2)] {
            let g = PoolGeom {
                channels: c,
                height: h,
                width: w,
                kernel: k,
                stride: s,
                out_height: (h - k) / s + 1,
                out_width: (w - k) / s + 1,
            };
            let images = 3;
            // Few distinct values: many ties, which go to the first position.
            let v: Vec<f32> = t.random_vec(images * g.in_len(), 0.0, 4.0).iter().map(|x| x.floor()).collect();
            let x = t.alloc(xt, v.len());
            t.upload(x, &v);
            let y = t.nans(yt, images * g.out_len());
            let am = t.alloc(DType::I32, images * g.out_len());
            t.gpu.maxpool(x, &g, images, y, am).unwrap();
            t.re.maxpool(x, &g, images, y, am).unwrap();
            t.exact(y, &format!("maxpool {xt}->{yt} {g:?}"));
            t.exact(am, &format!("maxpool argmax {g:?}"));
            let dy = t.random(yt, images * g.out_len(), -1.0, 1.0);
            let dx = t.nans(xt, images * g.in_len());
            t.gpu.maxpool_backward(dy, am, &g, images, dx).unwrap();
            t.re.maxpool_backward(dy, am, &g, images, dx).unwrap();
            t.exact(dx, &format!("maxpool_backward {yt}->{xt} {g:?}"));
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn grad_stats_counts_non_finite_and_sums_squares() {
    let mut t = Both::new();
    for dt in FLOATS {
        for len in [1usize, 7, 257, 1_000_003] {
            let mut v = t.random_vec(len, -3.0, 3.0);
            if len > 7 {
                v[3] = f32::NAN;
                v[len - 1] = f32::INFINITY;
                v[len / 2] = 60000.0; // finite, but * scale overflows f16 nowhere: scale <= 1
            }
            let b = t.alloc(dt, len);
            t.upload(b, &v);
            for scale in [1.0f32, 0.5, 1.0 / 65536.0] {
                let g = t.gpu.grad_stats(b, scale).unwrap();
                let r = t.re.grad_stats(b, scale).unwrap();
                assert_eq!(g.non_finite, r.non_finite, "grad_stats {dt} x{len}");
                let d = (g.sum_sq - r.sum_sq).abs();
                println!(
                    "grad_stats {dt} x{len} scale {scale}: non_finite {} sum_sq {} (|diff| {d:e})",
                    g.non_finite, g.sum_sq
                );
                // f64 sums in different orders (tree vs sequential): within len * 2^-53 of the total.
                let bound = len as f64 * f64::EPSILON / 2.0 * r.sum_sq.abs();
                assert!(d <= bound, "sum_sq {} vs {}: |diff| {d:e} > {bound:e}", g.sum_sq, r.sum_sq);
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn fused_sgd_and_adamw_match_the_reference() {
    let mut t = Both::new();
    for n in [1usize, 7, 257, 100_003] {
        for wt in [None, Some(DType::F32), Some(DType::BF16), Some(DType::F16)] {
            let master = t.random(DType::F32, n, -1.0, 1.0);
            let working = match wt {
                None => master,
                Some(dt) => t.nans(dt, n),
            };
            let grad = t.random(DType::F32, n, -1000.0, 1000.0);
            let s1 = t.random(DType::F32, n, -0.1, 0.1);
            let s2 = t.random(DType::F32, n, 0.0, 0.01);
            let p = ParamBufs { master, working, grad, state1: s1, state2: s2 };
            let name = format!("{:?} x{n}", wt);
            for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
                let s = SgdStep { lr: 0.01, momentum, nesterov, weight_decay: 1e-4, grad_scale: 1.0 / 1024.0 };
                t.gpu.sgd_step(&p, &s).unwrap();
                t.re.sgd_step(&p, &s).unwrap();
                t.exact(master, &format!("sgd master {name} m={momentum} nesterov={nesterov}"));
                t.exact(s1, &format!("sgd momentum {name}"));
                t.exact(working, &format!("sgd working {name}"));
            }
            for step in 1..=3 {
                let (b1, b2) = (0.9f32, 0.999f32);
                let s = AdamWStep {
                    lr: 1e-3,
                    beta1: b1,
                    beta2: b2,
                    eps: 1e-8,
                    weight_decay: 0.01,
                    bias_correction1: (1.0 - (b1 as f64).powi(step)) as f32,
                    bias_correction2: (1.0 - (b2 as f64).powi(step)) as f32,
                    grad_scale: 1.0 / 1024.0,
                };
                t.gpu.adamw_step(&p, &s).unwrap();
                t.re.adamw_step(&p, &s).unwrap();
                t.exact(master, &format!("adamw master {name} t={step}"));
                t.exact(s1, &format!("adamw m {name}"));
                t.exact(s2, &format!("adamw v {name}"));
                t.exact(working, &format!("adamw working {name}"));
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn argmax_count_correct_and_count_underflow_match_the_reference() {
    let mut t = Both::new();
    for lt in FLOATS {
        for (rows, classes) in [(1, 1), (7, 10), (257, 67), (9000, 10)] {
            // Coarse values make ties common: the first maximum must win on both.
            let v: Vec<f32> = (0..rows * classes).map(|_| (t.rng.below(5) as f32) - 2.0).collect();
            let logits = t.alloc(lt, rows * classes);
            t.upload(logits, &v);
            let labels = t.alloc(DType::I32, rows);
            let l: Vec<i32> = (0..rows).map(|r| ((r * 31) % classes) as i32).collect();
            t.gpu.upload_i32(labels, &l).unwrap();
            t.re.upload_i32(labels, &l).unwrap();
            let (mut a, mut b) = (vec![0u32; rows], vec![0u32; rows]);
            t.gpu.argmax(logits, rows, classes, &mut a).unwrap();
            t.re.argmax(logits, rows, classes, &mut b).unwrap();
            assert_eq!(a, b, "argmax {lt} [{rows},{classes}]");
            let cg = t.gpu.count_correct(logits, labels, rows, classes).unwrap();
            let cr = t.re.count_correct(logits, labels, rows, classes).unwrap();
            assert_eq!(cg, cr, "count_correct {lt} [{rows},{classes}]");
        }
        t.arena = mantissa_core::Arena::new(t.arena.capacity());
    }
    // Values straddling f16's flush threshold (2^-25) and bf16's (2^-134), zeros and NaN.
    let mut v: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) * 1e-10).collect();
    v.extend([0.0, -0.0, f32::NAN, 2.0f32.powi(-25), 2.0f32.powi(-24), 1e-40, 1e-45, 1.0]);
    let src = t.alloc(DType::F32, v.len());
    t.upload(src, &v);
    for dt in FLOATS {
        let g = t.gpu.count_underflow(src, dt).unwrap();
        let r = t.re.count_underflow(src, dt).unwrap();
        assert_eq!(g, r, "count_underflow f32 -> {dt}");
    }
}

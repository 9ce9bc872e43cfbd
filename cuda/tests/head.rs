//! `Backend::linear_act_forward` and `Backend::linear_act_backward` on the GPU (a classifier layer after an
//! activation as one pass each way, `kernels/head.cu`) against the scalar reference running the composed
//! versions, the specification, on identical inputs: f32, bf16 and f16; GELU (tanh) and ReLU; outputs o in
//! {1, 3, 4, 10, 16} (the kernels' three instantiations, padded and exact), rows from 1 to 2048 (one split up to
//! many), in-features from 2 to 4096 (a partial last column tile; for 16-bit dtypes, in-feature counts that are
//! multiples of 8 run the tensor-core kernels, the others the CUDA-core ones); frozen weight and no previous bias
//! (gradients `None`). The GPU's backward gets the layer's input unwritten (`x_valid: false`, poisoned with
//! NaN), as after its forward kernel. Then problems the kernels do not take (o = 17, in-feature counts they
//! cannot vectorise), which run composed, and the same bits twice.
//!
//! Tolerances, per element, from the stored inputs in f64 (`d = act'(pre)`, `S_g = sum_p |dy w|`, `u` the
//! unit roundoff of the dtype, `u32` of f32):
//! - dx: both round the product `g` to the dtype (f32 sums in possibly different orders: `(o + 2) u32 S_g`), so
//!   the stored products may differ by one rounding, `2 u |g|`; times `|d|`; then each rounds `g d` once more,
//!   `2 u |dx|`; plus `16 u32 |dx|` and `e' S_g (1 + |pre| (1 + 0.15 pre^2))` for act' in f32, an absolute bound
//!   because act' cancels near its zero (as in fused.rs): `e' = 16 u32` where the kernel uses tanhf (f32, and
//!   ReLU), `6e-4` where it uses the hardware tanh (GELU for 16-bit dtypes: relative error 2^-10.99 in t, and
//!   |d act' / dt| <= 0.5 + 0.8 |pre| (1 + 0.134 pre^2)).
//! - dW: the kernel recomputes the layer's input `x = act(pre)` where the reference reads it as stored; the two
//!   can differ by one rounding of the dtype (`2 u |x|`), by `e |pre|` before rounding (`e = 16 u32` with
//!   tanhf, `2.5e-4` with the hardware tanh: `0.5 |pre| |dt|`), and the f32 sums over rows run in other orders:
//!   `sum_r |dy| ((2 u + (2 rows + 8) u32) |x| + e |pre|)`.
//! - the layer's bias gradient: f32 summation order, `(2 rows + 4) u32 sum_r |dy|`.
//! - the previous bias gradient: the column's sum of the dx tolerances plus f32 order `(2 rows + 4) u32 sum |dx|`.
//! - forward y: the kernel's `x` against the reference's stored one as for dW (`2 u |x| + e |pre|` a term), f32
//!   order over the `i` terms (tensor cores too: products of 16-bit values are exact in f32), then both round
//!   the product (`2 u |g|`) and the sum with the bias (`2 u (|g| + 1)`,
//!   the bias being below 1).

mod common;

use common::{act_derivative, rig_without_autotune as rig, u, Both, FLOATS, GPU};
use mantissa_core::backend::{Activation, LinearActBackward, LinearActForward};
use mantissa_core::{Backend, Buf, DType};

const U32: f64 = 1.0 / 16_777_216.0;

struct Case {
    dt: DType,
    act: Activation,
    rows: usize,
    i: usize,
    o: usize,
    /// Weight and bias gradients, and the previous layer's bias gradient, wanted.
    grads: bool,
}

/// Runs one case on both sides and compares; returns whether the GPU took the fused kernel.
fn case(b: &mut Both, c: &Case) -> bool {
    let Case { dt, act, rows, i, o, grads } = *c;
    let what = format!("{dt:?} {act:?} rows={rows} i={i} o={o} grads={grads}");
    let mark = b.arena.mark();
    let dy = b.random(dt, rows * o, -1.0, 1.0);
    let w = b.random(dt, o * i, -0.5, 0.5);
    let pre = b.random(dt, rows * i, -3.0, 3.0);
    // The layer's input as the forward pass stores it: act(pre), by the reference, the same on both sides.
    let x = b.alloc(dt, rows * i);
    b.re.activation(act, pre, x).unwrap();
    let mut xv = vec![0.0; rows * i];
    b.re.download(x, &mut xv).unwrap();
    b.upload(x, &xv);
    let dx = b.nans(dt, rows * i);
    let (dw, db, prev) = if grads {
        (Some(b.nans(DType::F32, o * i)), Some(b.nans(DType::F32, o)), Some(b.nans(DType::F32, i)))
    } else {
        (None, None, None)
    };
    // The GPU gets x as the forward kernel leaves it (not written: poisoned here), the reference as stored.
    let xg = b.nans(dt, rows * i);
    let op = LinearActBackward { act, rows, i, o, dy, x, x_valid: true, pre, w, dx, dw, db, prev_dbias: prev };
    let op_gpu = LinearActBackward { x: xg, x_valid: false, ..op };
    let before = b.gpu.fused_head_calls();
    b.gpu.linear_act_backward(&op_gpu).unwrap();
    let fused = b.gpu.fused_head_calls() > before;
    b.re.linear_act_backward(&op).unwrap();

    let get = |b: &mut Both, buf: Buf| b.get(buf).1.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (dyv, wv, prev_v, xs) = (get(b, dy), get(b, w), get(b, pre), get(b, x));
    let dx_ref = get(b, dx);
    let ut = u(dt);
    // The error of act' and of the recomputed act(pre) in f32, relative to the bounds below (see the top).
    let approx = dt != DType::F32 && act == Activation::GeluTanh;
    let (e_grad, e_act) = if approx { (6e-4, 2.5e-4) } else { (16.0 * U32, 16.0 * U32) };
    // dx
    let mut tol_dx = vec![0.0f64; rows * i];
    for r in 0..rows {
        for k in 0..i {
            let (mut g, mut sg) = (0.0f64, 0.0f64);
            for p in 0..o {
                g += dyv[r * o + p] * wv[p * i + k];
                sg += (dyv[r * o + p] * wv[p * i + k]).abs();
            }
            let xp = prev_v[r * i + k];
            let d = act_derivative(act, xp).abs();
            let y = dx_ref[r * i + k].abs();
            tol_dx[r * i + k] = (2.0 * ut * g.abs() + (o as f64 + 2.0) * U32 * sg) * d
                + 2.0 * ut * y
                + e_grad * sg * (1.0 + xp.abs() * (1.0 + 0.15 * xp * xp))
                + 16.0 * U32 * y
                + 1e-30;
        }
    }
    b.compare_with(dx, &format!("{what} dx"), |j, _| tol_dx[j]);
    if grads {
        let dw = dw.unwrap();
        let tw: Vec<f64> = (0..o * i)
            .map(|j| {
                let (p, k) = (j / i, j % i);
                let s: f64 = (0..rows).map(|r| (dyv[r * o + p] * xs[r * i + k]).abs()).sum();
                let sx: f64 = (0..rows).map(|r| (dyv[r * o + p] * prev_v[r * i + k]).abs()).sum();
                s * (2.0 * ut + (2.0 * rows as f64 + 8.0) * U32) + e_act * sx + 1e-30
            })
            .collect();
        b.compare_with(dw, &format!("{what} dW"), |j, _| tw[j]);
        let tb: Vec<f64> = (0..o)
            .map(|p| (0..rows).map(|r| dyv[r * o + p].abs()).sum::<f64>() * (2.0 * rows as f64 + 4.0) * U32 + 1e-30)
            .collect();
        b.compare_with(db.unwrap(), &format!("{what} db"), |j, _| tb[j]);
        let tp: Vec<f64> = (0..i)
            .map(|k| {
                (0..rows)
                    .map(|r| tol_dx[r * i + k] + (2.0 * rows as f64 + 4.0) * U32 * dx_ref[r * i + k].abs())
                    .sum::<f64>()
                    + 1e-30
            })
            .collect();
        b.compare_with(prev.unwrap(), &format!("{what} previous bias"), |j, _| tp[j]);
    }
    b.arena.release(mark);
    fused
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn classifier_backward_matches_the_reference() {
    let _ = GPU;
    let Some(mut b) = rig() else { return };
    let shapes = [
        (1, 2, 1),
        (7, 66, 3),
        (9, 130, 4),
        (300, 130, 10),
        (513, 96, 16),
        (17, 8, 1),
        (45, 264, 3),
        (1000, 4096, 10),
        (2048, 4096, 10),
    ];
    for dt in FLOATS {
        for act in [Activation::GeluTanh, Activation::Relu] {
            for &(rows, i, o) in &shapes {
                if rows * i >= 2048 * 4096 && (dt != DType::BF16 || act != Activation::GeluTanh) {
                    continue; // the real size once, as gpu-mlp runs it
                }
                let fused = case(&mut b, &Case { dt, act, rows, i, o, grads: true });
                assert!(fused, "{dt:?} {act:?} {rows}x{i}x{o}: the fused kernel should take this problem");
            }
        }
        let fused = case(&mut b, &Case { dt, act: Activation::GeluTanh, rows: 200, i: 62, o: 10, grads: false });
        assert!(fused, "no gradients wanted but dx");
    }
}

/// The forward op on one problem, both sides; returns whether the GPU took the kernel (then x is not written).
fn forward_case(b: &mut Both, dt: DType, act: Activation, rows: usize, i: usize, o: usize) -> bool {
    let what = format!("forward {dt:?} {act:?} rows={rows} i={i} o={o}");
    let mark = b.arena.mark();
    let pre = b.random(dt, rows * i, -3.0, 3.0);
    let w = b.random(dt, o * i, -0.5, 0.5);
    let bias = b.random(dt, o, -1.0, 1.0);
    let (x, y) = (b.nans(dt, rows * i), b.nans(dt, rows * o));
    let op = LinearActForward { act, rows, i, o, pre, x, w, b: bias, y };
    let before = b.gpu.fused_head_calls();
    let stored = b.gpu.linear_act_forward(&op).unwrap();
    let fused = b.gpu.fused_head_calls() > before;
    assert_eq!(stored, !fused, "{what}: x is stored exactly when the kernel did not run");
    assert!(b.re.linear_act_forward(&op).unwrap());
    let get = |b: &mut Both, buf: Buf| b.get(buf).1.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (pv, wv, xs) = (get(b, pre), get(b, w), get(b, x));
    let ut = u(dt);
    let approx = dt != DType::F32 && act == Activation::GeluTanh;
    let e_act = if approx { 2.5e-4 } else { 16.0 * U32 };
    // y: the reference's x may differ from the kernel's by one rounding (2 u |x|) and e |pre| before it; f32
    // order over i terms; then both round the product (2 u) and the sum with the bias (2 u |y|).
    let tol: Vec<f64> = (0..rows * o)
        .map(|j| {
            let (r, p) = (j / o, j % o);
            let (mut s, mut sp, mut g) = (0.0, 0.0, 0.0);
            for k in 0..i {
                let wk = wv[p * i + k];
                s += (xs[r * i + k] * wk).abs();
                sp += (pv[r * i + k] * wk).abs();
                g += xs[r * i + k] * wk;
            }
            s * (2.0 * ut + (i as f64 + 2.0) * U32) + e_act * sp + 2.0 * ut * g.abs() + 2.0 * ut * (g.abs() + 1.0)
        })
        .collect();
    b.compare_with(y, &what, |j, _| tol[j]);
    b.arena.release(mark);
    fused
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn classifier_forward_matches_the_reference() {
    let Some(mut b) = rig() else { return };
    for dt in FLOATS {
        for act in [Activation::GeluTanh, Activation::Relu] {
            for (rows, i, o) in
                [(1, 8, 1), (7, 72, 3), (33, 136, 4), (300, 520, 10), (513, 96, 16), (45, 264, 3), (2048, 4096, 10)]
            {
                assert!(forward_case(&mut b, dt, act, rows, i, o), "{dt:?} {rows}x{i}x{o}: the kernel should take it");
            }
        }
    }
    // Not taken: 17 outputs; 12 in-features (not a multiple of 8 16-bit elements); switched off.
    assert!(!forward_case(&mut b, DType::BF16, Activation::GeluTanh, 40, 64, 17));
    assert!(!forward_case(&mut b, DType::BF16, Activation::GeluTanh, 40, 12, 10));
    b.gpu.set_fused_head(false);
    assert!(!forward_case(&mut b, DType::BF16, Activation::GeluTanh, 40, 64, 10));
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn problems_the_kernel_does_not_take_run_composed() {
    let Some(mut b) = rig() else { return };
    for (rows, i, o) in [(50, 64, 17), (50, 65, 10)] {
        let fused = case(&mut b, &Case { dt: DType::BF16, act: Activation::GeluTanh, rows, i, o, grads: true });
        assert!(!fused, "{rows}x{i}x{o} should run composed");
    }
    // Switched off: composed, and still right.
    b.gpu.set_fused_head(false);
    let fused = case(&mut b, &Case { dt: DType::BF16, act: Activation::GeluTanh, rows: 50, i: 64, o: 10, grads: true });
    assert!(!fused);
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn repeated_calls_give_the_same_bits() {
    let Some(mut b) = rig() else { return };
    let (rows, i, o) = (3000, 1000, 10);
    let dt = DType::BF16;
    let dy = b.random(dt, rows * o, -1.0, 1.0);
    let w = b.random(dt, o * i, -0.5, 0.5);
    let pre = b.random(dt, rows * i, -3.0, 3.0);
    let x = b.alloc(dt, rows * i);
    b.gpu.activation(Activation::GeluTanh, pre, x).unwrap();
    let mut outs = Vec::new();
    for _ in 0..2 {
        let dx = b.alloc(dt, rows * i);
        let dw = b.alloc(DType::F32, o * i);
        let prev = b.alloc(DType::F32, i);
        let op = LinearActBackward {
            act: Activation::GeluTanh,
            rows,
            i,
            o,
            dy,
            x,
            x_valid: true,
            pre,
            w,
            dx,
            dw: Some(dw),
            db: None,
            prev_dbias: Some(prev),
        };
        b.gpu.linear_act_backward(&op).unwrap();
        let mut bytes = Vec::new();
        for buf in [dx, dw, prev] {
            let mut v = vec![0u8; buf.bytes()];
            b.gpu.download_bytes(buf, &mut v).unwrap();
            bytes.push(v);
        }
        outs.push(bytes);
    }
    assert!(outs[0] == outs[1], "two runs differ");
}

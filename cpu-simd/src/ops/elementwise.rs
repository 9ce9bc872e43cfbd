//! Element-wise ops: `fill`, `add_bias`, `bias_grad`, `activation`, `activation_backward`, and the vector
//! `exp` that GELU and the softmax use.
//!
//! Shapes: `y: [outer, channels, inner]` (Linear: `inner = 1`; Conv2d: `inner = OH * OW`).

use mantissa_core::backend::Activation;

use super::convert::{load, store, to_bits};
use super::{multiversion, CH};
use crate::gemm::{Elem, ElemKind};

/// sqrt(2 / pi), as the reference.
const GELU_S: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// `e^x` in the Cephes `expf` form (range reduction by `ln 2` in two parts, degree-5 polynomial, scale by
/// `2^n` through the exponent bits): branch-free, so it vectorises; within 2 ulp of `libm::expf` for
/// `x` in [-87.3, 88]. Outside, the argument is clamped: large negative `x` gives `~1.2e-38` instead of a
/// subnormal or zero, large positive `x` gives `~1.7e38` instead of infinity. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_54, 88.0);
    let z = x * LOG2E + MAGIC;
    let n = z - MAGIC;
    let ni = (z.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let y = p * (r * r) + r + 1.0;
    y * f32::from_bits(((ni + 127) as u32) << 23)
}

#[inline(always)]
fn relu(x: f32) -> f32 {
    // As the reference: NaN passes through, -0 and negatives give +0.
    if x > 0.0 || x.is_nan() {
        x
    } else {
        0.0
    }
}

/// `0.5 x (1 + tanh(u)) = x * sigmoid(2u)`, `u = sqrt(2/pi) (x + 0.044715 x^3)`. The sigmoid form avoids the
/// cancellation in `1 + tanh(u)` for negative `x`; it differs from the reference's `tanhf` form by a few
/// ulp of `max(|x|, 1)` (tolerance in `tests/backends.rs`).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = GELU_S * (x + GELU_C * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// The derivative of [`gelu`]: `0.5 (1 + t) + 0.5 x (1 - t^2) s' (1 + 3 c x^2)` with `t = tanh(u)`, written
/// with `s = sigmoid(2u) = (1 + t) / 2` and `q = 1 - s = e s` (`e = exp(-2u)`), so `1 - t^2 = 4 s q`.
#[inline(always)]
fn gelu_derivative(x: f32) -> f32 {
    let x2 = x * x;
    let u = GELU_S * (x + GELU_C * x2 * x);
    let e = exp(-2.0 * u);
    let s = 1.0 / (1.0 + e);
    let q = e * s;
    s + 2.0 * x * s * q * GELU_S * (1.0 + 3.0 * GELU_C * x2)
}

/// # Safety
/// `dst` writable for `n` elements.
#[inline(always)]
unsafe fn fill_body<T: Elem, const V: u8>(dst: *mut T, n: usize, value: f32) {
    let v: T = to_bits(value);
    for i in 0..n {
        // SAFETY: i < n.
        unsafe { dst.add(i).write(v) };
    }
}

/// `y[o, c, i] += bias[c]`.
///
/// # Safety
/// `y` readable and writable for `outer * channels * inner` elements, `bias` readable for `channels`; they do
/// not overlap; the CPU has the features of `V`.
#[inline(always)]
unsafe fn add_bias_body<Y: Elem, B: Elem, const V: u8>(
    y: *mut Y,
    bias: *const B,
    outer: usize,
    channels: usize,
    inner: usize,
) {
    let (mut yb, mut bb) = ([0.0f32; CH], [0.0f32; CH]);
    if inner == 1 {
        // Linear: each row of y gets the bias vector.
        let mut c0 = 0;
        while c0 < channels {
            let len = CH.min(channels - c0);
            // SAFETY: c0 + len <= channels; every y index below is < outer * channels.
            unsafe { load::<B, V>(bias.add(c0), &mut bb[..len]) };
            for o in 0..outer {
                let row = unsafe { y.add(o * channels + c0) };
                unsafe { load::<Y, V>(row, &mut yb[..len]) };
                for (a, b) in yb[..len].iter_mut().zip(&bb[..len]) {
                    *a += *b;
                }
                unsafe { store::<Y, V>(&yb[..len], row) };
            }
            c0 += len;
        }
        return;
    }
    for c in 0..channels {
        // SAFETY: c < channels.
        unsafe { load::<B, V>(bias.add(c), &mut bb[..1]) };
        let bc = bb[0];
        for o in 0..outer {
            let row = (o * channels + c) * inner;
            let mut i = 0;
            while i < inner {
                let len = CH.min(inner - i);
                // SAFETY: row + i + len <= outer * channels * inner.
                unsafe { load::<Y, V>(y.add(row + i), &mut yb[..len]) };
                for a in &mut yb[..len] {
                    *a += bc;
                }
                unsafe { store::<Y, V>(&yb[..len], y.add(row + i)) };
                i += len;
            }
        }
    }
}

/// Sum of `x` in 16 interleaved partial sums, combined pairwise (the shape of one AVX-512 register).
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += *v;
        }
    }
    let mut w = 8;
    while w > 0 {
        for l in 0..w {
            lanes[l] += lanes[l + w];
        }
        w /= 2;
    }
    chunks.remainder().iter().fold(lanes[0], |a, v| a + v)
}

/// `dbias[c] = sum over o, i of dy[o, c, i]`, f32 accumulation, for the channels `c` in `c_lo..c_hi` (each
/// channel's sum does not depend on the range: the backend splits channels over threads).
///
/// With `inner == 1` each channel is summed over the rows in row order, exactly as the reference (vectorised
/// across channels). Otherwise each `inner` run is summed in 16 partial sums and added to the channel's total
/// row by row: a different order, so not bit-exact.
///
/// # Safety
/// `dy` readable for `outer * channels * inner` elements, `dbias` writable for `channels`, not overlapping;
/// `c_lo <= c_hi <= channels`; the CPU has the features of `V`.
#[inline(always)]
unsafe fn bias_grad_body<Y: Elem, B: Elem, const V: u8>(
    dy: *const Y,
    dbias: *mut B,
    outer: usize,
    channels: usize,
    inner: usize,
    c_lo: usize,
    c_hi: usize,
) {
    let (mut yb, mut acc) = ([0.0f32; CH], [0.0f32; CH]);
    if inner == 1 {
        let mut c0 = c_lo;
        while c0 < c_hi {
            let len = CH.min(c_hi - c0);
            acc[..len].fill(0.0);
            for o in 0..outer {
                // SAFETY: o * channels + c0 + len <= outer * channels.
                let row = unsafe { dy.add(o * channels + c0) };
                let ys: &[f32] = if matches!(Y::KIND, ElemKind::F32) {
                    // f32 rows are summed in place (no copy through the chunk buffer).
                    // SAFETY: Y is f32; len elements readable (above).
                    unsafe { core::slice::from_raw_parts(row as *const f32, len) }
                } else {
                    // SAFETY: as above.
                    unsafe { load::<Y, V>(row, &mut yb[..len]) };
                    &yb[..len]
                };
                for (a, v) in acc[..len].iter_mut().zip(ys) {
                    *a += *v;
                }
            }
            // SAFETY: c0 + len <= channels.
            unsafe { store::<B, V>(&acc[..len], dbias.add(c0)) };
            c0 += len;
        }
        return;
    }
    for c in c_lo..c_hi {
        let mut total = 0.0f32;
        for o in 0..outer {
            let row = (o * channels + c) * inner;
            let mut i = 0;
            while i < inner {
                let len = CH.min(inner - i);
                // SAFETY: row + i + len <= outer * channels * inner.
                unsafe { load::<Y, V>(dy.add(row + i), &mut yb[..len]) };
                total += sum_lanes(&yb[..len]);
                i += len;
            }
        }
        // SAFETY: c < channels.
        unsafe { store::<B, V>(&[total], dbias.add(c)) };
    }
}

/// `y = act(x)`; `x` and `y` may be the same buffer.
///
/// # Safety
/// `x` readable and `y` writable for `n` elements; they are equal or disjoint; the CPU has the features of `V`.
#[inline(always)]
unsafe fn activation_body<X: Elem, Y: Elem, const V: u8>(act: Activation, x: *const X, y: *mut Y, n: usize) {
    let mut buf = [0.0f32; CH];
    let mut i = 0;
    while i < n {
        let len = CH.min(n - i);
        // SAFETY: i + len <= n; the chunk is read completely before it is written (in-place safe).
        unsafe { load::<X, V>(x.add(i), &mut buf[..len]) };
        match act {
            Activation::Relu => buf[..len].iter_mut().for_each(|v| *v = relu(*v)),
            Activation::GeluTanh => buf[..len].iter_mut().for_each(|v| *v = gelu(*v)),
        }
        unsafe { store::<Y, V>(&buf[..len], y.add(i)) };
        i += len;
    }
}

/// `dx = dy * act'(x)`; `dx` may be `dy`.
///
/// # Safety
/// `x`, `dy` readable and `dx` writable for `n` elements; `dx` equals or is disjoint from `dy` and disjoint
/// from `x`; the CPU has the features of `V`.
#[inline(always)]
unsafe fn activation_backward_body<X: Elem, D: Elem, const V: u8>(
    act: Activation,
    x: *const X,
    dy: *const D,
    dx: *mut D,
    n: usize,
) {
    let (mut xb, mut db) = ([0.0f32; CH], [0.0f32; CH]);
    let mut i = 0;
    while i < n {
        let len = CH.min(n - i);
        // SAFETY: i + len <= n; both chunks are read before dx's chunk is written.
        unsafe {
            load::<X, V>(x.add(i), &mut xb[..len]);
            load::<D, V>(dy.add(i), &mut db[..len]);
        }
        match act {
            // dy * 1 or dy * 0 as the reference (so -0, NaN and infinities in dy come out the same).
            Activation::Relu => {
                for (d, x) in db[..len].iter_mut().zip(&xb[..len]) {
                    *d *= if *x > 0.0 { 1.0 } else { 0.0 };
                }
            }
            Activation::GeluTanh => {
                for (d, x) in db[..len].iter_mut().zip(&xb[..len]) {
                    *d *= gelu_derivative(*x);
                }
            }
        }
        unsafe { store::<D, V>(&db[..len], dx.add(i)) };
        i += len;
    }
}

/// A fused linear layer's epilogue on `rows` rows of `n` elements (row stride `ld`): `pre += bias`, then, with
/// an activation, `y = act(pre)`. Each element gets exactly what `add_bias` and then `activation` give it
/// (f32 in place, with no copy through chunk buffers; other dtypes through those ops' bodies, row by row).
///
/// # Safety
/// `pre` (and `y` with an activation) readable and writable for `rows` rows of `n` at stride `ld`, `bias`
/// readable for `n`; the three do not overlap; the CPU has the features of `V`.
#[inline(always)]
unsafe fn bias_act_rows_body<C: Elem, B: Elem, const V: u8>(
    act: Option<Activation>,
    pre: *mut C,
    bias: *const B,
    y: *mut C,
    rows: usize,
    n: usize,
    ld: usize,
) {
    for r in 0..rows {
        // SAFETY: row r of each lies in the caller's ranges.
        let (p, yr) = unsafe { (pre.add(r * ld), y.wrapping_add(r * ld)) };
        if matches!(C::KIND, ElemKind::F32) && matches!(B::KIND, ElemKind::F32) {
            // SAFETY: C and B are f32; disjoint ranges of n elements (caller).
            let (p, b) = unsafe {
                (core::slice::from_raw_parts_mut(p as *mut f32, n), core::slice::from_raw_parts(bias as *const f32, n))
            };
            match act {
                None => p.iter_mut().zip(b).for_each(|(v, b)| *v += *b),
                Some(act) => {
                    // SAFETY: as above, y's row is disjoint from pre's and the bias.
                    let yr = unsafe { core::slice::from_raw_parts_mut(yr as *mut f32, n) };
                    for ((v, b), o) in p.iter_mut().zip(b).zip(yr.iter_mut()) {
                        let x = *v + *b;
                        *v = x;
                        *o = match act {
                            Activation::Relu => relu(x),
                            Activation::GeluTanh => gelu(x),
                        };
                    }
                }
            }
            continue;
        }
        // SAFETY: forwarded (one row).
        unsafe {
            add_bias_body::<C, B, V>(p, bias, 1, n, 1);
            if let Some(act) = act {
                activation_body::<C, C, V>(act, p, yr, n);
            }
        }
    }
}

/// The input-gradient epilogue on `rows` rows of `n` elements (row stride `ld`): `d *= act'(x)` in place,
/// exactly as `activation_backward` with `dx == dy` (f32 with no copy through chunk buffers).
///
/// # Safety
/// `x` readable and `d` readable and writable for `rows` rows of `n` at stride `ld`, not overlapping; the CPU
/// has the features of `V`.
#[inline(always)]
unsafe fn act_grad_rows_body<C: Elem, const V: u8>(
    act: Activation,
    x: *const C,
    d: *mut C,
    rows: usize,
    n: usize,
    ld: usize,
) {
    for r in 0..rows {
        // SAFETY: row r of each lies in the caller's ranges.
        let (xr, dr) = unsafe { (x.add(r * ld), d.add(r * ld)) };
        if matches!(C::KIND, ElemKind::F32) {
            // SAFETY: C is f32; disjoint ranges of n elements (caller).
            let (xs, ds) = unsafe {
                (core::slice::from_raw_parts(xr as *const f32, n), core::slice::from_raw_parts_mut(dr as *mut f32, n))
            };
            match act {
                Activation::Relu => ds.iter_mut().zip(xs).for_each(|(d, x)| *d *= if *x > 0.0 { 1.0 } else { 0.0 }),
                Activation::GeluTanh => ds.iter_mut().zip(xs).for_each(|(d, x)| *d *= gelu_derivative(*x)),
            }
            continue;
        }
        // SAFETY: forwarded (one row).
        unsafe { activation_backward_body::<C, C, V>(act, xr, dr, dr, n) };
    }
}

multiversion!(
    /// # Safety
    /// As `bias_act_rows_body`.
    unsafe fn bias_act_rows<C: Elem, B: Elem>(
        act: Option<Activation>, pre: *mut C, bias: *const B, y: *mut C, rows: usize, n: usize, ld: usize,
    ) => bias_act_rows_body
);
multiversion!(
    /// # Safety
    /// As `act_grad_rows_body`.
    unsafe fn act_grad_rows<C: Elem>(act: Activation, x: *const C, d: *mut C, rows: usize, n: usize, ld: usize)
        => act_grad_rows_body
);
multiversion!(
    /// # Safety
    /// As `fill_body`.
    unsafe fn fill<T: Elem>(dst: *mut T, n: usize, value: f32) => fill_body
);
multiversion!(
    /// # Safety
    /// As `add_bias_body`.
    unsafe fn add_bias<Y: Elem, B: Elem>(y: *mut Y, bias: *const B, outer: usize, channels: usize, inner: usize)
        => add_bias_body
);
multiversion!(
    /// # Safety
    /// As `bias_grad_body`.
    unsafe fn bias_grad<Y: Elem, B: Elem>(
        dy: *const Y, dbias: *mut B, outer: usize, channels: usize, inner: usize, c_lo: usize, c_hi: usize,
    ) => bias_grad_body
);
multiversion!(
    /// # Safety
    /// As `activation_body`.
    unsafe fn activation<X: Elem, Y: Elem>(act: Activation, x: *const X, y: *mut Y, n: usize) => activation_body
);
multiversion!(
    /// # Safety
    /// As `activation_backward_body`.
    unsafe fn activation_backward<X: Elem, D: Elem>(act: Activation, x: *const X, dy: *const D, dx: *mut D, n: usize)
        => activation_backward_body
);

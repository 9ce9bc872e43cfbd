//! Shared helpers for the integration tests: an aligned host buffer for the reference backend, seeded random
//! data, f64 helpers and the unit roundoffs the tolerances are written in.
#![allow(dead_code)]

use mantissa_core::arena::{Arena, Buf};
use mantissa_core::rng::Rng;
use mantissa_core::{Backend, DType};

/// Unit roundoff `u` (half an ulp at 1, relative): a correctly rounded store of `x` is within `u * |x|`.
/// f32: 24 significant bits; f16: 11; bf16: 8.
pub const U_F32: f64 = 1.0 / 16_777_216.0; // 2^-24
pub const U_F16: f64 = 1.0 / 2048.0; // 2^-11
pub const U_BF16: f64 = 1.0 / 256.0; // 2^-8

/// The unit roundoff of a float dtype.
pub fn unit_roundoff(dt: DType) -> f64 {
    match dt {
        DType::F32 | DType::I32 => U_F32,
        DType::F16 => U_F16,
        DType::BF16 => U_BF16,
    }
}

/// Half the smallest subnormal step of a dtype: the absolute rounding error near zero (f16: 2^-25).
pub fn subnormal_floor(dt: DType) -> f64 {
    match dt {
        DType::F16 => 1.0 / 33_554_432.0,
        _ => 0.0,
    }
}

/// The absolute error of storing `x` (computed in f32) in `dt`: `u * |x|` plus the subnormal floor.
pub fn store_err(dt: DType, x: f64) -> f64 {
    match dt {
        DType::F32 | DType::I32 => 0.0,
        _ => unit_roundoff(dt) * x.abs() * (1.0 + 2.0 * U_F32) + subnormal_floor(dt),
    }
}

pub const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// A heap buffer whose start is 64-byte aligned, as the reference backend wants, of exactly `len` bytes.
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        AlignedBuf { lines: vec![Line([0; 64]); len.div_ceil(64)], len }
    }

    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `Line` is 64 plain bytes with no padding, the vector holds at least `len` of them, and the
        // returned slice borrows `self` mutably.
        unsafe { core::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u8, self.len) }
    }
}

pub fn rand_vec(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(lo, hi)).collect()
}

pub fn rounded(dt: DType, v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| dt.round(x)).collect()
}

/// Allocates `values.len()` elements of `dt` from `arena` and uploads them (rounded to `dt`).
pub fn buf_with<B: Backend>(be: &mut B, arena: &mut Arena, dt: DType, values: &[f32]) -> Buf {
    let b = arena.alloc(dt, values.len()).expect("test arena large enough");
    be.upload(b, values).expect("upload");
    b
}

pub fn down<B: Backend>(be: &mut B, b: Buf) -> Vec<f32> {
    let mut v = vec![0.0; b.len];
    be.download(b, &mut v).expect("download");
    v
}

pub fn down_bytes<B: Backend>(be: &mut B, b: Buf) -> Vec<u8> {
    let mut v = vec![0u8; b.bytes()];
    be.download_bytes(b, &mut v).expect("download_bytes");
    v
}

/// Bit patterns of f32 values (so `-0.0 != 0.0` and NaNs compare by payload).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Largest `|a - b|` and the largest `|a - b| / max(|b|, floor)` over two vectors.
pub fn max_diffs(a: &[f64], b: &[f64], floor: f64) -> (f64, f64) {
    a.iter().zip(b).fold((0.0f64, 0.0f64), |(ma, mr), (&x, &y)| {
        let d = (x - y).abs();
        (ma.max(d), mr.max(d / y.abs().max(floor)))
    })
}

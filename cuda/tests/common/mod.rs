//! Shared by the GPU tests: the CUDA backend and the scalar reference side by side over identical arena
//! layouts, seeded random data, and a comparison that prints its max difference.
#![allow(dead_code)]

use mantissa_core::arena::{Arena, Buf};
use mantissa_core::backend::Activation;
use mantissa_core::rng::Rng;
use mantissa_core::{Backend, DType, Reference};
use mantissa_cuda::CudaBackend;

pub const GPU: &str = "needs an NVIDIA GPU (run scripts/gpu-check.sh)";

/// Arena bytes of each side.
pub const CAP: usize = 96 << 20;

pub const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// Unit roundoff of a dtype (half an ulp at 1).
pub fn u(dt: DType) -> f64 {
    match dt {
        DType::F32 | DType::I32 => 1.0 / 16_777_216.0,
        DType::F16 => 1.0 / 2048.0,
        DType::BF16 => 1.0 / 256.0,
    }
}

pub struct Both {
    pub gpu: CudaBackend,
    pub re: Reference<'static>,
    pub arena: Arena,
    pub rng: Rng,
}

impl Both {
    pub fn new() -> Both {
        let gpu = CudaBackend::new(0, CAP).expect("opening GPU 0");
        // The reference's buffer lives as long as the test process: leaked on purpose.
        let host: &'static mut [u8] = Box::leak(vec![0u8; CAP + 64].into_boxed_slice());
        let re = Reference::new(host);
        let cap = re.capacity().min(gpu.capacity());
        Both { gpu, re, arena: Arena::new(cap), rng: Rng::new(7) }
    }

    pub fn alloc(&mut self, dt: DType, len: usize) -> Buf {
        self.arena.alloc(dt, len).expect("test arena")
    }

    pub fn upload(&mut self, b: Buf, v: &[f32]) {
        self.gpu.upload(b, v).unwrap();
        self.re.upload(b, v).unwrap();
    }

    pub fn random_vec(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| self.rng.uniform(lo, hi)).collect()
    }

    /// A buffer of uniform values in `[lo, hi)`, the same on both sides.
    pub fn random(&mut self, dt: DType, len: usize, lo: f32, hi: f32) -> Buf {
        let b = self.alloc(dt, len);
        let v = self.random_vec(len, lo, hi);
        self.upload(b, &v);
        b
    }

    /// A buffer of NaNs on both sides (what an op that must not read it would leak).
    pub fn nans(&mut self, dt: DType, len: usize) -> Buf {
        let b = self.alloc(dt, len);
        self.upload(b, &vec![f32::NAN; len]);
        b
    }

    pub fn get(&mut self, b: Buf) -> (Vec<f32>, Vec<f32>) {
        let (mut g, mut r) = (vec![0.0; b.len], vec![0.0; b.len]);
        self.gpu.download(b, &mut g).unwrap();
        self.re.download(b, &mut r).unwrap();
        (g, r)
    }

    /// Asserts `|gpu - ref| <= tol(i, ref)` element-wise (NaN equals NaN, infinities must match) and prints
    /// the largest difference.
    pub fn compare_with(&mut self, b: Buf, what: &str, tol: impl Fn(usize, f32) -> f64) {
        let (g, r) = self.get(b);
        let mut worst = (0.0f64, 0usize);
        for (i, (&x, &y)) in g.iter().zip(&r).enumerate() {
            if x.is_nan() || y.is_nan() {
                assert!(x.is_nan() && y.is_nan(), "{what}[{i}]: gpu {x} vs reference {y}");
                continue;
            }
            if x.is_infinite() || y.is_infinite() {
                assert_eq!(x, y, "{what}[{i}]");
                continue;
            }
            let d = (x as f64 - y as f64).abs();
            let t = tol(i, y);
            assert!(d <= t, "{what}[{i}]: gpu {x} vs reference {y}: difference {d:e} > tolerance {t:e}");
            if d > worst.0 {
                worst = (d, i);
            }
        }
        println!("{what}: {} values, max |gpu - reference| = {:e} (at {})", g.len(), worst.0, worst.1);
    }

    /// Relative-plus-absolute tolerance: `abs + rel * |ref|`.
    pub fn compare(&mut self, b: Buf, what: &str, abs: f64, rel: f64) {
        self.compare_with(b, what, |_, y| abs + rel * (y as f64).abs());
    }

    /// Bit-for-bit (as f32 values; NaN equals NaN).
    pub fn exact(&mut self, b: Buf, what: &str) {
        self.compare(b, what, 0.0, 0.0);
    }
}

/// A `Both` with GEMM autotune off (the paths are chosen by the switches a test sets, not by timing), or `None`
/// (with a message) where no GPU can be opened.
pub fn rig_without_autotune() -> Option<Both> {
    match CudaBackend::new(0, 1 << 20) {
        Ok(_) => {
            let mut both = Both::new();
            both.gpu.set_autotune(false);
            Some(both)
        }
        Err(mantissa_core::Error::DeviceUnavailable(why)) => {
            eprintln!("skipped: no usable GPU ({why})");
            None
        }
        Err(e) => panic!("opening GPU 0: {e}"),
    }
}

/// act'(x) in f64, for tolerances (GELU's tanh form: sqrt(2/pi), 0.044715).
pub fn act_derivative(act: Activation, x: f64) -> f64 {
    const S: f64 = 0.797_884_560_802_865_4;
    const C: f64 = 0.044_715;
    match act {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::GeluTanh => {
            let t = (S * (x + C * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * S * (1.0 + 3.0 * C * x * x)
        }
    }
}

//! `CudaBackend::activation_backward_bias_grad` (one pass, `kernels/act_grad.cu`) against the composed version on
//! the same backend (`activation_backward(act, pre, dy, dy)` then `bias_grad(dy, dbias, m, n, 1)`, what
//! `gemm_fused_composed` runs after the GEMM for `Epilogue::ActGrad`), on identical inputs: f32, f16 and bf16;
//! dbias in f32 and in a 16-bit dtype; ReLU and GELU (tanh); sizes with m in {1, 7, 1000, 8192} and n in {3,
//! 10, 33, 4096, 4100} (vector kernel where n is a multiple of 8 16-bit or 4 f32 elements and both arrays are
//! 16-byte aligned, scalar kernel otherwise), buffers shifted by 2 elements (scalar kernel), `pre == dy`,
//! NaN / infinity / signed-zero inputs, more columns than the scratch holds at once (chunked), `m == 0`, no
//! dbias; then the errors.
//!
//! Tolerances:
//! - dx: bit for bit (raw bytes, NaN payloads included): the same device function and expression per element.
//! - dbias: both sides add the same f32 values (dx as stored, widened) in different orders; each sum is within
//!   `(m - 1) u S` of the exact one (`u = 2^-24`, `S = sum_r |dx[r, c]|`), so they differ by at most
//!   `2 (m + 2) u S`; a 16-bit dbias adds one unit in the last place of its dtype at the larger of the two (each
//!   is its f32 sum rounded once). NaN on one side needs NaN on the other, and infinities must match (which
//!   columns hold them does not depend on the order). Two runs of the fused op give the same bits.
//!
//! Then `CudaBackend::activation_backward_bias_grad_small_k` (the small-k product fused in; its tolerances are
//! written down where its tests start, below): against the exact composed version (the product on the host, as
//! documented, then `activation_backward_bias_grad`: dx bit for bit) and against `gemm` then
//! `activation_backward_bias_grad` (within a rounding of the product), the problems it refuses (`Ok(false)`),
//! its errors, and its time against the pair it replaces.

mod common;

use common::act_derivative;
use mantissa_core::backend::{Activation, Gemm};
use mantissa_core::rng::Rng;
use mantissa_core::{Arena, Backend, Buf, DType, Error};
use mantissa_cuda::CudaBackend;

/// Arena bytes: `[8192, 4100]` in f32 is 134 MB, and a case holds pre and two copies of dy.
const CAP: usize = 1 << 30;

const ACTS: [Activation; 2] = [Activation::GeluTanh, Activation::Relu];

struct Rig {
    gpu: CudaBackend,
    arena: Arena,
    rng: Rng,
}

/// A rig, or `None` (with a message) where no GPU can be opened.
fn rig() -> Option<Rig> {
    match CudaBackend::new(0, CAP) {
        Ok(gpu) => {
            let arena = Arena::new(gpu.capacity());
            Some(Rig { gpu, arena, rng: Rng::new(11) })
        }
        Err(Error::DeviceUnavailable(why)) => {
            eprintln!("skipped: no usable GPU ({why})");
            None
        }
        Err(e) => panic!("opening GPU 0: {e}"),
    }
}

/// One unit in the last place of `dt` at `|v|` (0 for f32).
fn ulp(dt: DType, v: f64) -> f64 {
    let e = (((v.abs() as f32).to_bits() >> 23) & 0xff) as i32 - 127;
    match dt {
        DType::BF16 => 2f64.powi(e.max(-126) - 7),
        DType::F16 => 2f64.powi(e.max(-14) - 10),
        _ => 0.0,
    }
}

/// The 16-bit dtype a dbias of a `dt` problem is also tried in (bf16 for f32).
fn dbias_16(dt: DType) -> DType {
    if dt == DType::F32 {
        DType::BF16
    } else {
        dt
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    dt: DType,
    /// dbias dtype, or none.
    bt: Option<DType>,
    act: Activation,
    m: usize,
    n: usize,
    /// Elements the start of pre and of the two dy buffers is moved by (from a 64-byte aligned allocation).
    shift: (usize, usize),
    /// NaN, infinities, signed zeros and large values among the inputs.
    specials: bool,
    /// pre is dy itself.
    same: bool,
    /// Run the fused op a second time on the same inputs: the same bits.
    twice: bool,
}

impl Case {
    fn new(dt: DType, bt: Option<DType>, act: Activation, m: usize, n: usize) -> Case {
        Case { dt, bt, act, m, n, shift: (0, 0), specials: false, same: false, twice: false }
    }
}

impl Rig {
    fn alloc(&mut self, dt: DType, len: usize, shift: usize) -> Buf {
        self.arena.alloc(dt, len + shift).expect("test arena").slice(shift, len)
    }

    fn values(&mut self, len: usize, lo: f32, hi: f32, specials: bool) -> Vec<f32> {
        // About one value in 64 special, one in 170 NaN or infinite: most columns of a few dozen rows keep a
        // finite dbias.
        const SPECIAL: [f32; 8] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 3.0e4, -3.0e4, 1.0e-6];
        (0..len)
            .map(|_| {
                if specials && self.rng.below(64) == 0 {
                    SPECIAL[self.rng.below(SPECIAL.len())]
                } else {
                    self.rng.uniform(lo, hi)
                }
            })
            .collect()
    }

    fn bytes(&mut self, b: Buf) -> Vec<u8> {
        let mut v = vec![0u8; b.bytes()];
        self.gpu.download_bytes(b, &mut v).unwrap();
        v
    }

    fn floats(&mut self, b: Buf) -> Vec<f32> {
        let mut v = vec![0.0; b.len];
        self.gpu.download(b, &mut v).unwrap();
        v
    }

    /// Runs one case both ways and compares; returns the largest dbias difference relative to its tolerance.
    fn case(&mut self, c: Case) -> f64 {
        let what = format!("{c:?}");
        let Case { dt, bt, act, m, n, shift, specials, same, .. } = c;
        let mark = self.arena.mark();
        let len = m * n;
        let dy_f = self.alloc(dt, len, shift.1);
        let dy_c = self.alloc(dt, len, shift.1);
        let pre = if same { dy_f } else { self.alloc(dt, len, shift.0) };
        let pre_c = if same { dy_c } else { pre };
        // pre over GELU's curved part, dy of unit size.
        let pv = self.values(len, -4.0, 4.0, specials);
        let gv = if same { pv.clone() } else { self.values(len, -1.0, 1.0, specials) };
        if !same {
            self.gpu.upload(pre, &pv).unwrap();
        }
        self.gpu.upload(dy_f, &gv).unwrap();
        self.gpu.upload(dy_c, &gv).unwrap();
        let dbs = bt.map(|b| (self.alloc(b, n, 0), self.alloc(b, n, 0)));
        if let Some((f, k)) = dbs {
            self.gpu.fill(f, f32::NAN).unwrap();
            self.gpu.fill(k, f32::NAN).unwrap();
        }

        self.gpu.activation_backward_bias_grad(act, pre, dy_f, dbs.map(|d| d.0), m, n).unwrap();
        self.gpu.activation_backward(act, pre_c, dy_c, dy_c).unwrap();
        if let Some((_, k)) = dbs {
            self.gpu.bias_grad(dy_c, k, m, n, 1).unwrap();
        }

        let (xf, xc) = (self.bytes(dy_f), self.bytes(dy_c));
        if xf != xc {
            let size = dt.size();
            let i = xf.chunks(size).zip(xc.chunks(size)).position(|(a, b)| a != b).unwrap();
            panic!(
                "{what}: dx[{i}] (row {}, column {}) differs: fused {:?} vs composed {:?}",
                i / n,
                i % n,
                &xf[i * size..(i + 1) * size],
                &xc[i * size..(i + 1) * size]
            );
        }
        let mut worst = 0.0f64;
        if let (Some((f, k)), Some(bt)) = (dbs, bt) {
            let dx = self.floats(dy_f);
            let mut s = vec![0.0f64; n];
            for row in dx.chunks(n.max(1)).take(m) {
                for (acc, &x) in s.iter_mut().zip(row) {
                    if x.is_finite() {
                        *acc += (x as f64).abs();
                    }
                }
            }
            let (df, dc) = (self.floats(f), self.floats(k));
            for j in 0..n {
                let (a, b) = (df[j], dc[j]);
                if a.is_nan() || b.is_nan() {
                    assert!(a.is_nan() && b.is_nan(), "{what}: dbias[{j}]: fused {a} vs composed {b}");
                    continue;
                }
                if a.is_infinite() || b.is_infinite() {
                    assert_eq!(a, b, "{what}: dbias[{j}]");
                    continue;
                }
                let d = (a as f64 - b as f64).abs();
                let tol = 2.0 * (m as f64 + 2.0) * 2f64.powi(-24) * s[j] + ulp(bt, (a.abs()).max(b.abs()) as f64);
                assert!(
                    d <= tol,
                    "{what}: dbias[{j}]: fused {a} vs composed {b}: difference {d:e} > tolerance {tol:e}"
                );
                if tol > 0.0 {
                    worst = worst.max(d / tol);
                }
            }
            if c.twice {
                let first = self.bytes(f);
                self.gpu.upload(dy_f, &gv).unwrap();
                self.gpu.fill(f, f32::NAN).unwrap();
                self.gpu.activation_backward_bias_grad(act, pre, dy_f, Some(f), m, n).unwrap();
                assert_eq!(self.bytes(f), first, "{what}: a second run gave other dbias bits");
                assert_eq!(self.bytes(dy_f), xf, "{what}: a second run gave other dx bits");
            }
        }
        self.arena.release(mark);
        worst
    }
}

/// Every dtype, activation, dbias dtype (and none), size and alignment class on the small and medium sizes.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn fused_equals_composed_on_small_and_odd_shapes() {
    let Some(mut r) = rig() else { return };
    let mut cases = 0;
    let mut worst = 0.0f64;
    for dt in common::FLOATS {
        for act in ACTS {
            for bt in [Some(DType::F32), Some(dbias_16(dt)), None] {
                for m in [1, 7, 1000] {
                    for n in [3, 10, 33, 4096, 4100] {
                        for shift in [(0, 0), (2, 2), (0, 2), (2, 0)] {
                            // The misaligned mixes once per dtype and size is enough.
                            if (shift == (0, 2) || shift == (2, 0)) && (bt != Some(DType::F32) || act != ACTS[0]) {
                                continue;
                            }
                            let mut c = Case::new(dt, bt, act, m, n);
                            c.shift = shift;
                            worst = worst.max(r.case(c));
                            cases += 1;
                        }
                    }
                }
            }
        }
    }
    println!("{cases} cases: dx bit-identical; dbias max |fused - composed| / tolerance = {worst:.3}");
}

/// The gpu-mlp's shape, [8192, 4096], and its odd neighbour [8192, 4100] (16-bit: scalar kernel; f32: vector
/// kernel), each run twice (deterministic).
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn fused_equals_composed_on_the_mlp_shape_and_is_deterministic() {
    let Some(mut r) = rig() else { return };
    let mut worst = 0.0f64;
    for dt in common::FLOATS {
        for n in [4096, 4100] {
            for bt in [DType::F32, dbias_16(dt)] {
                let mut c = Case::new(dt, Some(bt), Activation::GeluTanh, 8192, n);
                c.twice = true;
                worst = worst.max(r.case(c));
            }
        }
        // ReLU and a misaligned (scalar) pass on the big shape once per dtype.
        let mut c = Case::new(dt, Some(DType::F32), Activation::Relu, 8192, 4096);
        c.shift = (2, 2);
        worst = worst.max(r.case(c));
    }
    println!("[8192, 4096] and [8192, 4100]: dx bit-identical; dbias max |fused - composed| / tolerance = {worst:.3}");
}

/// NaN, infinities, signed zeros and large values; pre == dy; more columns than the scratch holds (chunks,
/// vector and scalar); m == 0 (dbias zeroed); n == 0.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn specials_aliasing_chunks_and_empty_problems() {
    let Some(mut r) = rig() else { return };
    for dt in common::FLOATS {
        for act in ACTS {
            for (m, n) in [(37, 40), (37, 41), (64, 4096)] {
                for bt in [DType::F32, dbias_16(dt)] {
                    let mut c = Case::new(dt, Some(bt), act, m, n);
                    c.specials = true;
                    r.case(c);
                    let mut c = Case::new(dt, Some(bt), act, m, n);
                    c.same = true;
                    r.case(c);
                }
            }
        }
        // 2.1 million columns: more than the scratch's partial sums hold (about 2.08 million f32), so the op runs
        // in chunks; 2_100_000 is a multiple of 8 (vector kernel), 2_100_001 is not (scalar kernel).
        for n in [2_100_000, 2_100_001] {
            r.case(Case::new(dt, Some(DType::F32), Activation::GeluTanh, 3, n));
        }
    }
    // m == 0: dbias zeroed, dy untouched; n == 0: nothing.
    for bt in [DType::F32, DType::BF16] {
        let dy = r.alloc(DType::BF16, 16, 0);
        r.gpu.fill(dy, 1.5).unwrap();
        let db = r.alloc(bt, 8, 0);
        r.gpu.fill(db, f32::NAN).unwrap();
        r.gpu.activation_backward_bias_grad(Activation::GeluTanh, dy, dy, Some(db), 0, 8).unwrap();
        assert_eq!(r.floats(db), vec![0.0; 8], "m == 0: dbias must be zeroed");
        assert_eq!(r.floats(dy), vec![1.5; 16], "m == 0: dy must be untouched");
        r.gpu.activation_backward_bias_grad(Activation::GeluTanh, dy, dy, Some(db.prefix(0)), 5, 0).unwrap();
        r.gpu.activation_backward_bias_grad(Activation::GeluTanh, dy, dy, None, 0, 8).unwrap();
        assert_eq!(r.floats(dy), vec![1.5; 16]);
    }
    r.gpu.synchronize().unwrap();
}

/// What a refused call was given: (what, pre, dy, dbias, m, n).
type BadCall = (&'static str, Buf, Buf, Option<Buf>, usize, usize);

/// Bad handles are errors (nothing queued), and the backend is still usable afterwards.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn bad_handles_are_errors() {
    let Some(mut r) = rig() else { return };
    let (m, n) = (16, 24);
    let gelu = Activation::GeluTanh;
    let pre = r.alloc(DType::BF16, m * n, 0);
    let dy = r.alloc(DType::BF16, m * n, 0);
    let db = r.alloc(DType::F32, n, 0);
    let pre32 = r.alloc(DType::F32, m * n, 0);
    let ints = r.alloc(DType::I32, m * n, 0);
    r.gpu.fill(pre, 0.5).unwrap();
    r.gpu.fill(dy, 1.0).unwrap();
    let outside = Buf { offset: r.gpu.capacity() - 16, len: m * n, dtype: DType::BF16 };
    let cases: [BadCall; 16] = [
        ("pre too short", pre.prefix(m * n - 1), dy, Some(db), m, n),
        ("dy too short", pre, dy.prefix(m * n - 1), Some(db), m, n),
        ("dy too short, no dbias", pre, dy.prefix(m * n - 1), None, m, n),
        ("dbias too short", pre, dy, Some(db.prefix(n - 1)), m, n),
        ("dbias overlaps dy", pre, dy, Some(Buf { offset: dy.offset + 8, len: n, dtype: DType::F32 }), m, n),
        ("dbias overlaps pre", pre, dy, Some(Buf { offset: pre.offset, len: n, dtype: DType::BF16 }), m, n),
        ("pre i32", ints, dy, Some(db), m, n),
        ("dy i32", pre, ints, Some(db), m, n),
        ("pre and dy i32", ints, ints, Some(db), m, n),
        ("dbias i32", pre, dy, Some(ints.prefix(n)), m, n),
        ("pre f32, dy bf16", pre32, dy, Some(db), m, n),
        ("pre overlaps dy shifted", Buf { offset: dy.offset + 2, ..dy }.prefix(m * n - 1), dy, Some(db), m, n - 1),
        ("dy outside the arena", pre, outside, Some(db), m, n),
        (
            "dbias outside the arena",
            pre,
            dy,
            Some(Buf { offset: r.gpu.capacity() - 8, len: n, dtype: DType::F32 }),
            m,
            n,
        ),
        ("m * n overflows", pre, dy, Some(db), usize::MAX, 2),
        ("dbias misaligned for f32", pre, dy, Some(Buf { offset: db.offset + 2, len: n, dtype: DType::F32 }), m, n),
    ];
    for (what, p, d, b, m, n) in cases {
        let got = r.gpu.activation_backward_bias_grad(gelu, p, d, b, m, n);
        println!("{what}: {got:?}");
        assert!(got.is_err(), "{what}: must be an error");
    }
    // dy untouched by the refused calls; the backend still works.
    assert_eq!(r.floats(dy), vec![1.0; m * n]);
    r.gpu.activation_backward_bias_grad(gelu, pre, dy, Some(db), m, n).unwrap();
    r.gpu.synchronize().unwrap();
}

/// Not a correctness test: the time of the fused op against the composed pair on the gpu-mlp's shape (bf16, f32
/// dbias, as the Linear layer's backward runs it) and its odd neighbour (scalar kernel), with the DRAM bound of
/// one pass (read pre and dy, write dx) at the H200's 4.8 TB/s for scale. Other tests on the same GPU disturb it:
/// for clean numbers run it alone (`act_grad --include-ignored --nocapture timing`).
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn timing_fused_against_composed() {
    let Some(mut r) = rig() else { return };
    const REPS: u32 = 50;
    let gelu = Activation::GeluTanh;
    for (dt, m, n) in
        [(DType::BF16, 8192, 4096), (DType::F16, 8192, 4096), (DType::BF16, 8192, 4100), (DType::F32, 8192, 4096)]
    {
        let mark = r.arena.mark();
        let (pre, dy, db) = (r.alloc(dt, m * n, 0), r.alloc(dt, m * n, 0), r.alloc(DType::F32, n, 0));
        let pv = r.values(m * n, -4.0, 4.0, false);
        r.gpu.upload(pre, &pv).unwrap();
        let gv = r.values(m * n, -1.0, 1.0, false);
        r.gpu.upload(dy, &gv).unwrap();
        let time = |r: &mut Rig, fused: bool| {
            let run = |r: &mut Rig| {
                if fused {
                    r.gpu.activation_backward_bias_grad(gelu, pre, dy, Some(db), m, n).unwrap();
                } else {
                    r.gpu.activation_backward(gelu, pre, dy, dy).unwrap();
                    r.gpu.bias_grad(dy, db, m, n, 1).unwrap();
                }
            };
            for _ in 0..3 {
                run(r);
            }
            r.gpu.synchronize().unwrap();
            let t = std::time::Instant::now();
            for _ in 0..REPS {
                run(r);
            }
            r.gpu.synchronize().unwrap();
            t.elapsed().as_secs_f64() * 1e3 / REPS as f64
        };
        let (fused, composed) = (time(&mut r, true), time(&mut r, false));
        let bound = 3.0 * (m * n * dt.size()) as f64 / 4.8e12 * 1e3;
        println!(
            "act_grad timing: {dt} [{m}, {n}] GELU + f32 dbias: fused {fused:.4} ms, composed {composed:.4} ms \
             (one-pass DRAM bound {bound:.4} ms)"
        );
        r.arena.release(mark);
    }
}

// ---- activation_backward_bias_grad_small_k: the small-k product fused in ----
//
// Against two composed versions on the same backend and inputs:
// - exact: c computed on the host as the kernels document it (f32 from +0, p ascending, one fused multiply-add a
//   term: `f32::mul_add`, correctly rounded), uploaded (rounded to the dtype, as the device rounds), then
//   `activation_backward_bias_grad(act, pre, c, dbias)`: dx bit for bit (raw bytes); dbias as above (the same
//   f32 values added in another order: `2 (m + 2) u S` plus an ulp of a 16-bit dbias).
// - gemm: `gemm` (cuBLAS or the skinny kernel, which may add the k products in another order) into c, then the
//   same: per element, with S = sum_p |A[i, p] B[p, j]| (so |c| <= S) and D = 1.01 |act'(pre)| + 2^-16 (act'
//   in f64 on the host, with slack for the device's f32 one, which is the same on both sides):
//     |dx_fused - dx_gemm| <= D ((k + 2) 2^-22 S + ulp_T(S)) (1 + 2^-20) + ulp_T(D S (1 + 2^-20))
//   (each f32 sum within k 2^-24 S of the exact one, with a factor 2 of slack for the tensor cores' f32
//   accumulation; the two c then differ by that plus one rounding to T; multiplying by act'(pre) scales it, and
//   storing dx rounds once more); dbias within the sum of its column's per-element tolerances plus the f32 order
//   term and a 16-bit ulp.

/// One small-k case.
#[derive(Clone, Copy, Debug)]
struct SkCase {
    dt: DType,
    bt: Option<DType>,
    act: Activation,
    m: usize,
    n: usize,
    k: usize,
    /// Extra elements in each row of A (`lda = k + pad.0`) and of B (`ldb = n + pad.1`, a multiple of 4).
    pad: (usize, usize),
    /// Elements A's start is moved by (any alignment is taken).
    a_shift: usize,
    /// NaN, infinities, signed zeros and large values in pre, A and B (exact comparison only).
    specials: bool,
    /// Compare with gemm + act_grad_bias too (with the tolerance above).
    with_gemm: bool,
    /// Run the fused op twice: the same bits.
    twice: bool,
}

impl SkCase {
    fn new(dt: DType, bt: Option<DType>, act: Activation, m: usize, n: usize, k: usize) -> SkCase {
        SkCase { dt, bt, act, m, n, k, pad: (0, 0), a_shift: 0, specials: false, with_gemm: true, twice: false }
    }
}

/// One unit in the last place of `dt` at `|v|`, f32 included.
fn ulp_any(dt: DType, v: f64) -> f64 {
    let e = (((v.abs() as f32).to_bits() >> 23) & 0xff) as i32 - 127;
    match dt {
        DType::BF16 => 2f64.powi(e.max(-126) - 7),
        DType::F16 => 2f64.powi(e.max(-14) - 10),
        _ => 2f64.powi(e.max(-126) - 23),
    }
}

/// dbias against a reference computed from the same dx values in another f32 order: returns the largest
/// difference relative to the tolerance. `extra[j]`: tolerance added per column (0 for bit-identical dx).
fn check_dbias(what: &str, bt: DType, m: usize, fused: &[f32], other: &[f32], abs_dx: &[f64], extra: &[f64]) -> f64 {
    let mut worst = 0.0f64;
    for j in 0..fused.len() {
        let (a, b) = (fused[j], other[j]);
        if a.is_nan() || b.is_nan() {
            assert!(a.is_nan() && b.is_nan(), "{what}: dbias[{j}]: fused {a} vs composed {b}");
            continue;
        }
        if a.is_infinite() || b.is_infinite() {
            assert_eq!(a, b, "{what}: dbias[{j}]");
            continue;
        }
        let d = (a as f64 - b as f64).abs();
        let tol =
            2.0 * (m as f64 + 2.0) * 2f64.powi(-24) * abs_dx[j] + extra[j] + ulp(bt, (a.abs()).max(b.abs()) as f64);
        assert!(d <= tol, "{what}: dbias[{j}]: fused {a} vs composed {b}: difference {d:e} > tolerance {tol:e}");
        if tol > 0.0 {
            worst = worst.max(d / tol);
        }
    }
    worst
}

impl Rig {
    /// Column sums of |x| over the finite entries of an [m, n] array.
    fn abs_col_sums(x: &[f32], m: usize, n: usize) -> Vec<f64> {
        let mut s = vec![0.0f64; n];
        for row in x.chunks(n.max(1)).take(m) {
            for (acc, &v) in s.iter_mut().zip(row) {
                if v.is_finite() {
                    *acc += (v as f64).abs();
                }
            }
        }
        s
    }

    /// Runs one small-k case (the fused op must take it) against the exact composed version and, with
    /// `with_gemm`, the gemm one; returns the largest (dx, dbias) difference relative to its tolerance of the
    /// gemm comparison (dx is bit-identical to the exact one, or this panics).
    fn small_k_case(&mut self, c: SkCase) -> (f64, f64) {
        let what = format!("{c:?}");
        let SkCase { dt, bt, act, m, n, k, pad, a_shift, specials, .. } = c;
        let (lda, ldb) = (k + pad.0, n + pad.1);
        let mark = self.arena.mark();
        let (ea, eb, len) = ((m.max(1) - 1) * lda + k, (k - 1) * ldb + n, m * n);
        let a = self.alloc(dt, ea, a_shift);
        let b = self.alloc(dt, eb, 0);
        let pre = self.alloc(dt, len, 0);
        let dx = self.alloc(dt, len, 0);
        let cx = self.alloc(dt, len, 0);
        let av = self.values(ea, -1.0, 1.0, specials);
        let bv = self.values(eb, -1.0, 1.0, specials);
        let pv = self.values(len, -4.0, 4.0, specials);
        self.gpu.upload(a, &av).unwrap();
        self.gpu.upload(b, &bv).unwrap();
        self.gpu.upload(pre, &pv).unwrap();
        self.gpu.fill(dx, f32::NAN).unwrap();
        let dbs = bt.map(|t| (self.alloc(t, n, 0), self.alloc(t, n, 0)));
        if let Some((f, x)) = dbs {
            self.gpu.fill(f, f32::NAN).unwrap();
            self.gpu.fill(x, f32::NAN).unwrap();
        }

        let took = self
            .gpu
            .activation_backward_bias_grad_small_k(act, a, lda, b, ldb, k, pre, dx, dbs.map(|d| d.0), m, n)
            .unwrap();
        assert!(took, "{what}: the small-k kernels must take this case");

        // The exact composed version: c on the host from the stored A and B.
        let (sa, sb) = (self.floats(a), self.floats(b));
        let mut ch = vec![0.0f32; len];
        for i in 0..m {
            let arow = &sa[i * lda..i * lda + k];
            for (j, out) in ch[i * n..(i + 1) * n].iter_mut().enumerate() {
                *out = arow.iter().enumerate().fold(0.0f32, |acc, (p, &x)| x.mul_add(sb[p * ldb + j], acc));
            }
        }
        self.gpu.upload(cx, &ch).unwrap();
        self.gpu.activation_backward_bias_grad(act, pre, cx, dbs.map(|d| d.1), m, n).unwrap();
        let (xf, xc) = (self.bytes(dx), self.bytes(cx));
        if xf != xc {
            // Bit for bit, but for NaN payloads (host-made NaN in c, with specials: the GPU's arithmetic
            // returns its canonical NaN, so these should match too, but they are not the kernels' doing).
            let (vf, vc) = (self.floats(dx), self.floats(cx));
            let size = dt.size();
            for (i, (p, q)) in xf.chunks(size).zip(xc.chunks(size)).enumerate() {
                if p != q && !(vf[i].is_nan() && vc[i].is_nan()) {
                    panic!(
                        "{what}: dx[{i}] (row {}, column {}) differs: fused {p:?} vs exact composed {q:?} (c {})",
                        i / n,
                        i % n,
                        ch[i]
                    );
                }
            }
            println!("{what}: dx bit-identical but for the payloads of some NaN");
        }
        let dxv = self.floats(dx);
        let abs_dx = Self::abs_col_sums(&dxv, m, n);
        let mut worst = (0.0f64, 0.0f64);
        if let (Some((f, x)), Some(t)) = (dbs, bt) {
            let (df, dc) = (self.floats(f), self.floats(x));
            worst.1 = check_dbias(&format!("{what} (exact)"), t, m, &df, &dc, &abs_dx, &vec![0.0; n]);
        }
        if c.twice {
            let (first_dx, first_db) = (xf.clone(), dbs.map(|d| self.bytes(d.0)));
            self.gpu.fill(dx, f32::NAN).unwrap();
            if let Some((f, _)) = dbs {
                self.gpu.fill(f, f32::NAN).unwrap();
            }
            let again =
                self.gpu.activation_backward_bias_grad_small_k(act, a, lda, b, ldb, k, pre, dx, dbs.map(|d| d.0), m, n);
            assert!(again.unwrap());
            assert_eq!(self.bytes(dx), first_dx, "{what}: a second run gave other dx bits");
            if let Some((f, _)) = dbs {
                assert_eq!(Some(self.bytes(f)), first_db, "{what}: a second run gave other dbias bits");
            }
        }

        // The gemm composed version, within the tolerance above.
        if c.with_gemm && !specials {
            if let Some((_, x)) = dbs {
                self.gpu.fill(x, f32::NAN).unwrap();
            }
            let g = Gemm { lda, ldb, ..Gemm::new(m, n, k, a, b, cx) };
            self.gpu.gemm(&g).unwrap();
            self.gpu.activation_backward_bias_grad(act, pre, cx, dbs.map(|d| d.1), m, n).unwrap();
            let xg = self.floats(cx);
            let spre = self.floats(pre);
            let mut col_tol = vec![0.0f64; n];
            let slack = 1.0 + 2f64.powi(-20);
            for i in 0..m {
                for j in 0..n {
                    let s: f64 = (0..k).map(|p| (sa[i * lda + p] as f64 * sb[p * ldb + j] as f64).abs()).sum();
                    // The device's f32 act' may differ from this f64 one (relatively, most where GELU's
                    // derivative is small): a percent and an absolute 2^-16 of slack.
                    let d = act_derivative(act, spre[i * n + j] as f64).abs() * 1.01 + 2f64.powi(-16);
                    let tol = d * ((k as f64 + 2.0) * 2f64.powi(-22) * s + ulp_any(dt, s)) * slack
                        + ulp_any(dt, d * s * slack);
                    let (p, q) = (dxv[i * n + j], xg[i * n + j]);
                    let diff = (p as f64 - q as f64).abs();
                    assert!(
                        diff <= tol,
                        "{what}: dx[{i}, {j}]: fused {p} vs gemm + act_grad_bias {q}: difference {diff:e} > \
                         tolerance {tol:e}"
                    );
                    if tol > 0.0 {
                        worst.0 = worst.0.max(diff / tol);
                    }
                    col_tol[j] += tol;
                }
            }
            if let (Some((f, x)), Some(t)) = (dbs, bt) {
                let (df, dg) = (self.floats(f), self.floats(x));
                let w = check_dbias(&format!("{what} (gemm)"), t, m, &df, &dg, &abs_dx, &col_tol);
                worst.1 = worst.1.max(w);
            }
        }
        self.arena.release(mark);
        worst
    }
}

/// The brief's grid: m in {1, 7, 1000}, n in {8, 40, 4096}, k in {1, 3, 10, 16}, every dtype, both
/// activations, dbias in f32, in a 16-bit dtype and none ([1000, 4096] with GELU and a dbias only).
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn small_k_equals_composed_on_small_and_odd_shapes() {
    let Some(mut r) = rig() else { return };
    let (mut cases, mut worst) = (0, (0.0f64, 0.0f64));
    for dt in common::FLOATS {
        for act in ACTS {
            for bt in [Some(DType::F32), Some(dbias_16(dt)), None] {
                for m in [1, 7, 1000] {
                    for n in [8, 40, 4096] {
                        for k in [1, 3, 10, 16] {
                            if m == 1000 && n == 4096 && (act != Activation::GeluTanh || bt.is_none()) {
                                continue;
                            }
                            let w = r.small_k_case(SkCase::new(dt, bt, act, m, n, k));
                            worst = (worst.0.max(w.0), worst.1.max(w.1));
                            cases += 1;
                        }
                    }
                }
            }
        }
    }
    println!(
        "{cases} small-k cases: dx bit-identical to the exact composed version; against gemm + act_grad_bias \
         max |difference| / tolerance: dx {:.3}, dbias {:.3}",
        worst.0, worst.1
    );
}

/// Every k from 1 to 16 (each kernel bucket, full and partly used); leading dimensions past the row length;
/// A at odd element offsets; n = 12 (a multiple of 4 but not of 8); m not a multiple of the splits' rows.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn small_k_every_k_leading_dimensions_and_offsets() {
    let Some(mut r) = rig() else { return };
    for dt in common::FLOATS {
        for k in 1..=16 {
            for act in ACTS {
                r.small_k_case(SkCase::new(dt, Some(DType::F32), act, 37, 40, k));
            }
            let mut c = SkCase::new(dt, Some(dbias_16(dt)), Activation::GeluTanh, 301, 12, k);
            c.pad = (3, 4);
            c.a_shift = 1;
            r.small_k_case(c);
            let mut c = SkCase::new(dt, None, Activation::Relu, 130, 264, k);
            c.pad = (k, 8);
            c.a_shift = 3;
            r.small_k_case(c);
        }
    }
}

/// NaN, infinities, signed zeros and large values in pre, A and B (dx still bit-identical to the exact composed
/// version); the gpu-mlp's shape ([8192, 4096], k = 10) in every dtype, run twice (deterministic); more columns
/// than the scratch's partial sums hold at once (chunks); m == 0 (dbias zeroed) and n == 0.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn small_k_specials_mlp_shape_chunks_and_empty_problems() {
    let Some(mut r) = rig() else { return };
    for dt in common::FLOATS {
        for act in ACTS {
            for k in [1, 10, 16] {
                let mut c = SkCase::new(dt, Some(DType::F32), act, 77, 40, k);
                c.specials = true;
                r.small_k_case(c);
            }
        }
        let mut c = SkCase::new(dt, Some(DType::F32), Activation::GeluTanh, 8192, 4096, 10);
        c.twice = true;
        c.with_gemm = dt == DType::BF16; // the host tolerance loop is slow; once is enough
        let w = r.small_k_case(c);
        println!("{dt} [8192, 4096] k = 10: against gemm + act_grad_bias dx {:.3}, dbias {:.3}", w.0, w.1);
        let mut c = SkCase::new(dt, Some(dbias_16(dt)), Activation::Relu, 8192, 4096, 10);
        c.with_gemm = false;
        r.small_k_case(c);
    }
    // 2.1 million columns: more than the scratch's partial sums hold (about 2.08 million f32), so two chunks.
    let mut c = SkCase::new(DType::BF16, Some(DType::F32), Activation::GeluTanh, 3, 2_100_000, 10);
    c.with_gemm = false;
    r.small_k_case(c);

    // m == 0: dbias zeroed, dx untouched; n == 0: nothing.
    let a = r.alloc(DType::BF16, 32, 0);
    let b = r.alloc(DType::BF16, 32, 0);
    let dx = r.alloc(DType::BF16, 16, 0);
    r.gpu.fill(a, 0.5).unwrap();
    r.gpu.fill(b, 0.5).unwrap();
    r.gpu.fill(dx, 1.5).unwrap();
    for bt in [DType::F32, DType::BF16] {
        let db = r.alloc(bt, 8, 0);
        r.gpu.fill(db, f32::NAN).unwrap();
        let gelu = Activation::GeluTanh;
        let took = r.gpu.activation_backward_bias_grad_small_k(gelu, a, 2, b, 8, 2, dx, dx, Some(db), 0, 8);
        // pre == dx (both empty here): nothing overlaps, so the kernels take it.
        assert!(took.unwrap());
        assert_eq!(r.floats(db), vec![0.0; 8], "m == 0: dbias must be zeroed");
        let pre = r.alloc(DType::BF16, 16, 0);
        let took = r.gpu.activation_backward_bias_grad_small_k(gelu, a, 2, b, 8, 2, pre, dx, Some(db.prefix(0)), 5, 0);
        assert!(took.unwrap());
        assert_eq!(r.floats(dx), vec![1.5; 16], "empty problems leave dx untouched");
    }
    r.gpu.synchronize().unwrap();
}

/// What a small-k call was given: (what, A, lda, B, ldb, k, pre, dx, dbias, m, n).
type SkCall = (&'static str, Buf, usize, Buf, usize, usize, Buf, Buf, Option<Buf>, usize, usize);

/// Problems the kernels do not take are `Ok(false)` with nothing written; invalid handles are errors; the
/// backend works afterwards.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn small_k_refusals_and_errors() {
    let Some(mut r) = rig() else { return };
    let (m, n, k) = (16, 24, 10);
    let gelu = Activation::GeluTanh;
    let t = DType::BF16;
    let a = r.alloc(t, m * 17, 0);
    let b = r.alloc(t, 17 * (n + 4), 0);
    let pre = r.alloc(t, m * n + 8, 0);
    let dx = r.alloc(t, m * n + 8, 0);
    let db = r.alloc(DType::F32, n + 4, 0);
    let a32 = r.alloc(DType::F32, m * k, 0);
    let pre16 = r.alloc(DType::F16, m * n, 0);
    let ints = r.alloc(DType::I32, m * n + 8, 0);
    for x in [a, b, pre] {
        r.gpu.fill(x, 0.5).unwrap();
    }
    r.gpu.fill(a32, 0.5).unwrap();
    r.gpu.fill(pre16, 0.5).unwrap();
    r.gpu.fill(dx, 7.0).unwrap();
    let (pre, dx) = (pre.prefix(m * n), dx.prefix(m * n));
    let shifted = |x: Buf, by: usize, len: usize| Buf { offset: x.offset + by * x.dtype.size(), len, dtype: x.dtype };
    let refused: [SkCall; 13] = [
        ("k == 17", a, 17, b, n, 17, pre, dx, Some(db), m, n),
        ("k == 0", a, k, b, n, 0, pre, dx, Some(db), m, n),
        ("n not a multiple of 4", a, k, b, 22, k, pre.prefix(m * 22), dx.prefix(m * 22), Some(db), m, 22),
        ("ldb not a multiple of 4", a, k, b, n + 2, k, pre, dx, Some(db), m, n),
        ("B misaligned", a, k, shifted(b, 2, 9 * n + n), n, k, pre, dx, Some(db), m, n),
        ("pre misaligned", a, k, b, n, k, shifted(pre, 2, m * n), dx, Some(db), m, n),
        ("dx misaligned", a, k, b, n, k, pre, shifted(dx, 2, m * n), Some(db), m, n),
        ("A f32, the rest bf16", a32, k, b, n, k, pre, dx, Some(db), m, n),
        ("pre f16, the rest bf16", a, k, b, n, k, pre16, dx, Some(db), m, n),
        ("dx is pre", a, k, b, n, k, dx, dx, Some(db), m, n),
        ("dx overlaps A", a, k, b, n, k, pre, Buf { offset: a.offset, len: m * n, dtype: t }, None, m, n),
        ("dx overlaps B", a, k, b, n, k, pre, Buf { offset: b.offset + 64, len: m * n, dtype: t }, None, m, n),
        ("dx overlaps pre, no dbias", a, k, b, n, k, pre, shifted(pre, 8, m * n), None, m, n),
    ];
    for (what, a, lda, b, ldb, k, p, d, db, m, n) in refused {
        let got = r.gpu.activation_backward_bias_grad_small_k(gelu, a, lda, b, ldb, k, p, d, db, m, n);
        println!("{what}: {got:?}");
        assert!(matches!(got, Ok(false)), "{what}: must be Ok(false), got {got:?}");
    }
    assert_eq!(r.floats(dx), vec![7.0; m * n], "refused calls must not write dx");

    let outside = |len: usize, dtype: DType| Buf { offset: r.gpu.capacity() - 16, len, dtype };
    let errors: [SkCall; 18] = [
        ("A too short", a.prefix((m - 1) * k + k - 1), k, b, n, k, pre, dx, Some(db), m, n),
        ("A too short for lda", a.prefix((m - 1) * 12 + k - 1), 12, b, n, k, pre, dx, Some(db), m, n),
        ("B too short", a, k, b.prefix((k - 1) * n + n - 1), n, k, pre, dx, Some(db), m, n),
        ("pre too short", a, k, b, n, k, pre.prefix(m * n - 1), dx, Some(db), m, n),
        ("dx too short", a, k, b, n, k, pre, dx.prefix(m * n - 1), Some(db), m, n),
        ("dbias too short", a, k, b, n, k, pre, dx, Some(db.prefix(n - 1)), m, n),
        ("A i32", ints, k, b, n, k, pre, dx, Some(db), m, n),
        ("B i32", a, k, ints, n, k, pre, dx, Some(db), m, n),
        ("pre i32", a, k, b, n, k, ints.prefix(m * n), dx, Some(db), m, n),
        ("dx i32", a, k, b, n, k, pre, ints.prefix(m * n), Some(db), m, n),
        ("dbias i32", a, k, b, n, k, pre, dx, Some(ints.prefix(n)), m, n),
        (
            "dbias overlaps dx",
            a,
            k,
            b,
            n,
            k,
            pre,
            dx,
            Some(Buf { offset: dx.offset + 8, len: n, dtype: DType::F32 }),
            m,
            n,
        ),
        ("dbias overlaps pre", a, k, b, n, k, pre, dx, Some(Buf { offset: pre.offset, len: n, dtype: t }), m, n),
        ("dx outside the arena", a, k, b, n, k, pre, outside(m * n, t), Some(db), m, n),
        ("A outside the arena", outside(m * k, t), k, b, n, k, pre, dx, Some(db), m, n),
        ("m * n overflows", a, k, b, n, k, pre, dx, Some(db), usize::MAX, 2),
        ("A's extent overflows", a, usize::MAX, b, n, k, pre, dx, Some(db), m, n),
        (
            "dbias misaligned for f32",
            a,
            k,
            b,
            n,
            k,
            pre,
            dx,
            Some(Buf { offset: db.offset + 2, len: n, dtype: DType::F32 }),
            m,
            n,
        ),
    ];
    for (what, a, lda, b, ldb, k, p, d, db, m, n) in errors {
        let got = r.gpu.activation_backward_bias_grad_small_k(gelu, a, lda, b, ldb, k, p, d, db, m, n);
        println!("{what}: {got:?}");
        assert!(got.is_err(), "{what}: must be an error, got {got:?}");
    }
    assert_eq!(r.floats(dx), vec![7.0; m * n], "refused calls must not write dx");
    // The backend still works, and the same buffers are taken.
    assert!(r.gpu.activation_backward_bias_grad_small_k(gelu, a, k, b, n, k, pre, dx, Some(db), m, n).unwrap());
    r.gpu.synchronize().unwrap();
}

/// Not a correctness test: the fused small-k op against gemm then act_grad_bias on the gpu-mlp's classifier
/// input gradient (bf16 [8192, 10] x [10, 4096], GELU, f32 dbias). Run alone for clean numbers
/// (`act_grad --include-ignored --nocapture timing_small_k`).
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn timing_small_k_against_gemm_and_act_grad_bias() {
    let Some(mut r) = rig() else { return };
    const REPS: u32 = 50;
    let gelu = Activation::GeluTanh;
    let (dt, m, n, k) = (DType::BF16, 8192, 4096, 10);
    let (a, b) = (r.alloc(dt, m * k, 0), r.alloc(dt, k * n, 0));
    let (pre, dx, db) = (r.alloc(dt, m * n, 0), r.alloc(dt, m * n, 0), r.alloc(DType::F32, n, 0));
    let av = r.values(m * k, -1.0, 1.0, false);
    r.gpu.upload(a, &av).unwrap();
    let bv = r.values(k * n, -1.0, 1.0, false);
    r.gpu.upload(b, &bv).unwrap();
    let pv = r.values(m * n, -4.0, 4.0, false);
    r.gpu.upload(pre, &pv).unwrap();
    let time = |r: &mut Rig, fused: bool| {
        let run = |r: &mut Rig| {
            if fused {
                assert!(r
                    .gpu
                    .activation_backward_bias_grad_small_k(gelu, a, k, b, n, k, pre, dx, Some(db), m, n)
                    .unwrap());
            } else {
                r.gpu.gemm(&Gemm::new(m, n, k, a, b, dx)).unwrap();
                r.gpu.activation_backward_bias_grad(gelu, pre, dx, Some(db), m, n).unwrap();
            }
        };
        for _ in 0..3 {
            run(r);
        }
        r.gpu.synchronize().unwrap();
        let t = std::time::Instant::now();
        for _ in 0..REPS {
            run(r);
        }
        r.gpu.synchronize().unwrap();
        t.elapsed().as_secs_f64() * 1e3 / REPS as f64
    };
    let (fused, composed) = (time(&mut r, true), time(&mut r, false));
    println!(
        "act_grad timing: small-k bf16 [8192,4096] k=10: fused {fused:.4} ms, gemm+act_grad_bias {composed:.4} ms"
    );
}

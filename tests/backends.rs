//! Every backend compiled in against the scalar reference: one set of test bodies, instantiated per backend by
//! `backend_tests!` (a backend that is not compiled in skips with a message). Each test runs an op on the
//! backend under test and on a `Reference` over its own arena, with identical inputs at identical offsets, and
//! compares. The `reference` instantiation compares the reference with itself: a check of the harness.
//!
//! Tolerances (`eps` = 2^-23; `ulp(dt, v)` = one unit in the last place of dtype `dt` at `|v|`, 0 for f32):
//! - upload / download / cast / fill: bit-exact (round to nearest even, NaN payloads included).
//! - gemm: `|d| <= 1e-5 * sqrt(k) * scale + ulp(C, ref)`, `scale = |alpha| sum_p |a_ip b_pj| + |beta c_ij|`
//!   (summation order differs; a 16-bit C may round the other way). Elements outside C: bit-exact.
//! - add_bias, ReLU forward / backward, max-pool, im2col, col2im: bit-exact (same per-element arithmetic).
//! - bias_grad: bit-exact for `inner == 1`; else `|d| <= terms * eps * sum |dy| + ulp(out)` (any order).
//! - GELU (vectorised `exp`, sigmoid form): `|d| <= 2e-6 * (1 + |x|) + ulp(out)` forward and
//!   `|d| <= 2e-6 * (1 + |x|) * |dy| + ulp(out)` backward; infinite inputs are not compared (the reference
//!   gives NaN for `gelu(-inf)`).
//! - softmax cross-entropy: loss `|d| <= 1e-6 * (1 + |loss|)`, dlogits `|d| <= 8 eps |g| + ulp(out)` with
//!   `g = grad_scale / rows` (only `exp` differs, by 2 ulp).
//! - grad_stats: non-finite count exact; `sum_sq` within `1e-12` relative (f64 sums in another order).
//! - sgd / adamw: master and state within 1e-6 relative; the working copy equals the backend's own new master
//!   rounded to the working dtype, bit-exact.
//! - gemm_fused: against the reference's composition of unfused ops: the gemm tolerance at the scale of the
//!   sum (bias included) plus two roundings of the intermediate, times 1.2 (the activation's slope), plus
//!   `2 ulp(out)` and `rel (1 + |out|)` with rel = 2e-6 for f32 and 1e-3 for 16-bit outputs (a fused epilogue
//!   evaluates GELU with its own tanh); the bias gradient sums its column's tolerances.
//! - queued (and recorded) steps against step-by-step training on the same backend: bit-exact.
//! - training, 20 steps: losses within `1e-5 (1 + |loss|)` under float32, `2e-3 (1 + |loss|)` under the mixed
//!   policies (one flipped 16-bit rounding early in training shifts later losses by about a 16-bit ulp).
//!
//! `MANTISSA_KERNEL=<kernel> cargo test --release --test backends` runs the SIMD instantiation on that kernel
//! (`scripts/test-kernels.sh` runs each one the CPU has) and `forced_kernel_is_used` checks it really did.
#![cfg(feature = "std")]

use mantissa::backend::{Activation, AdamWStep, ConvGeom, Epilogue, Gemm, ParamBufs, PoolGeom, SgdStep};
use mantissa::backends::{simd_kernel_available, AnyBackend, BackendKind};
use mantissa::host::HostBuffer;
use mantissa::{
    AdamW, Arena, Backend, Buf, DType, MemoryPlan, Model, Optimizer, Policy, Reference, Sgd, Shape, TrainConfig,
    Trainer,
};

const EPS: f32 = f32::EPSILON;
const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// One unit in the last place of `dt` at `|v|` (0 for f32: those comparisons carry their own f32 term).
fn ulp(dt: DType, v: f32) -> f32 {
    let e = (((v.abs().to_bits() >> 23) & 0xff) as i32 - 127).max(-126);
    match dt {
        DType::BF16 => 2f32.powi(e - 7),
        DType::F16 => 2f32.powi(e.max(-14) - 10),
        _ => 0.0,
    }
}

/// The backend under test and the reference, over two arenas with the same allocations.
struct Rig<'a> {
    test: AnyBackend<'a>,
    reference: Reference<'a>,
    arena: Arena,
    rng: u64,
}

/// Runs `f` with a rig of `bytes`-byte arenas for `kind`, or prints why it is skipped.
fn with_rig(kind: BackendKind, bytes: usize, f: impl FnOnce(&mut Rig)) {
    if !kind.compiled() {
        eprintln!("skipped: the {} backend is not compiled in", kind.name());
        return;
    }
    let mut a = HostBuffer::new(bytes).unwrap();
    let mut b = HostBuffer::new(bytes).unwrap();
    let test = AnyBackend::open(kind, a.as_mut_slice()).unwrap();
    let reference = Reference::new(b.as_mut_slice());
    f(&mut Rig { test, reference, arena: Arena::new(bytes), rng: 0x9e37_79b9_7f4a_7c15 });
}

impl Rig<'_> {
    fn alloc(&mut self, dt: DType, len: usize) -> Buf {
        self.arena.alloc(dt, len).unwrap()
    }

    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.rng >> 16
    }

    /// Uniform in `[lo, hi)`.
    fn rand(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * (self.next() as f64 / (1u64 << 48) as f64) as f32).collect()
    }

    /// `n` random `dt` bit patterns (NaN payloads, infinities, subnormals included).
    fn rand_bits(&mut self, dt: DType, n: usize) -> Vec<u8> {
        (0..n * dt.size()).map(|_| (self.next() >> 8) as u8).collect()
    }

    /// Both backends, same op: `(test, reference)`.
    fn run<R>(&mut self, mut f: impl FnMut(&mut dyn Backend) -> mantissa::Result<R>) -> (R, R) {
        let t = f(&mut self.test).unwrap();
        let r = f(&mut self.reference).unwrap();
        (t, r)
    }

    fn set(&mut self, b: Buf, v: &[f32]) {
        self.run(|be| be.upload(b, v));
    }

    fn set_bytes(&mut self, b: Buf, v: &[u8]) {
        self.run(|be| be.upload_bytes(b, v));
    }

    fn get(&mut self, b: Buf) -> (Vec<f32>, Vec<f32>) {
        let (mut t, mut r) = (vec![0.0; b.len], vec![0.0; b.len]);
        self.test.download(b, &mut t).unwrap();
        self.reference.download(b, &mut r).unwrap();
        (t, r)
    }

    fn bytes(&mut self, b: Buf) -> (Vec<u8>, Vec<u8>) {
        let (mut t, mut r) = (vec![0; b.bytes()], vec![0; b.bytes()]);
        self.test.download_bytes(b, &mut t).unwrap();
        self.reference.download_bytes(b, &mut r).unwrap();
        (t, r)
    }

    /// Bit-exact equality of `b` on both backends.
    fn same_bits(&mut self, what: &str, b: Buf) {
        let (t, r) = self.bytes(b);
        if let Some(i) = t.iter().zip(&r).position(|(x, y)| x != y) {
            let e = i / b.dtype.size();
            panic!("{what}: element {e} of {} differs in its bits (test {:?}, reference {:?})", b.len, t, r);
        }
    }
}

/// Asserts `|got - want| <= tol(i)` everywhere (NaN only against NaN) and prints the largest difference.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f32) {
    assert_eq!(got.len(), want.len());
    let mut max = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.is_nan() || w.is_nan() {
            assert!(g.is_nan() && w.is_nan(), "{what}: element {i}: {g} vs reference {w}");
            continue;
        }
        if g == w {
            continue;
        }
        let d = (g - w).abs();
        assert!(d <= tol(i), "{what}: element {i}: {g} vs reference {w} (|d| = {d:e} > {:e})", tol(i));
        max = max.max(d);
    }
    eprintln!("{what}: max |d| = {max:e}");
}

// ---------------------------------------------------------------------------------------------------------
// Test bodies. Each takes the backend kind under test.

fn upload_download(kind: BackendKind) {
    with_rig(kind, 1 << 20, |r| {
        for dt in FLOATS {
            for n in [1, 7, 257, 4099] {
                let b = r.alloc(dt, n);
                let mut v = r.rand(n, -70000.0, 70000.0);
                // Ties, subnormals of every dtype, overflow and specials.
                let special =
                    [0.0, -0.0, 1.0 + EPS, 1.0 + 2f32.powi(-8), 1e-40, 3e-8, 6e-5, 65520.0, f32::INFINITY, f32::NAN];
                for (x, s) in v.iter_mut().zip(special.iter().cycle()).step_by(2) {
                    *x = *s * if n % 2 == 0 { -1.0 } else { 1.0 };
                }
                r.set(b, &v);
                r.same_bits(&format!("upload {dt} x{n}"), b);
                let (t, f) = r.get(b);
                assert_eq!(
                    t.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    f.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
        let labels = r.alloc(DType::I32, 7);
        r.run(|be| be.upload_i32(labels, &[0, 1, -2, 3, i32::MAX, 5, 6]));
        r.same_bits("upload_i32", labels);
        let (t, f) = r.get(labels);
        assert_eq!(t, f);
    });
}

fn cast(kind: BackendKind) {
    with_rig(kind, 1 << 20, |r| {
        for s in FLOATS {
            for d in FLOATS {
                for n in [1, 7, 257, 1000] {
                    let (src, dst) = (r.alloc(s, n), r.alloc(d, n));
                    let bits = r.rand_bits(s, n);
                    r.set_bytes(src, &bits);
                    r.run(|be| be.cast(src, dst));
                    r.same_bits(&format!("cast {s} -> {d} x{n}"), dst);
                }
            }
        }
    });
}

fn fill(kind: BackendKind) {
    with_rig(kind, 1 << 20, |r| {
        for dt in [DType::F32, DType::BF16, DType::F16, DType::I32] {
            for v in [0.0, -0.0, 0.1, -3.75, 1e30, f32::NAN, 1e-42] {
                let b = r.alloc(dt, 67);
                r.run(|be| be.fill(b, v));
                r.same_bits(&format!("fill {dt} {v}"), b);
            }
        }
    });
}

/// All four transposes, odd sizes, padded leading dimensions, batches, beta 0 over NaN and beta != 0.
fn gemm(kind: BackendKind, ad: DType) {
    with_rig(kind, 32 << 20, |r| {
        let sizes = [(1, 1, 1), (7, 7, 7), (63, 65, 67), (257, 129, 131), (1, 257, 3)];
        for cd in FLOATS {
            for (m, n, k) in sizes {
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    for (batch, beta, bcast_a) in [(1, 0.0, false), (3, 0.5, false), (2, 0.0, true)] {
                        if batch > 1 && m * n * k > 100_000 {
                            continue;
                        }
                        let mark = r.arena.mark();
                        let lda = if ta { m } else { k } + 3;
                        let ldb = if tb { k } else { n } + 1;
                        let ldc = n + 2;
                        let mut g = Gemm::new(m, n, k, Buf::EMPTY, Buf::EMPTY, Buf::EMPTY);
                        g.lda = lda;
                        g.ldb = ldb;
                        g.ldc = ldc;
                        g.trans_a = ta;
                        g.trans_b = tb;
                        g.alpha = 0.75;
                        g.beta = beta;
                        let one = g.extents();
                        let (sa, sb, sc) = (if bcast_a { 0 } else { one.0 + 5 }, one.1 + 3, one.2 + 1);
                        g = g.batched(batch, sa, sb, sc);
                        let (ea, eb, ec) = g.extents();
                        g.a = r.alloc(ad, ea);
                        g.b = r.alloc(ad, eb);
                        g.c = r.alloc(cd, ec);
                        let (va, vb) = (r.rand(ea, -1.0, 1.0), r.rand(eb, -1.0, 1.0));
                        let vc = if beta == 0.0 { vec![f32::NAN; ec] } else { r.rand(ec, -1.0, 1.0) };
                        r.set(g.a, &va);
                        r.set(g.b, &vb);
                        r.set(g.c, &vc);
                        let (_, a) = r.get(g.a);
                        let (_, b) = r.get(g.b);
                        let (_, c0) = r.get(g.c);
                        r.run(|be| be.gemm(&g));
                        let (got, want) = r.get(g.c);
                        // Per element of C: the scale of its sum; elements outside C keep tolerance 0.
                        let mut tol = vec![0.0f32; ec];
                        for t in 0..batch {
                            for i in 0..m {
                                for j in 0..n {
                                    let mut s = 0.0f64;
                                    for p in 0..k {
                                        let ai = t * sa + if ta { p * lda + i } else { i * lda + p };
                                        let bi = t * sb + if tb { j * ldb + p } else { p * ldb + j };
                                        s += (a[ai] as f64 * b[bi] as f64).abs();
                                    }
                                    let ci = t * sc + i * ldc + j;
                                    let beta_c = if beta == 0.0 { 0.0 } else { (beta * c0[ci]).abs() as f64 };
                                    let scale = 0.75 * s + beta_c;
                                    tol[ci] = (1e-5 * (k as f64).sqrt() * scale) as f32 + ulp(cd, want[ci]);
                                }
                            }
                        }
                        let what = format!("gemm {ad}->{cd} {m}x{n}x{k} ta={ta} tb={tb} batch={batch} beta={beta}");
                        assert_close(&what, &got, &want, |i| tol[i]);
                        if beta == 0.0 {
                            assert!(
                                got.iter().enumerate().all(|(i, v)| tol[i] == 0.0 || v.is_finite()),
                                "{what}: NaN leaked"
                            );
                        }
                        r.arena.release(mark);
                    }
                }
            }
        }
    });
}

fn gemm_errors(kind: BackendKind) {
    with_rig(kind, 1 << 16, |r| {
        let a = r.alloc(DType::F32, 64);
        let b = r.alloc(DType::F32, 64);
        let c = r.alloc(DType::F32, 64);
        let bad = [
            Gemm::new(8, 8, 8, a, b, Buf { len: 16, ..c }),            // C too short
            Gemm::new(4, 4, 4, a, b, a),                               // C overlaps A
            Gemm::new(4, 4, 4, a, Buf { dtype: DType::BF16, ..b }, c), // dtypes differ
            Gemm::new(4, 4, 4, a, b, Buf { offset: 1 << 16, ..c }),    // outside the arena
            Gemm::new(4, 4, 4, Buf { dtype: DType::I32, ..a }, Buf { dtype: DType::I32, ..b }, c), // not a float
        ];
        for g in bad {
            assert!(r.test.gemm(&g).is_err(), "{g:?} accepted by the backend under test");
            assert!(r.reference.gemm(&g).is_err(), "{g:?} accepted by the reference");
        }
        let outside = Buf { offset: usize::MAX / 2, len: 4, dtype: DType::F32 };
        assert!(r.test.activation(Activation::Relu, outside, c).is_err());
        assert!(r.test.upload(outside, &[0.0; 4]).is_err());
        assert!(r.test.grad_stats(outside, 1.0).is_err());
    });
}

const BIAS_SHAPES: [(usize, usize, usize); 6] =
    [(1, 1, 1), (7, 7, 1), (3, 257, 1), (5, 7, 63), (2, 3, 257), (64, 10, 1)];

fn add_bias(kind: BackendKind) {
    with_rig(kind, 1 << 20, |r| {
        for yd in FLOATS {
            for bd in FLOATS {
                for (o, c, i) in BIAS_SHAPES {
                    let (y, b) = (r.alloc(yd, o * c * i), r.alloc(bd, c));
                    let (vy, vb) = (r.rand(o * c * i, -4.0, 4.0), r.rand(c, -4.0, 4.0));
                    r.set(y, &vy);
                    r.set(b, &vb);
                    r.run(|be| be.add_bias(y, b, o, c, i));
                    r.same_bits(&format!("add_bias {yd}+{bd} {o}x{c}x{i}"), y);
                }
            }
        }
    });
}

fn bias_grad(kind: BackendKind) {
    with_rig(kind, 1 << 20, |r| {
        for yd in FLOATS {
            for bd in FLOATS {
                for (o, c, i) in BIAS_SHAPES {
                    let (dy, db) = (r.alloc(yd, o * c * i), r.alloc(bd, c));
                    let v = r.rand(o * c * i, -4.0, 4.0);
                    r.set(dy, &v);
                    r.run(|be| be.bias_grad(dy, db, o, c, i));
                    let what = format!("bias_grad {yd}->{bd} {o}x{c}x{i}");
                    // The CPU backends sum each column over the rows in the reference's order (bit-exact); the
                    // CUDA backend reduces in parallel partial sums, so it gets the summation-order tolerance.
                    if i == 1 && kind != BackendKind::Cuda {
                        r.same_bits(&what, db);
                        continue;
                    }
                    let (_, y) = r.get(dy);
                    let (got, want) = r.get(db);
                    let terms = (o * i) as f32;
                    let sum_abs = |ch: usize| -> f32 {
                        (0..o)
                            .map(|oo| y[(oo * c + ch) * i..(oo * c + ch + 1) * i].iter().map(|v| v.abs()).sum::<f32>())
                            .sum()
                    };
                    let tol: Vec<f32> = (0..c).map(|ch| terms * EPS * sum_abs(ch) + ulp(bd, want[ch])).collect();
                    assert_close(&what, &got, &want, |k| tol[k]);
                }
            }
        }
    });
}

/// Inputs for activations: a spread over [-10, 10] plus zeros, NaN and values near the kinks.
fn act_inputs(r: &mut Rig, n: usize) -> Vec<f32> {
    let mut v = r.rand(n, -10.0, 10.0);
    for (x, s) in v.iter_mut().zip([0.0, -0.0, f32::NAN, 1e-30, -1e-30, 30.0, -30.0, 100.0].iter().cycle()).step_by(5) {
        *x = *s;
    }
    v
}

fn activation(kind: BackendKind) {
    with_rig(kind, 1 << 20, |r| {
        for act in [Activation::Relu, Activation::GeluTanh] {
            for xd in FLOATS {
                for yd in FLOATS {
                    for n in [1, 7, 257, 1000] {
                        let (x, y) = (r.alloc(xd, n), r.alloc(yd, n));
                        let v = act_inputs(r, n);
                        r.set(x, &v);
                        let what = format!("{act:?} {xd}->{yd} x{n}");
                        r.run(|be| be.activation(act, x, y));
                        if act == Activation::Relu {
                            r.same_bits(&what, y);
                        } else {
                            let (_, xv) = r.get(x);
                            let (got, want) = r.get(y);
                            assert_close(&what, &got, &want, |i| 2e-6 * (1.0 + xv[i].abs()) + ulp(yd, want[i]));
                        }
                        if xd == yd {
                            // In place.
                            r.run(|be| be.activation(act, x, x));
                            let (got, want) = r.get(x);
                            assert_close(&format!("{what} in place"), &got, &want, |i| {
                                if act == Activation::Relu {
                                    0.0
                                } else {
                                    2e-6 * (1.0 + v[i].abs()) + ulp(yd, want[i])
                                }
                            });
                        }
                    }
                }
            }
        }
    });
}

fn activation_backward(kind: BackendKind) {
    with_rig(kind, 1 << 20, |r| {
        for act in [Activation::Relu, Activation::GeluTanh] {
            for xd in FLOATS {
                for dd in FLOATS {
                    for n in [1, 7, 257, 1000] {
                        let (x, dy, dx) = (r.alloc(xd, n), r.alloc(dd, n), r.alloc(dd, n));
                        let v = act_inputs(r, n);
                        let g = r.rand(n, -2.0, 2.0);
                        r.set(x, &v);
                        r.set(dy, &g);
                        let what = format!("{act:?}' {xd},{dd} x{n}");
                        for (out, label) in [(dx, "dx"), (dy, "in place")] {
                            r.run(|be| be.activation_backward(act, x, dy, out));
                            if act == Activation::Relu {
                                r.same_bits(&format!("{what} {label}"), out);
                            } else {
                                let (_, xv) = r.get(x);
                                let (got, want) = r.get(out);
                                assert_close(&format!("{what} {label}"), &got, &want, |i| {
                                    2e-6 * (1.0 + xv[i].abs()) * g[i].abs() + ulp(dd, want[i])
                                });
                            }
                        }
                    }
                }
            }
        }
    });
}

fn softmax_cross_entropy(kind: BackendKind) {
    with_rig(kind, 4 << 20, |r| {
        for ld in FLOATS {
            for dd in FLOATS {
                for (rows, classes) in [(1, 1), (7, 10), (64, 10), (3, 257), (2, 600)] {
                    let logits = r.alloc(ld, rows * classes);
                    let dl = r.alloc(dd, rows * classes);
                    let labels = r.alloc(DType::I32, rows);
                    let loss = r.alloc(DType::F32, 1);
                    let v = r.rand(rows * classes, -20.0, 20.0);
                    let lab: Vec<i32> = (0..rows).map(|i| ((i * 7 + 3) % classes) as i32).collect();
                    r.set(logits, &v);
                    r.run(|be| be.upload_i32(labels, &lab));
                    let scale = 1024.0;
                    r.run(|be| be.softmax_cross_entropy(logits, labels, rows, classes, loss, dl, scale));
                    let what = format!("softmax_xent {ld}->{dd} {rows}x{classes}");
                    let (got, want) = r.get(loss);
                    assert_close(&format!("{what} loss"), &got, &want, |_| 1e-6 * (1.0 + want[0].abs()));
                    let (got, want) = r.get(dl);
                    let g = scale / rows as f32;
                    assert_close(&format!("{what} dlogits"), &got, &want, |i| 8.0 * EPS * g + ulp(dd, want[i]));
                }
            }
        }
        // A label out of range is an error on both, before anything is written.
        let (logits, dl, labels, loss) =
            (r.alloc(DType::F32, 20), r.alloc(DType::F32, 20), r.alloc(DType::I32, 2), r.alloc(DType::F32, 1));
        r.run(|be| be.upload_i32(labels, &[1, 10]));
        assert!(r.test.softmax_cross_entropy(logits, labels, 2, 10, loss, dl, 1.0).is_err());
        assert!(r.reference.softmax_cross_entropy(logits, labels, 2, 10, loss, dl, 1.0).is_err());
    });
}

fn grad_stats(kind: BackendKind) {
    with_rig(kind, 1 << 20, |r| {
        for dt in FLOATS {
            for n in [1, 7, 257, 10_001] {
                for bad in [0, 1, 3] {
                    let g = r.alloc(dt, n);
                    let mut v = r.rand(n, -100.0, 100.0);
                    for (j, s) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY].iter().take(bad.min(n)).enumerate() {
                        v[(j * 37) % n] = *s;
                    }
                    r.set(g, &v);
                    let (t, f) = r.run(|be| be.grad_stats(g, 1.0 / 128.0));
                    let what = format!("grad_stats {dt} x{n} with {bad} non-finite");
                    assert_eq!(t.non_finite, f.non_finite, "{what}");
                    if f.non_finite == 0 {
                        assert!((t.sum_sq - f.sum_sq).abs() <= 1e-12 * f.sum_sq, "{what}: {t:?} vs {f:?}");
                    }
                }
            }
        }
    });
}

/// Allocates and fills the buffers of one fused optimizer update with `n` parameters.
fn param_bufs(r: &mut Rig, n: usize, working: Option<DType>, states: usize) -> ParamBufs {
    let master = r.alloc(DType::F32, n);
    let working = match working {
        Some(dt) => r.alloc(dt, n),
        None => master,
    };
    let grad = r.alloc(DType::F32, n);
    let state1 = if states >= 1 { r.alloc(DType::F32, n) } else { Buf::EMPTY };
    let state2 = if states >= 2 { r.alloc(DType::F32, n) } else { Buf::EMPTY };
    let (w, g) = (r.rand(n, -1.0, 1.0), r.rand(n, -1000.0, 1000.0));
    r.set(master, &w);
    r.set(grad, &g);
    for s in [state1, state2] {
        if s.len > 0 {
            let v = r.rand(n, 0.0, 0.01);
            r.set(s, &v);
        }
    }
    ParamBufs { master, working, grad, state1, state2 }
}

fn check_update(r: &mut Rig, what: &str, p: &ParamBufs) {
    let (got, want) = r.get(p.master);
    assert_close(&format!("{what} master"), &got, &want, |i| 1e-6 * want[i].abs());
    for s in [p.state1, p.state2] {
        if s.len > 0 {
            let (t, f) = r.get(s);
            assert_close(&format!("{what} state"), &t, &f, |i| 1e-6 * f[i].abs());
        }
    }
    if p.working != p.master {
        let (w, _) = r.get(p.working);
        let rounded: Vec<f32> = got.iter().map(|&x| p.working.dtype.round(x)).collect();
        assert_eq!(
            w.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            rounded.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{what}: working copy is not the new master rounded to {}",
            p.working.dtype
        );
    }
}

fn sgd_step(kind: BackendKind) {
    with_rig(kind, 1 << 20, |r| {
        for working in [None, Some(DType::BF16), Some(DType::F16), Some(DType::F32)] {
            for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
                for n in [1, 7, 257, 1000] {
                    let p = param_bufs(r, n, working, usize::from(momentum != 0.0));
                    let s = SgdStep { lr: 0.01, momentum, nesterov, weight_decay: 1e-4, grad_scale: 1.0 / 1024.0 };
                    r.run(|be| be.sgd_step(&p, &s));
                    check_update(r, &format!("sgd {working:?} momentum={momentum} nesterov={nesterov} x{n}"), &p);
                }
            }
        }
    });
}

fn adamw_step(kind: BackendKind) {
    with_rig(kind, 1 << 20, |r| {
        for working in [None, Some(DType::BF16), Some(DType::F16)] {
            for (t, n) in [(1, 1), (2, 7), (10, 257), (1000, 1000)] {
                let p = param_bufs(r, n, working, 2);
                let (b1, b2) = (0.9f64, 0.999f64);
                let s = AdamWStep {
                    lr: 1e-3,
                    beta1: b1 as f32,
                    beta2: b2 as f32,
                    eps: 1e-8,
                    weight_decay: 0.01,
                    bias_correction1: (1.0 - b1.powi(t)) as f32,
                    bias_correction2: (1.0 - b2.powi(t)) as f32,
                    grad_scale: 1.0 / 1024.0,
                };
                r.run(|be| be.adamw_step(&p, &s));
                check_update(r, &format!("adamw {working:?} t={t} x{n}"), &p);
            }
        }
    });
}

fn conv_and_pool(kind: BackendKind) {
    with_rig(kind, 4 << 20, |r| {
        for dt in FLOATS {
            for (c, h, w, k, stride, pad) in [(1, 1, 1, 1, 1, 0), (3, 7, 9, 3, 1, 1), (2, 8, 8, 5, 2, 2)] {
                let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
                let g = ConvGeom {
                    channels: c,
                    height: h,
                    width: w,
                    kernel: k,
                    stride,
                    padding: pad,
                    out_height: oh,
                    out_width: ow,
                };
                let images = 3;
                let x = r.alloc(dt, images * g.in_len());
                let cols = r.alloc(dt, images * g.col_rows() * g.col_cols());
                let v = r.rand(x.len, -1.0, 1.0);
                r.set(x, &v);
                r.run(|be| be.im2col(x, &g, images, cols));
                r.same_bits(&format!("im2col {dt} {g:?}"), cols);
                r.run(|be| be.col2im(cols, &g, images, x));
                r.same_bits(&format!("col2im {dt} {g:?}"), x);
            }
            let p = PoolGeom { channels: 3, height: 7, width: 9, kernel: 2, stride: 2, out_height: 3, out_width: 4 };
            let images = 2;
            let x = r.alloc(dt, images * p.in_len());
            let y = r.alloc(dt, images * p.out_len());
            let am = r.alloc(DType::I32, images * p.out_len());
            let v = r.rand(x.len, -1.0, 1.0);
            r.set(x, &v);
            r.run(|be| be.maxpool(x, &p, images, y, am));
            r.same_bits(&format!("maxpool {dt}"), y);
            r.same_bits(&format!("maxpool argmax {dt}"), am);
            r.run(|be| be.maxpool_backward(y, am, &p, images, x));
            r.same_bits(&format!("maxpool_backward {dt}"), x);
        }
    });
}

/// 20 steps of `model` on `kind` and on the reference; returns `(test, reference)` losses.
fn train(kind: BackendKind, model: &Model, policy: Policy, opt: Optimizer) -> Option<(Vec<f32>, Vec<f32>)> {
    if !kind.compiled() {
        eprintln!("skipped: the {} backend is not compiled in", kind.name());
        return None;
    }
    let batch = 7;
    let inputs = model.input().len();
    let classes = model.classes();
    let mut rng = 1u64;
    let mut next = move || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) as u32
    };
    // Four fixed batches, cycled: the model can fit them, so the loss falls.
    let data: Vec<(Vec<f32>, Vec<u32>)> = (0..4)
        .map(|_| {
            let x = (0..batch * inputs).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            let y = (0..batch).map(|_| next() % classes as u32).collect();
            (x, y)
        })
        .collect();
    let plan = MemoryPlan::new(model, policy, &opt, batch).unwrap();
    let losses = |k: BackendKind| -> Vec<f32> {
        let mut buf = HostBuffer::new(plan.total).unwrap();
        let be = AnyBackend::open(k, buf.as_mut_slice()).unwrap();
        let mut t = Trainer::new(be, model.clone(), policy, opt, TrainConfig::new(batch, policy).seed(7)).unwrap();
        (0..20).map(|s| t.step(&data[s % 4].0, &data[s % 4].1).unwrap().loss).collect()
    };
    Some((losses(kind), losses(BackendKind::Reference)))
}

fn training(kind: BackendKind) {
    let mlp = Model::sequential(Shape::flat(20)).linear(33).gelu().linear(17).relu().linear(5).build().unwrap();
    let cnn = Model::sequential(Shape::image(2, 9, 9))
        .conv2d(4, 3, 1, 1)
        .relu()
        .maxpool2d(2, 2)
        .conv2d(5, 3, 2, 1)
        .gelu()
        .flatten()
        .linear(3)
        .build()
        .unwrap();
    for (name, model, opt) in
        [("mlp", &mlp, Optimizer::from(AdamW::new(1e-2))), ("cnn", &cnn, Optimizer::from(Sgd::new(0.05).momentum(0.9)))]
    {
        for (policy, tol) in [(Policy::FLOAT32, 1e-5), (Policy::MIXED_BFLOAT16, 2e-3), (Policy::MIXED_FLOAT16, 2e-3)] {
            let Some((got, want)) = train(kind, model, policy, opt) else { return };
            let what = format!("training {name} {policy}");
            assert!(want[19] < want[0], "{what}: the reference did not learn: {want:?}");
            eprintln!("{what}: test {:?}\n{what}: reference {:?}", got, want);
            assert_close(&what, &got, &want, |i| tol * (1.0 + want[i].abs()));
        }
    }
}

/// A step with a NaN in its input is skipped on every backend and leaves master weights, working weights,
/// optimizer moments and the update counter bit-identical; under mixed_float16 the dynamic scale halves.
fn skipped_step(kind: BackendKind) {
    if !kind.compiled() {
        eprintln!("skipped: the {} backend is not compiled in", kind.name());
        return;
    }
    let model = Model::sequential(Shape::flat(12)).linear(9).gelu().linear(4).build().unwrap();
    let batch = 5;
    let x: Vec<f32> = (0..batch * 12).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
    let y: Vec<u32> = (0..batch as u32).map(|i| i % 4).collect();
    let mut bad = x.clone();
    bad[13] = f32::NAN;
    for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
        let opt = Optimizer::from(AdamW::new(1e-2));
        let plan = MemoryPlan::new(&model, policy, &opt, batch).unwrap();
        let mut buf = HostBuffer::new(plan.total).unwrap();
        let be = AnyBackend::open(kind, buf.as_mut_slice()).unwrap();
        let mut t = Trainer::new(be, model.clone(), policy, opt, TrainConfig::new(batch, policy)).unwrap();
        for _ in 0..3 {
            assert!(!t.step(&x, &y).unwrap().skipped);
        }
        let snapshot = |t: &mut Trainer<AnyBackend<'_>>| -> Vec<Vec<u8>> {
            let p = *t.params();
            [p.master, p.working, p.state1, p.state2]
                .iter()
                .map(|&b| {
                    let mut out = vec![0u8; b.bytes()];
                    t.backend_mut().download_bytes(b, &mut out).unwrap();
                    out
                })
                .collect()
        };
        let before = snapshot(&mut t);
        let (updates, scale) = (t.updates(), t.loss_scale().scale());
        let r = t.step(&bad, &y).unwrap();
        assert!(r.skipped, "{policy}: a NaN input must skip the step");
        assert_eq!(snapshot(&mut t), before, "{policy}: a skipped step changed the model");
        assert_eq!(t.updates(), updates, "{policy}");
        let expected = if policy == Policy::MIXED_FLOAT16 { scale / 2.0 } else { scale };
        assert_eq!(t.loss_scale().scale(), expected, "{policy}");
        assert!(!t.step(&x, &y).unwrap().skipped, "{policy}: training goes on after a skipped step");
    }
}

/// `gemm_fused` against the reference's composition of unfused ops, every epilogue, each float dtype, the
/// transposes the linear layers use.
fn gemm_fused(kind: BackendKind) {
    with_rig(kind, 8 << 20, |r| {
        for dt in FLOATS {
            for (m, n, k, tb) in [(7, 24, 13, true), (5, 17, 9, false), (64, 40, 72, true), (33, 48, 64, false)] {
                for (e, act) in [
                    (0, Activation::GeluTanh),
                    (1, Activation::GeluTanh),
                    (1, Activation::Relu),
                    (2, Activation::GeluTanh),
                    (2, Activation::Relu),
                    (3, Activation::GeluTanh),
                ] {
                    let mark = r.arena.mark();
                    let (a, b, c, pre) =
                        (r.alloc(dt, m * k), r.alloc(dt, k * n), r.alloc(dt, m * n), r.alloc(dt, m * n));
                    let (bias, dbias) = (r.alloc(dt, n), r.alloc(DType::F32, n));
                    let va = r.rand(m * k, -1.0, 1.0);
                    let vb = r.rand(k * n, -1.0, 1.0);
                    let vbias = r.rand(n, -0.5, 0.5);
                    let vpre = r.rand(m * n, -3.0, 3.0);
                    r.set(a, &va);
                    r.set(b, &vb);
                    r.set(bias, &vbias);
                    r.set(pre, &vpre);
                    r.set(c, &vec![f32::NAN; m * n]);
                    r.set(dbias, &vec![f32::NAN; n]);
                    let mut g = Gemm::new(m, n, k, a, b, c);
                    if tb {
                        g = g.b_t(k);
                    }
                    let ep = match e {
                        0 => Epilogue::Bias { bias },
                        1 => Epilogue::BiasAct { bias, act, pre },
                        2 => Epilogue::ActGrad { act, pre, dbias: Some(dbias) },
                        _ => Epilogue::ActGrad { act, pre, dbias: None },
                    };
                    r.run(|be| be.gemm_fused(&g, &ep));
                    let (_, av) = r.get(a);
                    let (_, bv) = r.get(b);
                    let (_, biasv) = r.get(bias);
                    // Per element: the GEMM's tolerance at the scale of its sum (bias included), carried through
                    // the activation (slope <= 1.2) with one more rounding of the intermediate; 16-bit results
                    // also allow 1e-3 relative (a fused epilogue evaluates GELU with its own tanh).
                    let mut tol = vec![0.0f32; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = biasv[j].abs() as f64;
                            for p in 0..k {
                                let bi = if tb { j * k + p } else { p * n + j };
                                s += (av[i * k + p] as f64 * bv[bi] as f64).abs();
                            }
                            let s = s as f32;
                            tol[i * n + j] = 1.2 * (1e-5 * (k as f32).sqrt() * s + 2.0 * ulp(dt, s));
                        }
                    }
                    let what = format!("gemm_fused {ep:?} {dt} {m}x{n}x{k} tb={tb}");
                    let rel = if dt == DType::F32 { 2e-6 } else { 1e-3 };
                    let (got, want) = r.get(c);
                    assert_close(&what, &got, &want, |i| tol[i] + 2.0 * ulp(dt, want[i]) + rel * (1.0 + want[i].abs()));
                    if let Epilogue::BiasAct { .. } = ep {
                        let (got, want) = r.get(pre);
                        assert_close(&format!("{what} pre"), &got, &want, |i| tol[i] + ulp(dt, want[i]));
                    }
                    if e == 2 {
                        let (got, want) = r.get(dbias);
                        let (_, cv) = r.get(c);
                        assert_close(&format!("{what} dbias"), &got, &want, |j| {
                            (0..m)
                                .map(|i| {
                                    tol[i * n + j] + 2.0 * ulp(dt, cv[i * n + j]) + rel * (1.0 + cv[i * n + j].abs())
                                })
                                .sum::<f32>()
                        });
                    }
                    r.arena.release(mark);
                }
            }
        }
    });
}

/// What the CUDA backend's autotune measured (empty for other backends), for failure messages.
fn tuning_log(be: &AnyBackend<'_>) -> String {
    match be {
        #[cfg(feature = "cuda")]
        AnyBackend::Cuda(g) => g.tuning_log().join("\n"),
        _ => String::new(),
    }
}

/// Steps queued without reports (and, on a device backend, recorded once and replayed) change the model
/// exactly as the same steps taken one at a time with a report each and no recording: weights, optimizer state
/// and the control block bit-identical, through a skipped step, a dynamic scale that grows, a new learning
/// rate and a change of batch rows.
fn queued_steps(kind: BackendKind) {
    if !kind.compiled() {
        eprintln!("skipped: the {} backend is not compiled in", kind.name());
        return;
    }
    let model = Model::sequential(Shape::flat(24)).linear(40).gelu().linear(32).gelu().linear(6).build().unwrap();
    let batch = 9;
    let x: Vec<f32> = (0..batch * 24).map(|i| ((i * 37 % 23) as f32 - 11.0) / 11.0).collect();
    let y: Vec<u32> = (0..batch as u32).map(|i| i % 6).collect();
    let mut bad = x.clone();
    bad[30] = f32::INFINITY;
    for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
        let opt = Optimizer::from(AdamW::new(1e-2));
        let plan = MemoryPlan::new(&model, policy, &opt, batch).unwrap();
        let scale = mantissa::LossScale::Dynamic(
            mantissa::DynamicLossScale::new(
                mantissa::DynamicConfig::pytorch().initial_scale(1024.0).growth_interval(3),
            )
            .unwrap(),
        );
        let cfg = TrainConfig::new(batch, policy).seed(3).loss_scale(scale).clip_norm(0.5);
        let mut bufs = [HostBuffer::new(plan.total).unwrap(), HostBuffer::new(plan.total).unwrap()];
        let [b0, b1] = &mut bufs;
        let mut queued =
            Trainer::new(AnyBackend::open(kind, b0.as_mut_slice()).unwrap(), model.clone(), policy, opt, cfg).unwrap();
        let mut stepped =
            Trainer::new(AnyBackend::open(kind, b1.as_mut_slice()).unwrap(), model.clone(), policy, opt, cfg).unwrap();
        stepped.set_graphs(false);
        let mut last = None;
        // (batch, rows, steps): good data, a non-finite batch (skipped), good data again with fewer rows.
        for (data, rows, steps, lr) in
            [(&x, batch, 4, None), (&bad, batch, 1, None), (&x, batch, 3, Some(5e-3)), (&x, batch - 2, 2, None)]
        {
            for t in [&mut queued, &mut stepped] {
                if let Some(lr) = lr {
                    t.set_lr(lr).unwrap();
                }
                t.stage(data, &y).unwrap();
            }
            let mut want = None;
            for _ in 0..steps {
                queued.queue_staged(rows).unwrap();
                want = Some(stepped.step_staged(rows).unwrap());
            }
            let got = queued.report().unwrap();
            let want = want.unwrap();
            let what = format!("queued steps {policy} rows={rows}");
            if format!("{got:?}") != format!("{want:?}") {
                eprintln!("{what}: queued backend's tuning:\n{}", tuning_log(queued.backend()));
                eprintln!("{what}: stepped backend's tuning:\n{}", tuning_log(stepped.backend()));
            }
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "{what}: reports differ");
            if data == &bad {
                assert!(got.skipped, "{what}: the non-finite batch must be skipped");
            }
            last = Some(got);
        }
        let p = *queued.params();
        for (name, b) in [("master", p.master), ("working", p.working), ("m", p.state1), ("v", p.state2)] {
            let mut a = vec![0u8; b.bytes()];
            let mut c = vec![0u8; b.bytes()];
            queued.backend_mut().download_bytes(b, &mut a).unwrap();
            stepped.backend_mut().download_bytes(b, &mut c).unwrap();
            assert!(a == c, "queued steps {policy}: {name} differs from step-by-step training");
        }
        assert_eq!(queued.updates(), stepped.updates());
        assert_eq!(queued.skipped(), 1, "{policy}");
        assert_eq!(format!("{:?}", queued.loss_scale()), format!("{:?}", stepped.loss_scale()));
        // The scale grew after 3 finite steps, halved on the skip, and grew again.
        assert!(last.unwrap().loss_scale > 1024.0, "{policy}: {:?}", queued.loss_scale());
    }
}

/// One module per backend, each with every test body; attributes after the kind go on every test.
macro_rules! backend_tests {
    ($module:ident => $kind:expr $(, #[$attr:meta])*) => {
        mod $module {
            use super::*;
            const KIND: BackendKind = $kind;
            #[test] $(#[$attr])* fn upload_download() { super::upload_download(KIND) }
            #[test] $(#[$attr])* fn cast() { super::cast(KIND) }
            #[test] $(#[$attr])* fn fill() { super::fill(KIND) }
            #[test] $(#[$attr])* fn gemm_f32() { super::gemm(KIND, DType::F32) }
            #[test] $(#[$attr])* fn gemm_bf16() { super::gemm(KIND, DType::BF16) }
            #[test] $(#[$attr])* fn gemm_f16() { super::gemm(KIND, DType::F16) }
            #[test] $(#[$attr])* fn gemm_errors() { super::gemm_errors(KIND) }
            #[test] $(#[$attr])* fn add_bias() { super::add_bias(KIND) }
            #[test] $(#[$attr])* fn bias_grad() { super::bias_grad(KIND) }
            #[test] $(#[$attr])* fn activation() { super::activation(KIND) }
            #[test] $(#[$attr])* fn activation_backward() { super::activation_backward(KIND) }
            #[test] $(#[$attr])* fn softmax_cross_entropy() { super::softmax_cross_entropy(KIND) }
            #[test] $(#[$attr])* fn grad_stats() { super::grad_stats(KIND) }
            #[test] $(#[$attr])* fn sgd_step() { super::sgd_step(KIND) }
            #[test] $(#[$attr])* fn adamw_step() { super::adamw_step(KIND) }
            #[test] $(#[$attr])* fn conv_and_pool() { super::conv_and_pool(KIND) }
            #[test] $(#[$attr])* fn training() { super::training(KIND) }
            #[test] $(#[$attr])* fn skipped_step() { super::skipped_step(KIND) }
            #[test] $(#[$attr])* fn gemm_fused() { super::gemm_fused(KIND) }
            #[test] $(#[$attr])* fn queued_steps() { super::queued_steps(KIND) }
        }
    };
}

backend_tests!(reference => BackendKind::Reference);
backend_tests!(cpu_simd => BackendKind::CpuSimd);
// The same bodies on the GPU: built with `--features cuda`, run on a GPU machine by scripts/gpu-check.sh with
// `--include-ignored` (`cargo test` here has no GPU, so they are ignored with that reason).
#[cfg(feature = "cuda")]
backend_tests!(cuda => BackendKind::Cuda, #[ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh runs it)"]);

/// Through `AnyBackend`, the GPU's own versions of the provided methods run (not the host defaults): a
/// 16-bit bias + GELU GEMM runs in cuBLASLt, the backend records, and the device control block matches the
/// host specification after a step decided on the device.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh runs it)"]
fn device_paths() {
    use mantissa::control::{self, Control, StepRule};
    let mut buf = HostBuffer::new(4 << 20).unwrap();
    let mut be = AnyBackend::open(BackendKind::Cuda, buf.as_mut_slice()).unwrap();
    let mut arena = Arena::new(be.capacity());
    let (m, n, k) = (64, 40, 72);
    let dt = DType::BF16;
    let (a, b, c, pre, bias) = (
        arena.alloc(dt, m * k).unwrap(),
        arena.alloc(dt, n * k).unwrap(),
        arena.alloc(dt, m * n).unwrap(),
        arena.alloc(dt, m * n).unwrap(),
        arena.alloc(dt, n).unwrap(),
    );
    for (x, len) in [(a, m * k), (b, n * k), (bias, n)] {
        be.upload(x, &(0..len).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect::<Vec<_>>()).unwrap();
    }
    let fused_calls = |be: &AnyBackend<'_>| match be {
        AnyBackend::Cuda(g) => g.fused_epilogue_calls(),
        _ => unreachable!(),
    };
    let before = fused_calls(&be);
    be.gemm_fused(&Gemm::new(m, n, k, a, b, c).b_t(k), &Epilogue::BiasAct { bias, act: Activation::GeluTanh, pre })
        .unwrap();
    assert_eq!(fused_calls(&be), before + 1, "gemm_fused did not reach cuBLASLt through AnyBackend");
    // A classifier layer's backward (4 outputs over pre [m, n]) reaches the one-pass kernel.
    let head_calls = |be: &AnyBackend<'_>| match be {
        AnyBackend::Cuda(g) => g.fused_head_calls(),
        _ => unreachable!(),
    };
    let before = head_calls(&be);
    let (dy, w, dx) =
        (arena.alloc(dt, m * 4).unwrap(), arena.alloc(dt, 4 * n).unwrap(), arena.alloc(dt, m * n).unwrap());
    be.upload(dy, &vec![0.25; m * 4]).unwrap();
    be.upload(w, &vec![0.5; 4 * n]).unwrap();
    let op = mantissa::backend::LinearActBackward {
        act: Activation::GeluTanh,
        rows: m,
        i: n,
        o: 4,
        dy,
        x: c,
        x_valid: true,
        pre,
        w,
        dx,
        dw: None,
        db: None,
        prev_dbias: None,
    };
    be.linear_act_backward(&op).unwrap();
    assert_eq!(head_calls(&be), before + 1, "linear_act_backward did not reach the CUDA kernel through AnyBackend");
    assert!(be.record_begin().unwrap(), "recording did not reach the CUDA backend");
    assert_eq!(be.record_end(false).unwrap(), None);
    // One decision on the device with an infinite gradient, against control::decide on the host.
    let (ctl, grad, loss) = (
        arena.alloc(DType::I32, control::WORDS).unwrap(),
        arena.alloc(DType::F32, 5).unwrap(),
        arena.alloc(DType::F32, 1).unwrap(),
    );
    let mut want = Control::new(1024.0, 2);
    mantissa::backend::write_control(&mut be, ctl, &want).unwrap();
    be.upload(grad, &[1.0, f32::INFINITY, 2.0, 3.0, 4.0]).unwrap();
    be.upload(loss, &[0.25]).unwrap();
    let rule = StepRule {
        loss_scale: mantissa::LossScale::Dynamic(mantissa::DynamicLossScale::deepspeed()),
        clip_norm: None,
        adam_betas: Some((0.9, 0.999)),
    };
    be.step_control(ctl, grad, loss, &rule).unwrap();
    want.set_f32(control::LAST_LOSS, 0.25);
    control::decide(&mut want, &rule, 1, 0.0);
    let got = mantissa::backend::read_control(&mut be, ctl).unwrap();
    assert!(got.f32(control::LAST_NORM).is_nan(), "a non-finite step's norm is NaN");
    want.words[control::LAST_NORM] = got.words[control::LAST_NORM];
    assert_eq!(got.words[..], want.words[..], "device decision differs from control::decide");
}

/// The kernel names `MANTISSA_KERNEL` accepts, slowest first.
const KERNELS: [&str; 5] = ["scalar", "avx2", "avx512", "avx512bf16", "amx"];

/// Prints `kernels: <name> ...` for the kernels this CPU runs (`scripts/test-kernels.sh` reads the line).
#[test]
fn list_kernels() {
    let names: Vec<&str> = KERNELS.into_iter().filter(|k| simd_kernel_available(k)).collect();
    println!("kernels: {}", names.join(" "));
}

/// With `MANTISSA_KERNEL` set, the SIMD backend must open on exactly that kernel (a kernel this CPU lacks is
/// an error, so the run fails rather than testing another kernel).
#[test]
fn forced_kernel_is_used() {
    let Ok(forced) = std::env::var("MANTISSA_KERNEL") else {
        eprintln!("MANTISSA_KERNEL not set: nothing to check");
        return;
    };
    if !BackendKind::CpuSimd.compiled() {
        eprintln!("skipped: the cpu-simd backend is not compiled in");
        return;
    }
    let be = AnyBackend::open(BackendKind::CpuSimd, &mut []);
    match be {
        Ok(be) => assert_eq!(be.kernel(), Some(forced.trim()), "MANTISSA_KERNEL={forced} was not used"),
        Err(e) => panic!("MANTISSA_KERNEL={forced}: {e}"),
    }
}

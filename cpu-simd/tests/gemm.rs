//! Every kernel this CPU supports against a naive f64 reference: odd sizes, all four
//! transpose combinations, padded and non-unit strides, nontrivial alpha/beta,
//! beta == 0 over a NaN-filled C, 1 and 2 threads, f32 / bf16 / f16 inputs and
//! f32 / 16-bit outputs. Elements outside each view hold sentinels that must survive.
//!
//! Tolerances (k = inner dimension, scale = |alpha| * sum_p |a_ip b_pj| + |beta c_ij|):
//! - f32 accumulation (all input types; 16-bit inputs are generated exactly
//!   representable, so the f64 reference sees the same values): |err| <= 1e-5 * sqrt(k) * scale.
//! - 16-bit C additionally: one ulp of the output type at |ref| (rounding is 1/2 ulp).
//! - bf16 on the dot-product kernels (`avx512bf16`, `amx`): products and partial sums below 2^-126 flush to
//!   zero (DAZ/FTZ), up to k * 2^-126 * |alpha| in all. (The generated inputs, multiples of 2^-10, never reach
//!   that range; `bf16_subnormals_flush_on_dot_kernels` checks the flushing itself.)
//! - AArch64 (`neon`, `neon-fhm`, `neon-bf16`): the f32 tolerance above for every dtype. FMLAL (f16) and
//!   BFMLALB/T (bf16) are IEEE fused multiply-adds of exact products, not the round-to-odd, subnormal-flushing
//!   BFDOT/BFMMLA, so `arm_16bit_kernels_match_neon_bitwise` asserts they equal the f32 NEON kernel exactly.
//!
//! `MANTISSA_KERNEL=<name> cargo test -p mantissa-cpu-simd` also checks that the forced
//! kernel exists on this CPU and is the one `detect()` returns.

use half::{bf16, f16};
use mantissa_cpu_simd::{
    available_kernels, detect, detect_from, gemm, gemm_bf16, gemm_f16, gemm_f32, gemm_in, gemm_scratch_len, COut, Elem,
    Error, Kernel, KernelId, MatMut, MatRef, Operand, KERNEL_ENV,
};

const SIZES: [(usize, usize, usize); 5] = [(1, 1, 1), (7, 7, 7), (63, 65, 67), (257, 129, 131), (1, 257, 3)];

struct Rng(u64);
impl Rng {
    /// Uniform in [-1, 1), multiples of 2^-10 so that bf16 and f16 hold them only
    /// after rounding, exercising the conversion.
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as i32 % 1024) as f32 / 1024.0
    }
}

fn kernels() -> Vec<Kernel> {
    available_kernels().into_iter().map(|id| Kernel::new(id).expect("listed kernels are available")).collect()
}

/// An (r, c) matrix stored row-major (or column-major when `trans`) with `pad` extra
/// elements per leading dimension: (len, rs, cs).
fn layout(r: usize, c: usize, trans: bool, pad: usize) -> (usize, usize, usize) {
    if trans {
        let ld = r + pad;
        (ld * c, 1, ld)
    } else {
        let ld = c + pad;
        (ld * r, ld, 1)
    }
}

/// Fills a matrix view with values rounded to `T`; the rest with `fill`.
fn make<T: Elem>(rng: &mut Rng, r: usize, c: usize, trans: bool, pad: usize, fill: f32) -> (Vec<T>, usize, usize) {
    let (len, rs, cs) = layout(r, c, trans, pad);
    let mut v = vec![T::from_f32(fill); len.max(1)];
    for i in 0..r {
        for j in 0..c {
            v[i * rs + j * cs] = T::from_f32(rng.next());
        }
    }
    (v, rs, cs)
}

fn ulp(x: f64, mantissa_bits: i32) -> f64 {
    if x == 0.0 {
        return 0.0;
    }
    2f64.powi(x.abs().log2().floor() as i32 - mantissa_bits)
}

type RawGemm<TI, TC> = dyn Fn(
    Kernel,
    usize,
    usize,
    usize,
    usize,
    f32,
    *const TI,
    isize,
    isize,
    *const TI,
    isize,
    isize,
    f32,
    *mut TC,
    isize,
    isize,
);

/// Runs every kernel x size x transpose x (alpha, beta) x threads through `call` and
/// checks against f64. `out_mantissa`: explicit mantissa bits of C (None for f32).
fn check_all<TI: Elem, TC: Elem>(label: &str, out_mantissa: Option<i32>, call: &RawGemm<TI, TC>) {
    check_sizes(&SIZES, label, out_mantissa, call)
}

/// [`check_all`] on the given (m, n, k).
fn check_sizes<TI: Elem, TC: Elem>(
    sizes: &[(usize, usize, usize)],
    label: &str,
    out_mantissa: Option<i32>,
    call: &RawGemm<TI, TC>,
) {
    let mut rng = Rng(0x5eed);
    let mut worst = 0.0f64;
    for &(m, n, k) in sizes {
        for combo in 0..4 {
            let (ta, tb) = (combo & 1 == 1, combo & 2 == 2);
            let (a, rsa, csa) = make::<TI>(&mut rng, m, k, ta, 3, f32::NAN);
            let (b, rsb, csb) = make::<TI>(&mut rng, k, n, tb, 2, f32::NAN);
            for &(alpha, beta) in &[(1.5f32, -0.75f32), (-0.5, 0.0)] {
                // C layouts: padded row-major, padded column-major, strided columns.
                let (clen, rsc, csc) = match combo {
                    1 => layout(m, n, true, 5),
                    3 => (m * (2 * n + 1), 2 * n + 1, 2),
                    _ => layout(m, n, false, 5),
                };
                let sentinel = 1234.5f32;
                let mut c0 = vec![TC::from_f32(sentinel); clen];
                for i in 0..m {
                    for j in 0..n {
                        c0[i * rsc + j * csc] = TC::from_f32(if beta == 0.0 { f32::NAN } else { rng.next() });
                    }
                }
                // Reference and error scale, in f64 from the stored (rounded) inputs.
                let mut refc = vec![0f64; m * n];
                let mut scale = vec![0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let (mut s, mut sa) = (0f64, 0f64);
                        for p in 0..k {
                            let x = a[i * rsa + p * csa].to_f32() as f64 * b[p * rsb + j * csb].to_f32() as f64;
                            s += x;
                            sa += x.abs();
                        }
                        let cv = if beta == 0.0 { 0.0 } else { c0[i * rsc + j * csc].to_f32() as f64 };
                        refc[i * n + j] = alpha as f64 * s + beta as f64 * cv;
                        scale[i * n + j] = (alpha as f64).abs() * sa + (beta as f64 * cv).abs();
                    }
                }
                for kernel in kernels() {
                    for threads in [1, 2] {
                        let mut c = c0.clone();
                        call(
                            kernel,
                            threads,
                            m,
                            n,
                            k,
                            alpha,
                            a.as_ptr(),
                            rsa as isize,
                            csa as isize,
                            b.as_ptr(),
                            rsb as isize,
                            csb as isize,
                            beta,
                            c.as_mut_ptr(),
                            rsc as isize,
                            csc as isize,
                        );
                        let ctx = || {
                            format!("{label} {} m={m} n={n} k={k} ta={ta} tb={tb} alpha={alpha} beta={beta} threads={threads}", kernel.name())
                        };
                        let mut inside = vec![false; clen];
                        for i in 0..m {
                            for j in 0..n {
                                inside[i * rsc + j * csc] = true;
                                let got = c[i * rsc + j * csc].to_f32() as f64;
                                let r = refc[i * n + j];
                                let tol = 1e-5 * (k as f64).sqrt() * scale[i * n + j]
                                    + out_mantissa.map_or(0.0, |mb| ulp(r, mb))
                                    + k as f64 * f32::MIN_POSITIVE as f64 * (alpha as f64).abs()
                                    + 1e-30;
                                let err = (got - r).abs();
                                assert!(
                                    err <= tol,
                                    "{}: C[{i},{j}] = {got}, reference {r}, |err| {err:e} > tol {tol:e}",
                                    ctx()
                                );
                                worst = worst.max(err / tol);
                            }
                        }
                        for (idx, v) in c.iter().enumerate() {
                            if !inside[idx] {
                                assert_eq!(
                                    v.to_f32(),
                                    TC::from_f32(sentinel).to_f32(),
                                    "{}: wrote outside C at {idx}",
                                    ctx()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    println!("{label}: worst |err| / tol = {worst:.3}");
}

#[test]
fn f32_all_kernels() {
    check_all::<f32, f32>("f32", None, &|kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, c, rsc, csc| unsafe {
        // SAFETY: check_all passes views that lie inside its buffers, C separate.
        gemm_f32(kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, c, rsc, csc)
    });
}

/// Sizes past every cache block of the f32 kernels (AVX-512: KC 256, MC 224, NC 1024), so that
/// the packers' block paths run with partial last blocks: m = 230 (MC + 6 rows), n = 1060 (NC +
/// a panel and a bit), k = 530 (two k blocks of 265, not a multiple of the 16-k transpose), in
/// all four layouts (row-major A and column-major B pack through the in-register transpose,
/// the other two row by row).
#[test]
fn f32_all_kernels_across_cache_blocks() {
    let sizes = [(230, 1060, 530)];
    check_sizes::<f32, f32>(
        &sizes,
        "f32 blocks",
        None,
        &|kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, c, rsc, csc| unsafe {
            // SAFETY: check_sizes passes views that lie inside its buffers, C separate.
            gemm_f32(kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, c, rsc, csc)
        },
    );
}

/// Few columns and many rows: the threaded entry runs these transposed (`C^T = B^T A^T`) where the
/// register tile's rows fit n better than its columns (AVX-512 f32: n = 10 uses 10 of 14 rows against 10
/// of 32 columns), in all four layouts, with edge tiles and both alpha/beta pairs.
#[test]
fn small_n_all_kernels() {
    let sizes = [(300, 10, 70), (64, 5, 33), (97, 14, 300)];
    check_sizes::<f32, f32>(
        &sizes,
        "f32 small n",
        None,
        &|kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, c, rsc, csc| unsafe {
            // SAFETY: check_sizes passes views that lie inside its buffers, C separate.
            gemm_f32(kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, c, rsc, csc)
        },
    );
    check_sizes::<bf16, bf16>(
        &sizes,
        "bf16 small n",
        Some(7),
        &|kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, c, rsc, csc| unsafe {
            // SAFETY: as above.
            gemm_bf16(kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, COut::BF16(c), rsc, csc)
        },
    );
}

#[test]
fn bf16_to_f32_all_kernels() {
    check_all::<bf16, f32>(
        "bf16->f32",
        None,
        &|kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, c, rsc, csc| unsafe {
            // SAFETY: as above.
            gemm_bf16(kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, COut::F32(c), rsc, csc)
        },
    );
}

#[test]
fn bf16_to_bf16_all_kernels() {
    check_all::<bf16, bf16>("bf16->bf16", Some(7), &|kn,
                                                     th,
                                                     m,
                                                     n,
                                                     k,
                                                     al,
                                                     a,
                                                     rsa,
                                                     csa,
                                                     b,
                                                     rsb,
                                                     csb,
                                                     be,
                                                     c,
                                                     rsc,
                                                     csc| unsafe {
        // SAFETY: as above.
        gemm_bf16(kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, COut::BF16(c), rsc, csc)
    });
}

#[test]
fn f16_to_f32_all_kernels() {
    check_all::<f16, f32>("f16->f32", None, &|kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, c, rsc, csc| unsafe {
        // SAFETY: as above.
        gemm_f16(kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, COut::F32(c), rsc, csc)
    });
}

#[test]
fn f16_to_f16_all_kernels() {
    check_all::<f16, f16>(
        "f16->f16",
        Some(10),
        &|kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, c, rsc, csc| unsafe {
            // SAFETY: as above.
            gemm_f16(kn, th, m, n, k, al, a, rsa, csa, b, rsb, csb, be, COut::F16(c), rsc, csc)
        },
    );
}

/// Long k (several KC blocks) with 16-bit C: accumulation must stay in f32 across
/// blocks, so the error stays within one output ulp plus f32 accumulation error.
#[test]
fn bf16_out_long_k_accumulates_in_f32() {
    let (m, n, k) = (3, 40, 2000);
    let mut rng = Rng(7);
    let a: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.next())).collect();
    let b: Vec<bf16> = (0..k * n).map(|_| bf16::from_f32(rng.next())).collect();
    for kernel in kernels() {
        let mut c = vec![bf16::from_f32(f32::NAN); m * n];
        gemm(
            kernel,
            1,
            1.0,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            0.0,
            MatMut::row_major(&mut c, m, n),
        )
        .unwrap();
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut sa) = (0f64, 0f64);
                for p in 0..k {
                    let x = a[i * k + p].to_f64() * b[p * n + j].to_f64();
                    s += x;
                    sa += x.abs();
                }
                let tol = ulp(s, 7) + 1e-5 * (k as f64).sqrt() * sa;
                let got = c[i * n + j].to_f64();
                assert!((got - s).abs() <= tol, "{}: C[{i},{j}] = {got}, reference {s}", kernel.name());
            }
        }
    }
}

#[test]
fn forced_kernel_is_available_and_used() {
    let Ok(forced) = std::env::var(KERNEL_ENV) else {
        // Not forced: detect() picks the fastest kernel, which this CPU must support.
        let best = detect().unwrap();
        assert_eq!(best, Kernel::best());
        assert!(available_kernels().contains(&best.id()));
        return;
    };
    let id = KernelId::from_name(&forced).unwrap_or_else(|| panic!("{KERNEL_ENV}={forced} names no kernel"));
    let kernel = detect().unwrap_or_else(|e| panic!("{KERNEL_ENV}={forced}: {e}"));
    assert_eq!(kernel.id(), id, "{KERNEL_ENV}={forced} but detect() chose {}", kernel.name());
    // And it computes: 2x2 identity times B.
    let (a, b) = ([1.0f32, 0.0, 0.0, 1.0], [1.0f32, 2.0, 3.0, 4.0]);
    let mut c = [f32::NAN; 4];
    gemm(
        kernel,
        1,
        1.0,
        MatRef::row_major(&a, 2, 2),
        MatRef::row_major(&b, 2, 2),
        0.0,
        MatMut::row_major(&mut c, 2, 2),
    )
    .unwrap();
    assert_eq!(c, b);
}

#[test]
fn detect_from_names() {
    assert_eq!(detect_from(Some("scalar")).unwrap().id(), KernelId::Scalar);
    assert_eq!(detect_from(Some(" AVX2 ")).map(|k| k.id()), Kernel::new(KernelId::Avx2).map(|k| k.id()));
    assert_eq!(detect_from(Some("sse9")), Err(Error::UnknownKernel));
    // NEON is part of the AArch64 base ISA: always there, names parse case-insensitively.
    #[cfg(target_arch = "aarch64")]
    assert_eq!(detect_from(Some(" NEON ")).unwrap().id(), KernelId::Neon);
    assert_eq!(detect_from(None).unwrap(), Kernel::best());
    for id in KernelId::ALL {
        assert_eq!(KernelId::from_name(id.name()), Some(id));
        match Kernel::new(id) {
            Ok(k) => assert!(available_kernels().contains(&k.id())),
            Err(e) => assert_eq!(e, Error::KernelUnavailable(id)),
        }
    }
}

#[test]
fn safe_wrapper_rejects_bad_views() {
    let k = Kernel::scalar();
    let a = [0.0f32; 6];
    let b = [0.0f32; 6];
    let mut c = [0.0f32; 4];
    let ok =
        gemm(k, 1, 1.0, MatRef::row_major(&a, 2, 3), MatRef::row_major(&b, 3, 2), 0.0, MatMut::row_major(&mut c, 2, 2));
    assert_eq!(ok, Ok(()));
    let e =
        gemm(k, 1, 1.0, MatRef::row_major(&a, 2, 3), MatRef::row_major(&b, 2, 3), 0.0, MatMut::row_major(&mut c, 2, 2));
    assert!(matches!(e, Err(Error::ShapeMismatch { .. })));
    let e =
        gemm(k, 1, 1.0, MatRef::new(&a, 2, 3, 4, 1), MatRef::row_major(&b, 3, 2), 0.0, MatMut::row_major(&mut c, 2, 2));
    assert_eq!(e, Err(Error::OutOfBounds(Operand::A)));
    let e =
        gemm(k, 1, 1.0, MatRef::row_major(&a, 2, 3), MatRef::row_major(&b, 3, 2), 0.0, MatMut::new(&mut c, 2, 2, 1, 1));
    assert_eq!(e, Err(Error::AliasingOutput));
    // Transposes are views: (A^T)^T B.
    let at = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0]; // A = [[1,2,3],[4,5,6]] stored transposed
    let bb = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
    gemm(
        k,
        1,
        1.0,
        MatRef::row_major(&at, 3, 2).t(),
        MatRef::row_major(&bb, 3, 2),
        0.0,
        MatMut::row_major(&mut c, 2, 2),
    )
    .unwrap();
    assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
}

#[test]
fn k_zero_and_alpha_zero_scale_c() {
    for kernel in kernels() {
        let a: [f32; 0] = [];
        let mut c = [1.0f32, 2.0, 3.0, 4.0];
        gemm(
            kernel,
            2,
            1.0,
            MatRef::row_major(&a, 2, 0),
            MatRef::row_major(&a, 0, 2),
            0.5,
            MatMut::row_major(&mut c, 2, 2),
        )
        .unwrap();
        assert_eq!(c, [0.5, 1.0, 1.5, 2.0]);
        let nan = [f32::NAN; 4];
        let mut c = [f32::NAN; 4];
        gemm(
            kernel,
            1,
            0.0,
            MatRef::row_major(&nan, 2, 2),
            MatRef::row_major(&nan, 2, 2),
            0.0,
            MatMut::row_major(&mut c, 2, 2),
        )
        .unwrap();
        assert_eq!(c, [0.0; 4]);
    }
}

/// The allocation-free entry point: exactly `gemm_scratch_len` bytes, at an
/// unaligned start, works for every dtype; one byte less is an error value.
#[test]
fn caller_scratch_no_alloc_path() {
    let (m, n, k) = (37, 70, 300);
    let mut rng = Rng(3);
    let a: Vec<f32> = (0..m * k).map(|_| rng.next()).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.next()).collect();
    let ah: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
    let bh: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
    for kernel in kernels() {
        let need = gemm_scratch_len(m, n, k, kernel);
        let mut buf = vec![0u8; need + 1];
        let scratch = &mut buf[1..];
        let mut c1 = vec![0f32; m * n];
        let mut c2 = vec![0f32; m * n];
        gemm_in(
            kernel,
            scratch,
            1.0,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            0.0,
            MatMut::row_major(&mut c1, m, n),
        )
        .unwrap();
        gemm(
            kernel,
            2,
            1.0,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            0.0,
            MatMut::row_major(&mut c2, m, n),
        )
        .unwrap();
        assert_eq!(c1, c2, "{}: scratch path differs from threaded path", kernel.name());
        let mut c3 = vec![bf16::ZERO; m * n];
        gemm_in(
            kernel,
            scratch,
            1.0,
            MatRef::row_major(&ah, m, k),
            MatRef::row_major(&bh, k, n),
            0.0,
            MatMut::row_major(&mut c3, m, n),
        )
        .unwrap();
        let short = &mut buf[1..need];
        let e = gemm_in(
            kernel,
            short,
            1.0,
            MatRef::row_major(&ah, m, k),
            MatRef::row_major(&bh, k, n),
            0.0,
            MatMut::row_major(&mut c3, m, n),
        );
        assert!(matches!(e, Err(Error::ScratchTooSmall { .. })) || e.is_ok(), "{e:?}");
        let e = gemm_in(
            kernel,
            &mut [],
            1.0,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            0.0,
            MatMut::row_major(&mut c1, m, n),
        );
        assert!(matches!(e, Err(Error::ScratchTooSmall { .. })));
    }
}

/// The bf16 dot-product instructions (`vdpbf16ps` on `avx512bf16`, `tdpbf16ps` on `amx`) treat subnormal
/// inputs as zero and flush subnormal results to zero, whatever MXCSR says; the widening kernels multiply in
/// f32 and keep both.
#[test]
fn bf16_subnormals_flush_on_dot_kernels() {
    let p = |e: i32| bf16::from_f32(2f32.powi(e));
    // Subnormal input (2^-130) times 2^10: 2^-120, a normal result the input flush turns into 0.
    // Normal inputs 2^-64 * 2^-64: 2^-128, a subnormal result.
    for (a, b, exact) in [(p(-130), p(10), 2f32.powi(-120)), (p(-64), p(-64), 2f32.powi(-128))] {
        for kernel in kernels() {
            let dot = matches!(kernel.id(), KernelId::Avx512Bf16 | KernelId::Amx);
            for (m, n, k) in [(1, 1, 1), (40, 40, 70)] {
                // A = a on its first column, B = b on its first row, zero elsewhere: every C is a * b.
                let av: Vec<bf16> = (0..m * k).map(|i| if i % k == 0 { a } else { bf16::ZERO }).collect();
                let bv: Vec<bf16> = (0..k * n).map(|i| if i < n { b } else { bf16::ZERO }).collect();
                let mut c = vec![f32::NAN; m * n];
                gemm(
                    kernel,
                    1,
                    1.0,
                    MatRef::row_major(&av, m, k),
                    MatRef::row_major(&bv, k, n),
                    0.0,
                    MatMut::row_major(&mut c, m, n),
                )
                .unwrap();
                let want = if dot { 0.0 } else { exact };
                assert!(c.iter().all(|&x| x == want), "{} m={m}: {a} * {b} gave {}, want {want}", kernel.name(), c[0]);
            }
        }
    }
}

/// Prints `kernels: <name> ...`, the kernels every test above ran on this CPU (`scripts/test-aarch64.sh`
/// reads the line to check that emulated CPUs expose the expected kernels).
#[test]
fn list_kernels() {
    let names: Vec<&str> = available_kernels().into_iter().map(|id| id.name()).collect();
    println!("kernels: {}", names.join(" "));
}

/// The AArch64 16-bit kernels against the f32 NEON kernel on the same data: FMLAL and BFMLALB/T are fused
/// multiply-adds of products exact in f32, in the NEON kernel's k order and cache blocks, so every element of
/// C must be equal, not merely close. Inputs span 2^-70..2^10 (bf16: subnormal f32 products; f16: its own
/// subnormals), so a flush to zero or a round-to-odd step (BFDOT/BFMMLA) would show.
#[cfg(target_arch = "aarch64")]
#[test]
fn arm_16bit_kernels_match_neon_bitwise() {
    fn wide<T: Elem>(rng: &mut Rng, len: usize, min_exp: i32) -> Vec<T> {
        (0..len)
            .map(|_| {
                let m = rng.next();
                let e = min_exp + ((rng.next() + 1.0) * 0.5 * (10 - min_exp) as f32) as i32;
                T::from_f32(m * 2f32.powi(e))
            })
            .collect()
    }
    fn run<TI: Elem, TC: Elem>(label: &str, min_exp: i32, fast: &[KernelId]) {
        let neon = Kernel::new(KernelId::Neon).unwrap();
        let mut rng = Rng(11);
        for &(m, n, k) in &[(1, 1, 1), (8, 12, 2), (63, 65, 67), (17, 30, 700)] {
            for combo in 0..4 {
                let (ta, tb) = (combo & 1 == 1, combo & 2 == 2);
                let a = wide::<TI>(&mut rng, m * k, min_exp);
                let b = wide::<TI>(&mut rng, k * n, min_exp);
                let av = if ta { MatRef::col_major(&a, m, k) } else { MatRef::row_major(&a, m, k) };
                let bv = if tb { MatRef::col_major(&b, k, n) } else { MatRef::row_major(&b, k, n) };
                let c0: Vec<TC> = wide(&mut rng, m * n, -10);
                let mut want = c0.clone();
                gemm(neon, 2, 0.75, av, bv, -1.5, MatMut::row_major(&mut want, m, n)).unwrap();
                for &id in fast {
                    let Ok(kernel) = Kernel::new(id) else { continue };
                    let mut got = c0.clone();
                    gemm(kernel, 2, 0.75, av, bv, -1.5, MatMut::row_major(&mut got, m, n)).unwrap();
                    for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                        let (g, w) = (g.to_f32(), w.to_f32());
                        assert!(
                            g == w || (g.is_nan() && w.is_nan()),
                            "{label} {}: m={m} n={n} k={k} ta={ta} tb={tb}: C[{idx}] = {g:e}, neon {w:e}",
                            kernel.name()
                        );
                    }
                }
            }
        }
    }
    let (fhm, bf) = (KernelId::NeonFhm, KernelId::NeonBf16);
    run::<f16, f32>("f16->f32", -14, &[fhm, bf]);
    run::<f16, f16>("f16->f16", -14, &[fhm, bf]);
    run::<bf16, f32>("bf16->f32", -70, &[bf]);
    run::<bf16, bf16>("bf16->bf16", -70, &[bf]);
}

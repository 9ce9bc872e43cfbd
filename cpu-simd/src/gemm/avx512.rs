//! AVX-512F kernel: 14x32 f32 register tile (28 zmm accumulators, 2 for B, A
//! broadcast from memory). Also serves bf16/f16 inputs, widened while packing.

use core::arch::x86_64::*;

use super::driver::{gemm_blocked, store_tile_strided};
use super::driver::{pack_a_panels, pack_b_panels};
use super::pack::{pack_f32, pack_f32_rows};
use super::{scratch_of, tile_of, Elem, ElemKind, GemmKernel, Micro, Task};

/// The AVX-512F kernel family.
pub(crate) struct Avx512;

/// 14x32 f32 micro-kernel.
pub(crate) struct Avx512F32;

pub(crate) const MR: usize = 14;
pub(crate) const NR: usize = 32;

impl Micro for Avx512F32 {
    type P = f32;
    const MR: usize = MR;
    const NR: usize = NR;
    const KU: usize = 1;
    // B micro-panel: 256 x 32 x 4 B = 32 KiB (L1d: 32 KiB Zen 4, 48 KiB Golden Cove);
    // A block: 224 x 256 x 4 B = 224 KiB (L2: 1-2 MiB); B block 1 MiB (L2/L3).
    const KC: usize = 256;
    const MC: usize = 14 * 16;
    const NC: usize = 1024;

    #[inline(always)]
    unsafe fn pack_a<T: Elem>(kc: usize, valid: usize, a: *const T, rs: isize, ks: isize, dst: *mut f32) {
        // SAFETY: forwarded contract; F16C and AVX-512F are part of this kernel's features.
        unsafe {
            if ks == 1 && matches!(T::KIND, ElemKind::F32) {
                pack_k_contiguous::<MR>(kc, valid, a as *const f32, rs, dst)
            } else {
                pack_f32::<T, MR, true>(kc, valid, a, rs, ks, dst)
            }
        }
    }

    #[inline(always)]
    unsafe fn pack_b<T: Elem>(kc: usize, valid: usize, b: *const T, rs: isize, ks: isize, dst: *mut f32) {
        // SAFETY: forwarded contract; F16C and AVX-512F are part of this kernel's features.
        unsafe {
            if ks == 1 && matches!(T::KIND, ElemKind::F32) {
                pack_k_contiguous::<NR>(kc, valid, b as *const f32, rs, dst)
            } else {
                pack_f32::<T, NR, true>(kc, valid, b, rs, ks, dst)
            }
        }
    }

    #[inline(always)]
    unsafe fn pack_a_block<T: Elem>(mc: usize, kc: usize, a: *const T, rsa: isize, csa: isize, dst: *mut f32) {
        // SAFETY: forwarded contract.
        unsafe {
            if rsa == 1 && matches!(T::KIND, ElemKind::F32) {
                pack_f32_rows::<MR>(kc, mc, a as *const f32, csa, dst)
            } else {
                pack_a_panels::<Self, T>(mc, kc, a, rsa, csa, dst)
            }
        }
    }

    #[inline(always)]
    unsafe fn pack_b_block<T: Elem>(kc: usize, nc: usize, b: *const T, rsb: isize, csb: isize, dst: *mut f32) {
        // SAFETY: forwarded contract.
        unsafe {
            if csb == 1 && matches!(T::KIND, ElemKind::F32) {
                pack_f32_rows::<NR>(kc, nc, b as *const f32, rsb, dst)
            } else {
                pack_b_panels::<Self, T>(kc, nc, b, rsb, csb, dst)
            }
        }
    }

    #[inline(always)]
    unsafe fn kernel(
        kp: usize,
        alpha: f32,
        a: *const f32,
        b: *const f32,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: panels hold kp * 14 and kp * 32 f32; AVX-512F is enabled by the
        // caller's #[target_feature] context.
        unsafe {
            let mut acc0 = [_mm512_setzero_ps(); MR];
            let mut acc1 = [_mm512_setzero_ps(); MR];
            for p in 0..kp {
                let b0 = _mm512_loadu_ps(b.add(p * NR));
                let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
                let ap = a.add(p * MR);
                for i in 0..MR {
                    let ai = _mm512_set1_ps(*ap.add(i));
                    acc0[i] = _mm512_fmadd_ps(ai, b0, acc0[i]);
                    acc1[i] = _mm512_fmadd_ps(ai, b1, acc1[i]);
                }
            }
            store_acc(&acc0, &acc1, alpha, beta, c, rsc, csc);
        }
    }
}

/// Packs `valid <= R` rows (of A; columns of B) of an f32 matrix contiguous along k,
/// `src[i * rs + p]`, into the panel layout `dst[p * R + i]`, rows past `valid` zero.
/// Reads 16 k of up to 16 rows (one zmm each), transposes them in registers and writes
/// 16 runs of up to 16 f32: the generic packer's element-wise strided writes became
/// `vscatterqps` here and cost ~8% of a 1024^3 GEMM.
///
/// # Safety
/// `src[i * rs + p]` readable for `i < valid`, `p < kc`; `dst` writable for `kc * R`
/// f32; AVX-512F enabled in the caller.
#[inline(always)]
unsafe fn pack_k_contiguous<const R: usize>(kc: usize, valid: usize, src: *const f32, rs: isize, dst: *mut f32) {
    debug_assert!(valid <= R);
    for p0 in (0..kc).step_by(16) {
        let len = 16.min(kc - p0);
        // Masked loads read only k < kc (and never fault past it).
        let kmask = (u32::MAX >> (32 - len)) as __mmask16;
        for g in (0..R).step_by(16) {
            let rows = 16.min(R - g);
            let live = valid.saturating_sub(g).min(rows);
            let smask = (u32::MAX >> (32 - rows)) as __mmask16;
            // SAFETY: rows g + i < valid and k p0 + q < kc are read (masked); writes hit
            // (p0 + q) * R + g + (lanes < rows) < kc * R (caller).
            unsafe {
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, ri) in r.iter_mut().enumerate() {
                    if i < live {
                        *ri = _mm512_maskz_loadu_ps(kmask, src.offset((g + i) as isize * rs + p0 as isize));
                    }
                }
                let t = transpose16(&r);
                for (q, tq) in t.iter().enumerate() {
                    if q < len {
                        _mm512_mask_storeu_ps(dst.add((p0 + q) * R + g), smask, *tq);
                    }
                }
            }
        }
    }
}

/// 16x16 f32 transpose: `out[q]` lane `i` = `r[i]` lane `q`. 64 shuffles in four stages
/// (pairs of rows, pairs of pairs, then 128-bit lanes twice).
#[inline(always)]
fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
    // SAFETY: register-only shuffles; AVX-512F is enabled in every caller's context.
    unsafe {
        let mut t = [_mm512_setzero_ps(); 16];
        for j in 0..8 {
            t[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
            t[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
        }
        // u[4g + s]: k = s, 4 + s, 8 + s, 12 + s (one per 128-bit lane) of rows 4g..4g + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a0, a1, b0, b1) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            let pd = _mm512_castps_pd;
            u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a0), pd(b0)));
            u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a0), pd(b0)));
            u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a1), pd(b1)));
            u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a1), pd(b1)));
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for s in 0..4 {
            // v: lanes (k = s, 8 + s) of rows 0..8; w: the same of rows 8..16; v1/w1 for k 4 + s, 12 + s.
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[s], u[4 + s]);
            let v1 = _mm512_shuffle_f32x4::<0xdd>(u[s], u[4 + s]);
            let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + s], u[12 + s]);
            let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + s], u[12 + s]);
            out[s] = _mm512_shuffle_f32x4::<0x88>(v0, w0);
            out[8 + s] = _mm512_shuffle_f32x4::<0xdd>(v0, w0);
            out[4 + s] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
            out[12 + s] = _mm512_shuffle_f32x4::<0xdd>(v1, w1);
        }
        out
    }
}

/// Writes a 14x32 accumulator tile (`acc0[i]`: columns 0..16 of row i, `acc1[i]`:
/// 16..32) to C: `C = alpha * acc + beta * C`, C not read when beta == 0.
///
/// # Safety
/// The 14x32 tile of C is writable; AVX-512F is enabled in the caller.
#[inline(always)]
pub(crate) unsafe fn store_acc(
    acc0: &[__m512; MR],
    acc1: &[__m512; MR],
    alpha: f32,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    // SAFETY: tile of C writable, AVX-512F available (caller).
    unsafe {
        let va = _mm512_set1_ps(alpha);
        if csc == 1 {
            let vb = _mm512_set1_ps(beta);
            for i in 0..MR {
                let row = c.offset(i as isize * rsc);
                let mut x0 = _mm512_mul_ps(va, acc0[i]);
                let mut x1 = _mm512_mul_ps(va, acc1[i]);
                if beta != 0.0 {
                    x0 = _mm512_fmadd_ps(vb, _mm512_loadu_ps(row), x0);
                    x1 = _mm512_fmadd_ps(vb, _mm512_loadu_ps(row.add(16)), x1);
                }
                _mm512_storeu_ps(row, x0);
                _mm512_storeu_ps(row.add(16), x1);
            }
        } else {
            let mut tile = [0.0f32; MR * NR];
            for i in 0..MR {
                _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR), acc0[i]);
                _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR + 16), acc1[i]);
            }
            store_tile_strided(MR, NR, &tile, alpha, beta, c, rsc, csc);
        }
    }
}

/// The blocked driver with the 14x32 f32 micro-kernel.
///
/// # Safety
/// As `gemm_blocked`; the CPU supports AVX-512F, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn run_avx512<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
    // SAFETY: forwarded contract; this function enables the kernel's features.
    unsafe { gemm_blocked::<Avx512F32, TA, TB, TC>(t, scratch) }
}

impl GemmKernel for Avx512 {
    fn tile<TA: Elem, TB: Elem>() -> (usize, usize) {
        tile_of::<Avx512F32>()
    }
    fn scratch_len<TA: Elem, TB: Elem, TC: Elem>(m: usize, n: usize, k: usize) -> usize {
        scratch_of::<Avx512F32, TC>(m, n, k)
    }
    unsafe fn run<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
        // SAFETY: the caller holds a `Kernel` for Avx512, so the features exist.
        unsafe { run_avx512(t, scratch) }
    }
}

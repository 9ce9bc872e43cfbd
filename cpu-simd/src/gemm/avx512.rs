//! AVX-512F kernel: 14x32 f32 register tile (28 zmm accumulators, 2 for B, A
//! broadcast from memory). Also serves bf16/f16 inputs, widened while packing.

use core::arch::x86_64::*;

use super::driver::{gemm_blocked, store_tile_strided};
use super::pack::pack_f32;
use super::{scratch_of, tile_of, Elem, GemmKernel, Micro, Task};

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
        // SAFETY: forwarded contract; F16C is part of this kernel's features.
        unsafe { pack_f32::<T, MR, true>(kc, valid, a, rs, ks, dst) }
    }

    #[inline(always)]
    unsafe fn pack_b<T: Elem>(kc: usize, valid: usize, b: *const T, rs: isize, ks: isize, dst: *mut f32) {
        // SAFETY: forwarded contract; F16C is part of this kernel's features.
        unsafe { pack_f32::<T, NR, true>(kc, valid, b, rs, ks, dst) }
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

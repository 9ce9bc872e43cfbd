//! AVX2 + FMA (+ F16C for f16 inputs) kernel: 6x16 f32 register tile
//! (12 ymm accumulators, 2 for B, 1 broadcast of A).

use core::arch::x86_64::*;

use super::driver::{gemm_blocked, store_tile_strided};
use super::pack::pack_f32;
use super::{scratch_of, tile_of, Elem, GemmKernel, Micro, Task};

/// The AVX2 kernel family.
pub(crate) struct Avx2;

/// 6x16 f32 micro-kernel.
pub(crate) struct Avx2F32;

const MR: usize = 6;
const NR: usize = 16;

impl Micro for Avx2F32 {
    type P = f32;
    const MR: usize = MR;
    const NR: usize = NR;
    const KU: usize = 1;
    // B micro-panel: 256 x 16 x 4 B = 16 KiB (L1); A block 144 x 256 x 4 B = 144 KiB (L2).
    const KC: usize = 256;
    const MC: usize = 144;
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
        // SAFETY: panels hold kp * 6 and kp * 16 f32; the tile of C is writable;
        // AVX2 + FMA are enabled by the caller's #[target_feature] context.
        unsafe {
            let mut acc0 = [_mm256_setzero_ps(); MR];
            let mut acc1 = [_mm256_setzero_ps(); MR];
            for p in 0..kp {
                let b0 = _mm256_loadu_ps(b.add(p * NR));
                let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
                let ap = a.add(p * MR);
                for i in 0..MR {
                    let ai = _mm256_broadcast_ss(&*ap.add(i));
                    acc0[i] = _mm256_fmadd_ps(ai, b0, acc0[i]);
                    acc1[i] = _mm256_fmadd_ps(ai, b1, acc1[i]);
                }
            }
            let va = _mm256_set1_ps(alpha);
            if csc == 1 {
                let vb = _mm256_set1_ps(beta);
                for i in 0..MR {
                    let row = c.offset(i as isize * rsc);
                    let mut x0 = _mm256_mul_ps(va, acc0[i]);
                    let mut x1 = _mm256_mul_ps(va, acc1[i]);
                    if beta != 0.0 {
                        x0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(row), x0);
                        x1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(row.add(8)), x1);
                    }
                    _mm256_storeu_ps(row, x0);
                    _mm256_storeu_ps(row.add(8), x1);
                }
            } else {
                let mut tile = [0.0f32; MR * NR];
                for i in 0..MR {
                    _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR), acc0[i]);
                    _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR + 8), acc1[i]);
                }
                store_tile_strided(MR, NR, &tile, alpha, beta, c, rsc, csc);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
    // SAFETY: forwarded contract; this function enables the kernel's features.
    unsafe { gemm_blocked::<Avx2F32, TA, TB, TC>(t, scratch) }
}

impl GemmKernel for Avx2 {
    fn tile<TA: Elem, TB: Elem>() -> (usize, usize) {
        tile_of::<Avx2F32>()
    }
    fn scratch_len<TA: Elem, TB: Elem, TC: Elem>(m: usize, n: usize, k: usize) -> usize {
        scratch_of::<Avx2F32, TC>(m, n, k)
    }
    unsafe fn run<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
        // SAFETY: the caller holds a `Kernel` for Avx2, so AVX2, FMA and F16C exist.
        unsafe { run_avx2(t, scratch) }
    }
}

//! AVX-512 BF16 kernel: bf16 x bf16 through `vdpbf16ps`, 14x32 f32 register tile.
//!
//! Packing interleaves pairs of consecutive k (see `pack::pack_bf16_pairs`): one
//! 32-bit lane of B holds `(B[2p, j], B[2p+1, j])`, one broadcast of A holds
//! `(A[i, 2p], A[i, 2p+1])`, and `vdpbf16ps` adds both products to the f32 lane.
//! Per instruction: 16 lanes x 2 products, twice the f32 FMA's work. `vdpbf16ps`
//! treats subnormal inputs and outputs as zero and rounds to nearest even.
//! Other input types use the AVX-512F f32 kernel.

use core::arch::x86_64::*;

use super::avx512::{run_avx512, store_acc, Avx512F32, MR, NR};
use super::driver::gemm_blocked;
use super::pack::pack_bf16_pairs;
use super::{is_bf16, scratch_of, tile_of, Elem, GemmKernel, Micro, Task};

/// The AVX-512 BF16 kernel family.
pub(crate) struct Avx512Bf16;

/// 14x32 bf16-pair micro-kernel.
pub(crate) struct Dpbf16;

impl Micro for Dpbf16 {
    /// bf16 bits.
    type P = u16;
    const MR: usize = MR;
    const NR: usize = NR;
    const KU: usize = 2;
    // B micro-panel: 384 x 32 x 2 B = 24 KiB (L1); A block 224 x 384 x 2 B = 168 KiB.
    const KC: usize = 384;
    const MC: usize = 14 * 16;
    const NC: usize = 1024;

    #[inline(always)]
    unsafe fn pack_a<T: Elem>(kc: usize, valid: usize, a: *const T, rs: isize, ks: isize, dst: *mut u16) {
        // SAFETY: forwarded contract.
        unsafe { pack_bf16_pairs::<T, MR>(kc, valid, a, rs, ks, dst) }
    }

    #[inline(always)]
    unsafe fn pack_b<T: Elem>(kc: usize, valid: usize, b: *const T, rs: isize, ks: isize, dst: *mut u16) {
        // SAFETY: forwarded contract.
        unsafe { pack_bf16_pairs::<T, NR>(kc, valid, b, rs, ks, dst) }
    }

    #[inline(always)]
    unsafe fn kernel(
        kp: usize,
        alpha: f32,
        a: *const u16,
        b: *const u16,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: panels hold kp * 2 * 14 and kp * 2 * 32 u16; AVX-512F and
        // AVX512_BF16 are enabled by the caller's #[target_feature] context;
        // __m512i and __m512bh are both 64 plain bytes, so transmute is sound.
        unsafe {
            let mut acc0 = [_mm512_setzero_ps(); MR];
            let mut acc1 = [_mm512_setzero_ps(); MR];
            let a32 = a as *const i32;
            for p in 0..kp {
                let bp = b.add(p * 2 * NR);
                let b0: __m512bh = core::mem::transmute(_mm512_loadu_si512(bp as *const _));
                let b1: __m512bh = core::mem::transmute(_mm512_loadu_si512(bp.add(32) as *const _));
                let ap = a32.add(p * MR);
                for i in 0..MR {
                    let ai: __m512bh = core::mem::transmute(_mm512_set1_epi32(ap.add(i).read_unaligned()));
                    acc0[i] = _mm512_dpbf16_ps(acc0[i], ai, b0);
                    acc1[i] = _mm512_dpbf16_ps(acc1[i], ai, b1);
                }
            }
            store_acc(&acc0, &acc1, alpha, beta, c, rsc, csc);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn run_dpbf16<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
    // SAFETY: forwarded contract; this function enables the kernel's features.
    unsafe { gemm_blocked::<Dpbf16, TA, TB, TC>(t, scratch) }
}

impl GemmKernel for Avx512Bf16 {
    fn tile<TA: Elem, TB: Elem>() -> (usize, usize) {
        if is_bf16::<TA>() && is_bf16::<TB>() {
            tile_of::<Dpbf16>()
        } else {
            tile_of::<Avx512F32>()
        }
    }
    fn scratch_len<TA: Elem, TB: Elem, TC: Elem>(m: usize, n: usize, k: usize) -> usize {
        if is_bf16::<TA>() && is_bf16::<TB>() {
            scratch_of::<Dpbf16, TC>(m, n, k)
        } else {
            scratch_of::<Avx512F32, TC>(m, n, k)
        }
    }
    unsafe fn run<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
        // SAFETY: the caller holds a `Kernel` for Avx512Bf16, so AVX-512F, AVX512_BF16
        // (and what they imply) exist; scratch sized by `scratch_len` above.
        unsafe {
            if is_bf16::<TA>() && is_bf16::<TB>() {
                run_dpbf16(t, scratch)
            } else {
                run_avx512(t, scratch)
            }
        }
    }
}

//! Portable kernel: plain Rust, 4x8 register tile. The fallback on every target and
//! the layout reference for the SIMD kernels (same packing, same driver).

use super::driver::{gemm_blocked, store_tile_strided};
use super::pack::pack_f32;
use super::{scratch_of, tile_of, Elem, GemmKernel, Micro, Task};

/// The portable kernel family.
pub(crate) struct Scalar;

/// 4x8 f32 micro-kernel.
pub(crate) struct Scalar4x8;

const MR: usize = 4;
const NR: usize = 8;

impl Micro for Scalar4x8 {
    type P = f32;
    const MR: usize = MR;
    const NR: usize = NR;
    const KU: usize = 1;
    const KC: usize = 256;
    const MC: usize = 64;
    const NC: usize = 512;

    #[inline(always)]
    unsafe fn pack_a<T: Elem>(kc: usize, valid: usize, a: *const T, rs: isize, ks: isize, dst: *mut f32) {
        // SAFETY: forwarded contract; no F16C.
        unsafe { pack_f32::<T, MR, false>(kc, valid, a, rs, ks, dst) }
    }

    #[inline(always)]
    unsafe fn pack_b<T: Elem>(kc: usize, valid: usize, b: *const T, rs: isize, ks: isize, dst: *mut f32) {
        // SAFETY: forwarded contract; no F16C.
        unsafe { pack_f32::<T, NR, false>(kc, valid, b, rs, ks, dst) }
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
        let mut acc = [[0.0f32; NR]; MR];
        for p in 0..kp {
            // SAFETY: panels hold kp * MR and kp * NR f32 (caller).
            let (ap, bp) = unsafe { (&*(a.add(p * MR) as *const [f32; MR]), &*(b.add(p * NR) as *const [f32; NR])) };
            for i in 0..MR {
                for j in 0..NR {
                    acc[i][j] += ap[i] * bp[j];
                }
            }
        }
        // SAFETY: acc is MR * NR contiguous f32; the C tile is writable (caller).
        unsafe {
            let flat = core::slice::from_raw_parts(acc.as_ptr() as *const f32, MR * NR);
            store_tile_strided(MR, NR, flat, alpha, beta, c, rsc, csc);
        }
    }
}

impl GemmKernel for Scalar {
    fn tile<TA: Elem, TB: Elem>() -> (usize, usize) {
        tile_of::<Scalar4x8>()
    }
    fn scratch_len<TA: Elem, TB: Elem, TC: Elem>(m: usize, n: usize, k: usize) -> usize {
        scratch_of::<Scalar4x8, TC>(m, n, k)
    }
    unsafe fn run<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
        // SAFETY: forwarded contract; plain Rust needs no CPU feature.
        unsafe { gemm_blocked::<Scalar4x8, TA, TB, TC>(t, scratch) }
    }
}

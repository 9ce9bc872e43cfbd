//! The activation backward fused with the bias gradient (`kernels/act_grad.cu`): `dx = dy * act'(pre)` written
//! over `dy` and `dbias[c] = sum_r dx[r, c]`, in one pass over the data (read `pre` and `dy`, write `dx`, per-split
//! column sums into the scratch) and a small finishing pass over the partial sums. It is what the composed
//! [`Epilogue::ActGrad`](mantissa_core::backend::Epilogue::ActGrad) tail computes with `activation_backward`
//! then `bias_grad`, which reads C twice (on the H200 that tail took ~0.1 ms for `[8192, 4096]` bf16, about twice
//! the memory-bandwidth bound).
//!
//! - dx: bit-identical to `activation_backward` (the same device function and expression per element).
//! - dbias: sums in f32 of dx as stored (rounded to dy's dtype, widened back), so it differs from `bias_grad`
//!   on the same dx only by the order of the f32 additions. Deterministic: no atomics, and a launch shape that
//!   depends only on the problem and the device.
//!
//! [`CudaBackend::activation_backward_bias_grad_small_k`] (`act_grad_small_k*` kernels) also computes dy itself, as the product `A B` of a
//! small inner dimension (`k <= 16`: the input gradient of a classifier layer, `dY[m, 10] W[10, n]`), so that dy
//! is never written: one pass reads `pre` (and the small A and B) and writes dx, where `gemm` then
//! `act_grad_bias` write dy, then read it back with `pre` and write dx.

use cudarc::driver::{result as cur, sys as cu};
use mantissa_core::backend::Activation;
use mantissa_core::{Backend, Buf, Error, Result};

use crate::kernels::{launch, Arg, Family};
use crate::{CudaBackend, BIG_BYTES, BIG_OFF};

/// Thread rows per block (`AG_BY` in `kernels/act_grad.cu`): blocks are `(32, ROWS)`, 256 threads.
const ROWS: u32 = 8;
/// The fewest rows a split gets (two iterations of the kernel's two-row loop per thread row): shorter splits add
/// partial sums to write and to add up without spreading the work any better.
const MIN_ROWS: usize = 32;
/// Waves of resident blocks the first pass aims for: more than one so that blocks that finish late (DRAM
/// contention is not even across multiprocessors) leave less of the machine idle.
const WAVES: usize = 2;

impl CudaBackend {
    /// `dx = dy * act'(pre)` over `[m, n]`, written over `dy`, and with `dbias` its column sums `dbias[c] =
    /// sum_r dx[r, c]`, in one pass over the data plus a small deterministic finishing pass: what
    /// `activation_backward(act, pre, dy, dy)` then `bias_grad(dy, dbias, m, n, 1)` compute, reading `dy` once.
    ///
    /// - `pre` and `dy`: the same float dtype, at least `m * n` elements; `pre` may be `dy` itself, but no other
    ///   overlap. `dbias`: any float dtype, at least `n` elements, not overlapping `pre` or `dy`.
    /// - dx is bit-identical to [`Backend::activation_backward`]'s. dbias sums the rounded dx values (as
    ///   stored, widened to f32) in f32, as [`Backend::bias_grad`] does, in another (fixed) order: the two differ
    ///   by f32 summation order only. Repeated calls give the same bits.
    /// - `m == 0` zeroes `dbias`; `dbias` of `None` is `activation_backward` itself.
    pub fn activation_backward_bias_grad(
        &mut self,
        act: Activation,
        pre: Buf,
        dy: Buf,
        dbias: Option<Buf>,
        m: usize,
        n: usize,
    ) -> Result<()> {
        let be = self;
        be.check(pre, "act_grad_bias pre")?;
        be.check(dy, "act_grad_bias dy")?;
        let len = m.checked_mul(n).ok_or(Error::ShapeMismatch {
            what: "act_grad_bias m * n",
            expected: dy.len,
            got: usize::MAX,
        })?;
        CudaBackend::check_len(pre, len, "act_grad_bias pre")?;
        CudaBackend::check_len(dy, len, "act_grad_bias dy")?;
        let t = CudaBackend::float(dy, "act_grad_bias dy")?;
        if pre.dtype != t {
            return Err(Error::UnsupportedDType { what: "act_grad_bias pre (must match dy)", dtype: pre.dtype });
        }
        let (pre, dy) = (pre.prefix(len), dy.prefix(len));
        // Shifted overlap would have threads read elements other threads have already overwritten.
        if pre.overlaps(&dy) && pre.offset != dy.offset {
            return Err(Error::InvalidConfig("act_grad_bias: pre overlaps dy (only pre == dy is allowed)"));
        }
        let Some(db) = dbias else {
            // Nothing to sum: exactly activation_backward (dx over dy).
            return if len == 0 { Ok(()) } else { be.activation_backward(act, pre, dy, dy) };
        };
        be.check(db, "act_grad_bias dbias")?;
        CudaBackend::check_len(db, n, "act_grad_bias dbias")?;
        let bt = CudaBackend::float(db, "act_grad_bias dbias")?;
        let db = db.prefix(n);
        if db.overlaps(&pre) || db.overlaps(&dy) {
            return Err(Error::InvalidConfig("act_grad_bias: dbias overlaps pre or dy"));
        }
        if n == 0 {
            return Ok(());
        }
        be.enter()?;
        if m == 0 {
            return be.memset(db, 0.0);
        }

        let (pp, dp) = (be.ptr(pre), be.ptr(dy));
        // 16-byte groups (8 16-bit or 4 f32 elements) where every row starts on one: n a multiple of the group and
        // both arrays 16-byte aligned (the arena's base is 256-byte aligned, so this is the Bufs' byte offsets).
        let group = 16 / t.size();
        let vec = n % group == 0 && pp % 16 == 0 && dp % 16 == 0;
        let (name, per_thread) = if vec { ("act_grad_bias16", group) } else { ("act_grad_bias", 1) };
        let tile = 32 * per_thread;
        let f = be.kernels.get(Family::ActGrad, name, Some(t), None)?;
        let finish = be.kernels.get(Family::ActGrad, "act_grad_finish", Some(bt), None)?;
        let resident = resident_blocks(be, f)?;
        let (pre_arg, dy_arg) = (Arg::U64(pp), Arg::U64(dp));
        by_chunks(be, m, n, tile, Some((finish, db)), |be, c0, cc, max_splits, partial| {
            let bx = cc.div_ceil(tile);
            let want = (resident * WAVES).div_ceil(bx).min(m.div_ceil(MIN_ROWS)).clamp(1, max_splits);
            let per = m.div_ceil(want);
            let splits = m.div_ceil(per);
            let args = [
                Arg::I32(crate::act_code(act)),
                pre_arg,
                dy_arg,
                Arg::U64(partial),
                Arg::U64(m as u64),
                Arg::U64(n as u64),
                Arg::U64(c0 as u64),
                Arg::U64(cc as u64),
                Arg::U64(per as u64),
            ];
            launch(be, f, (bx as u32, splits as u32, 1), (32, ROWS, 1), &args)?;
            Ok(splits)
        })
    }
}

/// Blocks of `f` (launched with `(32, ROWS)` threads) the whole device holds at once; registers and static
/// shared memory decide it, and the first passes size their grids from it. Asked of the driver once per kernel
/// and backend, then remembered (an eager step would otherwise query it on every call).
pub(crate) fn resident_blocks(be: &mut CudaBackend, f: cu::CUfunction) -> Result<usize> {
    if let Some(&n) = be.resident.get(&(f as usize)) {
        return Ok(n);
    }
    // SAFETY: `f` is a function of a module the backend keeps loaded; the query only reads its attributes.
    let per_sm = unsafe { cur::occupancy::max_active_block_per_multiprocessor(f, (32 * ROWS) as i32, 0) }
        .map_err(crate::driver("querying a kernel's occupancy"))?;
    let n = per_sm.max(1) as usize * be.sm_count as usize;
    be.resident.insert(f as usize, n);
    Ok(n)
}

/// The column chunks both ops share: partial sums `[splits, cc]` f32 in the scratch for a chunk of `cc` columns
/// at a time (all `n` when they fit, else whole `tile`s, so chunks keep the vector kernels' alignment).
/// `first(be, c0, cc, max_splits, partial)` queues the first pass over the chunk and returns its splits; with
/// `finish`, the finishing pass then adds the splits of each column into `dbias`.
fn by_chunks(
    be: &mut CudaBackend,
    m: usize,
    n: usize,
    tile: usize,
    finish: Option<(cu::CUfunction, Buf)>,
    mut first: impl FnMut(&mut CudaBackend, usize, usize, usize, u64) -> Result<usize>,
) -> Result<()> {
    debug_assert!(m > 0 && n > 0);
    let partial = be.scratch + BIG_OFF as u64;
    let room = BIG_BYTES / 4;
    let chunk = if n <= room { n } else { room / tile * tile };
    let mut c0 = 0;
    while c0 < n {
        let cc = (n - c0).min(chunk);
        let splits = first(be, c0, cc, (room / cc).clamp(1, 65535), partial)?;
        if let Some((finish, db)) = finish {
            let args = [
                Arg::U64(partial),
                Arg::U64(be.ptr(db) + (c0 * db.dtype.size()) as u64),
                Arg::U64(cc as u64),
                Arg::U64(splits as u64),
            ];
            launch(be, finish, (cc.div_ceil(32) as u32, 1, 1), (32, ROWS, 1), &args)?;
        }
        c0 += cc;
    }
    Ok(())
}

/// The largest k [`CudaBackend::activation_backward_bias_grad_small_k`] takes (its kernels keep a thread's k x 4 slice of B in registers).
pub(crate) const SMALL_K_MAX: usize = 16;
/// Columns a thread of the small-k kernels handles (`SK_V` in `kernels/act_grad.cu`): one 8-byte (16-bit) or
/// 16-byte (f32) load of `pre`, B's rows and store of `dx`.
const SK_V: usize = 4;
/// Rows a thread row of the small-k kernels stages at a time (`SK_ROWS`) times the thread rows: splits are
/// multiples of it (but the last), so that no staged block of a split is partly empty.
const SK_SPLIT_ROWS: usize = ROWS as usize * 8;

impl CudaBackend {
    /// `dx = act'(pre) * round(A B)` with the column sums `dbias[c] = sum_r dx[r, c]`, for a small inner
    /// dimension (`k <= 16`: the input gradient of a classifier layer, `dY W`, followed by the activation
    /// backward of the layer before it and that layer's bias gradient), without writing the product: what
    /// `gemm` into `dx` (A `[m, k]`, B `[k, n]`, both row-major and untransposed, leading dimensions `lda` and
    /// `ldb`) then [`CudaBackend::activation_backward_bias_grad`]`(act, pre, dx, dbias, m, n)` compute, in one pass
    /// over `pre` and `dx` plus the small finishing pass over the partial sums of `dbias`.
    ///
    /// - The product: `c[i, j] = sum_p A[i, p] B[p, j]` in f32 from +0, `p` ascending, one fused multiply-add
    ///   per term, rounded once to the dtype; cuBLAS may add in another order, so `c` can differ from `gemm`'s by
    ///   its rounding. Given the same `c`, `dx` is bit-identical to `activation_backward_bias_grad`'s (the same
    ///   device expression), and `dbias` sums the stored `dx` in f32 the same way (per-split partial sums, then
    ///   the same finishing pass) but over other splits: the two differ by f32 summation order only. Repeated
    ///   calls give the same bits.
    /// - `Ok(false)`, with nothing queued, where the kernels do not take the problem (run the unfused pair
    ///   instead): `k == 0` or `k > 16`; A, B, `pre` and `dx` not all of one dtype; `dx` overlapping A, B or `pre`;
    ///   `n` or `ldb` not a multiple of 4, or B, `pre` or `dx` not aligned to 4 elements (8 bytes for 16-bit
    ///   dtypes, 16 for f32). Any `lda` works.
    /// - Errors (nothing queued) for invalid input: a handle outside the arena or misaligned for its dtype, an
    ///   I32 operand, a buffer shorter than its extent (A `(m - 1) lda + k`, B `(k - 1) ldb + n`, `pre` and `dx`
    ///   `m n`, `dbias` `n`), `dbias` overlapping `pre` or `dx`.
    /// - `m == 0` zeroes `dbias`; `n == 0` does nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn activation_backward_bias_grad_small_k(
        &mut self,
        act: Activation,
        a: Buf,
        lda: usize,
        b: Buf,
        ldb: usize,
        k: usize,
        pre: Buf,
        dx: Buf,
        dbias: Option<Buf>,
        m: usize,
        n: usize,
    ) -> Result<bool> {
        let be = self;
        be.check(a, "act_grad_bias_small_k A")?;
        be.check(b, "act_grad_bias_small_k B")?;
        be.check(pre, "act_grad_bias_small_k pre")?;
        be.check(dx, "act_grad_bias_small_k dx")?;
        let t = CudaBackend::float(dx, "act_grad_bias_small_k dx")?;
        CudaBackend::float(a, "act_grad_bias_small_k A")?;
        CudaBackend::float(b, "act_grad_bias_small_k B")?;
        CudaBackend::float(pre, "act_grad_bias_small_k pre")?;
        // Elements a row-major [rows, cols] operand with leading dimension ld spans (0 when it is empty).
        let extent = |rows: usize, cols: usize, ld: usize| {
            if rows == 0 || cols == 0 {
                Some(0)
            } else {
                (rows - 1).checked_mul(ld)?.checked_add(cols)
            }
        };
        let ea = extent(m, k, lda).ok_or(Error::InvalidConfig("act_grad_bias_small_k: A's extent overflows usize"))?;
        let eb = extent(k, n, ldb).ok_or(Error::InvalidConfig("act_grad_bias_small_k: B's extent overflows usize"))?;
        let len = m.checked_mul(n).ok_or(Error::ShapeMismatch {
            what: "act_grad_bias_small_k m * n",
            expected: dx.len,
            got: usize::MAX,
        })?;
        CudaBackend::check_len(a, ea, "act_grad_bias_small_k A")?;
        CudaBackend::check_len(b, eb, "act_grad_bias_small_k B")?;
        CudaBackend::check_len(pre, len, "act_grad_bias_small_k pre")?;
        CudaBackend::check_len(dx, len, "act_grad_bias_small_k dx")?;
        let (a, b, pre, dx) = (a.prefix(ea), b.prefix(eb), pre.prefix(len), dx.prefix(len));
        let db = match dbias {
            Some(db) => {
                be.check(db, "act_grad_bias_small_k dbias")?;
                CudaBackend::check_len(db, n, "act_grad_bias_small_k dbias")?;
                CudaBackend::float(db, "act_grad_bias_small_k dbias")?;
                let db = db.prefix(n);
                // As act_grad_bias (the unfused version refuses it too). Overlapping A or B would be harmless: dbias
                // is written by the finishing pass, after every read of them.
                if db.overlaps(&pre) || db.overlaps(&dx) {
                    return Err(Error::InvalidConfig("act_grad_bias_small_k: dbias overlaps pre or dx"));
                }
                Some(db)
            }
            None => None,
        };

        // What the kernels take.
        if k == 0 || k > SMALL_K_MAX || a.dtype != t || b.dtype != t || pre.dtype != t {
            return Ok(false);
        }
        if dx.overlaps(&a) || dx.overlaps(&b) || dx.overlaps(&pre) {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
        let (ap, bp, pp, dp) = (be.ptr(a), be.ptr(b), be.ptr(pre), be.ptr(dx));
        let bytes = (SK_V * t.size()) as u64;
        if n % SK_V != 0 || ldb % SK_V != 0 || bp % bytes != 0 || pp % bytes != 0 || dp % bytes != 0 {
            return Ok(false);
        }
        be.enter()?;
        if m == 0 {
            if let Some(db) = db {
                be.memset(db, 0.0)?;
            }
            return Ok(true);
        }

        // The kernel for the smallest K >= k of those instantiated (a K > k adds fmaf(0, 0, acc) terms, which
        // leave the sums as they are): 10 for the classifier layers of 10 classes.
        let name = match k {
            1..=4 => "act_grad_small_k4",
            5..=8 => "act_grad_small_k8",
            9..=10 => "act_grad_small_k10",
            11..=12 => "act_grad_small_k12",
            _ => "act_grad_small_k16",
        };
        let f = be.kernels.get(Family::ActGrad, name, Some(t), None)?;
        let finish = match db {
            Some(db) => Some(be.kernels.get(Family::ActGrad, "act_grad_finish", Some(db.dtype), None)?),
            None => None,
        };
        let resident = resident_blocks(be, f)?;
        // Splits: at most WAVES waves of resident blocks (rounded down, so that no last wave runs nearly empty), each
        // split a multiple of SK_SPLIT_ROWS rows.
        let tile = 32 * SK_V;
        let finish = finish.zip(db);
        by_chunks(be, m, n, tile, finish, |be, c0, cc, max_splits, partial| {
            let bx = cc.div_ceil(tile);
            let want = (resident * WAVES / bx).min(m.div_ceil(SK_SPLIT_ROWS)).clamp(1, max_splits);
            let per = m.div_ceil(want).div_ceil(SK_SPLIT_ROWS) * SK_SPLIT_ROWS;
            let splits = m.div_ceil(per);
            let args = [
                Arg::I32(crate::act_code(act)),
                Arg::U64(ap),
                Arg::U64(lda as u64),
                Arg::U64(bp),
                Arg::U64(ldb as u64),
                Arg::U64(k as u64),
                Arg::U64(pp),
                Arg::U64(dp),
                Arg::U64(if db.is_some() { partial } else { 0 }),
                Arg::U64(m as u64),
                Arg::U64(n as u64),
                Arg::U64(c0 as u64),
                Arg::U64(cc as u64),
                Arg::U64(per as u64),
            ];
            launch(be, f, (bx as u32, splits as u32, 1), (32, ROWS, 1), &args)?;
            Ok(splits)
        })?;
        Ok(true)
    }
}

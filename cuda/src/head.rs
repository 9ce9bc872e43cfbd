//! A classifier layer after an activation, one pass each way (`kernels/head.cu`), for a linear layer of few
//! outputs (`o <= 16`):
//!
//! - forward: `y = act(pre) W^T + b` from one read of `pre`; `act(pre)` is not stored (the caller learns so from
//!   the return value and passes it to the backward as `x_valid`).
//! - backward: `dW = dy^T act(pre)`, `dx = (dy W) * act'(pre)`, the layer's bias gradient and the previous
//!   layer's `sum_r dx[r]` from one read of `pre` and one write of `dx`, plus a small deterministic finishing
//!   pass over per-split partial sums. The layer's input is recomputed from `pre`, so `x` is not read.
//!
//! Composed, the forward is the previous GEMM's GELU epilogue writing `x`, then cuBLAS reading it and
//! `add_bias`; the backward is cuBLAS's `dW` GEMM reading `x`, then the small-k product reading `pre` and
//! writing `dx` (`act_grad.rs`), each far from the bandwidth bound at `o = 10`. bf16 and f16 run the products on
//! tensor cores (`mma.sync`) where every row is whole 16-byte groups; f32 and other shapes on CUDA cores.
//!
//! Numerics against the composed versions: `x` rounded to the dtype as the forward would store it (GELU with
//! the hardware tanh for 16-bit dtypes: see head.cu); the product `dy W` in f32 rounded to the dtype, times
//! `act'(pre)`; every sum in f32, in another (fixed) order than the composed ops. Repeated calls give the same
//! bits.

use cudarc::driver::sys as cu;
use mantissa_core::backend::{
    linear_act_backward_composed, linear_act_forward_composed, LinearActBackward, LinearActForward, HEAD_MAX_OUT,
};
use mantissa_core::{Buf, DType, Result};

use crate::act_grad::resident_blocks;
use crate::kernels::{launch, Arg, Family};
use crate::{CudaBackend, BIG_BYTES, BIG_OFF};

/// Rows a warp of the f32 forward kernel takes (`HF_R`); its blocks are `(32, ROWS)` too (`HF_BY`), as are the
/// tensor-core forward kernel's (`HM_WARPS` warps over 16 rows).
const FWD_ROWS: usize = 2;
/// Thread rows per block (`HB_BY`): blocks are `(32, ROWS)`.
const ROWS: u32 = 8;
/// Columns a block of the CUDA-core backward kernel covers (32 lanes, 2 columns each).
const TILE: usize = 64;
/// Columns a block of the tensor-core backward kernel covers (8 warps, 32 columns each).
const MMA_TILE: usize = 256;
/// The most rows a split may have (`HB_SPLIT_MAX`: the block stages its split's `dy` rows in shared memory).
const SPLIT_MAX: usize = 256;
/// The most rows a split of the tensor-core backward kernel may have (`HM_SPLIT_MAX`: the block stages its
/// split's `dy` fragments in shared memory).
const MMA_SPLIT_MAX: usize = 512;
/// The fewest rows a split gets when there are enough rows (shorter ones add partial sums without spreading
/// the work any better).
const SPLIT_MIN: usize = 64;

/// [`mantissa_core::Backend::linear_act_backward`] for the CUDA backend: the one-pass kernel where it takes the problem and
/// [`CudaBackend::set_fused_head`] is on, else the composed version.
pub(crate) fn linear_act_backward(be: &mut CudaBackend, op: &LinearActBackward) -> Result<()> {
    if be.fused_head && fused(be, op)? {
        return Ok(());
    }
    linear_act_backward_composed(be, op)
}

/// [`mantissa_core::Backend::linear_act_forward`] for the CUDA backend: the one-pass kernel (which does not
/// store `act(pre)`: returns `false`) where it takes the problem and [`CudaBackend::set_fused_head`] is on,
/// else the composed version (`true`).
pub(crate) fn linear_act_forward(be: &mut CudaBackend, op: &LinearActForward) -> Result<bool> {
    if be.fused_head && fused_forward(be, op)? {
        return Ok(false);
    }
    linear_act_forward_composed(be, op)?;
    Ok(true)
}

/// Queues the forward kernel and returns `true`, or returns `false` with nothing queued where it does not take
/// the problem: more than [`HEAD_MAX_OUT`] outputs, operands (bias included) of different dtypes, `i` not a
/// multiple of one 16-byte group (8 16-bit or 4 f32 elements), `pre` or W not 16-byte aligned, `y` overlapping
/// an operand. Invalid input also returns `false`: the composed version then reports it.
fn fused_forward(be: &mut CudaBackend, op: &LinearActForward) -> Result<bool> {
    let (rows, i, o) = (op.rows, op.i, op.o);
    let t = op.y.dtype;
    if o == 0 || o > HEAD_MAX_OUT || rows == 0 || i == 0 || t == DType::I32 || i % (16 / t.size()) != 0 {
        return Ok(false);
    }
    let Some(len) = rows.checked_mul(i) else { return Ok(false) };
    let operands = [(op.pre, len), (op.w, o * i), (op.b, o), (op.y, rows * o)];
    if operands.iter().any(|&(b, n)| !valid(be, b, n) || b.dtype != t) {
        return Ok(false);
    }
    let (pre, w, b, y) = (op.pre.prefix(len), op.w.prefix(o * i), op.b.prefix(o), op.y.prefix(rows * o));
    if y.overlaps(&pre) || y.overlaps(&w) || y.overlaps(&b) {
        return Ok(false);
    }
    let (pp, wp) = (be.ptr(pre), be.ptr(w));
    if pp % 16 != 0 || wp % 16 != 0 {
        return Ok(false);
    }
    // 16-bit types on tensor cores (16 rows a block); f32 on CUDA cores (ROWS * FWD_ROWS rows a block).
    let (name, rows_per_block) = match (t, o) {
        (DType::BF16 | DType::F16, _) => ("head_fwd_mma", 16),
        (_, 1..=4) => ("head_fwd4", ROWS as usize * FWD_ROWS),
        (_, 5..=10) => ("head_fwd10", ROWS as usize * FWD_ROWS),
        _ => ("head_fwd16", ROWS as usize * FWD_ROWS),
    };
    let blocks = rows.div_ceil(rows_per_block);
    if blocks > u32::MAX as usize {
        return Ok(false);
    }
    let f = be.kernels.get(Family::Head, name, Some(t), None)?;
    be.enter()?;
    let args = [
        Arg::I32(crate::act_code(op.act)),
        Arg::U64(pp),
        Arg::U64(wp),
        Arg::U64(be.ptr(b)),
        Arg::U64(be.ptr(y)),
        Arg::U64(o as u64),
        Arg::U64(rows as u64),
        Arg::U64(i as u64),
    ];
    launch(be, f, (blocks as u32, 1, 1), (32, ROWS, 1), &args)?;
    be.head_calls += 1;
    Ok(true)
}

/// Whether `b` lies in the arena, holds at least `len` elements and has a float dtype.
fn valid(be: &CudaBackend, b: Buf, len: usize) -> bool {
    be.check(b, "head").is_ok() && b.len >= len && b.dtype != DType::I32
}

/// Queues the fused backward and returns `true`, or returns `false` with nothing queued where the kernels do
/// not take the problem: more than [`HEAD_MAX_OUT`] outputs, operands of different dtypes, an odd `i`,
/// operands not aligned to two elements, `dx` overlapping what is read, a gradient overlapping an operand,
/// or more rows than the scratch holds partial sums for. Invalid input also returns `false`: the composed
/// version then reports it.
fn fused(be: &mut CudaBackend, op: &LinearActBackward) -> Result<bool> {
    let (rows, i, o) = (op.rows, op.i, op.o);
    if o == 0 || o > HEAD_MAX_OUT || rows == 0 || i == 0 || i % 2 != 0 {
        return Ok(false);
    }
    let Some(len) = rows.checked_mul(i) else { return Ok(false) };
    let t = op.dx.dtype;
    let operands = [(op.dy, rows * o), (op.w, o * i), (op.pre, len), (op.dx, len)];
    if operands.iter().any(|&(b, n)| !valid(be, b, n) || b.dtype != t) {
        return Ok(false);
    }
    let (dy, w, pre, dx) = (op.dy.prefix(rows * o), op.w.prefix(o * i), op.pre.prefix(len), op.dx.prefix(len));
    if dx.overlaps(&dy) || dx.overlaps(&w) || dx.overlaps(&pre) {
        return Ok(false);
    }
    let grads = [(op.dw, o * i), (op.db, o), (op.prev_dbias, i)];
    for (g, n) in grads {
        if let Some(g) = g {
            let g = g.prefix(n.min(g.len));
            if !valid(be, g, n) || [dy, w, pre, dx].iter().any(|b| b.overlaps(&g)) {
                return Ok(false);
            }
        }
    }
    let (wp, pp, dp) = (be.ptr(w), be.ptr(pre), be.ptr(dx));
    let pair = 2 * t.size() as u64;
    if wp % pair != 0 || pp % pair != 0 || dp % pair != 0 {
        return Ok(false);
    }
    // 16-bit types on tensor cores where every row is whole 16-byte groups (MMA_TILE columns a block, splits
    // of whole 16-row tiles, any length); otherwise CUDA cores (TILE columns, splits of at most SPLIT_MAX rows,
    // whose dy the block stages in shared memory).
    let mma = matches!(t, DType::BF16 | DType::F16) && i % 8 == 0 && pp % 16 == 0 && dp % 16 == 0;
    let (name, tile, align, most) = match (mma, o) {
        (true, _) => ("head_bwd_mma", MMA_TILE, 16, MMA_SPLIT_MAX),
        (false, 1..=4) => ("head_bwd4", TILE, 1, SPLIT_MAX),
        (false, 5..=10) => ("head_bwd10", TILE, 1, SPLIT_MAX),
        _ => ("head_bwd16", TILE, 1, SPLIT_MAX),
    };
    let f = be.kernels.get(Family::Head, name, Some(t), None)?;
    // Splits: about two waves of resident blocks over the column tiles, each split at least SPLIT_MIN rows.
    let resident = resident_blocks(be, f)?;
    let bx_all = i.div_ceil(tile);
    let want = (resident * 2).div_ceil(bx_all).max(1);
    let per = rows.div_ceil(want).clamp(SPLIT_MIN.min(rows), most).div_ceil(align) * align;
    let splits = rows.div_ceil(per);
    // The scratch: the splits' sums of the layer's own bias gradient [splits, o] first (16-byte aligned after
    // them), then column chunks whose partial sums [splits, o + 1, cc] fit the rest.
    let db_floats = (splits * o).div_ceil(4) * 4;
    let room = (BIG_BYTES / 4).saturating_sub(db_floats) / ((o + 1) * splits);
    let chunk = if i <= room { i } else { room / tile * tile };
    if chunk == 0 || splits > 65535 {
        return Ok(false);
    }
    be.enter()?;
    // The finishing kernels, looked up before anything is queued. Every gradient wanted, in one dtype (the
    // trainer's case): one launch a chunk (head_finish3), the layer's own bias with the last chunk's. Otherwise
    // one head_finish launch per wanted gradient (for its dtype).
    let fin3 = match (op.dw, op.prev_dbias, op.db) {
        (Some(w), Some(b), Some(d)) if w.dtype == b.dtype && w.dtype == d.dtype => {
            Some((be.kernels.get(Family::Head, "head_finish3", Some(w.dtype), None)?, w, b, d))
        }
        _ => None,
    };
    let mut finisher = |g: Option<Buf>| -> Result<Option<(cu::CUfunction, Buf)>> {
        match g {
            Some(g) if fin3.is_none() => {
                Ok(Some((be.kernels.get(Family::Head, "head_finish", Some(g.dtype), None)?, g)))
            }
            _ => Ok(None),
        }
    };
    let (finish_w, finish_b, finish_db) = (finisher(op.dw)?, finisher(op.prev_dbias)?, finisher(op.db)?);
    let dbp = be.scratch + BIG_OFF as u64;
    let partial = dbp + (db_floats * 4) as u64;
    let mut c0 = 0;
    while c0 < i {
        let cc = (i - c0).min(chunk);
        let args = [
            Arg::I32(crate::act_code(op.act)),
            Arg::U64(be.ptr(dy)),
            Arg::U64(o as u64),
            Arg::U64(wp),
            Arg::U64(pp),
            Arg::U64(dp),
            Arg::U64(partial),
            // The first chunk's column tile 0 sums dy's columns.
            Arg::U64(if c0 == 0 && op.db.is_some() { dbp } else { 0 }),
            Arg::U64(rows as u64),
            Arg::U64(i as u64),
            Arg::U64(c0 as u64),
            Arg::U64(cc as u64),
            Arg::U64(per as u64),
        ];
        launch(be, f, (cc.div_ceil(tile) as u32, splits as u32, 1), (32, ROWS, 1), &args)?;
        let stride = ((o + 1) * cc) as u64;
        let at = |be: &CudaBackend, g: Buf| be.ptr(g) + (c0 * g.dtype.size()) as u64;
        if let Some((fin, w, b, d)) = fin3 {
            let args = [
                Arg::U64(partial),
                Arg::U64(stride),
                Arg::U64(at(be, w)),
                Arg::U64(i as u64),
                Arg::U64(at(be, b)),
                Arg::U64(cc as u64),
                Arg::U64(splits as u64),
                Arg::U64(o as u64),
                Arg::U64(dbp),
                Arg::U64(be.ptr(d)),
            ];
            let last = c0 + cc == i;
            let n_rows = o + 1 + usize::from(last);
            launch(be, fin, (cc.div_ceil(32) as u32, n_rows as u32, 1), (32, ROWS, 1), &args)?;
        } else {
            // dW's rows (partial rows 0..o, out leading dimension i), then the previous bias (partial row o).
            for (fin, first, n_rows, ld) in [(finish_w, 0, o, i), (finish_b, o, 1, 0)] {
                if let Some((fin, g)) = fin {
                    let out = at(be, g);
                    finish(be, fin, partial + (first * cc * 4) as u64, stride, out, ld, cc, n_rows, splits)?;
                }
            }
        }
        c0 += cc;
    }
    if let Some((fin, g)) = finish_db {
        finish(be, fin, dbp, o as u64, be.ptr(g), 0, o, 1, splits)?;
    }
    be.head_calls += 1;
    Ok(true)
}

/// Queues `head_finish`: `out[p * ld + c] = sum_s partial[s * stride + p * cc + c]` for `p < rows`, `c < cc`.
#[allow(clippy::too_many_arguments)]
fn finish(
    be: &CudaBackend,
    fin: cu::CUfunction,
    partial: u64,
    stride: u64,
    out: u64,
    ld: usize,
    cc: usize,
    rows: usize,
    splits: usize,
) -> Result<()> {
    let args = [
        Arg::U64(partial),
        Arg::U64(stride),
        Arg::U64(out),
        Arg::U64(ld as u64),
        Arg::U64(cc as u64),
        Arg::U64(splits as u64),
    ];
    launch(be, fin, (cc.div_ceil(32) as u32, rows as u32, 1), (32, ROWS, 1), &args)
}

impl CudaBackend {
    /// Whether a classifier layer (at most 16 outputs) after an activation runs as one pass forward and one
    /// backward (`kernels/head.cu`); on by default. Off, both are composed: forward the activation, cuBLAS and
    /// `add_bias`; backward cuBLAS's weight gradient, `bias_grad`, and the fused `ActGrad` GEMM (itself autotuned
    /// between cuBLAS plus `act_grad` and the small-k kernel).
    pub fn set_fused_head(&mut self, on: bool) {
        self.fused_head = on;
    }

    /// How many [`mantissa_core::Backend::linear_act_forward`] and [`mantissa_core::Backend::linear_act_backward`]
    /// calls ran as one pass so far.
    pub fn fused_head_calls(&self) -> u64 {
        self.head_calls
    }
}

//! The step-control block on the device ([`mantissa_core::control`]): the overrides of the `Backend` methods
//! that decide a step where the data is. None of them waits for the device or copies to or from the host, so a
//! whole training step queues without a round trip and can be recorded as a CUDA graph ([`crate::graph`]).
//!
//! - `softmax_cross_entropy_scaled`: the softmax kernel with the block's `SCALE` read on the device.
//! - `count_correct_to`, `count_underflow_to`: the device counts, written straight into their words.
//! - `softmax_cross_entropy_to`: the scaled softmax, the rounding of its gradient and both counts in one pass,
//!   then one block that writes the loss and the words.
//! - `step_control`: `grad_stats`' per-block partial sums (unscaled by `1 / SCALE`, read on the device), then
//!   one block (`kernels/control.cu`) that adds them in f64 and performs [`mantissa_core::control::decide`].
//! - `adamw_step_gated`, `sgd_step_gated`: the fused optimizer kernels, which read `LAST_APPLIED` (and return at
//!   once on a skipped step), `GRAD_MUL` and the bias corrections from the block.
//!
//! Each is checked against the provided host versions on the reference backend (`cuda/tests/control.rs`).

use cudarc::driver::sys as cu;
use mantissa_core::backend::{
    check_control, softmax_cross_entropy_to_composed, validate_softmax_cross_entropy, AdamWStep, LossTo, ParamBufs,
    SgdStep,
};
use mantissa_core::control::{self as block, StepRule};
use mantissa_core::{Buf, DType, Error, LossScale, Result};

use crate::kernels::{launch, Arg, Family};
use crate::{driver, CudaBackend, FLAG_OFF, LOSS_COUNTS_OFF, LOSS_OFF, MAX_PARTIAL_BLOCKS, STATS_SUM_OFF};

// count_underflow_to zeroes and counts into the two words with one memset and one kernel argument.
const _: () = assert!(block::LAST_NON_ZERO == block::LAST_FLUSHED + 1);

// The loss-scale modes of kernels/control.cu (LOSS_SCALE_*).
const MODE_NONE: i32 = 0;
const MODE_FIXED: i32 = 1;
const MODE_DYNAMIC: i32 = 2;
/// Threads of the step_control kernel (CONTROL_THREADS in kernels/control.cu).
const CONTROL_THREADS: u32 = 256;
/// Most blocks per SM of grad_stats: it is compiled with `__launch_bounds__(256, 4)` (STATS_BOUNDS in
/// kernels/reduce.cu), so 4 blocks of 256 threads always fit on an SM together and a grid of at most
/// `sm_count * 4` blocks runs as one wave: the threads of its grid-stride loop all start at once and do the
/// same number of passes (or one fewer), with no late second wave. (The `*8` optimizer updates, compiled with
/// the same bounds, now launch one pass a thread instead: see `CudaBackend::optim`.)
const STATS_BLOCKS_PER_SM: usize = 4;
/// Bytes one grad_stats thread reads per pass (STATS_VECS 16-byte loads in kernels/reduce.cu).
const STATS_BYTES_PER_THREAD: usize = 64;

impl CudaBackend {
    /// Checks the control block (an I32 buffer of exactly `control::WORDS` words inside the arena) and returns
    /// its device address.
    fn control_block(&self, ctl: Buf) -> Result<u64> {
        check_control(ctl)?;
        self.check(ctl, "step control block")?;
        Ok(self.ptr(ctl))
    }

    /// Blocks of grad_stats and of step_control's first pass (256 threads each): the same grid for both, so
    /// the two see the same per-block partials. One pass per thread for short gradients, at most one wave (see
    /// STATS_BLOCKS_PER_SM) and MAX_PARTIAL_BLOCKS (the scratch holds that many partials). `grad.len > 0`.
    pub(crate) fn stats_blocks(&self, grad: Buf) -> usize {
        (grad.len * grad.dtype.size())
            .div_ceil(256 * STATS_BYTES_PER_THREAD)
            .min(MAX_PARTIAL_BLOCKS)
            .min(self.sm_count as usize * STATS_BLOCKS_PER_SM)
    }

    /// Launches an optimizer update over the `n` parameters of `p` (validated, `n > 0`). The kernels take
    /// `(master, working, grad, state..., n, scalars..., write_working)`; an absent state array is 0 (SGD without
    /// momentum). The vectorised `{base8}` kernel runs when every array is 16-byte aligned, with 8 parameters a
    /// thread in 256-thread blocks, else the scalar `{base}` kernel. Both compute the same bits.
    pub(crate) fn optim(
        &mut self,
        (base, base8): (&'static str, &'static str),
        p: &ParamBufs,
        n: usize,
        state: &[u64],
        scalars: &[Arg],
    ) -> Result<()> {
        self.enter()?;
        let (wt, working, write) = self.working(p);
        let (master, grad) = (self.ptr(p.master), self.ptr(p.grad));
        let mut args = vec![Arg::U64(master), Arg::U64(working), Arg::U64(grad)];
        args.extend(state.iter().map(|&s| Arg::U64(s)));
        args.push(Arg::U64(n as u64));
        args.extend_from_slice(scalars);
        args.push(Arg::I32(write));
        // An absent state array is not read: it does not decide the alignment.
        let aligned = [master, working, grad].iter().chain(state.iter().filter(|&&s| s != 0)).all(|a| a % 16 == 0);
        if n >= 8 && aligned {
            let f = self.kernels.get(Family::Optim, base8, Some(wt), None)?;
            // One pass a thread (as many blocks as that takes), not one wave of resident blocks looping: on the
            // H200 the update over gpu-mlp's 20 M parameters took 0.1612-0.1621 ms so against 0.1685-0.1692 ms
            // (`examples/adamw_layout.rs`, same bits).
            let blocks = n.div_ceil(8 * 256).min(u32::MAX as usize);
            launch(self, f, (blocks as u32, 1, 1), (256, 1, 1), &args)
        } else {
            self.run(Family::Optim, base, wt, None, n, &args)
        }
    }

    /// Zeroes `words` 32-bit words at device address `at` (a checked control block or the scratch), in stream
    /// order.
    fn memset_words(&self, at: u64, words: usize) -> Result<()> {
        // SAFETY: callers pass an address inside the backend's allocation with `words` words after it.
        unsafe { cu::cuMemsetD32Async(at, 0, words, self.stream.cu_stream()) }.result().map_err(driver("memset"))
    }
}

/// Which softmax cross-entropy [`softmax_xent`] runs: one pass (one warp per row, per-block loss partials), then
/// one finishing block.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Xent {
    /// `Backend::softmax_cross_entropy`: the gradient scaled by `grad_scale / rows` from the host.
    Plain,
    /// `Backend::softmax_cross_entropy_scaled`: `grad_scale` further multiplied by the block's `SCALE` on the
    /// device.
    Scaled(Buf),
    /// `Backend::softmax_cross_entropy_to`: as `Scaled`, with the gradient rounded to its dtype in the pass and
    /// each block's counts (`softmax_xent_to`), then a finishing block (`softmax_xent_to_finish`) that writes the
    /// loss and the block's `LAST_CORRECT` (and, for a 16-bit gradient, `LAST_FLUSHED`, `LAST_NON_ZERO`) words.
    /// The same grid as the others, so the loss has the composed op's bits. No memsets.
    Counted(Buf),
}

/// Softmax cross-entropy in the mode `xent`. A label outside `0..classes` raises a flag in the scratch (its row
/// is left untouched); only the plain op outside a recording waits for that flag and reports
/// [`Error::LabelOutOfRange`]. The ops with a control block never wait, and nothing can wait while recording:
/// there the trainer validates the labels on the host before it uploads them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmax_xent(
    be: &mut CudaBackend,
    logits: Buf,
    labels: Buf,
    rows: usize,
    classes: usize,
    loss: Buf,
    dlogits: Buf,
    grad_scale: f32,
    xent: Xent,
) -> Result<()> {
    let ctl = match xent {
        Xent::Plain => None,
        Xent::Scaled(c) | Xent::Counted(c) => Some(be.control_block(c)?),
    };
    validate_softmax_cross_entropy(be.capacity, logits, labels, rows, classes, loss, dlogits)?;
    let (lt, dt) =
        (CudaBackend::float(logits, "softmax_cross_entropy")?, CudaBackend::float(dlogits, "softmax_cross_entropy")?);
    be.enter()?;
    if rows == 0 {
        return be.memset(loss.prefix(1), 0.0);
    }
    let inv_rows = 1.0 / rows as f32;
    let flag = be.scratch + FLAG_OFF as u64;
    let partial = be.scratch + LOSS_OFF as u64;
    let counts = be.scratch + LOSS_COUNTS_OFF as u64;
    let wait = ctl.is_none() && !be.graphs.recording();
    if wait {
        be.memset_words(flag, 2)?;
    }
    // One warp per row, 8 rows per block.
    let blocks = rows.div_ceil(8).min(MAX_PARTIAL_BLOCKS);
    let mut args = vec![
        Arg::U64(be.ptr(logits)),
        Arg::U64(be.ptr(labels)),
        Arg::U64(rows as u64),
        Arg::U64(classes as u64),
        Arg::U64(be.ptr(dlogits)),
    ];
    match ctl {
        // g = (grad_scale * SCALE) * inv_rows, multiplied in that order on the device.
        Some(c) => args.extend([Arg::F32(grad_scale), Arg::F32(inv_rows), Arg::U64(c)]),
        None => args.push(Arg::F32(grad_scale * inv_rows)),
    }
    args.extend([Arg::U64(partial), Arg::U64(flag)]);
    let name = match xent {
        Xent::Plain => "softmax_xent",
        Xent::Scaled(_) => "softmax_xent_scaled",
        Xent::Counted(_) => {
            args.push(Arg::U64(counts));
            "softmax_xent_to"
        }
    };
    let f = be.kernels.get(Family::SoftmaxXent, name, Some(lt), Some(dt))?;
    launch(be, f, (blocks as u32, 1, 1), (256, 1, 1), &args)?;
    let (loss_ptr, parts) = (Arg::U64(be.ptr(loss)), Arg::U64(blocks as u64));
    let (name, args) = match (xent, ctl) {
        (Xent::Counted(_), Some(c)) => (
            "softmax_xent_to_finish",
            vec![
                Arg::U64(partial),
                Arg::U64(counts),
                parts,
                Arg::F32(inv_rows),
                loss_ptr,
                Arg::U64(c),
                Arg::I32((dt != DType::F32) as i32),
            ],
        ),
        _ => ("softmax_xent_finish", vec![Arg::U64(partial), parts, Arg::F32(inv_rows), loss_ptr]),
    };
    let f = be.kernels.get(Family::SoftmaxXent, name, None, None)?;
    launch(be, f, (1, 1, 1), (1024, 1, 1), &args)?;
    if !wait {
        return Ok(());
    }
    // The reference rejects a bad label before writing anything; here the kernel finds it, so wait for the
    // flag (the trainer reads the loss right after anyway).
    let mut bad = [0i32; 2];
    be.dtoh(&mut bad, flag)?;
    if bad[0] != 0 {
        return Err(Error::LabelOutOfRange { label: bad[1], classes });
    }
    Ok(())
}

/// `Backend::softmax_cross_entropy_to`: [`Xent::Counted`], or the composed op when [`CudaBackend::set_fused_loss`]
/// is off, or where there is nothing to do or no class a label can name (the composed count then still compares
/// arg-max 0 with each label), for the same words. The one-pass version does not touch the f32 room.
pub(crate) fn softmax_xent_to(be: &mut CudaBackend, op: &LossTo) -> Result<()> {
    if !be.fused_loss || op.rows == 0 || op.classes == 0 {
        return softmax_cross_entropy_to_composed(be, op);
    }
    let (l, y, rows, classes) = (op.logits, op.labels, op.rows, op.classes);
    softmax_xent(be, l, y, rows, classes, op.loss, op.dlogits, op.grad_scale, Xent::Counted(op.ctl))
}

impl CudaBackend {
    /// Whether [`mantissa_core::Backend::softmax_cross_entropy_to`] (the loss of a step decided on the device)
    /// runs as one pass and one finishing block; on by default. Off, it is composed: the scaled softmax into
    /// f32, `count_underflow_to`, `cast` and `count_correct_to` (five kernels and two memsets). The same bits
    /// either way.
    pub fn set_fused_loss(&mut self, on: bool) {
        self.fused_loss = on;
    }
}

/// `Backend::count_correct_to`: the count kernel adds straight into the zeroed `LAST_CORRECT` word.
pub(crate) fn count_correct_to(
    be: &mut CudaBackend,
    logits: Buf,
    labels: Buf,
    rows: usize,
    classes: usize,
    ctl: Buf,
) -> Result<()> {
    let c = be.control_block(ctl)?;
    be.check(logits, "count_correct logits")?;
    be.check(labels, "count_correct labels")?;
    let lt = CudaBackend::float(logits, "count_correct")?;
    if labels.dtype != DType::I32 {
        return Err(Error::UnsupportedDType { what: "count_correct labels", dtype: labels.dtype });
    }
    if logits.len < rows * classes || labels.len < rows {
        return Err(Error::ShapeMismatch { what: "count_correct", expected: rows * classes, got: logits.len });
    }
    be.enter()?;
    let word = c + 4 * block::LAST_CORRECT as u64;
    be.memset_words(word, 1)?;
    if rows == 0 {
        return Ok(());
    }
    let args = [
        Arg::U64(be.ptr(logits)),
        Arg::U64(be.ptr(labels)),
        Arg::U64(rows as u64),
        Arg::U64(classes as u64),
        Arg::U64(word),
    ];
    be.run(Family::SoftmaxXent, "count_correct_ctl", lt, None, rows, &args)
}

/// `Backend::count_underflow_to`: the count kernel adds straight into the zeroed `LAST_FLUSHED` and
/// `LAST_NON_ZERO` words.
pub(crate) fn count_underflow_to(be: &mut CudaBackend, src: Buf, dtype: DType, ctl: Buf) -> Result<()> {
    let c = be.control_block(ctl)?;
    be.check(src, "count_underflow")?;
    let st = CudaBackend::float(src, "count_underflow")?;
    let dt = if dtype == DType::I32 { DType::F32 } else { dtype };
    be.enter()?;
    let words = c + 4 * block::LAST_FLUSHED as u64;
    be.memset_words(words, 2)?;
    if src.len == 0 {
        return Ok(());
    }
    let args = [Arg::U64(be.ptr(src)), Arg::U64(src.len as u64), Arg::U64(words)];
    be.run(Family::Reduce, "count_underflow_ctl", st, Some(dt), src.len, &args)
}

/// `Backend::step_control`: per-block partial sums of the unscaled gradients into the scratch, then the
/// one-block decision kernel with the rule's constants as arguments.
pub(crate) fn step_control(be: &mut CudaBackend, ctl: Buf, grad: Buf, loss: Buf, rule: &StepRule) -> Result<()> {
    let c = be.control_block(ctl)?;
    be.check(grad, "step_control grad")?;
    be.check(loss, "step_control loss")?;
    let gt = CudaBackend::float(grad, "step_control grad")?;
    let lt = CudaBackend::float(loss, "step_control loss")?;
    CudaBackend::check_len(loss, 1, "step_control loss")?;
    let (mode, fixed, dynamic) = match rule.loss_scale {
        LossScale::None => (MODE_NONE, 1.0, None),
        LossScale::Fixed(s) => (MODE_FIXED, s, None),
        LossScale::Dynamic(d) => (MODE_DYNAMIC, 1.0, Some(d.config)),
    };
    be.enter()?;
    // Pass 1, as grad_stats launches it (same blocks, same per-block partials).
    let sums = be.scratch + STATS_SUM_OFF as u64;
    let parts = if grad.len == 0 { 0 } else { be.stats_blocks(grad) };
    let counts = sums + (parts * 8) as u64;
    if parts > 0 {
        let f = be.kernels.get(Family::Reduce, "grad_stats_ctl", Some(gt), None)?;
        let args = [Arg::U64(be.ptr(grad)), Arg::U64(grad.len as u64), Arg::U64(c), Arg::U64(sums), Arg::U64(counts)];
        launch(be, f, (parts as u32, 1, 1), (256, 1, 1), &args)?;
    }
    // Pass 2: the decision.
    let (clip, clip_norm) = match rule.clip_norm {
        Some(m) => (1, m),
        None => (0, 0.0),
    };
    let (adam, (beta1, beta2)) = match rule.adam_betas {
        Some(b) => (1, b),
        None => (0, (0.0, 0.0)),
    };
    let (growth, backoff, interval, hysteresis, min_scale) = match dynamic {
        Some(d) => (d.growth_factor, d.backoff_factor, d.growth_interval, d.hysteresis, d.min_scale),
        None => (1.0, 1.0, 1, 1, 0.0),
    };
    let f = be.kernels.get(Family::Control, "step_control", Some(lt), None)?;
    let args = [
        Arg::U64(c),
        Arg::U64(sums),
        Arg::U64(counts),
        Arg::U64(parts as u64),
        Arg::U64(be.ptr(loss)),
        Arg::I32(mode),
        Arg::F32(fixed),
        Arg::F32(growth),
        Arg::F32(backoff),
        Arg::I32(interval as i32),
        Arg::I32(hysteresis as i32),
        Arg::F32(min_scale),
        Arg::I32(clip),
        Arg::F32(clip_norm),
        Arg::I32(adam),
        Arg::F32(beta1),
        Arg::F32(beta2),
    ];
    launch(be, f, (1, 1, 1), (CONTROL_THREADS, 1, 1), &args)
}

/// `Backend::adamw_step_gated`: the fused AdamW kernel, gated and parameterised by the block on the device
/// (`s.grad_scale` and the bias corrections are ignored).
pub(crate) fn adamw_step_gated(be: &mut CudaBackend, p: &ParamBufs, s: &AdamWStep, ctl: Buf) -> Result<()> {
    let c = be.control_block(ctl)?;
    let n = p.validate(be.capacity, true, true)?;
    if n == 0 {
        return Ok(());
    }
    let state = [be.ptr(p.state1), be.ptr(p.state2)];
    let scalars =
        [Arg::F32(s.lr), Arg::F32(s.beta1), Arg::F32(s.beta2), Arg::F32(s.eps), Arg::F32(s.weight_decay), Arg::U64(c)];
    be.optim(("adamw_gated", "adamw8_gated"), p, n, &state, &scalars)
}

/// `Backend::sgd_step_gated`: the fused SGD kernel, gated by the block, with its gradient multiplier.
pub(crate) fn sgd_step_gated(be: &mut CudaBackend, p: &ParamBufs, s: &SgdStep, ctl: Buf) -> Result<()> {
    let c = be.control_block(ctl)?;
    let n = p.validate(be.capacity, s.momentum != 0.0, false)?;
    if n == 0 {
        return Ok(());
    }
    let mom = if s.momentum != 0.0 { be.ptr(p.state1) } else { 0 };
    let scalars =
        [Arg::F32(s.lr), Arg::F32(s.momentum), Arg::I32(s.nesterov as i32), Arg::F32(s.weight_decay), Arg::U64(c)];
    be.optim(("sgd_gated", "sgd8_gated"), p, n, &[mom], &scalars)
}

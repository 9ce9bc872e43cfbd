//! The training loop's one call: a whole mixed-precision step.
//!
//! ```text
//! step(x, labels):
//!   working = cast(master)                  (kept current by the fused optimizer update)
//!   acts    = forward(working, x)           compute dtype, f32 accumulation
//!   loss, dlogits = softmax_xent(logits) * S     f32; S = loss scale
//!   grads   = backward(dlogits)             f32 parameter gradients (still times S)
//!   finite, |g| = grad_stats(grads / S)     fused unscale + check
//!   if finite: clip; optimizer(master, state, working; grads * (1/S) * clip)   else: skip, model untouched
//!   S = loss_scale.update(finite)
//! ```

use crate::arena::{Arena, Buf, Mark};
use crate::backend::Activation;
use crate::backend::{read_control, write_control, Backend, ParamBufs};
use crate::control::{self, Control, StepRule};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layers::{Bwd, Fwd, Layer, LayerParams};
use crate::loss_scale::{DynamicLossScale, LossScale};
use crate::model::Model;
use crate::numerics::{NonFiniteReport, Phase};
use crate::optim::Optimizer;
use crate::plan::{alloc_params, alloc_step, retype, MemoryPlan, StepBufs};
use crate::policy::Policy;
use crate::rng::Rng;
use crate::trainable::{ParamLayout, TensorLoc, Trainable};

/// How to train, beyond the model, policy and optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    /// The largest batch a step takes (smaller batches are fine; the plan is sized for this one).
    pub batch: usize,
    pub loss_scale: LossScale,
    /// Clip the global gradient norm (after unscaling) to this value.
    pub clip_norm: Option<f32>,
    /// Seeds the weight initialisation.
    pub seed: u64,
    /// The objective is `loss_weight * cross-entropy` (an auxiliary loss's weight, say); reports give the
    /// unweighted cross-entropy. Gradients scale with it, so a small weight shows f16 underflow.
    pub loss_weight: f32,
    /// Which parameters train (partial fine-tuning freezes the rest).
    pub trainable: Trainable,
    /// The dtype frozen parameters are stored in; `None`: the policy's compute dtype. `Some(BF16)` under
    /// `float32` halves frozen weights; layers convert them to f32, a block at a time, as they read them.
    pub frozen_storage: Option<DType>,
}

impl TrainConfig {
    /// Batch `batch` and the policy's default loss scaling: dynamic (Keras' defaults) under `mixed_float16`,
    /// none otherwise, as Keras' `fit` does.
    pub fn new(batch: usize, policy: Policy) -> Self {
        let loss_scale = match policy.compute {
            crate::dtype::DType::F16 => LossScale::Dynamic(DynamicLossScale::tensorflow()),
            _ => LossScale::None,
        };
        TrainConfig {
            batch,
            loss_scale,
            clip_norm: None,
            seed: 0,
            loss_weight: 1.0,
            trainable: Trainable::All,
            frozen_storage: None,
        }
    }

    /// Trains only some parameters; see [`Trainable`].
    pub fn trainable(mut self, t: Trainable) -> Self {
        self.trainable = t;
        self
    }

    /// Stores frozen parameters in `dtype` (a float dtype) instead of the compute dtype.
    pub fn frozen_storage(mut self, dtype: DType) -> Self {
        self.frozen_storage = Some(dtype);
        self
    }

    /// The dtype frozen parameters are stored in under `policy`.
    pub fn frozen_dtype(&self, policy: Policy) -> Result<DType> {
        match self.frozen_storage {
            Some(DType::I32) => Err(Error::InvalidConfig("frozen storage must be a float dtype")),
            Some(d) => Ok(d),
            None => Ok(policy.compute),
        }
    }

    pub fn loss_scale(mut self, s: LossScale) -> Self {
        self.loss_scale = s;
        self
    }

    pub fn clip_norm(mut self, max_norm: f32) -> Self {
        self.clip_norm = Some(max_norm);
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn loss_weight(mut self, w: f32) -> Self {
        self.loss_weight = w;
        self
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Mean loss over the batch (unscaled).
    pub loss: f32,
    /// The loss scale this step used.
    pub loss_scale: f32,
    /// Whether the update was skipped (non-finite gradients).
    pub skipped: bool,
    /// Global L2 norm of the unscaled gradients, before clipping (NaN when skipped).
    pub grad_norm: f32,
    /// Rows whose highest logit was the label.
    pub correct: usize,
    pub rows: usize,
    /// Steps skipped so far, this one included.
    pub skipped_total: u64,
    /// Fraction of the non-zero loss gradients (f32, times the loss scale) that flushed to zero when cast to
    /// the compute dtype: f16 underflow made visible. 0 under float32.
    pub underflow: f32,
}

/// What [`Trainer::apply_gradients`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Applied {
    /// Whether the optimizer ran.
    pub applied: bool,
    /// Whether every gradient was finite.
    pub finite: bool,
    /// Global L2 norm of the unscaled gradients before clipping (NaN when not finite).
    pub grad_norm: f32,
    /// How many gradient values were NaN or infinite.
    pub non_finite: usize,
}

/// Loss and accuracy over a data set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    pub loss: f32,
    pub correct: usize,
    pub total: usize,
}

impl Evaluation {
    pub fn accuracy(&self) -> f32 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f32 / self.total as f32
        }
    }
}

#[derive(Debug)]
pub struct Trainer<B: Backend> {
    backend: B,
    model: Model,
    policy: Policy,
    optimizer: Optimizer,
    config: TrainConfig,
    arena: Arena,
    /// The trainable parameters' vectors (everything under [`Trainable::All`]).
    params: ParamBufs,
    /// Frozen parameters, in `frozen_dtype`; empty unless partial.
    frozen: Buf,
    frozen_dtype: DType,
    layout: ParamLayout,
    /// The arena position after the persistent buffers: every step allocates above it and releases to it.
    base: Mark,
    plan: MemoryPlan,
    /// Updates applied (AdamW's `t`).
    updates: u64,
    skipped: u64,
    /// Stop at the first non-finite value (like `tf.debugging.enable_check_numerics`).
    check_numerics: bool,
    /// Rows of the batch [`Trainer::stage`] left in the arena's input buffers (0: none).
    staged: usize,
    /// The step-control block ([`crate::control`]): the loss scale, counters and the last step's report live
    /// there, next to the data; `config.loss_scale`, `updates` and `skipped` mirror it as of the last report.
    ctl: Buf,
    /// Rows of the last step queued (0: none yet).
    last_rows: usize,
    /// Record the step once and replay it (CUDA graphs) where the backend can.
    graphs: bool,
    /// The recorded step: `(rows, id)`.
    recorded: Option<(usize, usize)>,
    /// Rows of the last step run directly while graphs are on: a shape is recorded from its second step, so
    /// that its first runs where the backend may still wait for the device (a CUDA backend then measures which
    /// GEMM algorithm to take, which it cannot do while recording).
    ran_direct: usize,
    /// The activation layer whose output the last forward pass did not store (a classifier head computed its
    /// logits straight from the activation's input): the backward pass recomputes it where it reads it.
    unstored: Option<usize>,
}

impl<B: Backend> Trainer<B> {
    /// Plans memory, checks it fits the backend's arena, allocates the parameters and initialises them.
    pub fn new(
        mut backend: B,
        model: Model,
        policy: Policy,
        optimizer: impl Into<Optimizer>,
        config: TrainConfig,
    ) -> Result<Self> {
        let optimizer = optimizer.into();
        optimizer.validate()?;
        if let Some(c) = config.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::InvalidConfig("clip norm must be finite and > 0"));
            }
        }
        if let LossScale::Fixed(s) = config.loss_scale {
            LossScale::fixed(s)?;
        }
        if let LossScale::Dynamic(d) = config.loss_scale {
            d.config.validate()?;
        }
        if !(config.loss_weight.is_finite() && config.loss_weight > 0.0) {
            return Err(Error::InvalidConfig("loss weight must be finite and > 0"));
        }
        let plan = MemoryPlan::for_config(&model, policy, &optimizer, &config)?;
        if plan.total > backend.capacity() {
            return Err(Error::OutOfMemory { needed: plan.total, available: backend.capacity() });
        }
        let layout = ParamLayout::new(&model, config.trainable)?;
        let frozen_dtype = config.frozen_dtype(policy)?;
        let mut arena = Arena::new(backend.capacity());
        let (params, frozen, ctl, _) = alloc_params(&mut arena, &model, policy, &optimizer, &layout, frozen_dtype)?;
        let base = arena.mark();
        let mut rng = Rng::new(config.seed);
        // PyTorch's default initialisation, drawn layer by layer, weight then bias, in model order (the same
        // draws whatever is frozen), each tensor written where it lives.
        for (i, layer) in model.layers().iter().enumerate() {
            let Some(bound) = layer.init_bound() else { continue };
            for loc in layout.layer(i) {
                let dst = tensor_buf(&params, frozen, loc);
                let mut chunk = [0.0f32; 256];
                let mut done = 0;
                while done < loc.len {
                    let n = chunk.len().min(loc.len - done);
                    for v in &mut chunk[..n] {
                        *v = rng.uniform(-bound, bound);
                    }
                    backend.upload(dst.slice(done, n), &chunk[..n])?;
                    done += n;
                }
            }
        }
        if params.working != params.master {
            backend.cast(params.master, params.working)?;
        }
        backend.fill(params.grad, 0.0)?;
        for s in [params.state1, params.state2] {
            if s.len > 0 {
                backend.fill(s, 0.0)?;
            }
        }
        let mut c = Control::new(config.loss_scale.scale(), 0);
        c.set_loss_scale(&config.loss_scale);
        write_control(&mut backend, ctl, &c)?;
        Ok(Trainer {
            backend,
            model,
            policy,
            optimizer,
            config,
            arena,
            params,
            frozen,
            frozen_dtype,
            layout,
            base,
            plan,
            updates: 0,
            skipped: 0,
            check_numerics: false,
            staged: 0,
            ctl,
            last_rows: 0,
            graphs: true,
            recorded: None,
            ran_direct: 0,
            unstored: None,
        })
    }

    /// One training step on `rows = labels.len()` samples; `x` is `[rows, input]` in f32. Uploads the batch,
    /// queues the step ([`Trainer::queue_staged`]) and reads its report: one wait for the backend per step.
    /// On any error the model, optimizer state and loss scale are unchanged.
    pub fn step(&mut self, x: &[f32], labels: &[u32]) -> Result<StepReport> {
        let rows = self.check_batch(x, labels.len())?;
        let bufs = self.alloc_step()?;
        self.staged = 0;
        let result = self.upload_batch(&bufs, x, labels, rows).and_then(|_| self.queue_step(&bufs, rows));
        self.arena.release(self.base);
        result?;
        self.report()
    }

    /// Uploads a batch into the arena once, so that [`Trainer::step_staged`] can train on it repeatedly with
    /// no host-to-device copy (benchmarks; data that already lives where the arena is). The static arena puts
    /// every step's input at the same address, so the batch stays valid until the next call that brings other
    /// data (`step`, `forward_backward`, `predict`, `evaluate`, or another `stage`).
    pub fn stage(&mut self, x: &[f32], labels: &[u32]) -> Result<()> {
        let rows = self.check_batch(x, labels.len())?;
        self.staged = 0;
        let bufs = self.alloc_step()?;
        let result = self.upload_batch(&bufs, x, labels, rows);
        self.arena.release(self.base);
        result?;
        self.staged = rows;
        Ok(())
    }

    /// A training step on the first `rows` samples of the staged batch (see [`Trainer::stage`]), with its
    /// report: [`Trainer::queue_staged`] then [`Trainer::report`].
    pub fn step_staged(&mut self, rows: usize) -> Result<StepReport> {
        self.queue_staged(rows)?;
        self.report()
    }

    /// Queues a training step on the first `rows` samples of the staged batch without waiting for it: every
    /// decision of the step (finite gradients, apply or skip, the loss-scale update, AdamW's bias correction)
    /// is made by the backend, in its control block, so nothing crosses back to the host. On a device backend
    /// the first step of a shape runs op by op (the CUDA backend then picks its GEMM algorithms by timing them),
    /// the second is recorded and every later one replays it (a CUDA graph: one launch per step).
    /// Read the outcome with [`Trainer::report`].
    pub fn queue_staged(&mut self, rows: usize) -> Result<()> {
        if rows == 0 || rows > self.staged {
            return Err(Error::ShapeMismatch { what: "rows of the staged batch", expected: self.staged, got: rows });
        }
        let bufs = self.alloc_step()?;
        let result = self.queue_step(&bufs, rows);
        self.arena.release(self.base);
        result
    }

    /// Waits for the queued steps and reads the last one's report from the control block (the one read of
    /// the step's results). Also brings [`Trainer::loss_scale`], [`Trainer::updates`] and
    /// [`Trainer::skipped`] up to date.
    pub fn report(&mut self) -> Result<StepReport> {
        if self.last_rows == 0 {
            return Err(Error::InvalidConfig("no training step to report yet"));
        }
        let c = self.sync_state()?;
        let (flushed, non_zero) = (c.words[control::LAST_FLUSHED], c.words[control::LAST_NON_ZERO]);
        Ok(StepReport {
            loss: c.f32(control::LAST_LOSS),
            loss_scale: c.f32(control::LAST_SCALE),
            skipped: c.words[control::LAST_APPLIED] == 0,
            grad_norm: c.f32(control::LAST_NORM),
            correct: c.words[control::LAST_CORRECT] as usize,
            rows: self.last_rows,
            skipped_total: self.skipped,
            underflow: if non_zero > 0 { flushed as f32 / non_zero as f32 } else { 0.0 },
        })
    }

    /// Waits for queued steps and brings [`Trainer::loss_scale`], [`Trainer::updates`] and
    /// [`Trainer::skipped`] up to date from the control block (checkpoints call this before saving).
    pub fn sync_state(&mut self) -> Result<Control> {
        let c = read_control(&mut self.backend, self.ctl)?;
        self.config.loss_scale = c.loss_scale(&self.config.loss_scale);
        self.updates = c.u64(control::UPDATES);
        self.skipped = c.u64(control::SKIPPED);
        Ok(c)
    }

    /// Whether steps are recorded once and replayed where the backend can (on by default). Turning it off
    /// frees the recording.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.forget_recording();
        }
    }

    fn forget_recording(&mut self) {
        if self.recorded.take().is_some() {
            self.backend.clear_recordings();
        }
    }

    /// Runs (or replays) the step's ops on the batch already in `s.input`.
    fn queue_step(&mut self, s: &StepBufs, rows: usize) -> Result<()> {
        let record = self.graphs && !self.check_numerics;
        if record {
            match self.recorded {
                Some((r, id)) if r == rows => {
                    self.backend.replay(id)?;
                    self.last_rows = rows;
                    return Ok(());
                }
                Some(_) => self.forget_recording(),
                None => {}
            }
            if self.ran_direct != rows {
                // The first step of this shape: run it directly, record the next one.
                self.step_ops(s, rows)?;
                self.ran_direct = rows;
                self.last_rows = rows;
                return Ok(());
            }
            if self.backend.record_begin()? {
                let ops = self.step_ops(s, rows);
                let id = self.backend.record_end(ops.is_ok());
                ops?;
                let id = id?.ok_or(Error::InvalidConfig("internal: a kept recording has no id"))?;
                self.recorded = Some((rows, id));
                self.backend.replay(id)?;
                self.last_rows = rows;
                return Ok(());
            }
        }
        self.step_ops(s, rows)?;
        self.last_rows = rows;
        Ok(())
    }

    /// Forward, loss, backward, the decision and the update, all on the backend.
    fn step_ops(&mut self, s: &StepBufs, rows: usize) -> Result<()> {
        self.forward_backward_inner(s, rows, ScaleFrom::Control)?;
        let rule = StepRule {
            loss_scale: self.config.loss_scale,
            clip_norm: self.config.clip_norm,
            adam_betas: self.optimizer.adam_betas(),
        };
        self.backend.step_control(self.ctl, self.params.grad, s.loss, &rule)?;
        self.optimizer.step_gated(&mut self.backend, &self.params, self.ctl)?;
        if self.check_numerics && read_control(&mut self.backend, self.ctl)?.words[control::LAST_APPLIED] != 0 {
            self.check_master()?;
        }
        Ok(())
    }

    /// Check-numerics after an update: the master weights.
    fn check_master(&mut self) -> Result<()> {
        let n = self.params.master.len;
        check_finite(&mut self.backend, self.params.master, [n, 1], None, "optimizer", "master weights", Phase::Update)
    }

    /// The second half of a step, for custom loops (see [`crate::loss_scale::GradScaler`]): unscales the
    /// gradients left by [`Trainer::forward_backward`] (computed with loss scale `scale`), checks them, clips
    /// them if configured, and applies the optimizer if they are all finite. Skipped steps change nothing.
    /// The trainer's own loss scale is not touched.
    pub fn apply_gradients(&mut self, scale: f32) -> Result<Applied> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::InvalidConfig("loss scale must be finite and > 0"));
        }
        // The counters live in the control block: bring the host's copy up to date, and write it back after.
        let mut c = read_control(&mut self.backend, self.ctl)?;
        self.updates = c.u64(control::UPDATES);
        self.skipped = c.u64(control::SKIPPED);
        let applied = self.apply_gradients_with(scale, |finite| finite)?;
        c.set_u64(control::UPDATES, self.updates);
        c.set_u64(control::SKIPPED, self.skipped);
        write_control(&mut self.backend, self.ctl, &c)?;
        Ok(applied)
    }

    /// `decide(finite)` says whether to apply the update (a dynamic loss scale also adapts itself there).
    fn apply_gradients_with(&mut self, scale: f32, decide: impl FnOnce(bool) -> bool) -> Result<Applied> {
        let inv_scale = 1.0 / scale;
        let stats = self.backend.grad_stats(self.params.grad, inv_scale)?;
        let finite = stats.non_finite == 0;
        let grad_norm = if finite { libm::sqrt(stats.sum_sq) as f32 } else { f32::NAN };
        let apply = decide(finite);
        if apply {
            // Clipping by global norm, after unscaling (folded into the optimizer's gradient multiplier).
            let clip = control::clip_factor(self.config.clip_norm, grad_norm);
            self.optimizer.step(&mut self.backend, &self.params, self.updates + 1, inv_scale * clip)?;
            self.updates += 1;
            if self.check_numerics {
                self.check_master()?;
            }
        } else {
            self.skipped += 1;
        }
        Ok(Applied { applied: apply, finite, grad_norm, non_finite: stats.non_finite })
    }

    /// Forward and backward without an update: leaves `grad * scale` in the gradient buffer and returns the
    /// mean loss. For custom loops and gradient checks; `step` is this plus the update.
    pub fn forward_backward(&mut self, x: &[f32], labels: &[u32], scale: f32) -> Result<f32> {
        let rows = self.check_batch(x, labels.len())?;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::InvalidConfig("loss scale must be finite and > 0"));
        }
        let bufs = self.alloc_step()?;
        self.staged = 0;
        let result = (|| {
            self.upload_batch(&bufs, x, labels, rows)?;
            self.forward_backward_inner(&bufs, rows, ScaleFrom::Host(scale))?;
            let mut loss = [0.0f32];
            self.backend.download(bufs.loss, &mut loss)?;
            Ok(loss[0])
        })();
        self.arena.release(self.base);
        result
    }

    fn alloc_step(&mut self) -> Result<StepBufs> {
        alloc_step(&mut self.arena, &self.model, self.policy, self.config.batch, &self.layout, self.frozen_dtype)
    }

    /// Copies the f32 gradients of the trainable parameters out, still multiplied by the loss scale
    /// (`out.len() == trainable_len()`: the model's `param_len()` unless partial).
    pub fn read_gradients(&mut self, out: &mut [f32]) -> Result<()> {
        self.backend.download(self.params.grad, out)
    }

    /// Overwrites the f32 master weights of the trainable parameters (and refreshes the working copy).
    /// `w.len() == trainable_len()` (the model's `param_len()` unless partial); see
    /// [`Trainer::load_weights`] for every parameter, frozen ones included.
    pub fn write_master(&mut self, w: &[f32]) -> Result<()> {
        self.backend.upload(self.params.master, w)?;
        if self.params.working != self.params.master {
            self.backend.cast(self.params.master, self.params.working)?;
        }
        Ok(())
    }

    /// Forward, loss (times the loss scale, from the host or the control block), backward, on the batch
    /// already in `s.input`. With the control block, the correct count and f16 underflow go there too.
    fn forward_backward_inner(&mut self, s: &StepBufs, rows: usize, from: ScaleFrom) -> Result<()> {
        let logits = self.forward(s, rows)?;
        let n = self.model.layers().len();
        let dtypes = self.model.out_dtypes(self.policy);
        let classes = self.model.classes();
        let lw = self.config.loss_weight;
        let ctl = self.ctl;
        let loss = self.model.loss();
        // The loss head writes dlogits into the ping-pong buffer that feeds the last layer's backward, in the
        // dtype of the logits. For 16-bit logits the gradient is computed in f32 and then rounded, where values
        // below half the smallest subnormal flush to zero (counted with the control block).
        let mut dy = retype(s.grad_a, dtypes[n - 1], rows * classes);
        let d32 = s.dlogits.prefix(s.dlogits.len.min(rows * classes));
        match from {
            ScaleFrom::Control => {
                let (l, labels) = (logits.prefix(rows * classes), s.labels.prefix(rows));
                loss.forward_backward_to(&mut self.backend, l, labels, rows, s.loss, dy, d32, lw, ctl)?;
            }
            ScaleFrom::Host(scale) if d32.len > 0 => {
                loss.forward_backward(&mut self.backend, logits, s.labels, rows, s.loss, d32, scale * lw)?;
                self.backend.cast(d32, dy)?;
            }
            ScaleFrom::Host(scale) => {
                loss.forward_backward(&mut self.backend, logits, s.labels, rows, s.loss, dy, scale * lw)?;
            }
        }
        if self.check_numerics {
            check_finite(&mut self.backend, s.loss, [1, 1], None, "loss", "loss value", Phase::Forward)?;
            check_finite(&mut self.backend, dy, [rows, classes], None, "loss", "logits gradient", Phase::Backward)?;
        }
        let layers = self.model.layers();
        // Backward from the loss down to the first trainable layer: nothing before it needs a gradient.
        let first = self.layout.first_trainable();
        // A fused GEMM already wrote this layer's bias gradient.
        let mut dbias_done: Option<usize> = None;
        let mut i = n;
        while i > first {
            i -= 1;
            let layer = &layers[i];
            let d = dtypes[i];
            let in_dtype = if i == 0 { self.policy.compute } else { dtypes[i - 1] };
            let in_len = rows * layer.in_shape().len();
            let x_i = if s.casts[i].len > 0 {
                s.casts[i]
            } else if i == 0 {
                s.input
            } else {
                s.acts[i - 1]
            };
            // The first trainable layer needs no input gradient. Flatten passes dy through as dx.
            let dx = if i == first {
                None
            } else if layer.aliases_input() {
                Some(retype(dy, in_dtype, in_len))
            } else {
                let other = if dy.offset == s.grad_a.offset { s.grad_b } else { s.grad_a };
                Some(retype(other, in_dtype, in_len))
            };
            let mut p = self.layer_params(i, d, s);
            if dbias_done == Some(i) {
                p.dbias = None;
            }
            let scratch = retype(s.scratch, d, s.scratch.bytes() / d.size());
            let io = Bwd { x: x_i, y: s.acts[i], dy, dx, aux: s.aux[i], scratch, rows };
            if let (Some(act), Layer::Linear(lin), Some(dx)) =
                (self.fusable_backward(i, first, &dtypes, s, &p), layer, dx)
            {
                // Linear i's input gradient through activation i - 1, and the bias gradient of layer i - 2 when
                // it is linear, in one GEMM; the activation's own backward is then done.
                let prev_dbias = match layers[i - 2] {
                    Layer::Linear(_) => self.layer_params(i - 2, dtypes[i - 2], s).dbias,
                    _ => None,
                };
                let x_valid = self.unstored != Some(i - 1);
                lin.backward_act(&mut self.backend, &p, &io, act, s.acts[i - 2], prev_dbias, x_valid)?;
                dbias_done = prev_dbias.map(|_| i - 2);
                dy = retype(dx, dtypes[i - 2], rows * layers[i - 1].in_shape().len());
                i -= 1;
                continue;
            }
            if i >= 1 && self.unstored == Some(i - 1) {
                // This layer reads its input, which the forward pass did not store.
                let a = i - 1;
                let act = layers[a].activation().ok_or(Error::InvalidConfig("internal: unstored non-activation"))?;
                let n = rows * layer.in_shape().len();
                self.backend.activation(act, s.acts[a - 1].prefix(n), s.acts[a].prefix(n))?;
                self.unstored = None;
            }
            layer.backward(&mut self.backend, &p, &io)?;
            if self.check_numerics {
                for ((name, _, dims), loc) in layer.tensors().into_iter().zip(self.layout.layer(i)) {
                    if !loc.trainable {
                        continue;
                    }
                    let len = loc.len;
                    let g = self.params.grad.slice(loc.offset, len);
                    let shape = [dims[0], len / dims[0].max(1)];
                    check_finite(&mut self.backend, g, shape, Some(i), layer.kind(), name_grad(name), Phase::Backward)?;
                }
                if let (Some(dx), false) = (dx, layer.aliases_input()) {
                    let shape = [rows, layer.in_shape().len()];
                    check_finite(
                        &mut self.backend,
                        dx,
                        shape,
                        Some(i),
                        layer.kind(),
                        "input gradient",
                        Phase::Backward,
                    )?;
                }
            }
            if let Some(dx) = dx {
                dy = dx;
            }
        }
        Ok(())
    }

    /// Whether linear layer `i`'s backward can run fused with activation `i - 1`'s (see
    /// [`crate::layers::Linear::backward_act`]), and that activation: the three layers compute in one dtype
    /// with no casts between them, layer `i - 1` needs an input gradient, the weight needs no conversion, and
    /// check-numerics (which inspects every layer's gradients) is off.
    fn fusable_backward(
        &self,
        i: usize,
        first: usize,
        dtypes: &[DType],
        s: &StepBufs,
        p: &LayerParams,
    ) -> Option<Activation> {
        let layers = self.model.layers();
        if self.check_numerics || i < first + 2 || !matches!(layers[i], Layer::Linear(_)) {
            return None;
        }
        let act = layers[i - 1].activation()?;
        let d = dtypes[i];
        let same = dtypes[i - 1] == d && dtypes[i - 2] == d && p.weight.dtype == d;
        (same && s.casts[i].len == 0 && s.casts[i - 1].len == 0).then_some(act)
    }

    /// The linear layer `i + 2` and its parameters when linear layer `i`, the activation after it and that layer
    /// form a classifier head the forward pass runs as [`crate::layers::Linear::forward_after_act`]: at most
    /// [`crate::backend::HEAD_MAX_OUT`] outputs, one compute dtype and no casts, the weight stored in it,
    /// check-numerics off (the caller has checked layer `i` and the activation).
    fn head_after(&self, i: usize, dtypes: &[DType], s: &StepBufs) -> Option<(crate::layers::Linear, LayerParams)> {
        let Some(&Layer::Linear(head)) = self.model.layers().get(i + 2) else { return None };
        let d = dtypes[i];
        if head.out_features > crate::backend::HEAD_MAX_OUT || dtypes[i + 2] != d || s.casts[i + 2].len != 0 {
            return None;
        }
        let p = self.layer_params(i + 2, d, s);
        let ok = p.weight.dtype == d && !s.acts[i + 2].overlaps(&s.acts[i]) && !s.acts[i + 2].overlaps(&s.acts[i + 1]);
        ok.then_some((head, p))
    }

    /// Runs the layers forward over `rows` samples already uploaded to `s.input`; returns the logits. A linear
    /// layer followed by an activation runs as one fused GEMM (unless check-numerics is on).
    fn forward(&mut self, s: &StepBufs, rows: usize) -> Result<Buf> {
        self.unstored = None;
        let dtypes = self.model.out_dtypes(self.policy);
        let layers = self.model.layers();
        let mut x = s.input;
        let mut i = 0;
        while i < layers.len() {
            let layer = &layers[i];
            let d = dtypes[i];
            if s.casts[i].len > 0 {
                // A float32 layer after 16-bit ones reads its input widened (exactly) to f32.
                let n = rows * layer.in_shape().len();
                self.backend.cast(x.prefix(n), s.casts[i].prefix(n))?;
                x = s.casts[i];
            }
            let p = self.layer_params(i, d, s);
            let scratch = retype(s.scratch, d, s.scratch.bytes() / d.size());
            let io = Fwd { x, y: s.acts[i], aux: s.aux[i], scratch, rows };
            if let (Layer::Linear(lin), Some(next)) = (layer, layers.get(i + 1)) {
                let fusable = !self.check_numerics
                    && p.weight.dtype == d
                    && !s.acts[i + 1].overlaps(&x)
                    && dtypes.get(i + 1) == Some(&d)
                    && s.casts[i + 1].len == 0;
                if let (true, Some(act)) = (fusable, next.activation()) {
                    if let Some((head, ph)) = self.head_after(i, &dtypes, s) {
                        // A classifier head: this layer with the bias in its epilogue, then the activation and
                        // the head in one op, which may compute the logits without storing the activation.
                        lin.forward_bias(&mut self.backend, &p, &io)?;
                        let (pre, xa, y) = (s.acts[i], s.acts[i + 1], s.acts[i + 2]);
                        let stored = head.forward_after_act(&mut self.backend, &ph, act, pre, xa, y, rows)?;
                        self.unstored = (!stored).then_some(i + 1);
                        x = y;
                        i += 3;
                        continue;
                    }
                    lin.forward_act(&mut self.backend, &p, &io, act, s.acts[i + 1])?;
                    x = s.acts[i + 1];
                    i += 2;
                    continue;
                }
            }
            layer.forward(&mut self.backend, &p, &io)?;
            x = s.acts[i];
            if self.check_numerics {
                let per = layer.out_shape().len();
                check_finite(
                    &mut self.backend,
                    x.prefix(rows * per),
                    [rows, per],
                    Some(i),
                    layer.kind(),
                    "output",
                    Phase::Forward,
                )?;
            }
            i += 1;
        }
        Ok(x)
    }

    fn check_batch(&self, x: &[f32], rows: usize) -> Result<usize> {
        if rows == 0 || rows > self.config.batch {
            return Err(Error::ShapeMismatch {
                what: "batch rows (1..=planned batch)",
                expected: self.config.batch,
                got: rows,
            });
        }
        let want = rows * self.model.input().len();
        if x.len() != want {
            return Err(Error::ShapeMismatch {
                what: "input values (rows x input size)",
                expected: want,
                got: x.len(),
            });
        }
        Ok(rows)
    }

    fn upload_batch(&mut self, s: &StepBufs, x: &[f32], labels: &[u32], rows: usize) -> Result<()> {
        self.backend.upload(s.input.prefix(x.len()), x)?;
        let classes = self.model.classes();
        let mut chunk = [0i32; 256];
        let mut done = 0;
        while done < rows {
            let n = chunk.len().min(rows - done);
            for (c, &l) in chunk.iter_mut().zip(&labels[done..done + n]) {
                if l as usize >= classes {
                    return Err(Error::LabelOutOfRange { label: l.min(i32::MAX as u32) as i32, classes });
                }
                *c = l as i32;
            }
            self.backend.upload_i32(s.labels.slice(done, n), &chunk[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Counts rows whose arg-max logit equals the label.
    fn count_correct(&mut self, logits: Buf, labels: Buf, rows: usize) -> Result<usize> {
        let classes = self.model.classes();
        self.backend.count_correct(logits.prefix(rows * classes), labels.prefix(rows), rows, classes)
    }

    /// Predicted classes for `rows = out.len()` samples of `x` (any number: they run in planned batches).
    /// Runs the forward pass in the compute dtype; weights, gradients and optimizer state are not touched.
    pub fn predict(&mut self, x: &[f32], out: &mut [u32]) -> Result<()> {
        let per = self.model.input().len();
        if x.len() != out.len() * per {
            return Err(Error::ShapeMismatch { what: "predict input values", expected: out.len() * per, got: x.len() });
        }
        let batch = self.config.batch;
        let classes = self.model.classes();
        self.staged = 0;
        for (xc, oc) in x.chunks(batch * per).zip(out.chunks_mut(batch)) {
            let rows = oc.len();
            let s = self.alloc_step()?;
            let r = self.backend.upload(s.input.prefix(xc.len()), xc).and_then(|_| self.forward(&s, rows));
            let r = r.and_then(|logits| self.backend.argmax(logits.prefix(rows * classes), rows, classes, oc));
            self.arena.release(self.base);
            r?;
        }
        Ok(())
    }

    /// Mean loss and accuracy over `x`/`labels` without training.
    pub fn evaluate(&mut self, x: &[f32], labels: &[u32]) -> Result<Evaluation> {
        let per = self.model.input().len();
        if x.len() != labels.len() * per {
            return Err(Error::ShapeMismatch {
                what: "evaluate input values",
                expected: labels.len() * per,
                got: x.len(),
            });
        }
        let batch = self.config.batch;
        let mut eval = Evaluation { loss: 0.0, correct: 0, total: 0 };
        self.staged = 0;
        let mut loss_sum = 0.0f64;
        for (xc, lc) in x.chunks(batch * per).zip(labels.chunks(batch)) {
            let rows = lc.len();
            let s = self.alloc_step()?;
            let r = (|| -> Result<(f32, usize)> {
                self.upload_batch(&s, xc, lc, rows)?;
                let logits = self.forward(&s, rows)?;
                let last = self.model.out_dtypes(self.policy)[self.model.layers().len() - 1];
                let dl = retype(s.grad_a, last, rows * self.model.classes());
                self.model.loss().forward_backward(&mut self.backend, logits, s.labels, rows, s.loss, dl, 1.0)?;
                let mut loss = [0.0f32];
                self.backend.download(s.loss, &mut loss)?;
                Ok((loss[0], self.count_correct(logits, s.labels, rows)?))
            })();
            self.arena.release(self.base);
            let (loss, correct) = r?;
            loss_sum += loss as f64 * rows as f64;
            eval.correct += correct;
            eval.total += rows;
        }
        eval.loss = if eval.total > 0 { (loss_sum / eval.total as f64) as f32 } else { 0.0 };
        Ok(eval)
    }

    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// Changes the learning rate (schedules).
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        let mut o = self.optimizer;
        o.set_lr(lr);
        o.validate()?;
        self.optimizer = o;
        // The recorded step has the old rate in it.
        self.forget_recording();
        Ok(())
    }

    /// The loss scale and its state as of the last report ([`Trainer::step`] reports every step).
    pub fn loss_scale(&self) -> &LossScale {
        &self.config.loss_scale
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Updates applied so far, as of the last report.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Steps skipped so far, as of the last report.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The parameter buffers (master, working, gradients, optimizer state).
    pub fn params(&self) -> &ParamBufs {
        &self.params
    }

    /// The arena's bookkeeping: `high_water()` stays flat over training.
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Copies the f32 master weights of the trainable parameters out (`out.len() == trainable_len()`; see
    /// [`Trainer::read_weights`] for every parameter).
    pub fn read_master(&mut self, out: &mut [f32]) -> Result<()> {
        self.backend.download(self.params.master, out)
    }

    /// Replaces the loss-scale state (restoring a checkpoint, or switching scaling mid-run).
    pub fn set_loss_scale(&mut self, s: LossScale) -> Result<()> {
        match s {
            LossScale::Fixed(v) => {
                LossScale::fixed(v)?;
            }
            LossScale::Dynamic(d) => d.config.validate()?,
            LossScale::None => {}
        }
        let mut c = read_control(&mut self.backend, self.ctl)?;
        c.set_loss_scale(&s);
        write_control(&mut self.backend, self.ctl, &c)?;
        self.config.loss_scale = s;
        // The recorded step has the old mode's constants in it.
        self.forget_recording();
        Ok(())
    }

    /// Restores the update and skip counters (from a checkpoint). AdamW's bias correction uses `updates`.
    pub fn set_counters(&mut self, updates: u64, skipped: u64) -> Result<()> {
        let mut c = read_control(&mut self.backend, self.ctl)?;
        c.set_u64(control::UPDATES, updates);
        c.set_u64(control::SKIPPED, skipped);
        write_control(&mut self.backend, self.ctl, &c)?;
        self.updates = updates;
        self.skipped = skipped;
        Ok(())
    }

    /// Check-numerics mode (like `tf.debugging.enable_check_numerics`): off by default, and then costs
    /// nothing. When on, every layer output, loss, gradient and updated weight is scanned, and the first
    /// non-finite value stops the step with [`Error::NonFinite`] naming the layer, tensor, phase, dtype, shape
    /// and the NaN and Inf counts. (Under dynamic loss scaling an f16 overflow, normally a skipped step, is
    /// then reported as an error too, as TensorFlow does.) Errors in the forward or backward phase leave
    /// the model untouched; an update-phase error reports weights the update already wrote.
    pub fn set_check_numerics(&mut self, on: bool) {
        self.check_numerics = on;
    }

    pub fn check_numerics(&self) -> bool {
        self.check_numerics
    }

    /// Which parameters train, and where every tensor lives.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Elements of the trainable vectors (master, gradients, optimizer state): `model().param_len()` unless
    /// partial.
    pub fn trainable_len(&self) -> usize {
        self.layout.trainable_len()
    }

    /// The frozen parameters' buffer (empty unless partial) and its dtype.
    pub fn frozen(&self) -> Buf {
        self.frozen
    }

    /// Sets every parameter, frozen ones included, from `w` in the model's flat parameter order
    /// (`w.len() == model().param_len()`; the order of [`crate::layers::Layer::tensors`] and of a checkpoint's
    /// master weights). Frozen values are rounded to their storage dtype; the working copy is refreshed.
    /// Optimizer state and counters are not touched. On a length error nothing is written.
    pub fn load_weights(&mut self, w: &[f32]) -> Result<()> {
        let n = self.model.param_len();
        if w.len() != n {
            return Err(Error::ShapeMismatch {
                what: "weights (model parameters in model order)",
                expected: n,
                got: w.len(),
            });
        }
        self.load_weights_with(|at, chunk| {
            chunk.copy_from_slice(&w[at..at + chunk.len()]);
            Ok(())
        })
    }

    /// [`Trainer::load_weights`] without the whole vector in memory (firmware reading a blob in flash):
    /// `fill(at, chunk)` writes the parameters `at..at + chunk.len()` of the model's flat order into `chunk`
    /// (at most 256 values, within one tensor). Every parameter is asked for exactly once, in order. An error
    /// from `fill` stops the load and is returned (parameters before it are written).
    pub fn load_weights_with(&mut self, mut fill: impl FnMut(usize, &mut [f32]) -> Result<()>) -> Result<()> {
        let mut chunk = [0.0f32; 256];
        for (_, loc) in self.layout.iter(self.model.layers().len()) {
            let dst = tensor_buf(&self.params, self.frozen, loc);
            let mut done = 0;
            while done < loc.len {
                let n = chunk.len().min(loc.len - done);
                fill(loc.model_offset + done, &mut chunk[..n])?;
                self.backend.upload(dst.slice(done, n), &chunk[..n])?;
                done += n;
            }
        }
        if self.params.working != self.params.master {
            self.backend.cast(self.params.master, self.params.working)?;
        }
        Ok(())
    }

    /// Copies every parameter out in the model's flat parameter order (`out.len() == model().param_len()`):
    /// trainable ones from the f32 master weights, frozen ones widened from their storage.
    pub fn read_weights(&mut self, out: &mut [f32]) -> Result<()> {
        let n = self.model.param_len();
        if out.len() != n {
            return Err(Error::ShapeMismatch {
                what: "weights (model parameters in model order)",
                expected: n,
                got: out.len(),
            });
        }
        self.visit_weights(|at, chunk| out[at..at + chunk.len()].copy_from_slice(chunk))
    }

    /// [`Trainer::read_weights`] in chunks of at most 256 values, in model order: `f(at, chunk)` gets the
    /// parameters `at..at + chunk.len()` (for checksums and streaming out on a device).
    pub fn visit_weights(&mut self, mut f: impl FnMut(usize, &[f32])) -> Result<()> {
        let mut chunk = [0.0f32; 256];
        for (_, loc) in self.layout.iter(self.model.layers().len()) {
            let src = tensor_buf(&self.params, self.frozen, loc);
            let mut done = 0;
            while done < loc.len {
                let n = chunk.len().min(loc.len - done);
                self.backend.download(src.slice(done, n), &mut chunk[..n])?;
                f(loc.model_offset + done, &chunk[..n]);
                done += n;
            }
        }
        Ok(())
    }

    /// The views layer `i` (computing in `d`) reads and writes during step `s`: trainable tensors from the
    /// working copy (or the f32 master weights for a float32 layer under a mixed policy: they are always
    /// current, the optimizer writes them first) with their gradients; frozen tensors from the frozen vector,
    /// without gradients.
    fn layer_params(&self, i: usize, d: DType, s: &StepBufs) -> LayerParams {
        let [w, b] = self.layout.layer(i);
        if w.len == 0 {
            return LayerParams::NONE;
        }
        let p = &self.params;
        let working = if d == DType::F32 && self.policy.is_mixed() { p.master } else { p.working };
        let read = |loc: TensorLoc| {
            if loc.trainable {
                working.slice(loc.offset, loc.len)
            } else {
                self.frozen.slice(loc.offset, loc.len)
            }
        };
        let grad = |loc: TensorLoc| loc.trainable.then(|| p.grad.slice(loc.offset, loc.len));
        let widen = if !w.trainable && self.frozen_dtype != d && s.widen.len > 0 {
            retype(s.widen, d, s.widen.bytes() / d.size())
        } else {
            Buf::EMPTY
        };
        LayerParams { weight: read(w), bias: read(b), dweight: grad(w), dbias: grad(b), widen }
    }

    /// Gives the backend (and its arena) back.
    pub fn into_backend(self) -> B {
        self.backend
    }
}

/// Scans `buf` for NaN and Inf (in chunks: no heap), and reports the first tensor that holds any.
fn check_finite<B: Backend>(
    be: &mut B,
    buf: Buf,
    shape: [usize; 2],
    layer: Option<usize>,
    kind: &'static str,
    op: &'static str,
    phase: Phase,
) -> Result<()> {
    let (mut nan, mut inf) = (0usize, 0usize);
    let mut chunk = [0.0f32; 256];
    let mut done = 0;
    while done < buf.len {
        let n = chunk.len().min(buf.len - done);
        be.download(buf.slice(done, n), &mut chunk[..n])?;
        for v in &chunk[..n] {
            if v.is_nan() {
                nan += 1;
            } else if v.is_infinite() {
                inf += 1;
            }
        }
        done += n;
    }
    if nan + inf == 0 {
        return Ok(());
    }
    Err(Error::NonFinite(NonFiniteReport { layer, kind, op, phase, dtype: buf.dtype, shape, nan, inf }))
}

/// Where a tensor's values live: the f32 master vector (trainable) or the frozen vector.
fn tensor_buf(p: &ParamBufs, frozen: Buf, loc: TensorLoc) -> Buf {
    if loc.trainable {
        p.master.slice(loc.offset, loc.len)
    } else {
        frozen.slice(loc.offset, loc.len)
    }
}

fn name_grad(name: &str) -> &'static str {
    match name {
        "weight" => "weight gradient",
        "bias" => "bias gradient",
        _ => "parameter gradient",
    }
}

/// Where the loss scale of a forward-backward pass comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ScaleFrom {
    /// A value the host passes (custom loops: [`Trainer::forward_backward`]).
    Host(f32),
    /// The control block (the trainer's own steps).
    Control,
}

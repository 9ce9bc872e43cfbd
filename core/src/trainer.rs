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
use crate::backend::{Backend, ParamBufs};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layers::{Bwd, Fwd, LayerParams};
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
        let (params, frozen, _) = alloc_params(&mut arena, &model, policy, &optimizer, &layout, frozen_dtype)?;
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
        })
    }

    /// One training step on `rows = labels.len()` samples; `x` is `[rows, input]` in f32.
    /// On any error the model, optimizer state and loss scale are unchanged.
    pub fn step(&mut self, x: &[f32], labels: &[u32]) -> Result<StepReport> {
        let rows = self.check_batch(x, labels.len())?;
        let bufs = self.alloc_step()?;
        let result = self.step_inner(&bufs, Some((x, labels)), rows);
        self.arena.release(self.base);
        result
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

    /// A training step on the first `rows` samples of the staged batch (see [`Trainer::stage`]).
    pub fn step_staged(&mut self, rows: usize) -> Result<StepReport> {
        if rows == 0 || rows > self.staged {
            return Err(Error::ShapeMismatch { what: "rows of the staged batch", expected: self.staged, got: rows });
        }
        let bufs = self.alloc_step()?;
        let result = self.step_inner(&bufs, None, rows);
        self.arena.release(self.base);
        result
    }

    fn step_inner(&mut self, s: &StepBufs, batch: Option<(&[f32], &[u32])>, rows: usize) -> Result<StepReport> {
        let scale = self.config.loss_scale.scale();
        let (loss, correct, underflow) = self.forward_backward_inner(s, batch, rows, scale)?;
        let mut loss_scale = self.config.loss_scale;
        let applied = self.apply_gradients_with(scale, |finite| loss_scale.update(finite))?;
        self.config.loss_scale = loss_scale;
        Ok(StepReport {
            loss,
            loss_scale: scale,
            skipped: !applied.applied,
            grad_norm: applied.grad_norm,
            correct,
            rows,
            skipped_total: self.skipped,
            underflow,
        })
    }

    /// The second half of a step, for custom loops (see [`crate::loss_scale::GradScaler`]): unscales the
    /// gradients left by [`Trainer::forward_backward`] (computed with loss scale `scale`), checks them, clips
    /// them if configured, and applies the optimizer if they are all finite. Skipped steps change nothing.
    /// The trainer's own loss scale is not touched.
    pub fn apply_gradients(&mut self, scale: f32) -> Result<Applied> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::InvalidConfig("loss scale must be finite and > 0"));
        }
        self.apply_gradients_with(scale, |finite| finite)
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
            let clip = match self.config.clip_norm {
                Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
                _ => 1.0,
            };
            self.optimizer.step(&mut self.backend, &self.params, self.updates + 1, inv_scale * clip)?;
            self.updates += 1;
            if self.check_numerics {
                let n = self.params.master.len;
                check_finite(
                    &mut self.backend,
                    self.params.master,
                    [n, 1],
                    None,
                    "optimizer",
                    "master weights",
                    Phase::Update,
                )?;
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
        let bufs = self.alloc_step()?;
        let result = self.forward_backward_inner(&bufs, Some((x, labels)), rows, scale).map(|(loss, _, _)| loss);
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

    /// Upload, forward, loss (times `scale`), backward. Returns the mean loss and the correct count.
    fn forward_backward_inner(
        &mut self,
        s: &StepBufs,
        batch: Option<(&[f32], &[u32])>,
        rows: usize,
        scale: f32,
    ) -> Result<(f32, usize, f32)> {
        match batch {
            Some((x, labels)) => {
                self.staged = 0;
                self.upload_batch(s, x, labels, rows)?;
            }
            None if rows <= self.staged => {}
            None => {
                return Err(Error::ShapeMismatch { what: "rows of the staged batch", expected: self.staged, got: rows })
            }
        }
        let logits = self.forward(s, rows)?;
        let n = self.model.layers().len();
        let dtypes = self.model.out_dtypes(self.policy);
        let classes = self.model.classes();
        let g = scale * self.config.loss_weight;
        let mut underflow = 0.0;
        // The loss head writes dlogits into the ping-pong buffer that feeds the last layer's backward, in the
        // dtype of the logits.
        let mut dy = retype(s.grad_a, dtypes[n - 1], rows * classes);
        if s.dlogits.len > 0 {
            // 16-bit logits: the loss gradient is computed in f32, then cast to the compute dtype, where values
            // below half the smallest subnormal flush to zero. Count them.
            let d32 = s.dlogits.prefix(rows * classes);
            self.model.loss().forward_backward(&mut self.backend, logits, s.labels, rows, s.loss, d32, g)?;
            let (flushed, non_zero) = self.backend.count_underflow(d32, dy.dtype)?;
            underflow = if non_zero > 0 { flushed as f32 / non_zero as f32 } else { 0.0 };
            self.backend.cast(d32, dy)?;
        } else {
            self.model.loss().forward_backward(&mut self.backend, logits, s.labels, rows, s.loss, dy, g)?;
        }
        if self.check_numerics {
            check_finite(&mut self.backend, s.loss, [1, 1], None, "loss", "loss value", Phase::Forward)?;
            check_finite(&mut self.backend, dy, [rows, classes], None, "loss", "logits gradient", Phase::Backward)?;
        }
        let correct = self.count_correct(logits, s.labels, rows)?;
        let layers = self.model.layers();
        // Backward from the loss down to the first trainable layer: nothing before it needs a gradient.
        let first = self.layout.first_trainable();
        for i in (first..n).rev() {
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
            let p = self.layer_params(i, d, s);
            let scratch = retype(s.scratch, d, s.scratch.bytes() / d.size());
            let io = Bwd { x: x_i, y: s.acts[i], dy, dx, aux: s.aux[i], scratch, rows };
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
        let mut loss = [0.0f32];
        self.backend.download(s.loss, &mut loss)?;
        Ok((loss[0], correct, underflow))
    }

    /// Runs the layers forward over `rows` samples already uploaded to `s.input`; returns the logits.
    fn forward(&mut self, s: &StepBufs, rows: usize) -> Result<Buf> {
        let dtypes = self.model.out_dtypes(self.policy);
        let mut x = s.input;
        for (i, layer) in self.model.layers().iter().enumerate() {
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
        Ok(())
    }

    pub fn loss_scale(&self) -> &LossScale {
        &self.config.loss_scale
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Updates applied so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Steps skipped so far.
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
        self.config.loss_scale = s;
        Ok(())
    }

    /// Restores the update and skip counters (from a checkpoint). AdamW's bias correction uses `updates`.
    pub fn set_counters(&mut self, updates: u64, skipped: u64) {
        self.updates = updates;
        self.skipped = skipped;
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

//! The memory plan: every byte of a training run, decided before the first step.
//!
//! The plan is measured, not estimated: it replays the exact allocation sequence the trainer performs on an
//! unbounded [`Arena`], so `total` is the buffer size that fits, to the byte.

use crate::arena::{Arena, Buf};
use crate::backend::ParamBufs;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::{Model, MAX_LAYERS};
use crate::optim::Optimizer;
use crate::policy::Policy;
use crate::trainable::{ParamLayout, Trainable};
use crate::trainer::TrainConfig;

/// Bytes per part of a training run. Parts sum to `total` (alignment padding is counted in the part whose
/// allocation needed it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MemoryPlan {
    pub policy: Policy,
    pub batch: usize,
    /// Parameters of the model.
    pub params: usize,
    /// Which of them train, and how many elements that is (`params` unless partial).
    pub trainable: Trainable,
    pub trainable_params: usize,
    /// f32 master weights (of the trainable parameters).
    pub master: usize,
    /// Working copy in the compute dtype (0 under `float32`: the forward pass reads the master weights).
    pub working: usize,
    /// f32 parameter gradients.
    pub gradients: usize,
    /// f32 optimizer state (momentum; Adam's two moments).
    pub optimizer: usize,
    /// Per-step tensors kept from the forward to the backward pass: input, labels, layer outputs, max-pool
    /// positions, the loss. Released after every step.
    pub activations: usize,
    /// Per-step temporaries: activation gradients (two ping-pong buffers), im2col columns, forward-only
    /// outputs of frozen layers (two ping-pong buffers), conversion blocks for frozen weights.
    pub scratch: usize,
    /// Frozen parameters (weights and biases that do not train), in `frozen_dtype`: no master copy, gradient
    /// or optimizer state. 0 unless partial.
    pub frozen: usize,
    pub frozen_dtype: DType,
    /// The step-control block ([`crate::control`]): loss scale, counters and the last step's report.
    pub control: usize,
    pub total: usize,
}

impl MemoryPlan {
    /// The plan for training `model` under `policy` with `optimizer` on batches of `batch` samples.
    pub fn new(model: &Model, policy: Policy, optimizer: &Optimizer, batch: usize) -> Result<MemoryPlan> {
        MemoryPlan::for_config(model, policy, optimizer, &TrainConfig::new(batch, policy))
    }

    /// The plan of a trainer built with `config`: its batch, and which parameters train
    /// ([`TrainConfig::trainable`]) in which storage ([`TrainConfig::frozen_storage`]).
    pub fn for_config(
        model: &Model,
        policy: Policy,
        optimizer: &Optimizer,
        config: &TrainConfig,
    ) -> Result<MemoryPlan> {
        let batch = config.batch;
        if batch == 0 {
            return Err(Error::InvalidConfig("batch size must be at least 1"));
        }
        let layout = ParamLayout::new(model, config.trainable)?;
        let frozen_dtype = config.frozen_dtype(policy)?;
        let mut arena = Arena::unbounded();
        let (_, _, _, persistent) = alloc_params(&mut arena, model, policy, optimizer, &layout, frozen_dtype)?;
        let before = arena.used();
        let step = alloc_step(&mut arena, model, policy, batch, &layout, frozen_dtype)?;
        let scratch = step.scratch_bytes;
        let mut plan = persistent;
        plan.batch = batch;
        plan.activations = arena.used() - before - scratch;
        plan.scratch = scratch;
        plan.total = arena.high_water();
        Ok(plan)
    }

    /// Bytes that do not depend on the batch size.
    pub fn fixed(&self) -> usize {
        self.master + self.working + self.gradients + self.optimizer + self.frozen + self.control
    }

    /// The largest batch whose plan fits in `capacity` bytes (0 if not even one sample fits).
    pub fn max_batch(model: &Model, policy: Policy, optimizer: &Optimizer, capacity: usize) -> Result<usize> {
        let fits = |b: usize| MemoryPlan::new(model, policy, optimizer, b).map(|p| p.total <= capacity);
        if !fits(1)? {
            return Ok(0);
        }
        let (mut lo, mut hi) = (1usize, 2usize);
        while fits(hi)? {
            lo = hi;
            hi = hi.checked_mul(2).ok_or(Error::InvalidConfig("capacity too large to search"))?;
        }
        // fits(lo) and !fits(hi)
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

impl core::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let c = self.policy.compute;
        if self.trainable.is_partial() {
            writeln!(
                f,
                "memory plan: {} parameters ({} trainable: {}), policy {}, batch {}",
                self.params, self.trainable_params, self.trainable, self.policy, self.batch
            )?;
        } else {
            writeln!(f, "memory plan: {} parameters, policy {}, batch {}", self.params, self.policy, self.batch)?;
        }
        writeln!(f, "| part                              |         bytes |        MiB |")?;
        writeln!(f, "|-----------------------------------|---------------|------------|")?;
        let mut row = |name: &dyn core::fmt::Display, bytes: usize| {
            writeln!(f, "| {:<33} | {:>13} | {:>10.3} |", name, Grouped(bytes), bytes as f64 / 1048576.0)
        };
        row(&"master weights (float32)", self.master)?;
        row(&Label("working weights", c), self.working)?;
        row(&"gradients (float32)", self.gradients)?;
        row(&"optimizer state (float32)", self.optimizer)?;
        if self.frozen > 0 {
            row(&Label("frozen weights", self.frozen_dtype), self.frozen)?;
        }
        row(&"step control", self.control)?;
        row(&Label("activations", c), self.activations)?;
        row(&Label("scratch", c), self.scratch)?;
        row(&"total", self.total)
    }
}

/// Plans side by side, one column each, under a heading per column: full vs partial training, float32 vs
/// bf16 storage. `SideBySide(&[("full", full), ("last layer", partial)])` prints
///
/// ```text
/// | part                         |            full |      last layer |
/// |------------------------------|-----------------|-----------------|
/// | trainable parameters         |          15,018 |             330 |
/// | master weights (float32)     |          60,072 |           1,320 |
/// ...
/// ```
#[derive(Clone, Copy, Debug)]
pub struct SideBySide<'a>(pub &'a [(&'a str, MemoryPlan)]);

impl core::fmt::Display for SideBySide<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "| {:<28} |", "bytes")?;
        for (name, _) in self.0 {
            write!(f, " {:>15} |", name)?;
        }
        write!(f, "\n|{:-<30}|", "")?;
        for _ in self.0 {
            write!(f, "{:-<17}|", "")?;
        }
        writeln!(f)?;
        let mut row = |name: &str, get: &dyn Fn(&MemoryPlan) -> usize| -> core::fmt::Result {
            write!(f, "| {:<28} |", name)?;
            for (_, p) in self.0 {
                write!(f, " {:>15} |", Grouped(get(p)))?;
            }
            writeln!(f)
        };
        row("trainable parameters", &|p| p.trainable_params)?;
        row("master weights (float32)", &|p| p.master)?;
        row("working weights", &|p| p.working)?;
        row("gradients (float32)", &|p| p.gradients)?;
        row("optimizer state (float32)", &|p| p.optimizer)?;
        row("frozen weights", &|p| p.frozen)?;
        row("step control", &|p| p.control)?;
        row("activations", &|p| p.activations)?;
        row("scratch", &|p| p.scratch)?;
        row("total", &|p| p.total)
    }
}

struct Label(&'static str, DType);

impl core::fmt::Display for Label {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Padding must apply to the whole label: format into a small stack string first.
        let mut s: heapless::String<40> = heapless::String::new();
        let _ = core::fmt::write(&mut s, format_args!("{} ({})", self.0, self.1));
        f.pad(&s)
    }
}

/// `1234567` as `1,234,567`.
#[derive(Clone, Copy, Debug)]
pub struct Grouped(pub usize);

impl core::fmt::Display for Grouped {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut digits = [0u8; 32];
        let mut n = self.0;
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let mut s: heapless::String<40> = heapless::String::new();
        for i in (0..len).rev() {
            let _ = s.push(digits[i] as char);
            if i > 0 && i % 3 == 0 {
                let _ = s.push(',');
            }
        }
        f.pad(&s)
    }
}

/// Allocates the persistent parameter buffers in a fixed order and reports their sizes: the trainable
/// vectors (master, working, gradients, optimizer state), the frozen vector, then the step-control block.
pub(crate) fn alloc_params(
    arena: &mut Arena,
    model: &Model,
    policy: Policy,
    optimizer: &Optimizer,
    layout: &ParamLayout,
    frozen_dtype: DType,
) -> Result<(ParamBufs, Buf, Buf, MemoryPlan)> {
    let n = layout.trainable_len();
    let mut used = arena.used();
    let mut take = |arena: &mut Arena, dtype: DType, len: usize| -> Result<(Buf, usize)> {
        let b = arena.alloc(dtype, len)?;
        let bytes = arena.used() - used;
        used = arena.used();
        Ok((b, bytes))
    };
    let (master, master_bytes) = take(arena, DType::F32, n)?;
    let (working, working_bytes) = if policy.is_mixed() { take(arena, policy.compute, n)? } else { (master, 0) };
    let (grad, grad_bytes) = take(arena, DType::F32, n)?;
    let states = optimizer.state_vectors();
    let (state1, s1) = if states >= 1 { take(arena, DType::F32, n)? } else { (Buf::EMPTY, 0) };
    let (state2, s2) = if states >= 2 { take(arena, DType::F32, n)? } else { (Buf::EMPTY, 0) };
    let (frozen, frozen_bytes) =
        if layout.frozen_len() > 0 { take(arena, frozen_dtype, layout.frozen_len())? } else { (Buf::EMPTY, 0) };
    let (ctl, control) = take(arena, DType::I32, crate::control::WORDS)?;
    let plan = MemoryPlan {
        policy,
        batch: 0,
        params: model.param_len(),
        trainable: layout.trainable(),
        trainable_params: n,
        master: master_bytes,
        working: working_bytes,
        gradients: grad_bytes,
        optimizer: s1 + s2,
        activations: 0,
        scratch: 0,
        frozen: frozen_bytes,
        frozen_dtype,
        control,
        total: 0,
    };
    Ok((ParamBufs { master, working, grad, state1, state2 }, frozen, ctl, plan))
}

/// The buffers of one training (or inference) step, allocated after a [`crate::arena::Mark`] and released
/// when the step ends.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepBufs {
    /// `[B, input]` in the compute dtype.
    pub input: Buf,
    /// `[B]` class indices.
    pub labels: Buf,
    /// Output of layer `i`: `[B, out_shape(i)]` (Flatten: the same bytes as its input). Layers before the
    /// last frozen one ahead of the first trainable layer write into two alternating forward-only buffers.
    pub acts: [Buf; MAX_LAYERS],
    /// Per-layer state for the backward pass (max-pool positions); one shared buffer for frozen layers.
    pub aux: [Buf; MAX_LAYERS],
    /// Layer `i`'s input cast to its compute dtype, where that differs from the input's dtype (a float32
    /// layer after 16-bit ones); empty otherwise.
    pub casts: [Buf; MAX_LAYERS],
    /// The mean loss (one f32).
    pub loss: Buf,
    /// Activation-gradient ping-pong buffers, each `[B, widest layer]`.
    pub grad_a: Buf,
    pub grad_b: Buf,
    /// Shared layer scratch (im2col columns).
    pub scratch: Buf,
    /// The loss gradient in f32 before it is cast to the compute dtype (mixed policies only; under float32
    /// the loss head writes straight into `grad_a`). Lets the trainer count what the cast flushes to zero.
    pub dlogits: Buf,
    /// Conversion blocks for frozen weights stored in another dtype than their layer computes in (bytes;
    /// retyped per layer); empty when there are none.
    pub widen: Buf,
    pub scratch_bytes: usize,
}

/// Bytes of [`StepBufs::widen`]: the largest conversion block any layer needs.
fn widen_bytes(model: &Model, policy: Policy, layout: &ParamLayout, frozen_dtype: DType) -> usize {
    let dtypes = model.out_dtypes(policy);
    let mut bytes = 0;
    for (i, layer) in model.layers().iter().enumerate() {
        let w = layout.layer(i)[0];
        if w.len == 0 || w.trainable || frozen_dtype == dtypes[i] {
            continue;
        }
        let (rows, cols) = match layer.tensors().first() {
            Some((_, _, dims)) => (dims[0], w.len / dims[0].max(1)),
            None => continue,
        };
        bytes = bytes.max(crate::layers::widen_len(rows, cols) * dtypes[i].size());
    }
    bytes
}

pub(crate) fn alloc_step(
    arena: &mut Arena,
    model: &Model,
    policy: Policy,
    batch: usize,
    layout: &ParamLayout,
    frozen_dtype: DType,
) -> Result<StepBufs> {
    let c = policy.compute;
    let dtypes = model.out_dtypes(policy);
    let first = layout.first_trainable();
    let input = arena.alloc(c, batch * model.input().len())?;
    let labels = arena.alloc(DType::I32, batch)?;
    let mut acts = [Buf::EMPTY; MAX_LAYERS];
    let mut aux = [Buf::EMPTY; MAX_LAYERS];
    let mut casts = [Buf::EMPTY; MAX_LAYERS];
    // Layers 0..first-1 only feed the next layer forward: their outputs (and max-pool positions) need not
    // survive to the backward pass. Two alternating buffers hold them; layer first-1's output, the input of
    // the first trainable layer, is kept.
    let forward_only = |i: usize| i + 1 < first;
    let (mut fwd_bytes, mut fwd_aux) = (0usize, 0usize);
    for (i, layer) in model.layers().iter().enumerate() {
        if forward_only(i) && !layer.aliases_input() {
            fwd_bytes = fwd_bytes.max(layer.out_shape().len() * dtypes[i].size());
        }
        if i < first {
            fwd_aux = fwd_aux.max(layer.aux_len().0);
        }
    }
    let wide_of = |bytes: usize| if bytes % 4 == 0 { DType::F32 } else { DType::F16 };
    let fwd = if fwd_bytes > 0 {
        let w = wide_of(fwd_bytes);
        [arena.alloc(w, batch * fwd_bytes / w.size())?, arena.alloc(w, batch * fwd_bytes / w.size())?]
    } else {
        [Buf::EMPTY; 2]
    };
    let shared_aux = if fwd_aux > 0 { arena.alloc(DType::I32, batch * fwd_aux)? } else { Buf::EMPTY };
    let mut next_fwd = 0;
    let mut prev = input;
    // Gradient and scratch buffers hold the widest tensor in the widest dtype any layer uses (gradients only
    // flow through the layers from the first trainable one on).
    let mut widest_bytes = if first == 0 { model.input().len() * c.size() } else { 0 };
    let mut scratch_bytes_per = 0;
    for (i, layer) in model.layers().iter().enumerate() {
        let d = dtypes[i];
        if prev.dtype != d && layer.param_len() > 0 {
            casts[i] = arena.alloc(d, batch * layer.in_shape().len())?;
        }
        let out = layer.out_shape().len();
        acts[i] = if layer.aliases_input() {
            prev
        } else if forward_only(i) {
            let b = retype(fwd[next_fwd], d, batch * out);
            next_fwd ^= 1;
            b
        } else {
            arena.alloc(d, batch * out)?
        };
        let (aux_len, aux_dtype) = layer.aux_len();
        if aux_len > 0 {
            aux[i] = if i < first {
                retype(shared_aux, aux_dtype, batch * aux_len)
            } else {
                arena.alloc(aux_dtype, batch * aux_len)?
            };
        }
        prev = acts[i];
        let in_dtype = if i == 0 { c } else { dtypes[i - 1] };
        if i >= first {
            widest_bytes = widest_bytes.max(out * d.size());
            if i > first || first == 0 {
                widest_bytes = widest_bytes.max(layer.in_shape().len() * d.size().max(in_dtype.size()));
            }
        }
        scratch_bytes_per = scratch_bytes_per.max(layer.scratch_len() * d.size());
    }
    let loss = arena.alloc(DType::F32, 1)?;
    let before = arena.used();
    // Allocated as bytes-worth of u8-sized units through a 16- or 32-bit dtype; views retype them per layer.
    let wide = wide_of(widest_bytes);
    let grad_a = arena.alloc(wide, batch * widest_bytes / wide.size())?;
    let grad_b = arena.alloc(wide, batch * widest_bytes / wide.size())?;
    let scratch = arena.alloc(wide, (batch * scratch_bytes_per).div_ceil(wide.size()))?;
    let last = dtypes[model.layers().len() - 1];
    let dlogits = if last != DType::F32 { arena.alloc(DType::F32, batch * model.classes())? } else { Buf::EMPTY };
    let wb = widen_bytes(model, policy, layout, frozen_dtype);
    let widen = if wb > 0 { arena.alloc(DType::F16, wb / 2)? } else { Buf::EMPTY };
    // The forward-only buffers are temporaries too: count them as scratch, not as kept activations.
    let fwd_part = fwd[0].bytes() + fwd[1].bytes();
    let scratch_bytes = arena.used() - before + fwd_part;
    Ok(StepBufs { input, labels, acts, aux, casts, loss, grad_a, grad_b, scratch, dlogits, widen, scratch_bytes })
}

/// The same bytes as `b`, seen as `len` elements of `dtype` (ping-pong and scratch buffers serve layers of
/// different dtypes).
pub(crate) fn retype(b: Buf, dtype: DType, len: usize) -> Buf {
    debug_assert!(len * dtype.size() <= b.bytes());
    Buf { offset: b.offset, len, dtype }
}

//! Checkpoints in the [safetensors](https://huggingface.co/docs/safetensors) format: PyTorch
//! (`safetensors.torch.load_file`) and the `safetensors` crate read them, and [`load`] resumes training bit
//! for bit. No heap: [`save`] writes into a caller's slice of [`checkpoint_len`] bytes, [`load`] reads a slice.
//!
//! ```text
//! [0, 8)        N: u64 little-endian, the header's length in bytes
//! [8, 8 + N)    JSON header, padded with spaces to a multiple of 8 (so the data starts 8-byte aligned)
//! [8 + N, end)  tensor data, f32 little-endian; each tensor's data_offsets [begin, end) count from 8 + N
//! ```
//!
//! The header (one line in the file; wrapped here):
//! ```text
//! {"__metadata__":{"format":"mantissa","format_version":"1",
//!                  "model":"input(784);Linear(784,256);ReLU;Linear(256,10)","policy":"mixed_float16",
//!                  "optimizer":"AdamW","optimizer.lr":"0.002",...,"updates":"125","skipped":"2",
//!                  "loss_scale":"dynamic","loss_scale.scale":"16384","loss_scale.good_steps":"3",...},
//!  "0.weight":{"dtype":"F32","shape":[256,784],"data_offsets":[0,802816]},
//!  "0.bias":{"dtype":"F32","shape":[256],"data_offsets":[802816,803840]},
//!  "2.weight":..., "2.bias":...,
//!  "optimizer.0.weight.exp_avg":..., ..., "optimizer.2.bias.exp_avg_sq":...}
//! ```
//!
//! - Master weights (f32) are named as the state_dict of the same `torch.nn.Sequential` (`{layer}.weight`,
//!   `{layer}.bias`; layer indices count every layer, ReLU included) with PyTorch's shapes (`Linear`:
//!   `[out, in]`, `Conv2d`: `[out, in, k, k]`), so `model.load_state_dict(sd, strict=False)` takes them.
//! - Optimizer state is `optimizer.{layer}.{param}.{state}` with `torch.optim`'s state names: AdamW
//!   `exp_avg`, `exp_avg_sq`; SGD `momentum_buffer` (none without momentum). `updates` is torch's `step`.
//! - `__metadata__` (a string map, as safetensors requires) holds the format version, the architecture
//!   fingerprint (see [`fingerprint`]), the policy, the optimizer and its hyper-parameters, the update and skip
//!   counters, and the whole loss-scale state.
//! - Data is in header order: all master weights, then the first optimizer state, then the second; each of
//!   these is the trainer's flat f32 vector verbatim.
//!
//! What [`load`] restores, and what it refuses:
//! - It restores the master weights (then recomputes the working copy), the optimizer state, the learning
//!   rate, the counters and the loss scale. The other hyper-parameters and the policy stay the trainer's own
//!   (they were chosen when it was built); give it the same ones for a bit-exact resume.
//! - A checkpoint saved under another precision policy loads (master weights and state are f32 under every
//!   policy); the loss scale is then not restored, since a scale tuned to one compute dtype means nothing
//!   for another: the trainer keeps its own.
//! - It refuses another model (the architecture fingerprint differs), another optimizer (or SGD with and
//!   without momentum), and anything malformed: a truncated file, broken JSON, a missing, unknown or
//!   duplicated tensor, a dtype other than F32, a wrong shape, data offsets out of range, overlapping or
//!   leaving gaps, a non-finite or inconsistent loss scale. Each is an [`Error::Checkpoint`] saying which.
//! - It checks everything before writing anything: after an error the trainer is as it was.
//!
//! - It refuses partially trainable trainers ([`crate::trainable::Trainable`] other than `All`), for save and
//!   load alike: they keep no f32 master copy or optimizer state for frozen tensors. Move their weights with
//!   [`Trainer::load_weights`] and [`Trainer::read_weights`] (every parameter, in the checkpoint's order).
//!
//! Stack use: [`load`] keeps a 24-byte record for each possible tensor (`6 * MAX_LAYERS` of them), 4.6 KiB.

use core::fmt::{self, Display, Write};

use crate::arena::Buf;
use crate::backend::{Backend, ParamBufs};
use crate::error::{Error, Result};
use crate::layers::Layer;
use crate::loss_scale::{DynamicConfig, DynamicLossScale, LossScale};
use crate::model::{Model, MAX_LAYERS};
use crate::optim::Optimizer;
use crate::policy::Policy;
use crate::trainer::Trainer;

/// The value of the `format` metadata key.
pub const FORMAT: &str = "mantissa";

/// The version this build writes and reads (`format_version`).
pub const FORMAT_VERSION: u32 = 1;

/// At most 2 tensors (weight, bias) per layer, each with master weights and up to 2 optimizer states.
const MAX_TENSORS: usize = MAX_LAYERS * 2 * 3;

/// Bytes of the checkpoint of `trainer` as it is now: what [`save`] writes.
pub fn checkpoint_len<B: Backend>(trainer: &Trainer<B>) -> usize {
    let state = State::of(trainer);
    let (_, total) = sizes(&state);
    total
}

/// Writes the checkpoint of `trainer` into `out[..checkpoint_len(trainer)]` and returns that length.
/// `out` may be longer; the bytes after the checkpoint are not touched.
pub fn save<B: Backend>(trainer: &mut Trainer<B>, out: &mut [u8]) -> Result<usize> {
    refuse_partial(trainer)?;
    trainer.sync_state()?;
    let state = State::of(trainer);
    let n_states = state.layout.n_states;
    let (header_len, total) = sizes(&state);
    if out.len() < total {
        return Err(Error::ShapeMismatch {
            what: "checkpoint output buffer bytes (at least checkpoint_len)",
            expected: total,
            got: out.len(),
        });
    }
    let out = &mut out[..total];
    let (len_bytes, rest) = out.split_at_mut(8);
    let (header, mut data) = rest.split_at_mut(header_len);
    len_bytes.copy_from_slice(&(header_len as u64).to_le_bytes());
    let mut cursor = Cursor { buf: header, pos: 0 };
    write_header(&mut cursor, &state)
        .map_err(|_| Error::Checkpoint("internal error: the header outgrew its measured length"))?;
    let written = cursor.pos;
    header[written..].fill(b' ');

    // The data is each flat vector verbatim: the header gave every tensor its range within it.
    let p = *trainer.params();
    for buf in parts(&p, n_states) {
        let (this, rest) = data.split_at_mut(buf.bytes());
        trainer.backend_mut().download_bytes(buf, this)?;
        data = rest;
    }
    Ok(total)
}

/// Restores `trainer` from a checkpoint written by [`save`] (or any safetensors file with the same tensors
/// and metadata). See the module documentation for what is restored and what is refused. On error the
/// trainer is unchanged (short of a device failing in the middle of the upload).
pub fn load<B: Backend>(trainer: &mut Trainer<B>, bytes: &[u8]) -> Result<()> {
    refuse_partial(trainer)?;
    let (text, data) = split(bytes)?;
    let state = State::of(trainer);
    let parsed = parse(text, state.layout)?;
    let restore = check(&parsed, &state, data.len())?;
    let count = state.layout.tensors().count();

    // Everything is checked: from here on only the backend can fail.
    let p = *trainer.params();
    for i in 0..count {
        // The layout borrows the trainer, which the upload needs mutably: look each tensor up afresh (at most
        // 192 tensors, so the quadratic walk costs nothing next to the copy).
        let spec = Layout::new(trainer.model(), trainer.optimizer()).tensors().nth(i);
        let (Some(spec), Some(entry)) = (spec, parsed.slots[i]) else {
            return Err(Error::Checkpoint("internal error: the tensor list changed during load"));
        };
        let src = &data[entry.begin as usize..entry.end as usize];
        trainer.backend_mut().upload_bytes(spec.buf(&p), src)?;
    }
    if p.working != p.master {
        trainer.backend_mut().cast(p.master, p.working)?;
    }
    trainer.set_lr(restore.lr)?;
    if let Some(s) = restore.loss_scale {
        trainer.set_loss_scale(s)?;
    }
    trainer.set_counters(restore.updates, restore.skipped)
}

/// Checkpoints hold every parameter's f32 master weights and optimizer state; a partially trainable trainer
/// has neither for its frozen tensors. Its weights go in and out with [`Trainer::load_weights`] and
/// [`Trainer::read_weights`] instead.
fn refuse_partial<B: Backend>(trainer: &Trainer<B>) -> Result<()> {
    if trainer.layout().trainable().is_partial() {
        return Err(Error::Checkpoint(
            "checkpoints of a partially trainable trainer (Trainable::LastLayers / BiasOnly) are not supported: \
             use Trainer::read_weights / load_weights, or save from a trainer with Trainable::All",
        ));
    }
    Ok(())
}

/// The architecture fingerprint stored as `model`: the input shape and every layer with the numbers that
/// fix its parameters' and outputs' shapes, e.g. `input(784);Linear(784,256);ReLU;Linear(256,10)` or
/// `input(1x28x28);Conv2d(1,8,k=5,s=1,p=2);ReLU;MaxPool2d(k=2,s=2);...`.
pub fn fingerprint(model: &Model) -> Fingerprint<'_> {
    Fingerprint(model)
}

/// See [`fingerprint`].
#[derive(Clone, Copy, Debug)]
pub struct Fingerprint<'m>(&'m Model);

impl Display for Fingerprint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "input({})", self.0.input())?;
        for layer in self.0.layers() {
            f.write_char(';')?;
            match layer {
                Layer::Linear(l) => write!(f, "Linear({},{})", l.in_features, l.out_features)?,
                Layer::Conv2d(l) => {
                    let g = &l.geom;
                    write!(
                        f,
                        "Conv2d({},{},k={},s={},p={})",
                        g.channels, l.out_channels, g.kernel, g.stride, g.padding
                    )?
                }
                Layer::MaxPool2d(l) => write!(f, "MaxPool2d(k={},s={})", l.geom.kernel, l.geom.stride)?,
                Layer::Relu(_) | Layer::Gelu(_) | Layer::Flatten(_) => f.write_str(layer.kind())?,
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
// What a checkpoint holds.

/// The tensors of a model trained with an optimizer, in file order.
#[derive(Clone, Copy, Debug)]
struct Layout<'m> {
    model: &'m Model,
    /// torch's names of the optimizer's state vectors.
    state_names: [&'static str; 2],
    n_states: usize,
}

impl<'m> Layout<'m> {
    fn new(model: &'m Model, optimizer: &Optimizer) -> Self {
        let state_names = match optimizer {
            Optimizer::AdamW(_) => ["exp_avg", "exp_avg_sq"],
            Optimizer::Sgd(_) => ["momentum_buffer", ""],
        };
        Layout { model, state_names, n_states: optimizer.state_vectors() }
    }

    /// Part-major (master, state 1, state 2), then layer by layer, weight before bias: the order of the flat
    /// vectors, so each part's tensors tile its vector.
    fn tensors(self) -> impl Iterator<Item = TensorSpec> + 'm {
        let Layout { model, state_names, n_states } = self;
        (0..=n_states).flat_map(move |part| {
            model.layers().iter().enumerate().flat_map(move |(layer, l)| {
                l.tensors().into_iter().map(move |(param, offset, shape)| {
                    let mut dims = [0usize; 4];
                    dims[..shape.len()].copy_from_slice(&shape);
                    let state = if part == 0 { "" } else { state_names[part - 1] };
                    TensorSpec { part, layer, param, state, offset, dims, rank: shape.len() }
                })
            })
        })
    }

    /// Bytes of tensor data: each part is one flat vector of `param_len` f32s, which its tensors tile.
    fn data_len(self) -> usize {
        debug_assert_eq!(
            self.tensors().map(|t| t.bytes()).sum::<usize>(),
            self.model.param_len() * 4 * (1 + self.n_states)
        );
        self.model.param_len() * 4 * (1 + self.n_states)
    }
}

/// One tensor of the checkpoint.
#[derive(Clone, Copy, Debug)]
struct TensorSpec {
    /// 0: master weights, 1 and 2: optimizer state vectors.
    part: usize,
    layer: usize,
    /// `weight` or `bias`.
    param: &'static str,
    /// torch's state name (empty for master weights).
    state: &'static str,
    /// Elements into the flat vector.
    offset: usize,
    dims: [usize; 4],
    rank: usize,
}

impl TensorSpec {
    fn len(&self) -> usize {
        self.dims[..self.rank].iter().product()
    }

    fn bytes(&self) -> usize {
        self.len() * 4
    }

    fn buf(&self, p: &ParamBufs) -> Buf {
        [p.master, p.state1, p.state2][self.part].slice(self.offset, self.len())
    }
}

/// The tensor's name in the file.
impl Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.part == 0 {
            write!(f, "{}.{}", self.layer, self.param)
        } else {
            write!(f, "optimizer.{}.{}.{}", self.layer, self.param, self.state)
        }
    }
}

/// The flat vectors whose bytes form the data section, in order.
fn parts(p: &ParamBufs, n_states: usize) -> impl Iterator<Item = Buf> {
    [p.master, p.state1, p.state2].into_iter().take(1 + n_states)
}

/// Everything but the tensor data: what the header describes.
#[derive(Debug)]
struct State<'m> {
    layout: Layout<'m>,
    model: &'m Model,
    policy: Policy,
    optimizer: Optimizer,
    loss_scale: LossScale,
    updates: u64,
    skipped: u64,
}

impl<'m> State<'m> {
    fn of<B: Backend>(t: &'m Trainer<B>) -> Self {
        State {
            layout: Layout::new(t.model(), t.optimizer()),
            model: t.model(),
            policy: t.policy(),
            optimizer: *t.optimizer(),
            loss_scale: *t.loss_scale(),
            updates: t.updates(),
            skipped: t.skipped(),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Metadata keys that `load` reads (the writer uses the same table, so the two cannot drift apart).

struct Key {
    name: &'static str,
    missing: &'static str,
    invalid: &'static str,
}

macro_rules! key {
    ($name:literal, $invalid:literal) => {
        Key { name: $name, missing: concat!("checkpoint metadata lacks \"", $name, "\""), invalid: $invalid }
    };
}

#[derive(Clone, Copy)]
enum K {
    Format,
    FormatVersion,
    Model,
    Policy,
    Optimizer,
    Lr,
    Momentum,
    Updates,
    Skipped,
    LossScale,
    Scale,
    GoodSteps,
    HysteresisLeft,
    InitialScale,
    GrowthFactor,
    BackoffFactor,
    GrowthInterval,
    Hysteresis,
    MinScale,
}

const KEYS: [Key; 19] = [
    key!("format", "not a mantissa checkpoint: metadata \"format\" is not \"mantissa\""),
    key!("format_version", "unsupported checkpoint format_version: this build reads version 1"),
    key!(
        "model",
        "checkpoint is of another model: its architecture fingerprint (\"model\") differs from the trainer's"
    ),
    key!("policy", "checkpoint metadata \"policy\" is not float32, mixed_float16 or mixed_bfloat16"),
    key!("optimizer", "checkpoint was saved with another optimizer than the trainer's: its state does not apply"),
    key!("optimizer.lr", "checkpoint learning rate (\"optimizer.lr\") is not a finite number > 0"),
    key!(
        "optimizer.momentum",
        "checkpoint SGD momentum is zero where the trainer's is not (or the reverse): the momentum buffers do not match"
    ),
    key!("updates", "checkpoint metadata \"updates\" is not a non-negative integer"),
    key!("skipped", "checkpoint metadata \"skipped\" is not a non-negative integer"),
    key!("loss_scale", "checkpoint metadata \"loss_scale\" is not none, fixed or dynamic"),
    key!("loss_scale.scale", "checkpoint loss scale (\"loss_scale.scale\") is not a finite number > 0"),
    key!("loss_scale.good_steps", "checkpoint loss-scale good_steps is not an integer below growth_interval"),
    key!("loss_scale.hysteresis_left", "checkpoint loss-scale hysteresis_left is not an integer in 1..=hysteresis"),
    key!("loss_scale.initial_scale", "checkpoint loss-scale initial_scale is not a number"),
    key!("loss_scale.growth_factor", "checkpoint loss-scale growth_factor is not a number"),
    key!("loss_scale.backoff_factor", "checkpoint loss-scale backoff_factor is not a number"),
    key!("loss_scale.growth_interval", "checkpoint loss-scale growth_interval is not an integer"),
    key!("loss_scale.hysteresis", "checkpoint loss-scale hysteresis is not an integer"),
    key!("loss_scale.min_scale", "checkpoint loss-scale min_scale is not a number"),
];

fn name(k: K) -> &'static str {
    KEYS[k as usize].name
}

// ---------------------------------------------------------------------------------------------------------
// Writing.

/// `(padded header length N, whole file length)`.
fn sizes(state: &State) -> (usize, usize) {
    let mut counter = Counter(0);
    // Counting cannot fail.
    let _ = write_header(&mut counter, state);
    let header_len = counter.0.next_multiple_of(8);
    (header_len, 8 + header_len + state.layout.data_len())
}

fn write_header<W: Write>(w: &mut W, s: &State) -> fmt::Result {
    w.write_str("{\"__metadata__\":{")?;
    let mut m = Meta { w: &mut *w, first: true };
    m.entry(name(K::Format), FORMAT)?;
    m.entry(name(K::FormatVersion), FORMAT_VERSION)?;
    m.entry(name(K::Model), fingerprint(s.model))?;
    m.entry(name(K::Policy), s.policy)?;
    m.entry(name(K::Optimizer), s.optimizer.name())?;
    match s.optimizer {
        Optimizer::AdamW(a) => {
            m.entry(name(K::Lr), a.lr)?;
            m.entry("optimizer.beta1", a.beta1)?;
            m.entry("optimizer.beta2", a.beta2)?;
            m.entry("optimizer.eps", a.eps)?;
            m.entry("optimizer.weight_decay", a.weight_decay)?;
        }
        Optimizer::Sgd(o) => {
            m.entry(name(K::Lr), o.lr)?;
            m.entry(name(K::Momentum), o.momentum)?;
            m.entry("optimizer.nesterov", o.nesterov)?;
            m.entry("optimizer.weight_decay", o.weight_decay)?;
        }
    }
    m.entry(name(K::Updates), s.updates)?;
    m.entry(name(K::Skipped), s.skipped)?;
    m.entry(name(K::LossScale), s.loss_scale.name())?;
    match s.loss_scale {
        LossScale::None => {}
        LossScale::Fixed(v) => m.entry(name(K::Scale), v)?,
        LossScale::Dynamic(d) => {
            // f32 `Display` prints the shortest decimal that parses back to the same bits.
            m.entry(name(K::Scale), d.scale)?;
            m.entry(name(K::GoodSteps), d.good_steps)?;
            m.entry(name(K::HysteresisLeft), d.hysteresis_left)?;
            m.entry(name(K::InitialScale), d.config.initial_scale)?;
            m.entry(name(K::GrowthFactor), d.config.growth_factor)?;
            m.entry(name(K::BackoffFactor), d.config.backoff_factor)?;
            m.entry(name(K::GrowthInterval), d.config.growth_interval)?;
            m.entry(name(K::Hysteresis), d.config.hysteresis)?;
            m.entry(name(K::MinScale), d.config.min_scale)?;
        }
    }
    w.write_char('}')?;

    // Each part's data is its flat vector verbatim, so a tensor's range follows from its offset in it.
    let part_bytes = s.model.param_len() * 4;
    for t in s.layout.tensors() {
        // Names and numbers need no escaping.
        write!(w, ",\"{t}\":{{\"dtype\":\"F32\",\"shape\":[")?;
        for (i, d) in t.dims[..t.rank].iter().enumerate() {
            if i > 0 {
                w.write_char(',')?;
            }
            write!(w, "{d}")?;
        }
        let begin = t.part * part_bytes + t.offset * 4;
        write!(w, "],\"data_offsets\":[{begin},{}]}}", begin + t.bytes())?;
    }
    w.write_char('}')
}

/// Writes `"key":"value"` pairs of the metadata map.
struct Meta<'w, W: Write> {
    w: &'w mut W,
    first: bool,
}

impl<W: Write> Meta<'_, W> {
    fn entry(&mut self, key: &str, value: impl Display) -> fmt::Result {
        if !self.first {
            self.w.write_char(',')?;
        }
        self.first = false;
        write!(self.w, "\"{key}\":\"")?;
        write!(Escape(&mut *self.w), "{value}")?;
        self.w.write_char('"')
    }
}

/// Measures what would be written.
struct Counter(usize);

impl Write for Counter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

/// Writes into a byte slice; fails (rather than truncating) when it is full.
struct Cursor<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.pos.checked_add(s.len()).ok_or(fmt::Error)?;
        self.buf.get_mut(self.pos..end).ok_or(fmt::Error)?.copy_from_slice(s.as_bytes());
        self.pos = end;
        Ok(())
    }
}

/// JSON string escaping.
struct Escape<'w, W: Write>(&'w mut W);

impl<W: Write> Write for Escape<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '"' => self.0.write_str("\\\"")?,
                '\\' => self.0.write_str("\\\\")?,
                c if (c as u32) < 0x20 => write!(self.0, "\\u{:04x}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Reading.

/// Splits a file into its header text and its data section.
fn split(bytes: &[u8]) -> Result<(&str, &[u8])> {
    let Some((len, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(Error::Checkpoint("checkpoint truncated: shorter than the 8-byte header length"));
    };
    let n = u64::from_le_bytes(*len);
    if n > rest.len() as u64 {
        return Err(Error::Checkpoint(
            "checkpoint truncated: the header length (first 8 bytes) is beyond the end of the file",
        ));
    }
    let (header, data) = rest.split_at(n as usize);
    let text = core::str::from_utf8(header).map_err(|_| Error::Checkpoint("checkpoint header is not UTF-8"))?;
    Ok((text, data))
}

/// Where the header says a tensor is, and whether its dtype and shape are what the model needs.
#[derive(Clone, Copy, Debug)]
struct Entry {
    begin: u64,
    end: u64,
    f32: bool,
    shape_ok: bool,
}

/// The header, parsed against the tensors the trainer needs. Problems that say *what* is wrong (a missing
/// tensor, another model) are collected and reported by [`check`] in order of importance, so a checkpoint of
/// another model is reported as that, not as its first unexpected tensor name.
struct Parsed<'a> {
    meta: [Option<JStr<'a>>; KEYS.len()],
    has_meta: bool,
    /// Indexed like [`Layout::tensors`].
    slots: [Option<Entry>; MAX_TENSORS],
    unknown_tensor: bool,
    duplicate: bool,
}

fn parse<'a>(text: &'a str, layout: Layout) -> Result<Parsed<'a>> {
    let mut p = Parsed {
        meta: [None; KEYS.len()],
        has_meta: false,
        slots: [None; MAX_TENSORS],
        unknown_tensor: false,
        duplicate: false,
    };
    let mut j = Json { text, pos: 0 };
    j.eat(b'{', "checkpoint header is not a JSON object")?;
    j.list(b'}', |j| {
        let key = j.string("checkpoint header: expected a tensor name (a JSON string)")?;
        j.eat(b':', "checkpoint header: expected ':' after a name")?;
        if key.is("__metadata__") {
            p.duplicate |= p.has_meta;
            p.has_meta = true;
            j.eat(b'{', "checkpoint __metadata__ is not a JSON object")?;
            return j.list(b'}', |j| {
                let k = j.string("checkpoint __metadata__: expected a key (a JSON string)")?;
                j.eat(b':', "checkpoint __metadata__: expected ':' after a key")?;
                let v = j.string("checkpoint __metadata__ values must be strings")?;
                if let Some(i) = KEYS.iter().position(|key| k.is(key.name)) {
                    p.duplicate |= p.meta[i].is_some();
                    p.meta[i] = Some(v);
                }
                Ok(())
            });
        }
        let found = layout.tensors().enumerate().find(|(_, t)| key.is(t));
        let entry = tensor_info(j, found.map(|(_, t)| t))?;
        match found {
            Some((i, _)) => {
                let slot = &mut p.slots[i];
                p.duplicate |= slot.is_some();
                *slot = Some(entry);
            }
            None => p.unknown_tensor = true,
        }
        Ok(())
    })?;
    j.ws();
    if j.pos != text.len() {
        return Err(Error::Checkpoint("checkpoint header has characters after its JSON object (other than spaces)"));
    }
    Ok(p)
}

/// Parses `{"dtype":..., "shape":[...], "data_offsets":[b, e]}`, comparing the shape with `spec`'s.
fn tensor_info(j: &mut Json, spec: Option<TensorSpec>) -> Result<Entry> {
    let (mut dtype, mut shape, mut offsets) = (None, None, None);
    j.eat(b'{', "checkpoint header: a tensor entry is not a JSON object")?;
    j.list(b'}', |j| {
        let k = j.string("checkpoint header: expected a key in a tensor entry")?;
        j.eat(b':', "checkpoint header: expected ':' after a key")?;
        if k.is("dtype") {
            dtype = Some(j.string("checkpoint header: a tensor's dtype is not a string")?.is("F32"));
        } else if k.is("shape") {
            let (mut rank, mut same) = (0, true);
            j.eat(b'[', "checkpoint header: a tensor's shape is not an array")?;
            j.list(b']', |j| {
                let d = j.uint("checkpoint header: a tensor's shape holds something other than integers")?;
                same &= spec.is_some_and(|s| rank < s.rank && s.dims[rank] as u64 == d);
                rank += 1;
                Ok(())
            })?;
            shape = Some(same && spec.is_some_and(|s| s.rank == rank));
        } else if k.is("data_offsets") {
            let (mut n, mut v) = (0, [0u64; 2]);
            j.eat(b'[', "checkpoint header: a tensor's data_offsets is not an array")?;
            j.list(b']', |j| {
                let x = j.uint("checkpoint header: a tensor's data_offsets holds something other than integers")?;
                if n < 2 {
                    v[n] = x;
                }
                n += 1;
                Ok(())
            })?;
            if n != 2 {
                return Err(Error::Checkpoint("checkpoint header: a tensor's data_offsets is not a pair [begin, end]"));
            }
            offsets = Some(v);
        } else {
            j.skip_value(0)?;
        }
        Ok(())
    })?;
    match (dtype, shape, offsets) {
        (Some(f32), Some(shape_ok), Some([begin, end])) => Ok(Entry { begin, end, f32, shape_ok }),
        _ => Err(Error::Checkpoint("checkpoint header: a tensor entry lacks dtype, shape or data_offsets")),
    }
}

/// What `load` writes into the trainer besides the tensors.
struct Restore {
    lr: f32,
    updates: u64,
    skipped: u64,
    /// `None`: the policy differs, the trainer keeps its own.
    loss_scale: Option<LossScale>,
}

/// Every check, in order of importance: format, model, optimizer, tensors, data ranges, metadata values.
fn check(p: &Parsed, s: &State, data_len: usize) -> Result<Restore> {
    if !p.has_meta {
        return Err(Error::Checkpoint("not a mantissa checkpoint: the header has no __metadata__"));
    }
    let meta = |k: K| p.meta[k as usize].ok_or(Error::Checkpoint(KEYS[k as usize].missing));
    let invalid = |k: K| Error::Checkpoint(KEYS[k as usize].invalid);
    let expect = |k: K, want: &dyn Display| if meta(k)?.is(want) { Ok(()) } else { Err(invalid(k)) };
    expect(K::Format, &FORMAT)?;
    expect(K::FormatVersion, &FORMAT_VERSION)?;
    expect(K::Model, &fingerprint(s.model))?;
    expect(K::Optimizer, &s.optimizer.name())?;
    if let Optimizer::Sgd(o) = s.optimizer {
        if (number::<f32>(meta(K::Momentum)?).ok_or(invalid(K::Momentum))? != 0.0) != (o.momentum != 0.0) {
            return Err(invalid(K::Momentum));
        }
    }
    if p.duplicate {
        return Err(Error::Checkpoint("checkpoint header names a tensor or metadata key twice"));
    }
    if p.unknown_tensor {
        return Err(Error::Checkpoint(
            "checkpoint holds a tensor this trainer does not have (neither a parameter nor its optimizer state)",
        ));
    }

    // Tensors: present, F32, the model's shape, and a byte range that fits it.
    let data_len = data_len as u64;
    let mut covered = 0u64;
    for (i, t) in s.layout.tensors().enumerate() {
        let Some(e) = p.slots[i] else {
            return Err(Error::Checkpoint(if t.part == 0 {
                "checkpoint lacks one of this model's parameter tensors (named like 0.weight, 0.bias)"
            } else {
                "checkpoint lacks one of the optimizer's state tensors (named like optimizer.0.weight.exp_avg)"
            }));
        };
        if !e.f32 {
            return Err(Error::Checkpoint("checkpoint tensor dtype is not F32 (master weights and state are f32)"));
        }
        if !e.shape_ok {
            return Err(Error::Checkpoint("checkpoint tensor shape differs from the model's"));
        }
        if e.end < e.begin || e.end - e.begin != t.bytes() as u64 {
            return Err(Error::Checkpoint(
                "checkpoint tensor data_offsets [begin, end) do not span its shape's size (elements x 4 bytes)",
            ));
        }
        if e.end > data_len {
            return Err(Error::Checkpoint("checkpoint truncated: a tensor's data runs past the end of the file"));
        }
        covered += e.end - e.begin;
    }
    let n = s.layout.tensors().count();
    for a in 0..n {
        for b in a + 1..n {
            if let (Some(x), Some(y)) = (p.slots[a], p.slots[b]) {
                if x.begin < y.end && y.begin < x.end {
                    return Err(Error::Checkpoint("checkpoint tensors' data_offsets overlap"));
                }
            }
        }
    }
    // Disjoint and in range: covering the data section means summing to it.
    if covered != data_len {
        return Err(Error::Checkpoint(
            "checkpoint data section holds bytes no tensor covers (safetensors requires exact coverage)",
        ));
    }

    // Metadata values.
    let policy = {
        let mut buf = [0u8; 16];
        let name = meta(K::Policy)?.decode(&mut buf).ok_or(invalid(K::Policy))?;
        Policy::from_name(name).map_err(|_| invalid(K::Policy))?
    };
    let lr: f32 = number(meta(K::Lr)?).ok_or(invalid(K::Lr))?;
    let mut optimizer = s.optimizer;
    optimizer.set_lr(lr);
    optimizer.validate().map_err(|_| invalid(K::Lr))?;
    let updates = number(meta(K::Updates)?).ok_or(invalid(K::Updates))?;
    let skipped = number(meta(K::Skipped)?).ok_or(invalid(K::Skipped))?;
    let loss_scale = loss_scale(&meta, &invalid)?;
    Ok(Restore { lr, updates, skipped, loss_scale: (policy == s.policy).then_some(loss_scale) })
}

fn loss_scale<'a>(meta: &dyn Fn(K) -> Result<JStr<'a>>, invalid: &dyn Fn(K) -> Error) -> Result<LossScale> {
    let f = |k: K| -> Result<f32> { number(meta(k)?).ok_or(invalid(k)) };
    let u = |k: K| -> Result<u32> { number(meta(k)?).ok_or(invalid(k)) };
    let positive = |x: f32| x.is_finite() && x > 0.0;
    let mode = meta(K::LossScale)?;
    if mode.is("none") {
        Ok(LossScale::None)
    } else if mode.is("fixed") {
        let scale = f(K::Scale)?;
        LossScale::fixed(scale).map_err(|_| invalid(K::Scale))
    } else if mode.is("dynamic") {
        let config = DynamicConfig {
            initial_scale: f(K::InitialScale)?,
            growth_factor: f(K::GrowthFactor)?,
            backoff_factor: f(K::BackoffFactor)?,
            growth_interval: u(K::GrowthInterval)?,
            hysteresis: u(K::Hysteresis)?,
            min_scale: f(K::MinScale)?,
        };
        config.validate().map_err(|_| {
            Error::Checkpoint(
                "checkpoint dynamic loss-scale configuration is out of range (factors, interval, minimum)",
            )
        })?;
        let scale = f(K::Scale)?;
        if !positive(scale) {
            return Err(invalid(K::Scale));
        }
        let good_steps = u(K::GoodSteps)?;
        if good_steps >= config.growth_interval {
            return Err(invalid(K::GoodSteps));
        }
        let hysteresis_left = u(K::HysteresisLeft)?;
        if !(1..=config.hysteresis).contains(&hysteresis_left) {
            return Err(invalid(K::HysteresisLeft));
        }
        Ok(LossScale::Dynamic(DynamicLossScale { config, scale, good_steps, hysteresis_left }))
    } else {
        Err(invalid(K::LossScale))
    }
}

/// A metadata string parsed as a number (`None` if it is not one, or longer than any number we write).
fn number<T: core::str::FromStr>(v: JStr) -> Option<T> {
    let mut buf = [0u8; 64];
    v.decode(&mut buf)?.parse().ok()
}

/// A JSON string as it appears between the quotes (escapes not yet decoded; checked well-formed).
#[derive(Clone, Copy, Debug)]
struct JStr<'a>(&'a str);

impl<'a> JStr<'a> {
    fn chars(self) -> Unescape<'a> {
        Unescape(self.0.chars())
    }

    /// Whether the decoded string equals `d`'s `Display` output (compared as it is formatted: no buffer).
    fn is(self, d: impl Display) -> bool {
        let mut m = Match { rest: self.chars(), ok: true };
        let _ = write!(m, "{d}");
        m.ok && m.rest.next().is_none()
    }

    /// Decodes into `buf`; `None` if it does not fit.
    fn decode(self, buf: &mut [u8]) -> Option<&str> {
        let mut n = 0;
        for c in self.chars() {
            let end = n + c.len_utf8();
            c.encode_utf8(buf.get_mut(n..end)?);
            n = end;
        }
        core::str::from_utf8(&buf[..n]).ok()
    }
}

/// Decodes JSON escapes (`\"`, `\n`, `\u00e9`, surrogate pairs; a lone surrogate becomes U+FFFD).
struct Unescape<'a>(core::str::Chars<'a>);

impl Unescape<'_> {
    fn hex4(&mut self) -> u32 {
        (0..4).fold(0, |acc, _| acc * 16 + self.0.next().and_then(|c| c.to_digit(16)).unwrap_or(0))
    }
}

impl Iterator for Unescape<'_> {
    type Item = char;
    fn next(&mut self) -> Option<char> {
        let c = self.0.next()?;
        if c != '\\' {
            return Some(c);
        }
        Some(match self.0.next()? {
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'u' => {
                let hi = self.hex4();
                if (0xd800..0xdc00).contains(&hi) {
                    let before = self.0.clone();
                    if self.0.next() == Some('\\') && self.0.next() == Some('u') {
                        let lo = self.hex4();
                        if (0xdc00..0xe000).contains(&lo) {
                            return char::from_u32(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00));
                        }
                    }
                    self.0 = before;
                }
                char::from_u32(hi).unwrap_or('\u{fffd}')
            }
            c => c, // '"', '\\', '/'
        })
    }
}

/// Compares formatted text against a JSON string, character by character.
struct Match<'a> {
    rest: Unescape<'a>,
    ok: bool,
}

impl Write for Match<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.rest.next() != Some(c) {
                self.ok = false;
                return Err(fmt::Error);
            }
        }
        Ok(())
    }
}

/// The subset of JSON a safetensors header uses (objects, arrays, strings, non-negative integers), plus
/// skipping any other value, over the header text with no allocation.
struct Json<'a> {
    text: &'a str,
    pos: usize,
}

/// Objects and arrays nested deeper than this inside a tensor entry are refused (bounded recursion).
const MAX_DEPTH: u32 = 16;

impl<'a> Json<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes().get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.bytes().get(self.pos).copied()
    }

    fn eat(&mut self, c: u8, msg: &'static str) -> Result<()> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(Error::Checkpoint(msg))
        }
    }

    /// The items of an object or array whose opening bracket was read, up to and including `close`.
    fn list(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        if self.peek() == Some(close) {
            self.pos += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(c) if c == close => {
                    self.pos += 1;
                    return Ok(());
                }
                _ if close == b'}' => {
                    return Err(Error::Checkpoint("checkpoint header: expected ',' or '}' in an object"))
                }
                _ => return Err(Error::Checkpoint("checkpoint header: expected ',' or ']' in an array")),
            }
        }
    }

    fn string(&mut self, msg: &'static str) -> Result<JStr<'a>> {
        self.eat(b'"', msg)?;
        let b = self.bytes();
        let start = self.pos;
        loop {
            match b.get(self.pos) {
                None => return Err(Error::Checkpoint("checkpoint header: a string is not terminated")),
                Some(b'"') => break,
                Some(b'\\') => match b.get(self.pos + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 2,
                    Some(b'u')
                        if b.get(self.pos + 2..self.pos + 6).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
                    {
                        self.pos += 6
                    }
                    _ => return Err(Error::Checkpoint("checkpoint header: invalid escape in a string")),
                },
                Some(c) if *c < 0x20 => {
                    return Err(Error::Checkpoint("checkpoint header: control character inside a string"))
                }
                Some(_) => self.pos += 1,
            }
        }
        // `start` and `pos` sit next to ASCII quotes: both are character boundaries.
        let s = JStr(&self.text[start..self.pos]);
        self.pos += 1;
        Ok(s)
    }

    fn uint(&mut self, msg: &'static str) -> Result<u64> {
        self.ws();
        let b = self.bytes();
        let start = self.pos;
        let mut v = 0u64;
        while let Some(&c @ b'0'..=b'9') = b.get(self.pos) {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(c - b'0')))
                .ok_or(Error::Checkpoint("checkpoint header: an integer does not fit in 64 bits"))?;
            self.pos += 1;
        }
        if self.pos == start || matches!(b.get(self.pos), Some(b'.' | b'e' | b'E')) {
            return Err(Error::Checkpoint(msg));
        }
        Ok(v)
    }

    /// Skips any JSON value (for keys of a tensor entry that safetensors may add and mantissa ignores).
    fn skip_value(&mut self, depth: u32) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::Checkpoint("checkpoint header: JSON nested too deeply"));
        }
        match self.peek() {
            Some(b'"') => self.string("").map(|_| ()),
            Some(b'{') => {
                self.pos += 1;
                self.list(b'}', |j| {
                    j.string("checkpoint header: expected a key (a JSON string)")?;
                    j.eat(b':', "checkpoint header: expected ':' after a key")?;
                    j.skip_value(depth + 1)
                })
            }
            Some(b'[') => {
                self.pos += 1;
                self.list(b']', |j| j.skip_value(depth + 1))
            }
            Some(b'-' | b'0'..=b'9') => {
                let start = self.pos;
                while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.bytes().get(self.pos) {
                    self.pos += 1;
                }
                match self.text[start..self.pos].parse::<f64>() {
                    Ok(_) => Ok(()),
                    Err(_) => Err(Error::Checkpoint("checkpoint header: malformed number")),
                }
            }
            _ => {
                for lit in ["true", "false", "null"] {
                    if self.text[self.pos..].starts_with(lit) {
                        self.pos += lit.len();
                        return Ok(());
                    }
                }
                Err(Error::Checkpoint("checkpoint header: expected a JSON value"))
            }
        }
    }
}

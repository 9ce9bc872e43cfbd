//! The personalisation scenario, one source file compiled three times: into the firmware (thumbv7em, no std),
//! into the host tool `examples/firmware_export.rs`, and into the host test `tests/firmware.rs`. Same model,
//! same blobs, same data order, same seed, same scalar reference backend: the final weights agree bit for bit.
//!
//! The includer declares `mc` as the mantissa API (`use mantissa_core as mc;` in firmware, `use mantissa as mc;`
//! on the host) before `mod scenario;`.
//!
//! Blobs (little-endian), written on the host by `firmware_export` and embedded with `include_bytes!`:
//! ```text
//! model.bin  "MTWB" | u32 version=1 | u32 params | u32 tensors | tensors x (u32 model_offset, u32 len, u32 dtype)
//!            | data: each tensor in its storage dtype (0 = f32, 1 = bf16), model order | u64 FNV-1a of the data
//! data.bin   "MTDS" | u32 side | u32 tune | u32 test | u32 clean | labels (u8 each, in that order)
//!            | pixels (u8, side x side per sample, same order)
//! ```
#![allow(dead_code)]

use super::mc;
use mc::{AdamW, Backend, DType, Error, Model, Optimizer, Policy, Result, Shape, TrainConfig, Trainable, Trainer};

/// Images are MNIST digits averaged 2x2 down to 14 x 14 (what a small sensor delivers; a quarter of the flash).
pub const SIDE: usize = 14;
pub const INPUT: usize = SIDE * SIDE;
pub const CLASSES: usize = 10;
/// Samples per fine-tuning step.
pub const BATCH: usize = 10;
/// Passes over the fine-tuning samples.
pub const EPOCHS: usize = 6;
pub const LR: f32 = 3e-3;
/// Seeds the order of the fine-tuning samples (and the trainer's initialisation, overwritten by the blob).
pub const SEED: u64 = 2026;
/// What trains on the device: the last two Linear layers; the first (most of the weights) stays frozen.
pub const TRAINABLE: Trainable = Trainable::LastLayers(2);
/// Frozen weights are stored (flash and RAM) in bf16 under the float32 policy the M4F gets.
pub const FROZEN_STORAGE: DType = DType::BF16;

/// 196 -> Linear 64 -> ReLU -> Linear 32 -> ReLU -> Linear 10.
pub fn model() -> Result<Model> {
    Model::sequential(Shape::flat(INPUT)).linear(64).relu().linear(32).relu().linear(CLASSES).build()
}

pub fn optimizer() -> Optimizer {
    AdamW::new(LR).weight_decay(0.0).into()
}

/// The fine-tuning configuration under `policy`.
pub fn config(policy: Policy) -> TrainConfig {
    TrainConfig::new(BATCH, policy).seed(SEED).trainable(TRAINABLE).frozen_storage(FROZEN_STORAGE)
}

/// The same model trained in full (for the side-by-side plan).
pub fn config_full(policy: Policy) -> TrainConfig {
    TrainConfig::new(BATCH, policy).seed(SEED)
}

// ---------------------------------------------------------------------------------------------------------
// The model blob.

pub const MODEL_MAGIC: [u8; 4] = *b"MTWB";
pub const DATA_MAGIC: [u8; 4] = *b"MTDS";
pub const DTYPE_F32: u32 = 0;
pub const DTYPE_BF16: u32 = 1;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn bad(msg: &'static str) -> Error {
    Error::Checkpoint(msg)
}

/// FNV-1a, 64-bit.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(pub u64);

impl Fnv {
    pub const fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// A checked view of `model.bin`.
#[derive(Clone, Copy, Debug)]
pub struct ModelBlob<'a> {
    bytes: &'a [u8],
    tensors: usize,
    data: usize,
}

impl<'a> ModelBlob<'a> {
    pub fn parse(bytes: &'a [u8], model: &Model) -> Result<ModelBlob<'a>> {
        if bytes.get(..4) != Some(&MODEL_MAGIC[..]) {
            return Err(bad("model blob: bad magic (not written by firmware_export)"));
        }
        if u32_at(bytes, 4) != Some(1) {
            return Err(bad("model blob: unsupported version"));
        }
        if u32_at(bytes, 8).map(|n| n as usize) != Some(model.param_len()) {
            return Err(bad("model blob: parameter count differs from the firmware's model"));
        }
        let tensors = u32_at(bytes, 12).ok_or(bad("model blob: truncated header"))? as usize;
        let data = 16 + 12 * tensors;
        let blob = ModelBlob { bytes, tensors, data };
        let mut end = data;
        let mut next = 0;
        for t in 0..tensors {
            let (off, len, dtype) = blob.tensor(t).ok_or(bad("model blob: truncated tensor table"))?;
            if off != next {
                return Err(bad("model blob: tensors do not tile the model's parameters in order"));
            }
            next = off + len;
            end += len * if dtype == DTYPE_F32 { 4 } else { 2 };
        }
        if next != model.param_len() || bytes.len() != end + 8 {
            return Err(bad("model blob: size does not match its tensor table"));
        }
        let mut h = Fnv::new();
        h.bytes(&bytes[data..end]);
        if u64::from_le_bytes(bytes[end..end + 8].try_into().map_err(|_| bad("model blob: truncated"))?) != h.0 {
            return Err(bad("model blob: checksum mismatch (corrupted)"));
        }
        Ok(blob)
    }

    /// `(model_offset, len, dtype)` of tensor `t`.
    fn tensor(&self, t: usize) -> Option<(usize, usize, u32)> {
        let at = 16 + 12 * t;
        let dtype = u32_at(self.bytes, at + 8)?;
        if dtype > DTYPE_BF16 {
            return None;
        }
        Some((u32_at(self.bytes, at)? as usize, u32_at(self.bytes, at + 4)? as usize, dtype))
    }

    /// Bytes of weight data.
    pub fn data_len(&self) -> usize {
        self.bytes.len() - self.data - 8
    }

    /// Fills `out` with parameters `at..at + out.len()` (model order, within one tensor), widened to f32.
    pub fn read(&self, at: usize, out: &mut [f32]) -> Result<()> {
        let mut pos = self.data;
        for t in 0..self.tensors {
            let (off, len, dtype) = self.tensor(t).ok_or(bad("model blob: truncated tensor table"))?;
            let size = if dtype == DTYPE_F32 { 4 } else { 2 };
            if at >= off && at + out.len() <= off + len {
                let base = pos + (at - off) * size;
                for (i, o) in out.iter_mut().enumerate() {
                    let b = &self.bytes[base + i * size..base + (i + 1) * size];
                    *o = if size == 4 {
                        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
                    } else {
                        f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
                    };
                }
                return Ok(());
            }
            pos += len * size;
        }
        Err(bad("model blob: a read spans tensors"))
    }
}

/// Loads the blob's weights into every parameter of `trainer` (frozen ones stay bf16, trainable ones f32).
pub fn load<B: Backend>(trainer: &mut Trainer<B>, blob: &ModelBlob) -> Result<()> {
    trainer.load_weights_with(|at, chunk| blob.read(at, chunk))
}

// ---------------------------------------------------------------------------------------------------------
// The data blob.

/// Which samples of the data blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Shifted digits to fine-tune on.
    Tune,
    /// Held-out shifted digits (other writers' digits than `Tune`).
    Test,
    /// Held-out digits as the base model saw them in training (to show nothing was forgotten).
    Clean,
}

#[derive(Clone, Copy, Debug)]
pub struct DataBlob<'a> {
    bytes: &'a [u8],
    counts: [usize; 3],
}

impl<'a> DataBlob<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<DataBlob<'a>> {
        if bytes.get(..4) != Some(&DATA_MAGIC[..]) {
            return Err(bad("data blob: bad magic (not written by firmware_export)"));
        }
        if u32_at(bytes, 4) != Some(SIDE as u32) {
            return Err(bad("data blob: image side differs from the firmware's"));
        }
        let c = |i: usize| u32_at(bytes, 8 + 4 * i).map(|n| n as usize).ok_or(bad("data blob: truncated header"));
        let counts = [c(0)?, c(1)?, c(2)?];
        let n: usize = counts.iter().sum();
        if bytes.len() != 20 + n * (1 + INPUT) {
            return Err(bad("data blob: size does not match its counts"));
        }
        if bytes[20..20 + n].iter().any(|&l| l as usize >= CLASSES) {
            return Err(bad("data blob: a label is out of range"));
        }
        Ok(DataBlob { bytes, counts })
    }

    pub fn len(&self, s: Split) -> usize {
        self.counts[s as usize]
    }

    fn index(&self, s: Split, i: usize) -> usize {
        self.counts[..s as usize].iter().sum::<usize>() + i
    }

    pub fn label(&self, s: Split, i: usize) -> u32 {
        u32::from(self.bytes[20 + self.index(s, i)])
    }

    /// Sample `i` of `s` as f32 in [0, 1] (`byte / 255`, correctly rounded on every target).
    pub fn pixels(&self, s: Split, i: usize, out: &mut [f32]) {
        let n: usize = self.counts.iter().sum();
        let at = 20 + n + self.index(s, i) * INPUT;
        for (o, &b) in out.iter_mut().zip(&self.bytes[at..at + INPUT]) {
            *o = f32::from(b) / 255.0;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The run.

/// Correct predictions over `s` (in batches of `BATCH`, on the stack).
pub fn correct<B: Backend>(t: &mut Trainer<B>, data: &DataBlob, s: Split) -> Result<usize> {
    let mut x = [0.0f32; BATCH * INPUT];
    let mut pred = [0u32; BATCH];
    let mut right = 0;
    let n = data.len(s);
    let mut i = 0;
    while i < n {
        let rows = BATCH.min(n - i);
        for r in 0..rows {
            data.pixels(s, i + r, &mut x[r * INPUT..(r + 1) * INPUT]);
        }
        t.predict(&x[..rows * INPUT], &mut pred[..rows])?;
        right += (0..rows).filter(|&r| pred[r] == data.label(s, i + r)).count();
        i += rows;
    }
    Ok(right)
}

/// The most fine-tuning samples the order array holds.
pub const MAX_TUNE: usize = 1024;

/// Fine-tunes on `Tune` for `EPOCHS` epochs, reshuffling (seeded) each epoch; `on_step(step, loss)` after
/// each step (the firmware times steps there). Returns the mean loss of the last epoch.
pub fn fine_tune<B: Backend>(t: &mut Trainer<B>, data: &DataBlob, mut on_step: impl FnMut(usize, f32)) -> Result<f32> {
    let n = data.len(Split::Tune);
    if n > MAX_TUNE {
        return Err(Error::InvalidConfig("more fine-tuning samples than MAX_TUNE"));
    }
    let mut order = [0u16; MAX_TUNE];
    for (i, o) in order[..n].iter_mut().enumerate() {
        *o = i as u16;
    }
    let mut rng = mc::rng::Rng::new(SEED ^ 0x5eed);
    let mut x = [0.0f32; BATCH * INPUT];
    let mut y = [0u32; BATCH];
    let mut step = 0;
    let mut last = 0.0f32;
    for _ in 0..EPOCHS {
        rng.shuffle(&mut order[..n]);
        let (mut sum, mut batches) = (0.0f32, 0);
        for chunk in order[..n].chunks(BATCH) {
            for (r, &i) in chunk.iter().enumerate() {
                data.pixels(Split::Tune, i as usize, &mut x[r * INPUT..(r + 1) * INPUT]);
                y[r] = data.label(Split::Tune, i as usize);
            }
            let rows = chunk.len();
            let report = t.step(&x[..rows * INPUT], &y[..rows])?;
            on_step(step, report.loss);
            step += 1;
            sum += report.loss;
            batches += 1;
        }
        last = sum / batches as f32;
    }
    Ok(last)
}

/// FNV-1a over the f32 bits (little-endian) of every parameter, in model order: equal checksums mean
/// bit-identical weights.
pub fn checksum<B: Backend>(t: &mut Trainer<B>) -> Result<u64> {
    let mut h = Fnv::new();
    t.visit_weights(|_, chunk| {
        for v in chunk {
            h.bytes(&v.to_bits().to_le_bytes());
        }
    })?;
    Ok(h.0)
}

/// The policy for a backend: `auto`, with its reason.
pub fn policy<B: Backend>(be: &B) -> (Policy, &'static str) {
    Policy::auto(&be.capabilities())
}

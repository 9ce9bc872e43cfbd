//! Checkpoints: read by the `safetensors` crate, resumed bit for bit under every policy and optimizer, refused
//! with a clear error (and the trainer untouched) when broken, and written atomically.
#![cfg(feature = "std")]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use mantissa::checkpoint::{checkpoint_len, fingerprint, load, load_file, save, save_file, CheckpointErrorKind};
use mantissa::host::HostBuffer;
use mantissa::rng::Rng;
use mantissa::{
    AdamW, Backend, DynamicConfig, DynamicLossScale, Error, LossScale, MemoryPlan, Model, Optimizer, Policy, Reference,
    Sgd, Shape, TrainConfig, Trainer,
};
use safetensors::{Dtype, SafeTensors};

type T<'a> = Trainer<Reference<'a>>;

/// A model, policy, optimizer and loss scale to train with.
#[derive(Clone, Debug)]
struct Case {
    model: Model,
    policy: Policy,
    opt: Optimizer,
    loss_scale: LossScale,
    batch: usize,
}

impl Case {
    fn new(model: Model, policy: Policy, opt: impl Into<Optimizer>) -> Case {
        let loss_scale = TrainConfig::new(8, policy).loss_scale;
        Case { model, policy, opt: opt.into(), loss_scale, batch: 8 }
    }

    fn loss_scale(mut self, s: LossScale) -> Case {
        self.loss_scale = s;
        self
    }

    fn arena(&self) -> HostBuffer {
        let plan = MemoryPlan::new(&self.model, self.policy, &self.opt, self.batch).unwrap();
        HostBuffer::new(plan.total).unwrap()
    }

    fn trainer<'a>(&self, arena: &'a mut HostBuffer, seed: u64) -> T<'a> {
        let config = TrainConfig::new(self.batch, self.policy).loss_scale(self.loss_scale).seed(seed);
        Trainer::new(Reference::new(arena.as_mut_slice()), self.model.clone(), self.policy, self.opt, config).unwrap()
    }

    /// `n` batches of random inputs in [-1, 1) and random labels.
    fn batches(&self, n: usize, seed: u64) -> Vec<(Vec<f32>, Vec<u32>)> {
        let mut rng = Rng::new(seed);
        let (per, classes) = (self.model.input().len(), self.model.classes());
        (0..n)
            .map(|_| {
                let x = (0..self.batch * per).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let y = (0..self.batch).map(|_| rng.below(classes) as u32).collect();
                (x, y)
            })
            .collect()
    }
}

fn mlp(input: usize, hidden: usize, classes: usize) -> Model {
    Model::sequential(Shape::flat(input)).linear(hidden).relu().linear(classes).build().unwrap()
}

/// Conv2d -> ReLU -> MaxPool2d -> Flatten -> Linear: 4-D weights and parameter-free layers between.
fn cnn() -> Model {
    Model::sequential(Shape::image(1, 6, 6))
        .conv2d(2, 3, 1, 1)
        .relu()
        .maxpool2d(2, 2)
        .flatten()
        .linear(3)
        .build()
        .unwrap()
}

fn adamw() -> Optimizer {
    AdamW::new(1e-2).into()
}

fn sgd_momentum() -> Optimizer {
    Sgd::new(5e-2).momentum(0.9).nesterov(true).weight_decay(1e-3).into()
}

/// Dynamic scaling that overflows f16 at first (2^20 / 8 rows > 65504), tolerates one overflow (hysteresis 2)
/// and grows every 3 good steps, so a short run skips, backs off and grows.
fn eventful_dynamic() -> LossScale {
    let config =
        DynamicConfig { hysteresis: 2, ..DynamicConfig::pytorch() }.initial_scale(1048576.0).growth_interval(3);
    LossScale::Dynamic(DynamicLossScale::new(config).unwrap())
}

fn checkpoint(t: &mut T) -> Vec<u8> {
    let mut bytes = vec![0u8; checkpoint_len(t)];
    let n = save(t, &mut bytes).unwrap();
    assert_eq!(n, bytes.len());
    bytes
}

fn master(t: &mut T) -> Vec<f32> {
    let mut w = vec![0.0; t.model().param_len()];
    t.read_master(&mut w).unwrap();
    w
}

fn state(t: &mut T, which: usize) -> Vec<f32> {
    let p = *t.params();
    let buf = if which == 1 { p.state1 } else { p.state2 };
    let mut v = vec![0.0; buf.len];
    t.backend_mut().download(buf, &mut v).unwrap();
    v
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn train(t: &mut T, batches: &[(Vec<f32>, Vec<u32>)]) {
    for (x, y) in batches {
        t.step(x, y).unwrap();
    }
}

fn metadata(bytes: &[u8]) -> HashMap<String, String> {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    meta.metadata().clone().expect("__metadata__")
}

/// The file with its header replaced by `edit(header)` (re-padded, length updated), data unchanged.
fn with_header(bytes: &[u8], edit: impl FnOnce(&str) -> String) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end();
    let mut h = edit(header).into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    out
}

fn replace(from: &'static str, to: &'static str) -> impl FnOnce(&str) -> String {
    move |h| {
        assert!(h.contains(from), "{from} is not in the header {h}");
        h.replacen(from, to, 1)
    }
}

/// `load` fails with an `Error::Checkpoint` whose message contains `needle`, and leaves `t` as it was.
fn refused(t: &mut T, bytes: &[u8], needle: &str) -> &'static str {
    let before = checkpoint(t);
    let msg = match load(t, bytes) {
        Err(Error::Checkpoint(msg)) => msg,
        other => panic!("expected Error::Checkpoint containing {needle:?}, got {other:?}"),
    };
    assert!(msg.contains(needle), "error {msg:?} does not contain {needle:?}");
    assert!(checkpoint(t) == before, "a failed load ({msg}) changed the trainer");
    msg
}

// ---------------------------------------------------------------------------------------------------------
// (a) The safetensors crate reads what we write.

fn readable(case: &Case) {
    let mut arena = case.arena();
    let mut t = case.trainer(&mut arena, 3);
    train(&mut t, &case.batches(3, 1));
    let bytes = checkpoint(&mut t);
    let st = SafeTensors::deserialize(&bytes).expect("the safetensors crate accepts the checkpoint");

    let states: &[&str] = match case.opt {
        Optimizer::AdamW(_) => &["exp_avg", "exp_avg_sq"],
        Optimizer::Sgd(s) if s.momentum != 0.0 => &["momentum_buffer"],
        Optimizer::Sgd(_) => &[],
    };
    let w = master(&mut t);
    let s: Vec<Vec<f32>> = (1..=states.len()).map(|i| state(&mut t, i)).collect();
    let mut expected = BTreeSet::new();
    for (i, layer) in case.model.layers().iter().enumerate() {
        for (param, off, shape) in layer.tensors() {
            let len: usize = shape.iter().product();
            let mut check = |name: String, want: &[f32]| {
                let v = st.tensor(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(v.dtype(), Dtype::F32, "{name}");
                assert_eq!(v.shape(), &shape[..], "{name}");
                let got: Vec<f32> =
                    v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                assert_eq!(bits(&got), bits(&want[off..off + len]), "{name} values");
                expected.insert(name);
            };
            check(format!("{i}.{param}"), &w);
            for (k, st_name) in states.iter().enumerate() {
                check(format!("optimizer.{i}.{param}.{st_name}"), &s[k]);
            }
        }
    }
    let names: BTreeSet<String> = st.names().into_iter().map(String::from).collect();
    assert_eq!(names, expected);

    let meta = metadata(&bytes);
    assert_eq!(meta["format"], "mantissa");
    assert_eq!(meta["format_version"], "1");
    assert_eq!(meta["model"], fingerprint(&case.model).to_string());
    assert_eq!(meta["policy"], case.policy.name());
    assert_eq!(meta["optimizer"], case.opt.name());
    assert_eq!(meta["optimizer.lr"].parse::<f32>().unwrap(), case.opt.lr());
    assert_eq!(meta["updates"], t.updates().to_string());
    assert_eq!(meta["skipped"], t.skipped().to_string());
    assert_eq!(meta["loss_scale"], t.loss_scale().name());
    if let LossScale::Dynamic(d) = *t.loss_scale() {
        assert_eq!(meta["loss_scale.scale"].parse::<f32>().unwrap(), d.scale);
        assert_eq!(meta["loss_scale.good_steps"], d.good_steps.to_string());
        assert_eq!(meta["loss_scale.hysteresis_left"], d.hysteresis_left.to_string());
        assert_eq!(meta["loss_scale.growth_interval"], d.config.growth_interval.to_string());
    }
    // The data starts 8-byte aligned.
    assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()) % 8, 0);
}

#[test]
fn safetensors_reads_small_models() {
    readable(&Case::new(mlp(12, 16, 4), Policy::FLOAT32, adamw()));
    readable(&Case::new(mlp(12, 16, 4), Policy::MIXED_FLOAT16, sgd_momentum()).loss_scale(eventful_dynamic()));
    readable(&Case::new(cnn(), Policy::MIXED_BFLOAT16, Sgd::new(0.1)));
    readable(&Case::new(cnn(), Policy::FLOAT32, adamw()).loss_scale(LossScale::fixed(64.0).unwrap()));
}

#[test]
fn safetensors_reads_the_mnist_mlp() {
    let case = Case::new(mlp(784, 256, 10), Policy::MIXED_BFLOAT16, AdamW::new(2e-3));
    readable(&case);
    let mut arena = case.arena();
    let mut t = case.trainer(&mut arena, 1);
    let bytes = checkpoint(&mut t);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("0.weight").unwrap().shape(), &[256, 784]);
    assert_eq!(st.tensor("2.bias").unwrap().shape(), &[10]);
    assert_eq!(st.tensor("optimizer.2.weight.exp_avg_sq").unwrap().shape(), &[10, 256]);
    assert_eq!(metadata(&bytes)["model"], "input(784);Linear(784,256);ReLU;Linear(256,10)");
}

/// A file the safetensors crate wrote (its own tensor order and offsets) loads to the same state.
#[test]
fn loads_a_file_rewritten_by_the_safetensors_crate() {
    let case = Case::new(mlp(12, 16, 4), Policy::MIXED_FLOAT16, adamw()).loss_scale(eventful_dynamic());
    let mut arena = case.arena();
    let mut t = case.trainer(&mut arena, 3);
    train(&mut t, &case.batches(4, 2));
    let ours = checkpoint(&mut t);
    let st = SafeTensors::deserialize(&ours).unwrap();
    let theirs = safetensors::serialize(st.tensors(), Some(metadata(&ours))).unwrap();
    assert_ne!(theirs, ours, "the crate orders tensors differently");

    let mut arena2 = case.arena();
    let mut fresh = case.trainer(&mut arena2, 99);
    load(&mut fresh, &theirs).unwrap();
    assert!(checkpoint(&mut fresh) == ours);
}

// ---------------------------------------------------------------------------------------------------------
// (b) Train N, save, load into a fresh trainer, train M: bit-identical to N + M uninterrupted.

fn resumes_bit_for_bit(case: &Case, n: usize, m: usize) {
    let batches = case.batches(n + m, 11);
    let mut arena_a = case.arena();
    let mut a = case.trainer(&mut arena_a, 5);
    // A learning-rate schedule during the first part: the resumed trainer must pick up the last rate.
    for (k, (x, y)) in batches[..n].iter().enumerate() {
        a.set_lr(case.opt.lr() * 0.9f32.powi(k as i32)).unwrap();
        a.step(x, y).unwrap();
    }
    let saved = checkpoint(&mut a);
    train(&mut a, &batches[n..]);

    // Another seed: every initial weight differs, so only the checkpoint can make the runs agree.
    let mut arena_b = case.arena();
    let mut b = case.trainer(&mut arena_b, 6);
    assert_ne!(bits(&master(&mut a)), bits(&master(&mut b)));
    load(&mut b, &saved).unwrap();
    assert!(checkpoint(&mut b) == saved, "{case:?}: load then save does not give the same bytes");
    train(&mut b, &batches[n..]);

    assert_eq!(bits(&master(&mut a)), bits(&master(&mut b)), "{case:?}: master weights differ after resuming");
    assert_eq!(a.updates(), b.updates());
    assert_eq!(a.skipped(), b.skipped());
    assert_eq!(a.loss_scale(), b.loss_scale());
    assert!(checkpoint(&mut a) == checkpoint(&mut b), "{case:?}: optimizer or loss-scale state differs");
}

#[test]
fn resume_is_bit_exact_under_every_policy_and_optimizer() {
    let model = mlp(12, 16, 4);
    for opt in [adamw(), sgd_momentum()] {
        resumes_bit_for_bit(&Case::new(model.clone(), Policy::FLOAT32, opt), 5, 5);
        resumes_bit_for_bit(&Case::new(model.clone(), Policy::MIXED_BFLOAT16, opt), 5, 5);
        let f16 = Case::new(model.clone(), Policy::MIXED_FLOAT16, opt).loss_scale(eventful_dynamic());
        resumes_bit_for_bit(&f16, 5, 8);
        resumes_bit_for_bit(&f16, 2, 8);
    }
    resumes_bit_for_bit(
        &Case::new(cnn(), Policy::MIXED_FLOAT16, adamw()).loss_scale(LossScale::fixed(128.0).unwrap()),
        4,
        4,
    );
    resumes_bit_for_bit(&Case::new(cnn(), Policy::FLOAT32, sgd_momentum()), 4, 4);
}

/// The f16 cases above really exercise the dynamic state: steps are skipped and the scale moves both ways.
#[test]
fn the_f16_resume_case_skips_and_rescales() {
    let case = Case::new(mlp(12, 16, 4), Policy::MIXED_FLOAT16, adamw()).loss_scale(eventful_dynamic());
    let mut arena = case.arena();
    let mut t = case.trainer(&mut arena, 5);
    let mut scales = Vec::new();
    for (x, y) in &case.batches(13, 11) {
        scales.push(t.step(x, y).unwrap().loss_scale);
    }
    assert!(t.skipped() > 0, "no step was skipped: {scales:?}");
    assert!(scales.windows(2).any(|w| w[1] > w[0]), "the scale never grew: {scales:?}");
    assert!(scales.windows(2).any(|w| w[1] < w[0]), "the scale never backed off: {scales:?}");
}

/// Master weights are f32 under every policy: a mixed_float16 checkpoint loads into a mixed_bfloat16 trainer,
/// which keeps its own loss scale.
#[test]
fn loads_under_another_policy_keeping_the_trainers_loss_scale() {
    let f16 = Case::new(mlp(12, 16, 4), Policy::MIXED_FLOAT16, adamw()).loss_scale(eventful_dynamic());
    let mut arena = f16.arena();
    let mut a = f16.trainer(&mut arena, 3);
    train(&mut a, &f16.batches(6, 4));
    let bytes = checkpoint(&mut a);

    let bf16 = Case::new(f16.model.clone(), Policy::MIXED_BFLOAT16, adamw());
    let mut arena_b = bf16.arena();
    let mut b = bf16.trainer(&mut arena_b, 9);
    load(&mut b, &bytes).unwrap();
    assert_eq!(bits(&master(&mut b)), bits(&master(&mut a)));
    assert_eq!(bits(&state(&mut b, 2)), bits(&state(&mut a, 2)));
    assert_eq!(*b.loss_scale(), LossScale::None);
    assert_eq!((b.updates(), b.skipped()), (a.updates(), a.skipped()));
    // The working copy was refreshed: predictions follow the loaded weights.
    let (x, _) = &f16.batches(1, 8)[0];
    let mut pa = vec![0u32; f16.batch];
    let mut fresh_arena = bf16.arena();
    let mut c = bf16.trainer(&mut fresh_arena, 9);
    c.write_master(&master(&mut a)).unwrap();
    c.predict(x, &mut pa).unwrap();
    let mut pb = vec![0u32; f16.batch];
    b.predict(x, &mut pb).unwrap();
    assert_eq!(pa, pb);
}

// ---------------------------------------------------------------------------------------------------------
// (c) Broken or foreign checkpoints: a clear error, and the trainer untouched.

fn trained(case: &Case, arena: &mut HostBuffer) -> (Vec<u8>, usize) {
    let mut t = case.trainer(arena, 3);
    train(&mut t, &case.batches(4, 5));
    let bytes = checkpoint(&mut t);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (bytes, n)
}

#[test]
fn truncated_files_are_refused() {
    let case = Case::new(mlp(12, 16, 4), Policy::MIXED_FLOAT16, adamw()).loss_scale(eventful_dynamic());
    let mut arena = case.arena();
    let (bytes, n) = trained(&case, &mut arena);
    let mut arena2 = case.arena();
    let mut t = case.trainer(&mut arena2, 8);
    train(&mut t, &case.batches(2, 6));
    for cut in [0, 7, 8, 8 + n / 2, 8 + n - 1, 8 + n, 8 + n + 4, bytes.len() - 1] {
        refused(&mut t, &bytes[..cut], "truncated");
    }
    // Every other length is refused too (the message depends on where the cut falls).
    for cut in (0..bytes.len()).step_by(7) {
        assert!(load(&mut t, &bytes[..cut]).is_err(), "a file cut to {cut} bytes loaded");
    }
    // Bytes after the last tensor.
    let mut longer = bytes.clone();
    longer.extend([0u8; 8]);
    refused(&mut t, &longer, "no tensor covers");
}

#[test]
fn corrupt_headers_are_refused() {
    let case = Case::new(mlp(12, 16, 4), Policy::MIXED_FLOAT16, adamw()).loss_scale(eventful_dynamic());
    let mut arena = case.arena();
    let (bytes, n) = trained(&case, &mut arena);
    let mut arena2 = case.arena();
    let mut t = case.trainer(&mut arena2, 8);
    train(&mut t, &case.batches(2, 6));

    // Any byte of the header flipped (the header is ASCII, so this also breaks UTF-8).
    for i in 8..8 + n {
        let mut bad = bytes.clone();
        bad[i] ^= 0xff;
        refused(&mut t, &bad, "");
    }
    // The header length itself.
    let mut bad = bytes.clone();
    bad[0] ^= 0x08;
    refused(&mut t, &bad, "");
    let mut bad = bytes.clone();
    bad[7] = 0x80;
    refused(&mut t, &bad, "truncated");

    let cases: &[(&str, &str, &str)] = &[
        ("{\"__metadata__\"", "[\"__metadata__\"", "not a JSON object"),
        ("\"dtype\":\"F32\"", "\"dtype\":\"F16\"", "dtype is not F32"),
        ("\"shape\":[16,12]", "\"shape\":[12,16]", "shape differs"),
        ("\"shape\":[16,12]", "\"shape\":[16,12,1]", "shape differs"),
        ("\"shape\":[16,12]", "\"shape\":[16,-12]", "integers"),
        ("\"data_offsets\":[0,768]", "\"data_offsets\":[0,764]", "do not span"),
        ("\"data_offsets\":[0,768]", "\"data_offsets\":[0]", "pair"),
        ("\"format\":\"mantissa\"", "\"format\":\"mantissb\"", "not a mantissa checkpoint"),
        ("\"format_version\":\"1\"", "\"format_version\":\"2\"", "format_version"),
        ("Linear(12,16)", "Linear(12,17)", "another model"),
        ("\"optimizer\":\"AdamW\"", "\"optimizer\":\"SGD\"", "another optimizer"),
        ("\"policy\":\"mixed_float16\"", "\"policy\":\"float64\"", "policy"),
        ("\"loss_scale\":\"dynamic\"", "\"loss_scale\":\"dynamix\"", "loss_scale"),
        ("\"loss_scale.scale\":\"", "\"loss_scale.scale\":\"inf", "loss scale"),
        ("\"loss_scale.scale\":\"", "\"loss_scale.scale\":\"-", "loss scale"),
        ("\"loss_scale.backoff_factor\":\"0.5\"", "\"loss_scale.backoff_factor\":\"2\"", "configuration"),
        ("\"loss_scale.hysteresis_left\":\"", "\"loss_scale.hysteresis_left\":\"9", "hysteresis_left"),
        ("\"updates\":\"", "\"updates\":\"-", "updates"),
        ("\"optimizer.lr\":\"", "\"optimizer.lr\":\"NaN", "learning rate"),
        ("\"optimizer.lr\":\"0.01\",", "", "lacks \"optimizer.lr\""),
        ("\"0.bias\":", "\"0.bias\":{},\"0.bias\":", "lacks dtype"),
        ("\"0.bias\":", "\"7.bias\":", "does not have"),
        ("\"0.weight\":", "\"0.weight\\u0000\":", "does not have"),
        ("\"optimizer.0.bias.exp_avg\":", "\"optimizer.0.bias.momentum_buffer\":", "does not have"),
        ("\"0.bias\":", "\"0.bias\":{\"dtype\":\"F32\",\"shape\":[16],\"data_offsets\":[0,64]},\"0.bias\":", "twice"),
        ("\"__metadata__\":{", "\"__metadata__\":{\"format\":\"mantissa\",", "twice"),
        ("\"__metadata__\":{", "\"__metadata__\":{\"note\":1,", "values must be strings"),
        ("\"format\":\"mantissa\"", "\"format\":\"mantissa", "expected ',' or '}'"),
        ("\"format\":\"mantissa\"", "\"format\":\"mant\\qissa\"", "invalid escape"),
    ];
    for &(from, to, needle) in cases {
        refused(&mut t, &with_header(&bytes, replace(from, to)), needle);
    }
    // Renamed, the metadata map reads as a tensor entry without dtype, shape or offsets.
    refused(&mut t, &with_header(&bytes, |h| h.replace("\"__metadata__\"", "\"__metadata_\"")), "lacks dtype");
    refused(&mut t, &with_header(&bytes, |h| format!("{h} x")), "after its JSON object");
    refused(&mut t, &with_header(&bytes, |h| format!("{h} }}")), "after its JSON object");

    // Two tensors sharing bytes: give 2.bias the range of 0.bias (same size), so only the overlap is wrong.
    let mut same = Case::new(mlp(12, 4, 4), Policy::FLOAT32, Sgd::new(0.1));
    same.batch = 2;
    let mut arena3 = same.arena();
    let mut s = same.trainer(&mut arena3, 1);
    let sb = checkpoint(&mut s);
    let sn = u64::from_le_bytes(sb[..8].try_into().unwrap()) as usize;
    let h = std::str::from_utf8(&sb[8..8 + sn]).unwrap();
    let range = |name: &str| {
        let at = h.find(&format!("\"{name}\":")).unwrap();
        let rest = &h[at..];
        let start = rest.find("data_offsets\":[").unwrap() + "data_offsets\":[".len();
        rest[start..start + rest[start..].find(']').unwrap()].to_string()
    };
    let (b0, b2) = (range("0.bias"), range("2.bias"));
    let overlapped = with_header(&sb, |h| h.replacen(&format!("[{b2}]"), &format!("[{b0}]"), 1));
    refused(&mut s, &overlapped, "overlap");

    // Escapes are decoded: the same names and values spelled with escapes still load.
    let escaped = with_header(&bytes, |h| {
        h.replacen("\"0.weight\"", "\"0\\u002eweight\"", 1).replacen("mantissa", "m\\u0061ntissa", 1)
    });
    load(&mut t, &escaped).unwrap();
    assert!(checkpoint(&mut t) == bytes);
}

#[test]
fn foreign_checkpoints_are_refused() {
    let small = Case::new(mlp(12, 16, 4), Policy::FLOAT32, adamw());
    let mut arena = small.arena();
    let (bytes, _) = trained(&small, &mut arena);

    let other = Case::new(mlp(12, 8, 4), Policy::FLOAT32, adamw());
    let mut arena2 = other.arena();
    let mut t = other.trainer(&mut arena2, 1);
    refused(&mut t, &bytes, "another model");

    let deeper = Case::new(
        Model::sequential(Shape::flat(12)).linear(16).relu().linear(4).relu().linear(4).build().unwrap(),
        Policy::FLOAT32,
        adamw(),
    );
    let mut arena3 = deeper.arena();
    let mut t = deeper.trainer(&mut arena3, 1);
    refused(&mut t, &bytes, "another model");

    let conv = Case::new(cnn(), Policy::FLOAT32, adamw());
    let mut arena4 = conv.arena();
    let mut t = conv.trainer(&mut arena4, 1);
    refused(&mut t, &bytes, "another model");

    let sgd = Case::new(small.model.clone(), Policy::FLOAT32, sgd_momentum());
    let mut arena5 = sgd.arena();
    let mut t = sgd.trainer(&mut arena5, 1);
    refused(&mut t, &bytes, "another optimizer");

    // SGD with momentum and without: the momentum buffers do not match.
    let mut arena6 = sgd.arena();
    let (sgd_bytes, _) = trained(&sgd, &mut arena6);
    let plain = Case::new(small.model.clone(), Policy::FLOAT32, Sgd::new(0.1));
    let mut arena7 = plain.arena();
    let mut t = plain.trainer(&mut arena7, 1);
    refused(&mut t, &sgd_bytes, "momentum");

    // Not a checkpoint at all.
    refused(&mut t, b"", "truncated");
    refused(&mut t, b"\x02\0\0\0\0\0\0\0{}", "no __metadata__");
    refused(&mut t, &[0xff; 64], "truncated");
}

// ---------------------------------------------------------------------------------------------------------
// (d) Files.

/// A fresh directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("mantissa-checkpoint-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn save_file_round_trips_and_replaces_atomically() {
    let case = Case::new(mlp(12, 16, 4), Policy::MIXED_BFLOAT16, adamw());
    let dir = TempDir::new("atomic");
    let path = dir.0.join("run.safetensors");
    let mut arena = case.arena();
    let mut t = case.trainer(&mut arena, 3);
    let batches = case.batches(6, 9);
    train(&mut t, &batches[..3]);
    save_file(&mut t, &path).unwrap();
    let first = std::fs::read(&path).unwrap();
    assert!(first == checkpoint(&mut t));

    // Saving over it: a whole new file, no temporary files left behind.
    train(&mut t, &batches[3..]);
    save_file(&mut t, &path).unwrap();
    let second = std::fs::read(&path).unwrap();
    assert!(second == checkpoint(&mut t) && second != first);
    assert_eq!(entries(&dir.0), ["run.safetensors"]);
    let mut arena2 = case.arena();
    let mut u = case.trainer(&mut arena2, 4);
    load_file(&mut u, &path).unwrap();
    assert!(checkpoint(&mut u) == second);

    // A save that fails (the path is a non-empty directory) leaves the previous file byte-identical.
    let sub = dir.0.join("sub.safetensors");
    std::fs::create_dir(&sub).unwrap();
    let kept = sub.join("previous.safetensors");
    std::fs::write(&kept, &first).unwrap();
    let err = save_file(&mut t, &sub).unwrap_err();
    assert!(matches!(err.kind(), CheckpointErrorKind::Write(_)), "{err}");
    assert!(err.to_string().contains("sub.safetensors"), "{err}");
    assert!(std::fs::read(&kept).unwrap() == first);
    assert_eq!(entries(&dir.0), ["run.safetensors", "sub.safetensors"]);
    assert_eq!(entries(&sub), ["previous.safetensors"]);

    // In a directory that cannot be written (not as root, which may write anywhere), the old file stays.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o555)).unwrap();
        let writable = std::fs::write(dir.0.join("probe"), b"").is_ok();
        if !writable {
            assert!(save_file(&mut t, &path).is_err());
            assert!(std::fs::read(&path).unwrap() == second);
        }
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn load_file_errors_name_the_path() {
    let case = Case::new(mlp(12, 16, 4), Policy::FLOAT32, adamw());
    let dir = TempDir::new("errors");
    let mut arena = case.arena();
    let mut t = case.trainer(&mut arena, 3);

    let missing = dir.0.join("missing.safetensors");
    let err = load_file(&mut t, &missing).unwrap_err();
    assert!(matches!(err.kind(), CheckpointErrorKind::Read(_)));
    assert!(err.to_string().contains("missing.safetensors"), "{err}");

    let junk = dir.0.join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let err = load_file(&mut t, &junk).unwrap_err();
    assert!(matches!(err.kind(), CheckpointErrorKind::Load(Error::Checkpoint(_))), "{err}");
    assert!(err.to_string().starts_with(&junk.display().to_string()), "{err}");
    assert_eq!(err.path(), junk);
}

#[test]
fn save_needs_room() {
    let case = Case::new(mlp(12, 16, 4), Policy::FLOAT32, adamw());
    let mut arena = case.arena();
    let mut t = case.trainer(&mut arena, 3);
    let len = checkpoint_len(&t);
    let mut small = vec![0u8; len - 1];
    assert!(matches!(save(&mut t, &mut small), Err(Error::ShapeMismatch { .. })));
    // A longer buffer is fine: the tail is not touched.
    let mut big = vec![0xabu8; len + 10];
    assert_eq!(save(&mut t, &mut big).unwrap(), len);
    assert!(big[len..].iter().all(|&b| b == 0xab));
}

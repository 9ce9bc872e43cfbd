//! Host side of the firmware example (`examples/firmware-cortex-m`): trains the base digit classifier, saves it
//! as a safetensors checkpoint, converts that into the compact blob the firmware embeds, builds the shifted
//! digits it fine-tunes on, and replays the device's fine-tuning on the host with the same code
//! (`examples/firmware-cortex-m/src/scenario.rs`) to record the final-weight checksum the firmware must match.
//!
//! ```text
//! cargo run --release --example firmware_export              # regenerate the assets (deterministic)
//! cargo run --release --example firmware_export -- --replay  # only replay the committed assets
//! cargo run --release --example firmware_export -- --check   # regenerate in memory, compare with the committed
//! # or start from a base model trained by the main job, into another folder (then build the firmware with it):
//! cargo run --release --example mnist -- --model tiny --save base.safetensors
//! cargo run --release --example firmware_export -- --base base.safetensors --out my-assets
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use mantissa as mc;
#[path = "firmware-cortex-m/src/scenario.rs"]
mod scenario;

use mantissa::data::{load_bundled, Mnist};
use mantissa::host::HostBuffer;
use mantissa::trainable::ParamLayout;
use mantissa::{MemoryPlan, Policy, Reference, TrainConfig, Trainer};
use scenario::{DataBlob, ModelBlob, Split, INPUT, SIDE};

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/firmware-cortex-m/assets");
/// Shifted samples: fine-tuning, held-out test; then clean held-out digits.
const N_TUNE: usize = 300;
const N_TEST: usize = 500;
const N_CLEAN: usize = 200;
const BASE_EPOCHS: usize = 8;
const BASE_BATCH: usize = 64;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("");
    let r = match mode {
        "" => export(Path::new(ASSETS), None),
        "--replay" => replay(Path::new(ASSETS)),
        "--check" => check(),
        "--base" => match (args.get(1), args.get(2).map(String::as_str), args.get(3)) {
            (Some(base), Some("--out"), Some(out)) => export(Path::new(out), Some(Path::new(base))),
            (Some(base), None, None) => export(Path::new(ASSETS), Some(Path::new(base))),
            _ => Err("usage: firmware_export --base CHECKPOINT [--out DIR]".into()),
        },
        _ => Err(format!("unknown argument {mode:?}: use no argument, --replay, --check or --base").into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// 2x2 average of a 28x28 image (rounded to nearest).
fn downsample(img: &[u8]) -> Vec<u8> {
    mantissa::data::halve(img, 2 * SIDE)
}

/// The device's distribution shift: a pen drawing thicker strokes (3x3 dilation) on a sensor mounted off
/// centre (2 px right, 2 px down at 28x28), then the same 2x2 averaging.
fn shifted(img: &[u8]) -> Vec<u8> {
    let mut thick = vec![0u8; 784];
    for r in 0..28i32 {
        for c in 0..28i32 {
            let mut m = 0u8;
            for dr in -1..=1 {
                for dc in -1..=1 {
                    let (sr, sc) = (r + dr - 2, c + dc - 2);
                    if (0..28).contains(&sr) && (0..28).contains(&sc) {
                        m = m.max(img[(sr * 28 + sc) as usize]);
                    }
                }
            }
            thick[(r * 28 + c) as usize] = m;
        }
    }
    downsample(&thick)
}

struct Assets {
    checkpoint: PathBuf,
    model: Vec<u8>,
    data: Vec<u8>,
}

/// `base`: a checkpoint of this model (e.g. `mnist --model tiny --save`) to start from instead of training.
fn build(dir_for_checkpoint: &Path, base: Option<&Path>) -> Res<Assets> {
    let data = load_bundled(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data")))?;
    let (train, test) = data.split(8000);
    let model = scenario::model()?;
    let policy = Policy::FLOAT32;
    let opt = scenario::optimizer();

    // 1. The base model: trained on the 8000 training digits as they are.
    let cfg = TrainConfig::new(BASE_BATCH, policy).seed(1);
    let plan = MemoryPlan::for_config(&model, policy, &opt, &cfg)?;
    let mut arena = HostBuffer::new(plan.total)?;
    let mut t = Trainer::new(Reference::new(arena.as_mut_slice()), model.clone(), policy, opt, cfg)?;
    let small = |set: &Mnist, i: usize| downsample(set.image(i).expect("in range"));
    let x_train: Vec<f32> = (0..train.len()).flat_map(|i| small(&train, i)).map(|b| f32::from(b) / 255.0).collect();
    let y_train: Vec<u32> = train.labels.iter().map(|&l| u32::from(l)).collect();
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = mc::rng::Rng::new(7);
    let mut x = vec![0.0f32; BASE_BATCH * INPUT];
    let mut y = vec![0u32; BASE_BATCH];
    if let Some(base) = base {
        mantissa::checkpoint::load_file(&mut t, base)?;
        eprintln!("base model: loaded {}", base.display());
    }
    for epoch in 1..=if base.is_some() { 0 } else { BASE_EPOCHS } {
        rng.shuffle(&mut order);
        let mut loss = 0.0;
        for idx in order.chunks(BASE_BATCH) {
            for (r, &i) in idx.iter().enumerate() {
                x[r * INPUT..(r + 1) * INPUT].copy_from_slice(&x_train[i * INPUT..(i + 1) * INPUT]);
                y[r] = y_train[i];
            }
            loss += t.step(&x[..idx.len() * INPUT], &y[..idx.len()])?.loss * idx.len() as f32;
        }
        eprintln!("base model: epoch {epoch}/{BASE_EPOCHS}, train loss {:.4}", loss / train.len() as f32);
    }

    // 2. Saved as a safetensors checkpoint, read back through the checkpoint loader.
    std::fs::create_dir_all(dir_for_checkpoint)?;
    let checkpoint = dir_for_checkpoint.join("base.safetensors");
    mantissa::checkpoint::save_file(&mut t, &checkpoint)?;
    drop(t);
    let mut t = Trainer::new(Reference::new(arena.as_mut_slice()), model.clone(), policy, opt, cfg)?;
    mantissa::checkpoint::load_file(&mut t, &checkpoint)?;
    let mut w = vec![0.0f32; model.param_len()];
    t.read_weights(&mut w)?;

    // 3. The compact blob: frozen tensors in bf16 (round to nearest even), trainable ones in f32.
    let layout = ParamLayout::new(&model, scenario::TRAINABLE)?;
    let tensors: Vec<_> = layout.iter(model.layers().len()).map(|(_, l)| l).collect();
    let mut blob = Vec::new();
    blob.extend_from_slice(&scenario::MODEL_MAGIC);
    for v in [1, model.param_len() as u32, tensors.len() as u32] {
        blob.extend_from_slice(&v.to_le_bytes());
    }
    for l in &tensors {
        let dtype = if l.trainable { scenario::DTYPE_F32 } else { scenario::DTYPE_BF16 };
        for v in [l.model_offset as u32, l.len as u32, dtype] {
            blob.extend_from_slice(&v.to_le_bytes());
        }
    }
    let data_start = blob.len();
    for l in &tensors {
        for &v in &w[l.model_offset..l.model_offset + l.len] {
            if l.trainable {
                blob.extend_from_slice(&v.to_le_bytes());
            } else {
                blob.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
            }
        }
    }
    let mut h = scenario::Fnv::new();
    h.bytes(&blob[data_start..]);
    blob.extend_from_slice(&h.0.to_le_bytes());

    // 4. Data: shifted versions of held-out digits (the base model never saw these writers' digits), then
    // clean held-out digits.
    let (mut labels, mut pixels) = (Vec::new(), Vec::new());
    for i in 0..N_TUNE + N_TEST {
        labels.push(test.labels[i]);
        pixels.extend(shifted(test.image(i).expect("in range")));
    }
    for i in N_TUNE + N_TEST..N_TUNE + N_TEST + N_CLEAN {
        labels.push(test.labels[i]);
        pixels.extend(small(&test, i));
    }
    let mut data = Vec::new();
    data.extend_from_slice(&scenario::DATA_MAGIC);
    for v in [SIDE, N_TUNE, N_TEST, N_CLEAN] {
        data.extend_from_slice(&(v as u32).to_le_bytes());
    }
    data.extend(labels);
    data.extend(pixels);
    Ok(Assets { checkpoint, model: blob, data })
}

fn export(dir: &Path, base: Option<&Path>) -> Res<()> {
    let target = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/target/firmware"));
    let a = build(target, base)?;
    std::fs::create_dir_all(dir)?;
    mantissa::io::write_atomic(&dir.join("model.bin"), &a.model)?;
    mantissa::io::write_atomic(&dir.join("data.bin"), &a.data)?;
    println!("checkpoint: {}", a.checkpoint.display());
    println!(
        "wrote {} ({} bytes) and {} ({} bytes)",
        dir.join("model.bin").display(),
        a.model.len(),
        dir.join("data.bin").display(),
        a.data.len()
    );
    let r = run(&a.model, &a.data)?;
    let expected = format!(
        "// Written by `cargo run --release --example firmware_export`: the host's run of the same fine-tuning.\n\
         pub const HOST_CHECKSUM: u64 = 0x{:016x};\n\
         pub const HOST_CORRECT_BEFORE: usize = {};\n\
         pub const HOST_CORRECT_AFTER: usize = {};\n\
         /// The memory plan's total for this scenario: the firmware's static arena.\n\
         pub const PLAN_TOTAL: usize = {};\n",
        r.checksum, r.before, r.after, r.plan_total
    );
    mantissa::io::write_atomic(&dir.join("expected.rs"), expected.as_bytes())?;
    Ok(())
}

fn check() -> Res<()> {
    let target = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/target/firmware"));
    let a = build(target, None)?;
    for (name, bytes) in [("model.bin", &a.model), ("data.bin", &a.data)] {
        let committed = std::fs::read(Path::new(ASSETS).join(name))?;
        if &committed != bytes {
            return Err(
                format!("{name}: the committed asset differs from a fresh export (rerun firmware_export)").into()
            );
        }
        println!("{name}: reproduced bit for bit ({} bytes)", bytes.len());
    }
    Ok(())
}

struct Outcome {
    plan_total: usize,
    before: usize,
    after: usize,
    checksum: u64,
}

fn run(model_blob: &[u8], data_blob: &[u8]) -> Res<Outcome> {
    let model = scenario::model()?;
    let probe = Reference::new(&mut []);
    let (policy, why) = scenario::policy(&probe);
    let opt = scenario::optimizer();
    let cfg = scenario::config(policy);
    let plan = MemoryPlan::for_config(&model, policy, &opt, &cfg)?;
    let full = MemoryPlan::for_config(&model, policy, &opt, &scenario::config_full(policy))?;
    let mut arena = HostBuffer::new(plan.total)?;
    let mut t = Trainer::new(Reference::new(arena.as_mut_slice()), model.clone(), policy, opt, cfg)?;
    let blob = ModelBlob::parse(model_blob, &model)?;
    let data = DataBlob::parse(data_blob)?;
    scenario::load(&mut t, &blob)?;
    println!("policy {policy} ({why})");
    let f32_frozen = MemoryPlan::for_config(&model, policy, &opt, &cfg.frozen_storage(mantissa::DType::F32))?;
    println!("{}", mantissa::plan::SideBySide(&[("full", full), ("partial f32", f32_frozen), ("partial bf16", plan)]));
    let n_test = data.len(Split::Test);
    let before = scenario::correct(&mut t, &data, Split::Test)?;
    let clean_before = scenario::correct(&mut t, &data, Split::Clean)?;
    let loss = scenario::fine_tune(&mut t, &data, |_, _| {})?;
    let after = scenario::correct(&mut t, &data, Split::Test)?;
    let clean_after = scenario::correct(&mut t, &data, Split::Clean)?;
    let checksum = scenario::checksum(&mut t)?;
    let pct = |c: usize, n: usize| 100.0 * c as f64 / n as f64;
    println!("host: shifted held-out accuracy before {:.1}% ({before}/{n_test}), after {:.1}% ({after}/{n_test}); last epoch loss {loss:.4}", pct(before, n_test), pct(after, n_test));
    let nc = data.len(Split::Clean);
    println!("host: clean held-out accuracy before {:.1}%, after {:.1}%", pct(clean_before, nc), pct(clean_after, nc));
    println!("host: checksum=0x{checksum:016x}");
    Ok(Outcome { plan_total: plan.total, before, after, checksum })
}

fn replay(dir: &Path) -> Res<()> {
    let model = std::fs::read(dir.join("model.bin"))?;
    let data = std::fs::read(dir.join("data.bin"))?;
    run(&model, &data).map(|_| ())
}

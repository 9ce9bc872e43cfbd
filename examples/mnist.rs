//! The main job: train a digit classifier on the bundled MNIST digits (first 8000 train, last 2000 test)
//! with mixed precision on the best backend compiled in.
//!
//! ```text
//! cargo run --release --example mnist                               # MLP, policy auto
//! cargo run --release --example mnist -- --policy mixed_float16 --model cnn
//! ```
//! Ends with one machine-readable line:
//! `result: model=mlp policy=... backend=... test_accuracy=... epochs=... train_seconds=... arena_bytes=...`

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mantissa::backends::{AnyBackend, BackendKind};
use mantissa::data::{load_bundled, Mnist};
use mantissa::host::HostBuffer;
use mantissa::{AdamW, Backend, MemoryPlan, Model, Optimizer, Policy, Shape, TrainConfig, Trainer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Arch {
    /// 784 -> Linear 256 -> ReLU -> Linear 10
    Mlp,
    /// Conv 8@5x5 -> ReLU -> MaxPool 2 -> Conv 16@5x5 -> ReLU -> MaxPool 2 -> Linear 10
    Cnn,
    /// 14x14 input (2x2 average) -> Linear 64 -> ReLU -> Linear 32 -> ReLU -> Linear 10: small enough for a
    /// Cortex-M4F; the base model of examples/firmware-cortex-m (`--save`, then `firmware_export --base`)
    Tiny,
}

/// Train a digit classifier on the bundled MNIST digits with mixed precision.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Precision policy: float32, mixed_float16, mixed_bfloat16, or auto (chosen from the backend's hardware).
    #[arg(long, default_value = "auto")]
    policy: String,
    /// Backend: auto (best CPU backend compiled in), reference, cpu-simd, cuda.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Model architecture.
    #[arg(long, value_enum, default_value_t = Arch::Mlp)]
    model: Arch,
    /// Passes over the 8000 training digits [default: 10 for mlp, 8 for cnn].
    #[arg(long)]
    epochs: Option<usize>,
    /// Samples per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// AdamW learning rate (cosine-decayed to 5% over the run).
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Seed for initialisation and shuffling.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write a checkpoint (safetensors) here at the end.
    #[arg(long, value_name = "PATH")]
    save: Option<PathBuf>,
    /// Resume from a checkpoint written by --save: restores weights, optimizer state, loss scale and counters,
    /// then trains --epochs more epochs (the learning-rate schedule starts over).
    #[arg(long, value_name = "PATH")]
    resume: Option<PathBuf>,
    /// Shift each training digit by up to this many pixels (random per sample and epoch); 0 turns it off.
    #[arg(long, default_value_t = 1)]
    shift: usize,
    /// Directory with the IDX files.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data"))]
    data: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn build_model(arch: Arch) -> mantissa::Result<Model> {
    match arch {
        Arch::Mlp => Model::sequential(Shape::flat(784)).linear(256).relu().linear(10).build(),
        Arch::Tiny => Model::sequential(Shape::flat(196)).linear(64).relu().linear(32).relu().linear(10).build(),
        Arch::Cnn => Model::sequential(Shape::image(1, 28, 28))
            .conv2d(8, 5, 1, 2)
            .relu()
            .maxpool2d(2, 2)
            .conv2d(16, 5, 1, 2)
            .relu()
            .maxpool2d(2, 2)
            .flatten()
            .linear(10)
            .build(),
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let data = load_bundled(&args.data)?;
    let (train, test) = data.split(8000);
    if train.is_empty() || test.is_empty() {
        return Err("the data set needs more than 8000 samples (8000 train, the rest test)".into());
    }
    let mut kind = BackendKind::from_name(&args.backend).map_err(|e| e.to_string())?;
    let caps = match AnyBackend::open(kind, &mut []) {
        Ok(b) => b.capabilities(),
        Err(e @ mantissa::Error::BackendNotCompiled { .. }) => return Err(e.into()),
        Err(e) => {
            eprintln!("note: {e}; falling back to the {} backend", BackendKind::best_cpu().name());
            kind = BackendKind::Reference;
            AnyBackend::open(kind, &mut [])?.capabilities()
        }
    };
    let (policy, why) = Policy::resolve(&args.policy, &caps)?;
    let model = build_model(args.model)?;
    let optimizer: Optimizer = AdamW::new(args.lr).into();
    let plan = MemoryPlan::new(&model, policy, &optimizer, args.batch)?;
    let arch = match args.model {
        Arch::Mlp => "mlp",
        Arch::Cnn => "cnn",
        Arch::Tiny => "tiny",
    };
    let epochs = args.epochs.unwrap_or(match args.model {
        Arch::Mlp | Arch::Tiny => 10,
        Arch::Cnn => 8,
    });

    println!(
        "mantissa mnist: model {arch} ({} parameters), backend {} on {}",
        model.param_len(),
        caps.backend,
        caps.device
    );
    println!("policy {policy} ({why})");
    println!("{plan}");
    for p in [Policy::FLOAT32, Policy::MIXED_FLOAT16, Policy::MIXED_BFLOAT16] {
        let fit = MemoryPlan::max_batch(&model, p, &optimizer, 8 << 20)?;
        println!("largest batch in an 8 MiB arena under {:<15} {fit}", format!("{p}:"));
    }
    println!();

    let mut arena =
        HostBuffer::new(plan.total).map_err(|e| format!("cannot allocate the {}-byte arena: {e}", plan.total))?;
    let backend = AnyBackend::open(kind, arena.as_mut_slice())?;
    let config = TrainConfig::new(args.batch, policy).seed(args.seed);
    let mut trainer = Trainer::new(backend, model, policy, optimizer, config)?;
    if let Some(path) = &args.resume {
        mantissa::checkpoint::load_file(&mut trainer, path)?;
        println!(
            "resumed from {}: {} updates, {} skipped, loss scale {}",
            path.display(),
            trainer.updates(),
            trainer.skipped(),
            trainer.loss_scale().scale()
        );
    }

    let half = args.model == Arch::Tiny;
    let pixels = if half { train.pixels() / 4 } else { train.pixels() };
    let test_x = to_f32(&test, (0..test.len()).collect::<Vec<_>>().as_slice(), half);
    let test_y: Vec<u32> = test.labels.iter().map(|&l| u32::from(l)).collect();
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = mantissa::rng::Rng::new(args.seed ^ 0x5eed);
    let steps_per_epoch = train.len().div_ceil(args.batch);
    let total_steps = (steps_per_epoch * epochs) as f32;
    let mut x = vec![0.0f32; args.batch * pixels];
    let mut y = vec![0u32; args.batch];
    let mut train_seconds = 0.0f64;
    let mut last_test = 0.0f32;
    let terminal = std::io::stderr().is_terminal();

    println!("| epoch | train loss | train acc | test loss | test acc | loss scale | skipped | seconds |");
    println!("|-------|------------|-----------|-----------|----------|------------|---------|---------|");
    for epoch in 1..=epochs {
        rng.shuffle(&mut order);
        let bar = if terminal { ProgressBar::new(steps_per_epoch as u64) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{epochs}"));
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let start = Instant::now();
        for (s, idx) in order.chunks(args.batch).enumerate() {
            // Cosine decay of the learning rate to 5% of its start.
            let t = ((epoch - 1) * steps_per_epoch + s) as f32 / total_steps;
            trainer.set_lr(args.lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f32::consts::PI * t).cos())))?;
            let rows = idx.len();
            for (r, &i) in idx.iter().enumerate() {
                let out = &mut x[r * pixels..(r + 1) * pixels];
                shifted(&train, i, args.shift, &mut rng, half, out);
                y[r] = u32::from(train.labels[i]);
            }
            let report = trainer.step(&x[..rows * pixels], &y[..rows])?;
            loss_sum += f64::from(report.loss) * rows as f64;
            correct += report.correct;
            seen += rows;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} acc {:.4} scale {}",
                loss_sum / seen as f64,
                correct as f64 / seen as f64,
                report.loss_scale
            ));
        }
        let secs = start.elapsed().as_secs_f64();
        train_seconds += secs;
        bar.finish_and_clear();
        let eval = trainer.evaluate(&test_x, &test_y)?;
        last_test = eval.accuracy();
        println!(
            "| {epoch:>5} | {:>10.4} | {:>9.4} | {:>9.4} | {:>8.4} | {:>10} | {:>7} | {:>7.2} |",
            loss_sum / seen as f64,
            correct as f64 / seen as f64,
            eval.loss,
            last_test,
            trainer.loss_scale().scale(),
            trainer.skipped(),
            secs
        );
    }

    if let Some(path) = &args.save {
        save_checkpoint(&mut trainer, path)?;
        println!("checkpoint written to {}", path.display());
    }
    println!(
        "result: model={arch} policy={policy} backend={} test_accuracy={last_test:.4} epochs={epochs} train_seconds={train_seconds:.1} arena_bytes={}",
        caps.backend, plan.total
    );
    Ok(())
}

/// Image `i` translated by a random offset in `-max..=max` pixels on each axis (zero fill), as f32 in [0, 1];
/// with `half`, then averaged over 2x2 blocks (rounded to a grey level, as the firmware's data is).
fn shifted(set: &Mnist, i: usize, max: usize, rng: &mut mantissa::rng::Rng, half: bool, out: &mut [f32]) {
    let img = set.image(i).expect("index from 0..len");
    let span = 2 * max + 1;
    let dy = rng.below(span) as isize - max as isize;
    let dx = rng.below(span) as isize - max as isize;
    let (h, w) = (set.rows as isize, set.cols as isize);
    let mut moved = vec![0u8; img.len()];
    for r in 0..h {
        for c in 0..w {
            let (sr, sc) = (r - dy, c - dx);
            if sr >= 0 && sr < h && sc >= 0 && sc < w {
                moved[(r * w + c) as usize] = img[(sr * w + sc) as usize];
            }
        }
    }
    write_f32(&moved, set.cols, half, out);
}

/// Bytes to f32 in [0, 1], optionally 2x2-averaged first (`mantissa::data::halve`, as the firmware data).
fn write_f32(img: &[u8], cols: usize, half: bool, out: &mut [f32]) {
    let halved;
    let img = if half {
        halved = mantissa::data::halve(img, cols);
        &halved[..]
    } else {
        img
    };
    for (o, &b) in out.iter_mut().zip(img) {
        *o = f32::from(b) / 255.0;
    }
}

fn to_f32(set: &Mnist, idx: &[usize], half: bool) -> Vec<f32> {
    let p = if half { set.pixels() / 4 } else { set.pixels() };
    let mut out = vec![0.0f32; idx.len() * p];
    for (r, &i) in idx.iter().enumerate() {
        write_f32(set.image(i).expect("index from 0..len"), set.cols, half, &mut out[r * p..(r + 1) * p]);
    }
    out
}
fn save_checkpoint<B: Backend>(
    trainer: &mut Trainer<B>,
    path: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    mantissa::checkpoint::save_file(trainer, path)?;
    Ok(())
}

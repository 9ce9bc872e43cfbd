//! Why loss scaling exists, shown on real data: an MNIST classifier whose loss enters the objective with a
//! small weight (lambda = 2^-20, as an auxiliary loss in a larger objective would), so that every loss
//! gradient lies below f16's smallest subnormal (about 6e-8). It trains under float32, under mixed_float16
//! without scaling, with a fixed scale of 512, with dynamic scaling (TensorFlow's defaults), under
//! mixed_bfloat16, and once with a dynamic scale that starts far too high (2^60), which overflows, skips,
//! backs off and then trains.
//!
//! `cargo run --release --example loss_scaling` prints a table and one line per row:
//! `row: policy=mixed_float16 scaling=none loss_scale=1 final_loss=... underflow=... skipped=0 weights_moved=false`

use std::process::ExitCode;

use mantissa::backends::{AnyBackend, BackendKind};
use mantissa::data::load_bundled;
use mantissa::host::HostBuffer;
use mantissa::{
    AdamW, Backend, DynamicConfig, DynamicLossScale, LossScale, MemoryPlan, Model, Optimizer, Policy, Shape,
    TrainConfig, Trainer,
};

const LOSS_WEIGHT: f32 = 1.0 / 1_048_576.0; // 2^-20
const BATCH: usize = 64;
const STEPS: usize = 250; // two passes over 8000 digits

struct Row {
    policy: Policy,
    scaling: &'static str,
    loss_scale: LossScale,
}

struct Outcome {
    final_scale: f32,
    final_loss: f32,
    underflow: f32,
    skipped: u64,
    moved: bool,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let data = load_bundled(concat!(env!("CARGO_MANIFEST_DIR"), "/data").as_ref())?;
    let (train, test) = data.split(8000);
    let pixels = train.pixels();
    let to_f32 = |set: &mantissa::data::Mnist, n: usize| {
        let mut x = vec![0.0f32; n * pixels];
        for i in 0..n {
            set.image_f32(i, &mut x[i * pixels..(i + 1) * pixels]);
        }
        x
    };
    let (train_x, test_x) = (to_f32(&train, train.len()), to_f32(&test, test.len()));
    let train_y: Vec<u32> = train.labels.iter().map(|&l| u32::from(l)).collect();
    let test_y: Vec<u32> = test.labels.iter().map(|&l| u32::from(l)).collect();

    let dynamic = LossScale::Dynamic(DynamicLossScale::tensorflow());
    let too_high = LossScale::Dynamic(DynamicLossScale::new(DynamicConfig::tensorflow().initial_scale(2f32.powi(60)))?);
    let rows = [
        Row { policy: Policy::FLOAT32, scaling: "none", loss_scale: LossScale::None },
        Row { policy: Policy::MIXED_FLOAT16, scaling: "none", loss_scale: LossScale::None },
        Row { policy: Policy::MIXED_FLOAT16, scaling: "fixed", loss_scale: LossScale::fixed(512.0)? },
        Row { policy: Policy::MIXED_FLOAT16, scaling: "dynamic", loss_scale: dynamic },
        Row { policy: Policy::MIXED_BFLOAT16, scaling: "none", loss_scale: LossScale::None },
        Row { policy: Policy::MIXED_FLOAT16, scaling: "dynamic-from-2^60", loss_scale: too_high },
    ];
    let kind = BackendKind::best_cpu();
    println!(
        "MNIST MLP 784-128-10, loss weight 2^-20, AdamW lr 1e-3 (no weight decay), batch {BATCH}, {STEPS} steps, backend {}",
        kind.name()
    );
    println!("final_loss: cross-entropy on the 2000 test digits; underflow: mean fraction of non-zero loss gradients");
    println!("flushed to zero by the cast to the compute dtype\n");
    println!(
        "| policy         | scaling           | loss scale (end) | final loss | underflow | skipped | weights moved |"
    );
    println!(
        "|----------------|-------------------|------------------|------------|-----------|---------|---------------|"
    );
    let mut lines = Vec::new();
    for row in &rows {
        let o = train_one(kind, row, &train_x, &train_y, &test_x, &test_y)?;
        println!(
            "| {:<14} | {:<17} | {:>16} | {:>10.4} | {:>9.4} | {:>7} | {:>13} |",
            row.policy.name(),
            row.scaling,
            pow2(o.final_scale),
            o.final_loss,
            o.underflow,
            o.skipped,
            o.moved
        );
        lines.push(format!(
            "row: policy={} scaling={} loss_scale={} final_loss={:.6} underflow={:.4} skipped={} weights_moved={}",
            row.policy.name(),
            row.scaling,
            o.final_scale,
            o.final_loss,
            o.underflow,
            o.skipped,
            o.moved
        ));
    }
    println!();
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// `2^k` for exact powers of two (loss scales), the plain number otherwise.
fn pow2(x: f32) -> String {
    let k = x.log2();
    if x > 0.0 && k.fract() == 0.0 && k.abs() < 128.0 {
        format!("2^{}", k as i32)
    } else {
        format!("{x}")
    }
}

fn train_one(
    kind: BackendKind,
    row: &Row,
    train_x: &[f32],
    train_y: &[u32],
    test_x: &[f32],
    test_y: &[u32],
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let model = Model::sequential(Shape::flat(784)).linear(128).relu().linear(10).build()?;
    let optimizer: Optimizer = AdamW::new(1e-3).weight_decay(0.0).into();
    let plan = MemoryPlan::new(&model, row.policy, &optimizer, BATCH)?;
    let mut arena = HostBuffer::new(plan.total)?;
    let backend = AnyBackend::open(kind, arena.as_mut_slice())?;
    let config = TrainConfig::new(BATCH, row.policy).loss_scale(row.loss_scale).loss_weight(LOSS_WEIGHT).seed(7);
    let mut trainer = Trainer::new(backend, model, row.policy, optimizer, config)?;
    let n = trainer.model().param_len();
    let mut before = vec![0.0f32; n];
    trainer.read_master(&mut before)?;
    let pixels = 784;
    let samples = train_y.len();
    let mut underflow_sum = 0.0f64;
    for s in 0..STEPS {
        let start = (s * BATCH) % samples;
        let end = (start + BATCH).min(samples);
        let r = trainer.step(&train_x[start * pixels..end * pixels], &train_y[start..end])?;
        underflow_sum += f64::from(r.underflow);
    }
    let mut after = vec![0.0f32; n];
    trainer.read_master(&mut after)?;
    let eval = trainer.evaluate(test_x, test_y)?;
    let _ = trainer.backend().capabilities();
    Ok(Outcome {
        final_scale: trainer.loss_scale().scale(),
        final_loss: eval.loss,
        underflow: (underflow_sum / STEPS as f64) as f32,
        skipped: trainer.skipped(),
        moved: before != after,
    })
}

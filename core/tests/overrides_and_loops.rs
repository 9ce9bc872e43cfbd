//! Per-layer policy override (a float32 output layer under a mixed policy), gradient clipping after
//! unscaling against an f64 norm, and custom training loops with `GradScaler` matching `Trainer::step`.

mod common;

use common::AlignedBuf;
use mantissa_core::rng::Rng;
use mantissa_core::*;

fn data(rows: usize, features: usize, classes: u32, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let y: Vec<u32> = (0..rows).map(|_| rng.below(classes as usize) as u32).collect();
    let x = (0..rows * features).map(|i| y[i / features] as f32 * 0.3 + rng.uniform(-0.5, 0.5)).collect();
    (x, y)
}

fn mlp(f32_head: bool) -> Model {
    let b = Model::sequential(Shape::flat(6)).linear(12).gelu().linear(3);
    if f32_head { b.dtype_policy(Policy::FLOAT32) } else { b }.build().unwrap()
}

fn new_trainer<'a>(
    buf: &'a mut AlignedBuf,
    model: Model,
    policy: Policy,
    opt: Optimizer,
    cfg: TrainConfig,
) -> Trainer<Reference<'a>> {
    Trainer::new(Reference::new(buf.bytes()), model, policy, opt, cfg).unwrap()
}

#[test]
fn float32_head_under_mixed_policy_is_planned_and_trains() {
    let opt: Optimizer = AdamW::new(1e-2).into();
    let plain = MemoryPlan::new(&mlp(false), Policy::MIXED_BFLOAT16, &opt, 8).unwrap();
    let head = MemoryPlan::new(&mlp(true), Policy::MIXED_BFLOAT16, &opt, 8).unwrap();
    // The head's input is cast to f32 and its logits are stored in f32: more activation bytes.
    assert!(head.activations > plain.activations, "{head:?} vs {plain:?}");
    assert_eq!(mlp(true).out_dtypes(Policy::MIXED_BFLOAT16)[..3], [DType::BF16, DType::BF16, DType::F32]);
    assert_eq!(mlp(true).compute_dtype(2, Policy::MIXED_BFLOAT16), DType::F32);

    let mut buf = AlignedBuf::new(head.total);
    let mut t =
        new_trainer(&mut buf, mlp(true), Policy::MIXED_BFLOAT16, opt, TrainConfig::new(8, Policy::MIXED_BFLOAT16));
    let (x, y) = data(8, 6, 3, 1);
    let first = t.step(&x, &y).unwrap();
    let mut last = first;
    for _ in 0..40 {
        last = t.step(&x, &y).unwrap();
    }
    assert!(last.loss < 0.5 * first.loss, "{} -> {}", first.loss, last.loss);
    assert_eq!(last.underflow, 0.0, "f32 logits: no cast of the loss gradient");
    assert_eq!(t.arena().high_water(), head.total);
}

#[test]
fn float32_head_reads_exact_f32_weights() {
    // Under mixed_float16, a float32 head must compute its logits from the f32 master weights: its output
    // equals an f64 evaluation of (f16 hidden activations) x (f32 weights) to f32 accuracy, not f16's.
    let opt: Optimizer = Sgd::new(0.1).into();
    let model = Model::sequential(Shape::flat(4)).linear(3).dtype_policy(Policy::FLOAT32).build().unwrap();
    let plan = MemoryPlan::new(&model, Policy::MIXED_FLOAT16, &opt, 1).unwrap();
    let mut buf = AlignedBuf::new(plan.total);
    let mut t = new_trainer(&mut buf, model, Policy::MIXED_FLOAT16, opt, TrainConfig::new(1, Policy::MIXED_FLOAT16));
    let w: Vec<f32> = vec![
        0.1001, -0.2003, 0.3007, 0.4001, 0.5003, -0.6007, 0.7001, 0.8003, 0.9007, 1.0001, 1.1003, -1.2007, 0.01, 0.02,
        0.03,
    ];
    t.write_master(&w).unwrap();
    let x = [1.0f32, 0.5, 0.25, 0.125]; // exact in f16
                                        // Class 2's logit: sum_i w[2*4+i] * x[i] + b[2]. With f16 weights it would differ in the 4th digit.
    let exact: f64 = (0..4).map(|i| w[8 + i] as f64 * x[i] as f64).sum::<f64>() + w[14] as f64;
    let mut pred = [0u32];
    t.predict(&x, &mut pred).unwrap();
    let eval = t.evaluate(&x, &[2]).unwrap();
    // loss = logsumexp(z) - z_2: recompute it in f64 from f32-exact logits.
    let z: Vec<f64> =
        (0..3).map(|c| (0..4).map(|i| w[c * 4 + i] as f64 * x[i] as f64).sum::<f64>() + w[12 + c] as f64).collect();
    let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
    assert!((eval.loss as f64 - (lse - exact)).abs() < 1e-5, "loss {} vs f64 {}", eval.loss, lse - exact);
}

#[test]
fn overrides_are_only_float32_on_layers_with_weights() {
    let r = Model::sequential(Shape::flat(4)).linear(3).relu().dtype_policy(Policy::FLOAT32).build();
    assert!(matches!(r, Err(Error::InvalidModel(_))));
    let r = Model::sequential(Shape::flat(4)).linear(3).dtype_policy(Policy::MIXED_FLOAT16).build();
    assert!(matches!(r, Err(Error::InvalidModel(_))));
}

#[test]
fn clipping_happens_after_unscaling_and_uses_the_f64_norm() {
    // SGD lr 1 without momentum: w_new = w - g * min(1, max_norm / |g|). With a loss scale of 1024 the
    // clip must use the unscaled norm.
    for policy in [Policy::FLOAT32, Policy::MIXED_FLOAT16] {
        let opt: Optimizer = Sgd::new(1.0).into();
        let max_norm = 0.05f32;
        let cfg = TrainConfig::new(8, policy).loss_scale(LossScale::fixed(1024.0).unwrap()).clip_norm(max_norm);
        let plan = MemoryPlan::new(&mlp(false), policy, &opt, 8).unwrap();
        let mut buf = AlignedBuf::new(plan.total);
        let mut t = new_trainer(&mut buf, mlp(false), policy, opt, cfg);
        let (x, y) = data(8, 6, 3, 2);
        let n = t.model().param_len();
        let mut w0 = vec![0.0f32; n];
        t.read_master(&mut w0).unwrap();
        // The gradients this step will produce, times 1024.
        t.forward_backward(&x, &y, 1024.0).unwrap();
        let mut g = vec![0.0f32; n];
        t.read_gradients(&mut g).unwrap();
        let norm: f64 = g.iter().map(|&v| (v as f64 / 1024.0).powi(2)).sum::<f64>().sqrt();
        let r = t.step(&x, &y).unwrap();
        assert!(((r.grad_norm as f64) - norm).abs() <= 1e-5 * norm, "{policy}: {} vs f64 {norm}", r.grad_norm);
        assert!(norm > max_norm as f64, "the test needs a gradient above the clip");
        let mut w1 = vec![0.0f32; n];
        t.read_master(&mut w1).unwrap();
        let step_norm: f64 = w0.iter().zip(&w1).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
        assert!(
            (step_norm - max_norm as f64).abs() <= 1e-4 * max_norm as f64 + 1e-6,
            "{policy}: update norm {step_norm}"
        );
    }
}

#[test]
fn grad_scaler_loop_matches_trainer_step_bit_for_bit() {
    let policy = Policy::MIXED_FLOAT16;
    let opt: Optimizer = AdamW::new(1e-2).into();
    let plan = MemoryPlan::new(&mlp(false), policy, &opt, 8).unwrap();
    let dynamic = LossScale::Dynamic(DynamicLossScale::new(DynamicConfig::pytorch().growth_interval(3)).unwrap());
    let cfg = TrainConfig::new(8, policy).loss_scale(dynamic).seed(5);
    let (mut ba, mut bb) = (AlignedBuf::new(plan.total), AlignedBuf::new(plan.total));
    let mut auto = new_trainer(&mut ba, mlp(false), policy, opt, cfg);
    let mut custom = new_trainer(&mut bb, mlp(false), policy, opt, cfg);
    let mut scaler = GradScaler::new(dynamic);
    for s in 0..12u64 {
        let (mut x, y) = data(8, 6, 3, 10 + s);
        if s == 4 {
            x[3] = f32::INFINITY; // one overflowing step: both must skip it and back off
        }
        let r = auto.step(&x, &y).unwrap();
        custom.forward_backward(&x, &y, scaler.scale()).unwrap();
        let a = scaler.step(&mut custom).unwrap();
        assert_eq!(r.skipped, !a.applied, "step {s}");
        assert_eq!(auto.loss_scale().scale(), scaler.scale(), "step {s}");
    }
    let n = auto.model().param_len();
    let (mut wa, mut wb) = (vec![0.0f32; n], vec![0.0f32; n]);
    auto.read_master(&mut wa).unwrap();
    custom.read_master(&mut wb).unwrap();
    assert_eq!(wa.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), wb.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    assert_eq!(auto.updates(), custom.updates());
    assert_eq!(auto.skipped(), 1);
}

#[test]
fn staged_steps_equal_ordinary_steps_bit_for_bit() {
    let policy = Policy::MIXED_BFLOAT16;
    let opt: Optimizer = AdamW::new(1e-2).into();
    let plan = MemoryPlan::new(&mlp(false), policy, &opt, 8).unwrap();
    let cfg = TrainConfig::new(8, policy).seed(9);
    let (mut ba, mut bb) = (AlignedBuf::new(plan.total), AlignedBuf::new(plan.total));
    let mut plain = new_trainer(&mut ba, mlp(false), policy, opt, cfg);
    let mut staged = new_trainer(&mut bb, mlp(false), policy, opt, cfg);
    let (x, y) = data(8, 6, 3, 4);
    assert!(staged.step_staged(8).is_err(), "nothing staged yet");
    staged.stage(&x, &y).unwrap();
    for _ in 0..5 {
        let a = plain.step(&x, &y).unwrap();
        let b = staged.step_staged(8).unwrap();
        assert_eq!(a.loss.to_bits(), b.loss.to_bits());
        assert_eq!(a.correct, b.correct);
    }
    assert!(staged.step_staged(9).is_err());
    let mut pred = [0u32; 8];
    staged.predict(&x, &mut pred).unwrap();
    assert!(staged.step_staged(8).is_err(), "predict replaced the staged batch");
    let n = plain.model().param_len();
    let (mut wa, mut wb) = (vec![0.0f32; n], vec![0.0f32; n]);
    plain.read_master(&mut wa).unwrap();
    staged.read_master(&mut wb).unwrap();
    assert_eq!(wa, wb);
}

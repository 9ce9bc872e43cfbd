//! Trainer behaviour: it learns under every policy, inference leaves the model alone, a non-finite step is
//! skipped without a trace, user mistakes are errors that change nothing, and policies and models are
//! validated.

mod common;

use common::*;
use mantissa_core::backend::Capabilities;
use mantissa_core::layers::Shape;
use mantissa_core::rng::Rng;
use mantissa_core::{
    AdamW, Error, LossScale, MemoryPlan, Model, Optimizer, Policy, Reference, Sgd, TrainConfig, Trainer,
};

const POLICIES: [Policy; 3] = [Policy::FLOAT32, Policy::MIXED_FLOAT16, Policy::MIXED_BFLOAT16];
const FEATURES: usize = 8;
const CLASSES: usize = 3;
const BATCH: usize = 16;

fn mlp() -> Model {
    Model::sequential(Shape::flat(FEATURES)).linear(16).relu().linear(CLASSES).build().unwrap()
}

/// Three separable clusters around fixed random centres in `[-1, 1]^8` (noise +-0.35 per coordinate).
fn dataset(rng: &mut Rng, n: usize) -> (Vec<f32>, Vec<u32>) {
    let mut centres = Rng::new(1234);
    let centres: Vec<Vec<f32>> = (0..CLASSES).map(|_| rand_vec(&mut centres, FEATURES, -1.0, 1.0)).collect();
    let mut x = Vec::with_capacity(n * FEATURES);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let c = rng.below(CLASSES);
        x.extend(centres[c].iter().map(|&m| m + rng.uniform(-0.35, 0.35)));
        y.push(c as u32);
    }
    (x, y)
}

/// A buffer of exactly the planned size.
fn memory(model: &Model, policy: Policy, opt: Optimizer, batch: usize) -> AlignedBuf {
    AlignedBuf::new(MemoryPlan::new(model, policy, &opt, batch).unwrap().total)
}

/// Every persistent byte a step may change, plus the counters and the loss scale.
#[derive(Debug, PartialEq)]
struct Snapshot {
    master: Vec<u8>,
    working: Vec<u8>,
    grad: Vec<u8>,
    state1: Vec<u8>,
    state2: Vec<u8>,
    updates: u64,
    skipped: u64,
    loss_scale: LossScale,
}

fn snapshot(t: &mut Trainer<Reference>) -> Snapshot {
    let p = *t.params();
    let be = t.backend_mut();
    let mut bytes = |b| down_bytes(be, b);
    let (master, working, grad, state1, state2) =
        (bytes(p.master), bytes(p.working), bytes(p.grad), bytes(p.state1), bytes(p.state2));
    Snapshot {
        master,
        working,
        grad,
        state1,
        state2,
        updates: t.updates(),
        skipped: t.skipped(),
        loss_scale: *t.loss_scale(),
    }
}

#[test]
fn loss_decreases_under_every_policy() {
    let mut rng = Rng::new(42);
    let (x, y) = dataset(&mut rng, 256);
    let (xt, yt) = dataset(&mut rng, 96);
    for policy in POLICIES {
        for opt in [Optimizer::from(Sgd::new(0.1).momentum(0.9)), AdamW::new(1e-2).into()] {
            let model = mlp();
            let mut mem = memory(&model, policy, opt, BATCH);
            let config = TrainConfig::new(BATCH, policy).seed(1);
            let mut t = Trainer::new(Reference::new(mem.bytes()), model, policy, opt, config).unwrap();
            if policy == Policy::MIXED_FLOAT16 {
                assert!(matches!(t.loss_scale(), LossScale::Dynamic(_)), "mixed_float16 defaults to dynamic scaling");
                assert_eq!(t.loss_scale().scale(), 32768.0);
            } else {
                assert_eq!(*t.loss_scale(), LossScale::None);
            }
            let before = t.evaluate(&xt, &yt).unwrap();
            let mut first = None;
            let mut last = 0.0;
            for epoch in 0..4 {
                for (xb, yb) in x.chunks(BATCH * FEATURES).zip(y.chunks(BATCH)) {
                    let r = t.step(xb, yb).unwrap();
                    assert!(
                        !r.skipped && r.loss.is_finite() && r.grad_norm.is_finite(),
                        "{policy} epoch {epoch}: {r:?}"
                    );
                    first.get_or_insert(r.loss);
                    last = r.loss;
                }
            }
            let after = t.evaluate(&xt, &yt).unwrap();
            println!(
                "{policy:15} {:5}: held-out loss {:.4} -> {:.4}, accuracy {:.3} -> {:.3}; batch loss {:.4} -> {last:.4}",
                opt.name(),
                before.loss,
                after.loss,
                before.accuracy(),
                after.accuracy(),
                first.unwrap()
            );
            assert!(after.loss < 0.25 * before.loss, "{policy} {}: {} -> {}", opt.name(), before.loss, after.loss);
            assert!(after.accuracy() >= 0.95, "{policy} {}: accuracy {}", opt.name(), after.accuracy());
            assert_eq!(t.updates(), 4 * 16);
            assert_eq!(t.skipped(), 0);
            let mut pred = vec![0u32; yt.len()];
            t.predict(&xt, &mut pred).unwrap();
            let correct = pred.iter().zip(&yt).filter(|(p, y)| p == y).count();
            assert_eq!(correct, after.correct, "predict and evaluate agree");
        }
    }
}

/// A trainer that has taken a few steps (non-zero optimizer state and gradients).
fn trained(mem: &mut AlignedBuf, policy: Policy, opt: Optimizer) -> (Trainer<Reference<'_>>, Vec<f32>, Vec<u32>) {
    let mut rng = Rng::new(7);
    let (x, y) = dataset(&mut rng, 40);
    let mut t = Trainer::new(Reference::new(mem.bytes()), mlp(), policy, opt, TrainConfig::new(BATCH, policy)).unwrap();
    for (xb, yb) in x.chunks(BATCH * FEATURES).zip(y.chunks(BATCH)) {
        t.step(xb, yb).unwrap();
    }
    (t, x, y)
}

#[test]
fn predict_and_evaluate_change_nothing() {
    for policy in POLICIES {
        let opt = Optimizer::from(AdamW::new(1e-2));
        let mut mem = memory(&mlp(), policy, opt, BATCH);
        let (mut t, x, y) = trained(&mut mem, policy, opt);
        let before = snapshot(&mut t);
        assert!(before.state1.iter().any(|&b| b != 0) && before.grad.iter().any(|&b| b != 0));
        let mut pred = vec![0u32; y.len()];
        t.predict(&x, &mut pred).unwrap();
        let e1 = t.evaluate(&x, &y).unwrap();
        let e2 = t.evaluate(&x, &y).unwrap();
        assert_eq!(e1, e2, "{policy}: evaluation is repeatable");
        assert_eq!(snapshot(&mut t), before, "{policy}: predict/evaluate changed persistent state");
    }
}

#[test]
fn non_finite_step_is_skipped_and_changes_nothing() {
    for policy in POLICIES {
        let opt = Optimizer::from(Sgd::new(0.1).momentum(0.9));
        let mut mem = memory(&mlp(), policy, opt, BATCH);
        let (mut t, mut x, y) = trained(&mut mem, policy, opt);
        let scale = t.loss_scale().scale();
        let before = snapshot(&mut t);
        x[5] = f32::NAN;
        let r = t.step(&x[..BATCH * FEATURES], &y[..BATCH]).unwrap();
        assert!(r.skipped, "{policy}: {r:?}");
        assert!(r.grad_norm.is_nan());
        assert_eq!(r.loss_scale, scale, "the report gives the scale the step used");
        let after = snapshot(&mut t);
        assert_eq!(after.master, before.master, "{policy}: master");
        assert_eq!(after.working, before.working, "{policy}: working");
        assert_eq!(after.state1, before.state1, "{policy}: optimizer state");
        assert_eq!(after.updates, before.updates, "{policy}: updates");
        assert_eq!(after.skipped, before.skipped + 1);
        assert_eq!(r.skipped_total, after.skipped);
        match policy.compute {
            mantissa_core::DType::F16 => assert_eq!(t.loss_scale().scale(), scale / 2.0, "dynamic scale halves"),
            _ => assert_eq!(t.loss_scale().scale(), scale),
        }
        // An infinity too, and then a finite step applies again.
        x[5] = f32::INFINITY;
        assert!(t.step(&x[..BATCH * FEATURES], &y[..BATCH]).unwrap().skipped);
        x[5] = 0.5;
        let r = t.step(&x[..BATCH * FEATURES], &y[..BATCH]).unwrap();
        assert!(!r.skipped);
        assert_eq!(t.updates(), before.updates + 1);
        assert_ne!(snapshot(&mut t).master, before.master);
    }
}

#[test]
fn bad_batches_are_errors_and_change_nothing() {
    for policy in POLICIES {
        let opt = Optimizer::from(AdamW::new(1e-2));
        let mut mem = memory(&mlp(), policy, opt, BATCH);
        let (mut t, x, y) = trained(&mut mem, policy, opt);
        let before = snapshot(&mut t);
        let f = FEATURES;
        // Wrong input length, zero rows, too many rows, a label out of range (first and last row).
        let mut bad_last = y[..4].to_vec();
        bad_last[3] = CLASSES as u32;
        let cases: Vec<(&str, &[f32], Vec<u32>)> = vec![
            ("input one value short", &x[..4 * f - 1], y[..4].to_vec()),
            ("input one row long", &x[..5 * f], y[..4].to_vec()),
            ("zero rows", &x[..0], vec![]),
            ("more rows than the planned batch", &x[..(BATCH + 1) * f], y[..BATCH + 1].to_vec()),
            ("label == classes", &x[..4 * f], vec![CLASSES as u32, 0, 1, 2]),
            ("label == classes in the last row", &x[..4 * f], bad_last),
            ("label u32::MAX", &x[..4 * f], vec![0, u32::MAX, 1, 2]),
        ];
        for (what, xb, yb) in &cases {
            let r = t.step(xb, yb);
            match r {
                Err(Error::LabelOutOfRange { classes, .. }) => assert!(what.starts_with("label") && classes == CLASSES),
                Err(Error::ShapeMismatch { .. }) => assert!(!what.starts_with("label"), "{what}"),
                other => panic!("{policy} {what}: {other:?}"),
            }
            assert!(t.forward_backward(xb, yb, 1.0).is_err(), "{policy} forward_backward {what}");
            assert_eq!(snapshot(&mut t).master, before.master, "{policy} {what}");
        }
        assert!(t.evaluate(&x[..4 * f], &[0, 1, 2, 3]).is_err(), "evaluate with a bad label");
        assert!(t.evaluate(&x[..4 * f - 1], &y[..4]).is_err(), "evaluate with a short input");
        assert!(t.predict(&x[..4 * f - 1], &mut [0; 4]).is_err(), "predict with a short input");
        let after = snapshot(&mut t);
        // forward_backward may leave gradients; everything else must be untouched.
        assert_eq!(
            (after.master, after.working, after.state1, after.state2, after.updates, after.skipped, after.loss_scale),
            (
                before.master,
                before.working,
                before.state1,
                before.state2,
                before.updates,
                before.skipped,
                before.loss_scale
            ),
            "{policy}"
        );
        assert_eq!(t.arena().used(), t.plan().fixed(), "errors release the step's memory");
    }
}

#[test]
fn policy_names() {
    for (name, p) in [
        ("float32", Policy::FLOAT32),
        ("mixed_float16", Policy::MIXED_FLOAT16),
        ("mixed_bfloat16", Policy::MIXED_BFLOAT16),
    ] {
        assert_eq!(Policy::from_name(name), Ok(p));
        assert_eq!(p.name(), name);
        assert_eq!(p.to_string(), name);
        assert_eq!(p.variable, mantissa_core::DType::F32, "master weights are float32 under every policy");
        assert_eq!(p.is_mixed(), name != "float32");
    }
    for bad in ["", "fp16", "Float32", "mixed_float32", "float32 ", "bfloat16"] {
        let e = Policy::from_name(bad).unwrap_err();
        assert_eq!(e, Error::UnknownPolicy, "{bad:?}");
        let msg = e.to_string();
        assert!(msg.contains("float32, mixed_float16, mixed_bfloat16, auto"), "{msg}");
    }
    let caps = Capabilities { backend: "test", device: "test", fast_f16: true, fast_bf16: false };
    assert_eq!(Policy::resolve("auto", &caps).unwrap().0, Policy::MIXED_FLOAT16);
    assert_eq!(Policy::resolve("mixed_bfloat16", &caps).unwrap().0, Policy::MIXED_BFLOAT16);
    assert_eq!(Policy::resolve("nope", &caps), Err(Error::UnknownPolicy));
}

#[test]
fn auto_policy_follows_the_hardware() {
    for (fast_f16, fast_bf16, want) in [
        (true, true, Policy::MIXED_BFLOAT16),
        (false, true, Policy::MIXED_BFLOAT16),
        (true, false, Policy::MIXED_FLOAT16),
        (false, false, Policy::FLOAT32),
    ] {
        let caps = Capabilities { backend: "test", device: "test", fast_f16, fast_bf16 };
        let (p, why) = Policy::auto(&caps);
        assert_eq!(p, want, "fast_f16 {fast_f16}, fast_bf16 {fast_bf16}");
        assert!(!why.trim().is_empty());
    }
    // The reference backend has no fast 16-bit arithmetic.
    let mut mem = AlignedBuf::new(64);
    let be = Reference::new(mem.bytes());
    assert_eq!(Policy::auto(&mantissa_core::Backend::capabilities(&be)).0, Policy::FLOAT32);
}

#[test]
fn invalid_models_are_errors() {
    let img = Shape::image(1, 6, 5);
    let cases = [
        ("Linear after a conv without flatten", Model::sequential(img).conv2d(2, 3, 1, 0).linear(3).build()),
        ("conv kernel larger than the input", Model::sequential(img).conv2d(2, 7, 1, 0).flatten().linear(3).build()),
        ("conv kernel larger even with padding", Model::sequential(img).conv2d(2, 8, 1, 1).flatten().linear(3).build()),
        ("max-pool kernel larger than the input", Model::sequential(img).maxpool2d(6, 1).flatten().linear(3).build()),
        ("empty model", Model::sequential(Shape::flat(4)).build()),
        ("output not flat", Model::sequential(img).conv2d(2, 3, 1, 0).build()),
        ("output not flat after relu", Model::sequential(img).relu().build()),
        ("a single class", Model::sequential(Shape::flat(4)).linear(1).build()),
        ("zero features", Model::sequential(Shape::flat(4)).linear(0).linear(3).build()),
        ("zero conv stride", Model::sequential(img).conv2d(2, 3, 0, 0).flatten().linear(3).build()),
        ("zero pool kernel", Model::sequential(img).maxpool2d(0, 1).flatten().linear(3).build()),
        ("empty input", Model::sequential(Shape::flat(0)).relu().build()),
        ("too many layers", (0..40).fold(Model::sequential(Shape::flat(4)), |m, _| m.relu()).linear(3).build()),
    ];
    for (what, r) in cases {
        assert!(matches!(r, Err(Error::InvalidModel(_))), "{what}: {r:?}");
    }
    // The first error is kept even when later layers would be fine.
    let r = Model::sequential(img).conv2d(2, 9, 1, 0).flatten().linear(3).build();
    assert_eq!(r, Err(Error::InvalidModel("Conv2d kernel larger than the padded input")));
    // And valid neighbours of those build.
    assert!(Model::sequential(img).conv2d(2, 6, 1, 1).flatten().linear(3).build().is_ok());
    assert!(Model::sequential(img).maxpool2d(5, 1).flatten().linear(2).build().is_ok());
}

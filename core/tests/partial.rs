//! Partial training (`Trainable::LastLayers`, `BiasOnly`) and frozen storage in another dtype: the trainable
//! tensors get exactly the gradients full training gives them, frozen ones never move, the plan is exact and
//! smaller, and bf16-stored frozen weights compute exactly as f32 weights holding the same (bf16) values.

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

/// An MLP whose first two weights (40 x 300, 60 x 40) are larger than one conversion block, so bf16 storage is
/// widened in several blocks: forward by rows, and backward (BiasOnly, through the second) by columns.
fn mlp() -> Model {
    Model::sequential(Shape::flat(300)).linear(40).relu().linear(60).gelu().linear(5).build().unwrap()
}

fn cnn() -> Model {
    Model::sequential(Shape::image(2, 6, 6))
        .conv2d(3, 3, 1, 1)
        .relu()
        .maxpool2d(2, 2)
        .conv2d(4, 3, 1, 1)
        .relu()
        .flatten()
        .linear(3)
        .build()
        .unwrap()
}

struct Run {
    plan: MemoryPlan,
    buf: AlignedBuf,
}

impl Run {
    fn new(model: &Model, policy: Policy, opt: &Optimizer, cfg: &TrainConfig) -> Run {
        let plan = MemoryPlan::for_config(model, policy, opt, cfg).unwrap();
        Run { plan, buf: AlignedBuf::new(plan.total) }
    }
    fn trainer(&mut self, model: &Model, policy: Policy, opt: Optimizer, cfg: TrainConfig) -> Trainer<Reference<'_>> {
        Trainer::new(Reference::new(self.buf.bytes()), model.clone(), policy, opt, cfg).unwrap()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Values of the full model-order vector `all` at the trainable tensors of `t`, in trainable order.
fn trainable_part<B: Backend>(t: &Trainer<B>, all: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; t.trainable_len()];
    for (_, loc) in t.layout().iter(t.model().layers().len()) {
        if loc.trainable {
            out[loc.offset..loc.offset + loc.len].copy_from_slice(&all[loc.model_offset..loc.model_offset + loc.len]);
        }
    }
    out
}

fn modes(model: &Model) -> Vec<Trainable> {
    let n = model.layers().iter().filter(|l| l.param_len() > 0).count();
    let mut v: Vec<Trainable> = (1..=n).map(Trainable::LastLayers).collect();
    v.push(Trainable::BiasOnly);
    v
}

#[test]
fn partial_gradients_equal_full_gradients_bit_for_bit() {
    for (model, features) in [(mlp(), 300), (cnn(), 72)] {
        for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
            let opt: Optimizer = Sgd::new(0.05).momentum(0.9).into();
            let (x, y) = data(4, features, model.classes() as u32, 3);
            let full_cfg = TrainConfig::new(4, policy).seed(7).loss_scale(LossScale::None);
            let mut full_run = Run::new(&model, policy, &opt, &full_cfg);
            let mut full = full_run.trainer(&model, policy, opt, full_cfg);
            full.forward_backward(&x, &y, 1.0).unwrap();
            let mut g_full = vec![0.0; model.param_len()];
            full.read_gradients(&mut g_full).unwrap();
            for mode in modes(&model) {
                let cfg = full_cfg.trainable(mode);
                let mut run = Run::new(&model, policy, &opt, &cfg);
                let mut t = run.trainer(&model, policy, opt, cfg);
                assert!(t.trainable_len() < model.param_len() || mode == Trainable::LastLayers(3));
                t.forward_backward(&x, &y, 1.0).unwrap();
                let mut g = vec![0.0; t.trainable_len()];
                t.read_gradients(&mut g).unwrap();
                assert_eq!(bits(&g), bits(&trainable_part(&t, &g_full)), "{policy} {mode:?}");
            }
        }
    }
}

#[test]
fn frozen_parameters_never_move_and_trainable_ones_train() {
    let model = mlp();
    let policy = Policy::FLOAT32;
    let opt: Optimizer = AdamW::new(1e-2).into();
    for mode in modes(&model) {
        let cfg = TrainConfig::new(8, policy).seed(1).trainable(mode);
        let mut run = Run::new(&model, policy, &opt, &cfg);
        let mut t = run.trainer(&model, policy, opt, cfg);
        let mut before = vec![0.0; model.param_len()];
        t.read_weights(&mut before).unwrap();
        let (x, y) = data(8, 300, 5, 2);
        let first = t.step(&x, &y).unwrap();
        let mut last = first;
        for _ in 0..30 {
            last = t.step(&x, &y).unwrap();
        }
        assert!(last.loss < first.loss, "{mode:?}: {} -> {}", first.loss, last.loss);
        let mut after = vec![0.0; model.param_len()];
        t.read_weights(&mut after).unwrap();
        for (_, loc) in t.layout().iter(model.layers().len()) {
            let r = loc.model_offset..loc.model_offset + loc.len;
            if loc.trainable {
                assert_ne!(bits(&after[r.clone()]), bits(&before[r]), "{mode:?}: a trainable tensor moved");
            } else {
                assert_eq!(bits(&after[r.clone()]), bits(&before[r]), "{mode:?}: a frozen tensor moved");
            }
        }
        assert_eq!(t.arena().high_water(), run_total(&model, policy, &opt, &cfg));
    }
}

fn run_total(model: &Model, policy: Policy, opt: &Optimizer, cfg: &TrainConfig) -> usize {
    MemoryPlan::for_config(model, policy, opt, cfg).unwrap().total
}

#[test]
fn initialisation_is_the_same_whatever_is_frozen() {
    let model = cnn();
    let opt: Optimizer = Sgd::new(0.1).into();
    let mut want = vec![0.0; model.param_len()];
    {
        let cfg = TrainConfig::new(2, Policy::FLOAT32).seed(5);
        let mut run = Run::new(&model, Policy::FLOAT32, &opt, &cfg);
        run.trainer(&model, Policy::FLOAT32, opt, cfg).read_weights(&mut want).unwrap();
    }
    for mode in modes(&model) {
        let cfg = TrainConfig::new(2, Policy::FLOAT32).seed(5).trainable(mode);
        let mut run = Run::new(&model, Policy::FLOAT32, &opt, &cfg);
        let mut got = vec![0.0; model.param_len()];
        run.trainer(&model, Policy::FLOAT32, opt, cfg).read_weights(&mut got).unwrap();
        assert_eq!(bits(&got), bits(&want), "{mode:?}");
    }
}

#[test]
fn bf16_frozen_storage_computes_like_f32_weights_holding_bf16_values() {
    // Under float32 with bf16 frozen storage, frozen weights are widened (exactly) block by block before each
    // product. A trainer that stores the same rounded values in f32 must agree bit for bit: forward, backward
    // through frozen layers (BiasOnly), and several updates.
    for (model, features) in [(mlp(), 300), (cnn(), 72)] {
        for mode in modes(&model) {
            let policy = Policy::FLOAT32;
            let opt: Optimizer = AdamW::new(1e-2).into();
            let (x, y) = data(6, features, model.classes() as u32, 9);
            let cfg32 = TrainConfig::new(6, policy).seed(3).trainable(mode);
            let cfg16 = cfg32.frozen_storage(DType::BF16);
            let (mut r32, mut r16) = (Run::new(&model, policy, &opt, &cfg32), Run::new(&model, policy, &opt, &cfg16));
            if r32.plan.frozen > 0 {
                assert!(r16.plan.frozen < r32.plan.frozen, "{mode:?}: bf16 storage halves frozen bytes");
            }
            assert_eq!(r16.plan.frozen_dtype, DType::BF16);
            let mut t16 = r16.trainer(&model, policy, opt, cfg16);
            let mut w = vec![0.0; model.param_len()];
            t16.read_weights(&mut w).unwrap(); // frozen ones already rounded to bf16
            let mut t32 = r32.trainer(&model, policy, opt, cfg32);
            t32.load_weights(&w).unwrap();
            for _ in 0..4 {
                let (a, b) = (t16.step(&x, &y).unwrap(), t32.step(&x, &y).unwrap());
                assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{mode:?}");
            }
            let (mut a, mut b) = (vec![0.0; model.param_len()], vec![0.0; model.param_len()]);
            t16.read_weights(&mut a).unwrap();
            t32.read_weights(&mut b).unwrap();
            assert_eq!(bits(&a), bits(&b), "{mode:?}");
            let mut pa = vec![0u32; 6];
            let mut pb = vec![0u32; 6];
            t16.predict(&x, &mut pa).unwrap();
            t32.predict(&x, &mut pb).unwrap();
            assert_eq!(pa, pb);
            assert_eq!(t16.arena().high_water(), r16.plan.total, "{mode:?}: the plan is exact");
        }
    }
}

#[test]
fn partial_plans_are_exact_and_smaller() {
    let opt: Optimizer = AdamW::new(1e-3).into();
    for model in [mlp(), cnn()] {
        for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16] {
            let full = MemoryPlan::new(&model, policy, &opt, 16).unwrap();
            for mode in modes(&model) {
                let cfg = TrainConfig::new(16, policy).trainable(mode);
                let p = MemoryPlan::for_config(&model, policy, &opt, &cfg).unwrap();
                let parts =
                    p.master + p.working + p.gradients + p.optimizer + p.frozen + p.control + p.activations + p.scratch;
                assert_eq!(parts, p.total, "{mode:?}: {p:?}");
                assert_eq!(p.trainable, mode);
                assert!(p.trainable_params <= full.trainable_params);
                assert_eq!(p.master, 4 * p.trainable_params);
                if p.trainable_params < model.param_len() {
                    assert!(p.total < full.total, "{mode:?}: {p:?} vs {full:?}");
                    assert!(p.gradients < full.gradients && p.optimizer < full.optimizer);
                }
                if let Trainable::LastLayers(1) = mode {
                    assert!(p.activations < full.activations, "no activations kept before the last layer");
                }
                // The arena one byte short is an error naming the bytes; exactly the plan works.
                let mut short = AlignedBuf::new(p.total - 1);
                let err = Trainer::new(Reference::new(short.bytes()), model.clone(), policy, opt, cfg).err();
                assert_eq!(err, Some(Error::OutOfMemory { needed: p.total, available: p.total - 1 }));
                let text = p.to_string();
                assert!(text.contains("trainable"), "{text}");
            }
        }
    }
    let full = MemoryPlan::new(&mlp(), Policy::FLOAT32, &opt, 16).unwrap();
    let last = MemoryPlan::for_config(
        &mlp(),
        Policy::FLOAT32,
        &opt,
        &TrainConfig::new(16, Policy::FLOAT32).trainable(Trainable::LastLayers(1)),
    )
    .unwrap();
    let table = SideBySide(&[("full", full), ("last layer", last)]).to_string();
    println!("{table}");
    assert!(table.lines().any(|l| l.starts_with("| total") && l.contains(&format!("{}", last.total % 1000))));
}

#[test]
fn invalid_partial_configs_are_errors() {
    let model = mlp();
    let opt: Optimizer = Sgd::new(0.1).into();
    for (cfg, what) in [
        (TrainConfig::new(2, Policy::FLOAT32).trainable(Trainable::LastLayers(0)), "LastLayers(0)"),
        (TrainConfig::new(2, Policy::FLOAT32).trainable(Trainable::LastLayers(4)), "LastLayers(4) of 3"),
        (TrainConfig::new(2, Policy::FLOAT32).frozen_storage(DType::I32), "int32 storage"),
    ] {
        let plan = MemoryPlan::for_config(&model, Policy::FLOAT32, &opt, &cfg);
        assert!(matches!(plan, Err(Error::InvalidConfig(_))), "{what}: {plan:?}");
        let mut buf = AlignedBuf::new(1 << 20);
        let t = Trainer::new(Reference::new(buf.bytes()), model.clone(), Policy::FLOAT32, opt, cfg);
        assert!(matches!(t.err(), Some(Error::InvalidConfig(_))), "{what}");
    }
    // Weights of the wrong length are errors.
    let cfg = TrainConfig::new(2, Policy::FLOAT32).trainable(Trainable::BiasOnly);
    let mut buf = AlignedBuf::new(1 << 20);
    let mut t = Trainer::new(Reference::new(buf.bytes()), model.clone(), Policy::FLOAT32, opt, cfg).unwrap();
    assert!(matches!(t.load_weights(&[0.0; 3]), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(t.read_weights(&mut [0.0; 3]), Err(Error::ShapeMismatch { .. })));
    // Checkpoints refuse partial trainers with a clear error.
    let mut out = vec![0u8; 1 << 20];
    match checkpoint::save(&mut t, &mut out) {
        Err(Error::Checkpoint(msg)) => assert!(msg.contains("partially trainable"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn load_weights_round_trips_and_matches_write_master_under_all() {
    let model = cnn();
    let opt: Optimizer = Sgd::new(0.1).into();
    let cfg = TrainConfig::new(2, Policy::MIXED_BFLOAT16);
    let mut run = Run::new(&model, Policy::MIXED_BFLOAT16, &opt, &cfg);
    let mut t = run.trainer(&model, Policy::MIXED_BFLOAT16, opt, cfg);
    let mut rng = Rng::new(4);
    let w: Vec<f32> = (0..model.param_len()).map(|_| rng.uniform(-1.0, 1.0)).collect();
    t.load_weights(&w).unwrap();
    let mut back = vec![0.0; model.param_len()];
    t.read_weights(&mut back).unwrap();
    assert_eq!(bits(&back), bits(&w));
    t.read_master(&mut back).unwrap();
    assert_eq!(bits(&back), bits(&w), "under Trainable::All the trainable vector is the model order");
}

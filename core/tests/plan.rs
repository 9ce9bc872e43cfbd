//! The memory plan and the arena: the plan is exact to the byte, its parts add up, mixed policies need less
//! activation memory, the printed table names every part, and training does not grow the arena.

mod common;

use common::*;
use mantissa_core::layers::Shape;
use mantissa_core::rng::Rng;
use mantissa_core::{
    AdamW, Backend, Error, MemoryPlan, Model, Optimizer, Policy, Reference, Sgd, TrainConfig, Trainer,
};

const POLICIES: [Policy; 3] = [Policy::FLOAT32, Policy::MIXED_FLOAT16, Policy::MIXED_BFLOAT16];

fn mlp() -> Model {
    Model::sequential(Shape::flat(20)).linear(32).relu().linear(16).gelu().linear(5).build().unwrap()
}

fn cnn() -> Model {
    Model::sequential(Shape::image(2, 9, 8))
        .conv2d(4, 3, 1, 1)
        .relu()
        .maxpool2d(2, 2)
        .flatten()
        .linear(6)
        .build()
        .unwrap()
}

fn optimizers() -> [Optimizer; 3] {
    [Sgd::new(0.1).into(), Sgd::new(0.1).momentum(0.9).into(), AdamW::new(1e-3).into()]
}

fn parts(p: &MemoryPlan) -> [usize; 7] {
    [p.master, p.working, p.gradients, p.optimizer, p.control, p.activations, p.scratch]
}

#[test]
fn plan_parts_sum_to_total() {
    for model in [mlp(), cnn()] {
        for policy in POLICIES {
            for opt in optimizers() {
                for batch in [1, 3, 64] {
                    let p = MemoryPlan::new(&model, policy, &opt, batch).unwrap();
                    assert_eq!(
                        parts(&p).iter().sum::<usize>(),
                        p.total,
                        "{policy} {} batch {batch}: {p:?}",
                        opt.name()
                    );
                    assert_eq!(p.fixed(), p.master + p.working + p.gradients + p.optimizer + p.control);
                    let words = mantissa_core::control::WORDS * 4;
                    assert!((words..words + 64).contains(&p.control), "the step-control block: {p:?}");
                    assert_eq!((p.batch, p.params, p.policy), (batch, model.param_len(), policy));
                    // Sizes that follow from the definitions: the data, plus up to 63 bytes of alignment padding
                    // before it (counted in the part whose allocation needed it; the first part starts at 0).
                    let n = model.param_len();
                    let padded = |bytes: usize, data: usize| (data..data + 64).contains(&bytes);
                    assert_eq!(p.master, 4 * n);
                    assert!(padded(p.gradients, 4 * n), "{p:?}");
                    let states = opt.state_vectors();
                    assert!((states * 4 * n..states * (4 * n + 64) + 1).contains(&p.optimizer), "{p:?}");
                    if policy == Policy::FLOAT32 {
                        assert_eq!(p.working, 0, "float32 reads the master weights directly");
                    } else {
                        assert!(padded(p.working, 2 * n), "{p:?}");
                    }
                }
            }
        }
    }
    assert!(matches!(MemoryPlan::new(&mlp(), Policy::FLOAT32, &Sgd::new(0.1).into(), 0), Err(Error::InvalidConfig(_))));
}

#[test]
fn a_buffer_of_exactly_plan_total_fits_and_one_byte_less_does_not() {
    for (model, opt, policy) in [
        (mlp(), Optimizer::from(Sgd::new(0.1)), Policy::FLOAT32),
        (mlp(), AdamW::new(1e-3).into(), Policy::MIXED_FLOAT16),
        (cnn(), Sgd::new(0.1).momentum(0.9).into(), Policy::MIXED_BFLOAT16),
        (cnn(), AdamW::new(1e-3).into(), Policy::FLOAT32),
    ] {
        let batch = 7;
        let plan = MemoryPlan::new(&model, policy, &opt, batch).unwrap();
        let config = TrainConfig::new(batch, policy).seed(3);

        let mut exact = AlignedBuf::new(plan.total);
        let mut t = Trainer::new(Reference::new(exact.bytes()), model.clone(), policy, opt, config)
            .unwrap_or_else(|e| panic!("{policy}: a buffer of plan.total = {} bytes: {e}", plan.total));
        assert_eq!(t.backend().capacity(), plan.total);
        assert_eq!(*t.plan(), plan);
        // A full step (the largest allocation pattern) runs within it.
        let mut rng = Rng::new(4);
        let x = rand_vec(&mut rng, batch * model.input().len(), -1.0, 1.0);
        let labels: Vec<u32> = (0..batch).map(|i| (i % model.classes()) as u32).collect();
        t.step(&x, &labels).unwrap();
        assert_eq!(t.arena().high_water(), plan.total, "{policy}: the step used exactly the planned bytes");
        drop(t);

        let mut short = AlignedBuf::new(plan.total - 1);
        let r = Trainer::new(Reference::new(short.bytes()), model.clone(), policy, opt, config);
        assert_eq!(
            r.err(),
            Some(Error::OutOfMemory { needed: plan.total, available: plan.total - 1 }),
            "{policy}: one byte short"
        );
    }
}

#[test]
fn mixed_policies_need_less_activation_memory_and_fit_larger_batches() {
    let capacity = 1 << 20;
    for model in [mlp(), cnn()] {
        for opt in optimizers() {
            let f32_plan = MemoryPlan::new(&model, Policy::FLOAT32, &opt, 32).unwrap();
            let f32_max = MemoryPlan::max_batch(&model, Policy::FLOAT32, &opt, capacity).unwrap();
            for policy in [Policy::MIXED_FLOAT16, Policy::MIXED_BFLOAT16] {
                let p = MemoryPlan::new(&model, policy, &opt, 32).unwrap();
                assert!(
                    p.activations < f32_plan.activations,
                    "{policy}: {} vs {}",
                    p.activations,
                    f32_plan.activations
                );
                assert!(p.scratch <= f32_plan.scratch);
                let max = MemoryPlan::max_batch(&model, policy, &opt, capacity).unwrap();
                assert!(max > f32_max, "{policy} max batch {max} vs float32 {f32_max}");
            }
            for policy in POLICIES {
                // max_batch is the exact boundary.
                let b = MemoryPlan::max_batch(&model, policy, &opt, capacity).unwrap();
                assert!(b >= 1);
                assert!(
                    MemoryPlan::new(&model, policy, &opt, b).unwrap().total <= capacity,
                    "{policy}: plan({b}) fits"
                );
                assert!(
                    MemoryPlan::new(&model, policy, &opt, b + 1).unwrap().total > capacity,
                    "{policy}: plan({}) does not",
                    b + 1
                );
                // Capacity exactly plan(b).total gives b; one byte less gives b - 1.
                let exact = MemoryPlan::new(&model, policy, &opt, b).unwrap().total;
                assert_eq!(MemoryPlan::max_batch(&model, policy, &opt, exact).unwrap(), b);
                assert_eq!(MemoryPlan::max_batch(&model, policy, &opt, exact - 1).unwrap(), b - 1);
            }
            // Not even one sample.
            let one = MemoryPlan::new(&model, Policy::FLOAT32, &opt, 1).unwrap().total;
            assert_eq!(MemoryPlan::max_batch(&model, Policy::FLOAT32, &opt, one - 1).unwrap(), 0);
        }
    }
}

#[test]
fn display_table_lists_every_part() {
    let p = MemoryPlan::new(&cnn(), Policy::MIXED_BFLOAT16, &AdamW::new(1e-3).into(), 16).unwrap();
    let text = p.to_string();
    println!("{text}");
    let rows = [
        ("master weights (float32)", p.master),
        ("working weights (bfloat16)", p.working),
        ("gradients (float32)", p.gradients),
        ("optimizer state (float32)", p.optimizer),
        ("activations (bfloat16)", p.activations),
        ("scratch (bfloat16)", p.scratch),
        ("total", p.total),
    ];
    for (name, bytes) in rows {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("| {name} ")))
            .unwrap_or_else(|| panic!("no row {name:?}:\n{text}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(cells[2].replace(',', "").parse::<usize>().unwrap(), bytes, "row {name}: {line}");
        let mib: f64 = cells[3].parse().unwrap();
        assert!((mib - bytes as f64 / 1048576.0).abs() <= 0.0005, "row {name}: {line}");
    }
    assert!(text.contains("policy mixed_bfloat16, batch 16"), "{text}");
    assert!(text.contains(&format!("{} parameters", p.params)));
}

#[test]
fn arena_high_water_is_flat_over_training() {
    for policy in POLICIES {
        let model = cnn();
        let batch = 5;
        let opt = Optimizer::from(AdamW::new(1e-3));
        let plan = MemoryPlan::new(&model, policy, &opt, batch).unwrap();
        let mut mem = AlignedBuf::new(plan.total + 4096);
        let mut t =
            Trainer::new(Reference::new(mem.bytes()), model.clone(), policy, opt, TrainConfig::new(batch, policy))
                .unwrap();
        let base = t.arena().used();
        assert_eq!(base, plan.fixed(), "{policy}: persistent bytes");
        let mut rng = Rng::new(6);
        let mut marks = Vec::new();
        for step in 1..=20 {
            // Full and partial batches alike.
            let rows = 1 + (step % batch);
            let x = rand_vec(&mut rng, rows * model.input().len(), -1.0, 1.0);
            let labels: Vec<u32> = (0..rows).map(|_| rng.below(model.classes()) as u32).collect();
            t.step(&x, &labels).unwrap();
            assert_eq!(t.arena().used(), base, "{policy}: step {step} released what it allocated");
            if [1, 5, 20].contains(&step) {
                marks.push(t.arena().high_water());
            }
        }
        let x = rand_vec(&mut rng, 11 * model.input().len(), -1.0, 1.0);
        let labels: Vec<u32> = (0..11).map(|_| rng.below(model.classes()) as u32).collect();
        t.evaluate(&x, &labels).unwrap();
        t.predict(&x, &mut [0; 11]).unwrap();
        t.forward_backward(&x[..batch * model.input().len()], &labels[..batch], 1.0).unwrap();
        marks.push(t.arena().high_water());
        assert_eq!(marks, vec![plan.total; 4], "{policy}: high water after 1, 5, 20 steps and evaluation");
        assert_eq!(t.arena().used(), base);
    }
}

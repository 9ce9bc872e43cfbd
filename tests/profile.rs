//! `Profiled` forwards every op unchanged (training through it is bit-identical) and times what a step runs.
#![cfg(feature = "std")]

use mantissa::host::HostBuffer;
use mantissa::profile::Profiled;
use mantissa::{AdamW, MemoryPlan, Model, Optimizer, Policy, Reference, Shape, TrainConfig, Trainer};

#[test]
fn profiled_training_is_bit_identical_and_times_every_op() {
    let model = Model::sequential(Shape::flat(12)).linear(16).gelu().linear(8).relu().linear(3).build().unwrap();
    let policy = Policy::MIXED_FLOAT16;
    let opt = Optimizer::from(AdamW::new(1e-2));
    let plan = MemoryPlan::new(&model, policy, &opt, 5).unwrap();
    let x: Vec<f32> = (0..5 * 12).map(|i| (i % 7) as f32 / 7.0 - 0.5).collect();
    let y = [0u32, 1, 2, 1, 0];
    let (mut a, mut b) = (HostBuffer::new(plan.total).unwrap(), HostBuffer::new(plan.total).unwrap());
    let cfg = TrainConfig::new(5, policy);
    let mut plain = Trainer::new(Reference::new(a.as_mut_slice()), model.clone(), policy, opt, cfg).unwrap();
    let mut timed = Trainer::new(Profiled::new(Reference::new(b.as_mut_slice())), model, policy, opt, cfg).unwrap();
    timed.backend_mut().start().unwrap();
    for _ in 0..3 {
        let r1 = plain.step(&x, &y).unwrap();
        let r2 = timed.step(&x, &y).unwrap();
        assert_eq!(format!("{r1:?}"), format!("{r2:?}"));
    }
    timed.backend_mut().stop();
    let (mut w1, mut w2) = (vec![0.0; plain.trainable_len()], vec![0.0; timed.trainable_len()]);
    plain.read_master(&mut w1).unwrap();
    timed.read_master(&mut w2).unwrap();
    assert!(w1.iter().zip(&w2).all(|(p, q)| p.to_bits() == q.to_bits()), "profiling changed the training");
    let rows = timed.backend().rows();
    let find = |prefix: &str| {
        rows.iter().find(|r| r.op.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in {rows:?}"))
    };
    // Linear(12->16) with its bias in the GEMM, then GELU and Linear(16->8) as one op (a linear layer of at most
    // HEAD_MAX_OUT outputs after an activation), 3 steps.
    assert_eq!(find("gemm_fused[bias] 5x16x12").calls, 3);
    assert_eq!(find("linear_act_forward[GeluTanh] 5x16x8").calls, 3);
    // Backward: Linear(8->3) through ReLU into Linear(16->8)'s output, then Linear(16->8) through GELU into
    // Linear(12->16)'s, each with the earlier layer's bias gradient, as one op each (the reference composes them).
    assert_eq!(find("linear_act_backward[dRelu] 5x8x3").calls, 3);
    assert_eq!(find("linear_act_backward[dGeluTanh] 5x16x8").calls, 3);
    assert_eq!(find("step_control").calls, 3);
    assert_eq!(find("adamw_step_gated").calls, 3);
    assert!(rows.iter().all(|r| r.seconds >= 0.0 && r.calls > 0));
    assert!(find("gemm_fused[bias]").flops == 3 * 2 * 5 * 16 * 12);
}

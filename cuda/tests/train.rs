//! Twenty training steps of a small MLP and a small CNN on the GPU and on the reference, from the same seed
//! and data: the losses must stay within the stated tolerance of each other, step by step.

mod common;

use common::CAP;
use mantissa_core::rng::Rng;
use mantissa_core::{AdamW, Backend, Model, Policy, Reference, Shape, TrainConfig, Trainer};
use mantissa_cuda::CudaBackend;

fn data(input: usize, rows: usize, step: usize) -> (Vec<f32>, Vec<u32>) {
    let mut rng = Rng::new(1000 + step as u64);
    let x: Vec<f32> = (0..rows * input).map(|_| rng.uniform(0.0, 1.0)).collect();
    // Labels that depend on the input, so the loss falls: the class of the largest of the first 10 features.
    let labels = (0..rows)
        .map(|r| {
            let row = &x[r * input..r * input + 10.min(input)];
            row.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
        })
        .collect();
    (x, labels)
}

/// Runs both trainers and returns the largest relative loss difference over the steps.
fn run(model: &Model, policy: Policy, rows: usize) -> f32 {
    let config = TrainConfig::new(rows, policy).seed(3);
    let opt = AdamW::new(3e-3).weight_decay(0.01);
    let mut gpu = Trainer::new(CudaBackend::new(0, CAP).expect("GPU 0"), model.clone(), policy, opt, config).unwrap();
    let host: &'static mut [u8] = Box::leak(vec![0u8; CAP + 64].into_boxed_slice());
    let mut cpu = Trainer::new(Reference::new(host), model.clone(), policy, opt, config).unwrap();
    let input = model.input().len();
    let mut worst = 0.0f32;
    for step in 0..20 {
        let (x, labels) = data(input, rows, step);
        let g = gpu.step(&x, &labels).unwrap();
        let r = cpu.step(&x, &labels).unwrap();
        let d = (g.loss - r.loss).abs() / r.loss.abs().max(1e-3);
        println!(
            "{} step {step:2}: loss gpu {:.6} reference {:.6} (rel diff {d:.2e}) correct {}/{} vs {}/{} skipped {} {}",
            policy.name(),
            g.loss,
            r.loss,
            g.correct,
            rows,
            r.correct,
            rows,
            g.skipped,
            r.skipped
        );
        assert_eq!(g.skipped, r.skipped, "step {step}: loss-scale decisions differ");
        worst = worst.max(d);
    }
    worst
}

/// Tolerance on the per-step loss, relative: float32 differs only by summation order (cuBLAS and tree
/// reductions); 16-bit policies also round activations, where one f32 ulp can flip a rounding and the
/// difference grows over 20 updates.
fn tolerance(p: Policy) -> f32 {
    match p.compute {
        mantissa_core::DType::F32 => 1e-4,
        _ => 2e-2,
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn mlp_trains_like_the_reference() {
    let model = Model::sequential(Shape::flat(64)).linear(48).gelu().linear(32).relu().linear(10).build().unwrap();
    for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
        let worst = run(&model, policy, 33);
        println!("mlp {}: max relative loss difference {worst:.2e}", policy.name());
        assert!(worst <= tolerance(policy), "mlp {}: {worst}", policy.name());
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn cnn_trains_like_the_reference() {
    let model = Model::sequential(Shape::image(1, 12, 12))
        .conv2d(4, 3, 1, 1)
        .relu()
        .maxpool2d(2, 2)
        .conv2d(6, 3, 1, 0)
        .gelu()
        .flatten()
        .linear(10)
        .build()
        .unwrap();
    for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
        let worst = run(&model, policy, 17);
        println!("cnn {}: max relative loss difference {worst:.2e}", policy.name());
        assert!(worst <= tolerance(policy), "cnn {}: {worst}", policy.name());
    }
}

/// Programmatic dependent launch changes when a kernel's blocks start, never what they compute: the same steps,
/// queued and replayed as a CUDA graph, with it on and off leave the same bits in every weight and moment and
/// give the same report.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn pdl_on_and_off_train_the_same_bits() {
    let model = Model::sequential(Shape::flat(64)).linear(48).gelu().linear(32).gelu().linear(10).build().unwrap();
    let rows = 96;
    for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
        let config = TrainConfig::new(rows, policy).seed(3);
        let opt = AdamW::new(3e-3).weight_decay(0.01);
        let mut t = [true, false].map(|pdl| {
            let mut be = CudaBackend::new(0, CAP).expect("GPU 0");
            be.set_pdl(pdl);
            Trainer::new(be, model.clone(), policy, opt, config).unwrap()
        });
        let hopper = t[0].backend().compute_capability().0 >= 9;
        assert_eq!(t[0].backend().pdl(), hopper, "PDL is on by default from sm_90");
        assert!(!t[1].backend().pdl());
        for step in 0..6 {
            let (x, labels) = data(64, rows, step);
            for tr in t.iter_mut() {
                tr.stage(&x, &labels).unwrap();
                tr.queue_staged(rows).unwrap();
            }
        }
        let [on, off] = &mut t;
        let (a, b) = (on.report().unwrap(), off.report().unwrap());
        println!("{}: PDL {} / off: {a:?}", policy.name(), if hopper { "on" } else { "unavailable" });
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{}: reports differ", policy.name());
        let p = *on.params();
        for (name, buf) in [("master", p.master), ("working", p.working), ("m", p.state1), ("v", p.state2)] {
            let (mut x, mut y) = (vec![0u8; buf.bytes()], vec![0u8; buf.bytes()]);
            on.backend_mut().download_bytes(buf, &mut x).unwrap();
            off.backend_mut().download_bytes(buf, &mut y).unwrap();
            assert!(x == y, "{}: {name} differs with PDL on and off", policy.name());
        }
    }
}

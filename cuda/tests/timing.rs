//! Step time of the "gpu-mlp" workload on the GPU under each policy (784 -> 4096 -> GELU -> 4096 -> GELU -> 10,
//! batch 8192, AdamW), to set against PyTorch's numbers in shared/GPU.md. Not a correctness test: it prints.
//!
//! Two measurements: the device step (forward, loss, backward, grad_stats, fused AdamW, written with the
//! backend ops directly on data already on the GPU, as PyTorch's timing is), and `Trainer::step`, which also
//! converts and uploads the batch and reads the predictions back.

use std::time::Instant;

use mantissa_core::backend::{Activation, AdamWStep, Gemm, ParamBufs};
use mantissa_core::rng::Rng;
use mantissa_core::{AdamW, Arena, Backend, DType, MemoryPlan, Model, Policy, Shape, TrainConfig, Trainer};
use mantissa_cuda::CudaBackend;

const B: usize = 8192;
const I: usize = 784;
const H: usize = 4096;
const O: usize = 10;

fn device_step_ms(policy: Policy, steps: usize) -> f64 {
    let c = policy.compute;
    let mut be = CudaBackend::new(0, 2 << 30).expect("GPU 0");
    let mut a = Arena::new(be.capacity());
    let p_len = H * I + H + H * H + H + O * H + O;
    let master = a.alloc(DType::F32, p_len).unwrap();
    let working = if c == DType::F32 { master } else { a.alloc(c, p_len).unwrap() };
    let grad = a.alloc(DType::F32, p_len).unwrap();
    let (m, v) = (a.alloc(DType::F32, p_len).unwrap(), a.alloc(DType::F32, p_len).unwrap());
    let mut rng = Rng::new(1);
    let init: Vec<f32> = (0..p_len).map(|_| rng.uniform(-0.03, 0.03)).collect();
    be.upload(master, &init).unwrap();
    be.cast(master, working).unwrap();
    be.fill(m, 0.0).unwrap();
    be.fill(v, 0.0).unwrap();
    // Parameter slices: W1 [H, I], b1, W2 [H, H], b2, W3 [O, H], b3.
    let mut off = 0;
    let mut take = |n: usize| {
        let r = (off, n);
        off += n;
        r
    };
    let (w1, b1, w2, b2, w3, b3) = (take(H * I), take(H), take(H * H), take(H), take(O * H), take(O));
    let (wk, gr) = (|s: (usize, usize)| working.slice(s.0, s.1), |s: (usize, usize)| grad.slice(s.0, s.1));
    let x = a.alloc(c, B * I).unwrap();
    let xs: Vec<f32> = (0..B * I).map(|_| rng.uniform(0.0, 1.0)).collect();
    be.upload(x, &xs).unwrap();
    let labels = a.alloc(DType::I32, B).unwrap();
    be.upload_i32(labels, &(0..B).map(|r| (r % O) as i32).collect::<Vec<_>>()).unwrap();
    let [h1p, h1, h2p, h2, da, db] = [0; 6].map(|_| a.alloc(c, B * H).unwrap());
    let logits = a.alloc(c, B * O).unwrap();
    let dlogits = a.alloc(c, B * O).unwrap();
    let loss = a.alloc(DType::F32, 1).unwrap();
    let gelu = Activation::GeluTanh;
    let step = |be: &mut CudaBackend, t: i32| -> mantissa_core::Result<()> {
        // forward
        be.gemm(&Gemm::new(B, H, I, x, wk(w1), h1p).b_t(I))?;
        be.add_bias(h1p, wk(b1), B, H, 1)?;
        be.activation(gelu, h1p, h1)?;
        be.gemm(&Gemm::new(B, H, H, h1, wk(w2), h2p).b_t(H))?;
        be.add_bias(h2p, wk(b2), B, H, 1)?;
        be.activation(gelu, h2p, h2)?;
        be.gemm(&Gemm::new(B, O, H, h2, wk(w3), logits).b_t(H))?;
        be.add_bias(logits, wk(b3), B, O, 1)?;
        be.softmax_cross_entropy(logits, labels, B, O, loss, dlogits, 1.0)?;
        // backward
        be.gemm(&Gemm::new(O, H, B, dlogits, h2, gr(w3)).a_t(O))?;
        be.bias_grad(dlogits, gr(b3), B, O, 1)?;
        be.gemm(&Gemm::new(B, H, O, dlogits, wk(w3), da))?;
        be.activation_backward(gelu, h2p, da, da)?;
        be.gemm(&Gemm::new(H, H, B, da, h1, gr(w2)).a_t(H))?;
        be.bias_grad(da, gr(b2), B, H, 1)?;
        be.gemm(&Gemm::new(B, H, H, da, wk(w2), db))?;
        be.activation_backward(gelu, h1p, db, db)?;
        be.gemm(&Gemm::new(H, I, B, db, x, gr(w1)).a_t(H))?;
        be.bias_grad(db, gr(b1), B, H, 1)?;
        // update
        let stats = be.grad_stats(grad, 1.0)?;
        assert_eq!(stats.non_finite, 0);
        let (b1_, b2_) = (0.9f32, 0.999f32);
        let s = AdamWStep {
            lr: 1e-3,
            beta1: b1_,
            beta2: b2_,
            eps: 1e-8,
            weight_decay: 0.01,
            bias_correction1: 1.0 - b1_.powi(t),
            bias_correction2: 1.0 - b2_.powi(t),
            grad_scale: 1.0,
        };
        be.adamw_step(&ParamBufs { master, working, grad, state1: m, state2: v }, &s)
    };
    for t in 1..=5 {
        step(&mut be, t).unwrap();
    }
    be.synchronize().unwrap();
    let start = Instant::now();
    for t in 6..6 + steps as i32 {
        step(&mut be, t).unwrap();
    }
    be.synchronize().unwrap();
    start.elapsed().as_secs_f64() * 1e3 / steps as f64
}

fn trainer_step_ms(policy: Policy, steps: usize) -> f64 {
    let model = Model::sequential(Shape::flat(I)).linear(H).gelu().linear(H).gelu().linear(O).build().unwrap();
    let opt = AdamW::new(1e-3);
    let plan = MemoryPlan::new(&model, policy, &opt.into(), B).unwrap();
    let be = CudaBackend::new(0, plan.total).expect("GPU 0");
    let mut tr = Trainer::new(be, model, policy, opt, TrainConfig::new(B, policy)).unwrap();
    let mut rng = Rng::new(2);
    let x: Vec<f32> = (0..B * I).map(|_| rng.uniform(0.0, 1.0)).collect();
    let labels: Vec<u32> = (0..B).map(|r| (r % O) as u32).collect();
    tr.step(&x, &labels).unwrap();
    tr.backend_mut().synchronize().unwrap();
    let start = Instant::now();
    for _ in 0..steps {
        tr.step(&x, &labels).unwrap();
    }
    tr.backend_mut().synchronize().unwrap();
    start.elapsed().as_secs_f64() * 1e3 / steps as f64
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn gpu_mlp_step_time() {
    let flops = 3.0 * 2.0 * (B * (I * H + H * H + H * O)) as f64;
    for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
        let ms = device_step_ms(policy, 20);
        let tr = trainer_step_ms(policy, 3);
        println!(
            "timing: gpu-mlp policy={} device_step_ms={ms:.3} ({:.0} TFLOP/s of matrix work) trainer_step_ms={tr:.2}",
            policy.name(),
            flops / (ms * 1e-3) / 1e12
        );
    }
}

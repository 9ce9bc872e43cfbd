//! Fused (cuBLASLt epilogue) against composed (cuBLAS GEMM, then the bias / activation / bias-gradient
//! kernels) on the gpu-mlp's shapes in bf16: the first and second layers' forward (bias + GELU) and the second
//! layer's input gradient through the first GELU with its bias gradient.
//!
//! `cargo run --release -p mantissa-cuda --example lt_epilogue` prints one line per op:
//! `fused: op=... m= n= k= dtype=bf16 fused_ms=... composed_ms=... speedup=... path=... default=...`, where
//! `path` is how the timed fused call ran (`set_fuse_act_grad(true)`) and `default` how it runs by default.
//! Each time is the median of 20 samples after warm-up; a sample is 5 back-to-back calls between two
//! synchronisations, divided by 5.

use mantissa_core::backend::{gemm_fused_composed, Activation, Epilogue, Gemm};
use mantissa_core::rng::Rng;
use mantissa_core::{Arena, Backend, Buf, DType};
use mantissa_cuda::CudaBackend;

mod common;

use common::median_ms;

fn main() {
    let mut be = match CudaBackend::new(0, 1 << 30) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("lt_epilogue: no GPU ({e})");
            return;
        }
    };
    let mut arena = Arena::new(be.capacity());
    let mut rng = Rng::new(5);
    let dt = DType::BF16;
    let mut buf = |be: &mut CudaBackend, dtype: DType, len: usize, amp: f32| -> Buf {
        let b = arena.alloc(dtype, len).unwrap();
        let v: Vec<f32> = (0..len).map(|_| rng.uniform(-amp, amp)).collect();
        be.upload(b, &v).unwrap();
        b
    };
    let (rows, i, h) = (8192, 784, 4096);
    let x = buf(&mut be, dt, rows * i, 1.0);
    let w1 = buf(&mut be, dt, h * i, 0.05);
    let w2 = buf(&mut be, dt, h * h, 0.02);
    let bias = buf(&mut be, dt, h, 0.1);
    let h1 = buf(&mut be, dt, rows * h, 1.0);
    let pre = buf(&mut be, dt, rows * h, 2.0);
    let out = buf(&mut be, dt, rows * h, 0.0);
    let dbias = buf(&mut be, DType::F32, h, 0.0);
    let dbias16 = buf(&mut be, dt, h, 0.0);
    let gelu = Activation::GeluTanh;
    let cases = [
        // y = h1 W2^T + b2: [8192, 4096] x [4096, 4096]^T
        ("forward_bias", Gemm::new(rows, h, h, h1, w2, out).b_t(h), Epilogue::Bias { bias }),
        // y = GELU(x W1^T + b1): [8192, 784] x [4096, 784]^T
        ("forward_bias_gelu", Gemm::new(rows, h, i, x, w1, out).b_t(i), Epilogue::BiasAct { bias, act: gelu, pre }),
        // y = GELU(h1 W2^T + b2): [8192, 4096] x [4096, 4096]^T
        ("forward_bias_gelu", Gemm::new(rows, h, h, h1, w2, out).b_t(h), Epilogue::BiasAct { bias, act: gelu, pre }),
        // dh1 = (dy W2) * GELU'(pre1), db1 = sum_rows dh1: [8192, 4096] x [4096, 4096]
        (
            "backward_dx_gelu_dbias",
            Gemm::new(rows, h, h, h1, w2, out),
            Epilogue::ActGrad { act: gelu, pre, dbias: Some(dbias) },
        ),
        // For comparison: the same without the bias gradient, and with it in bf16 (cuBLASLt 13.1 has
        // DGELU_BGRAD only for a bias gradient in C's dtype; the f32 one above runs DGELU, then bias_grad).
        ("backward_dx_gelu", Gemm::new(rows, h, h, h1, w2, out), Epilogue::ActGrad { act: gelu, pre, dbias: None }),
        (
            "backward_dx_gelu_dbias_bf16",
            Gemm::new(rows, h, h, h1, w2, out),
            Epilogue::ActGrad { act: gelu, pre, dbias: Some(dbias16) },
        ),
    ];
    for (op, g, ep) in cases {
        // The default path (ActGrad composed), then cuBLASLt for every epilogue it takes.
        be.set_fuse_act_grad(false);
        let before = be.fused_epilogue_calls();
        be.gemm_fused(&g, &ep).unwrap();
        let default = if be.fused_epilogue_calls() > before { "cublaslt" } else { "composed" };
        be.set_fuse_act_grad(true);
        let before = be.fused_epilogue_calls();
        be.gemm_fused(&g, &ep).unwrap();
        let path = if be.fused_epilogue_calls() > before { "cublaslt" } else { "composed" };
        let fused = median_ms(&mut be, |be| be.gemm_fused(&g, &ep).unwrap());
        let composed = median_ms(&mut be, |be| gemm_fused_composed(be, &g, &ep).unwrap());
        println!(
            "fused: op={op} m={} n={} k={} dtype=bf16 fused_ms={fused:.4} composed_ms={composed:.4} speedup={:.2} \
             path={path} default={default} tflops_fused={:.0}",
            g.m,
            g.n,
            g.k,
            composed / fused,
            g.flops() as f64 / (fused * 1e-3) / 1e12
        );
    }
}

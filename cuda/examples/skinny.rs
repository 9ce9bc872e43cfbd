//! The skinny kernels (`kernels/skinny.cu`) against cuBLAS (and the composed input gradient, and the previous
//! bias-gradient layout) on the gpu-mlp's last layer, 4096 -> 10 at batch 8192, bf16:
//!
//! `cargo run --release -p mantissa-cuda --example skinny` prints one line per op:
//! `skinny: op=... m= n= k= dtype=bf16 new_ms=... cublas_ms=... speedup=... new_gbps=...`, where `new_gbps` is
//! the bytes the op must move (its operands read once, its output written once) over the new time. Each time
//! is the median of 20 samples after warm-up; a sample is 5 back-to-back calls between two synchronisations,
//! divided by 5. `new_ms` runs with [`CudaBackend::set_skinny_gemm`] and [`CudaBackend::set_skinny_all`] on
//! (every skinny kernel), `cublas_ms` with both off (what ran before them). By default only the small-m kernel
//! and the few-channel bias gradient run (the others were slower than cuBLAS on the H200).

use mantissa_core::backend::{Activation, Epilogue, Gemm};
use mantissa_core::rng::Rng;
use mantissa_core::{Arena, Backend, Buf, DType};
use mantissa_cuda::CudaBackend;

mod common;

use common::median_ms;

enum Op {
    Gemm(Gemm),
    Fused(Gemm, Epilogue),
    BiasGrad(Buf, Buf, usize, usize),
}

fn main() {
    let mut be = match CudaBackend::new(0, 1 << 30) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skinny: no GPU ({e})");
            return;
        }
    };
    let mut arena = Arena::new(be.capacity());
    let mut rng = Rng::new(9);
    let dt = DType::BF16;
    let mut buf = |be: &mut CudaBackend, dtype: DType, len: usize, amp: f32| -> Buf {
        let b = arena.alloc(dtype, len).unwrap();
        let v: Vec<f32> = (0..len).map(|_| rng.uniform(-amp, amp)).collect();
        be.upload(b, &v).unwrap();
        b
    };
    let (rows, h, o) = (8192, 4096, 10);
    let hidden = buf(&mut be, dt, rows * h, 1.0); // H: [8192, 4096], the last hidden activation
    let w = buf(&mut be, dt, o * h, 0.05); // W: [10, 4096]
    let y = buf(&mut be, dt, rows * o, 0.0); // Y = H W^T: [8192, 10]
    let dy = buf(&mut be, dt, rows * o, 0.1); // dY: [8192, 10]
    let dw = buf(&mut be, DType::F32, o * h, 0.0); // dW = dY^T H: [10, 4096] f32
    let pre = buf(&mut be, dt, rows * h, 2.0); // the pre-activation of H
    let dh = buf(&mut be, dt, rows * h, 0.0); // dH = (dY W) * GELU'(pre): [8192, 4096]
    let db_prev = buf(&mut be, DType::F32, h, 0.0); // the previous layer's bias gradient
    let db = buf(&mut be, DType::F32, o, 0.0); // this layer's bias gradient
    let gelu = Activation::GeluTanh;
    let mb = |elems: usize| (elems * 2) as f64;
    let cases = [
        ("forward", Op::Gemm(Gemm::new(rows, o, h, hidden, w, y).b_t(h)), mb(rows * h + o * h + rows * o)),
        (
            "weight_grad",
            Op::Gemm(Gemm::new(o, h, rows, dy, hidden, dw).a_t(o)),
            mb(rows * h + rows * o) + (o * h * 4) as f64,
        ),
        ("input_grad", Op::Gemm(Gemm::new(rows, h, o, dy, w, dh)), mb(rows * h + o * h + rows * o)),
        (
            "input_grad_gelu_dbias",
            Op::Fused(Gemm::new(rows, h, o, dy, w, dh), Epilogue::ActGrad { act: gelu, pre, dbias: Some(db_prev) }),
            mb(2 * rows * h + o * h + rows * o) + (h * 4) as f64,
        ),
        (
            "input_grad_gelu",
            Op::Fused(Gemm::new(rows, h, o, dy, w, dh), Epilogue::ActGrad { act: gelu, pre, dbias: None }),
            mb(2 * rows * h + o * h + rows * o),
        ),
        ("bias_grad", Op::BiasGrad(dy, db, rows, o), mb(rows * o)),
    ];
    for (op, call, bytes) in cases {
        let mut run = |be: &mut CudaBackend| match &call {
            Op::Gemm(g) => be.gemm(g).unwrap(),
            Op::Fused(g, ep) => be.gemm_fused(g, ep).unwrap(),
            Op::BiasGrad(dy, db, outer, ch) => be.bias_grad(*dy, *db, *outer, *ch, 1).unwrap(),
        };
        be.set_skinny_gemm(true);
        be.set_skinny_all(true);
        let new = median_ms(&mut be, &mut run);
        be.set_skinny_gemm(false);
        let old = median_ms(&mut be, &mut run);
        be.set_skinny_gemm(true);
        let (m, n, k) = match &call {
            Op::Gemm(g) | Op::Fused(g, _) => (g.m, g.n, g.k),
            Op::BiasGrad(_, _, outer, ch) => (*outer, *ch, 1),
        };
        println!(
            "skinny: op={op} m={m} n={n} k={k} dtype=bf16 new_ms={new:.4} cublas_ms={old:.4} speedup={:.2} \
             new_gbps={:.0}",
            old / new,
            bytes / (new * 1e-3) / 1e9
        );
    }
}

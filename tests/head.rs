//! The trainer's classifier head (a linear layer of at most `HEAD_MAX_OUT` outputs after an activation, run as
//! `Backend::linear_act_forward` / `linear_act_backward`) on the host, where a device backend's kernel cannot be
//! run: a backend whose forward does not store the activation's output (as the CUDA kernel does not: here the
//! reference, with that buffer poisoned with NaN afterwards) must train bit for bit as the plain reference,
//! through the fused backward (`x_valid: false`) and through the plain one (the head trainable alone, where the
//! trainer recomputes the activation itself). The counts of calls say which path ran.

use mantissa::backend::{
    Activation, AdamWStep, Backend, Capabilities, ConvGeom, Gemm, GradStats, LinearActBackward, LinearActForward,
    ParamBufs, PoolGeom, SgdStep,
};
use mantissa::host::HostBuffer;
use mantissa::Trainable;
use mantissa::{AdamW, Buf, MemoryPlan, Model, Optimizer, Policy, Reference, Result, Shape, TrainConfig, Trainer};

/// The reference, except that `linear_act_forward` leaves NaN where `act(pre)` would be stored.
struct Unstoring<'a> {
    inner: Reference<'a>,
    forwards: usize,
    backwards: usize,
    invalid_x: usize,
}

impl Backend for Unstoring<'_> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn upload(&mut self, dst: Buf, src: &[f32]) -> Result<()> {
        self.inner.upload(dst, src)
    }
    fn upload_i32(&mut self, dst: Buf, src: &[i32]) -> Result<()> {
        self.inner.upload_i32(dst, src)
    }
    fn download(&mut self, src: Buf, dst: &mut [f32]) -> Result<()> {
        self.inner.download(src, dst)
    }
    fn download_bytes(&mut self, src: Buf, dst: &mut [u8]) -> Result<()> {
        self.inner.download_bytes(src, dst)
    }
    fn upload_bytes(&mut self, dst: Buf, src: &[u8]) -> Result<()> {
        self.inner.upload_bytes(dst, src)
    }
    fn fill(&mut self, dst: Buf, value: f32) -> Result<()> {
        self.inner.fill(dst, value)
    }
    fn cast(&mut self, src: Buf, dst: Buf) -> Result<()> {
        self.inner.cast(src, dst)
    }
    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        self.inner.gemm(g)
    }
    fn add_bias(&mut self, y: Buf, bias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        self.inner.add_bias(y, bias, outer, channels, inner)
    }
    fn bias_grad(&mut self, dy: Buf, dbias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        self.inner.bias_grad(dy, dbias, outer, channels, inner)
    }
    fn activation(&mut self, act: Activation, x: Buf, y: Buf) -> Result<()> {
        self.inner.activation(act, x, y)
    }
    fn activation_backward(&mut self, act: Activation, x: Buf, dy: Buf, dx: Buf) -> Result<()> {
        self.inner.activation_backward(act, x, dy, dx)
    }
    fn softmax_cross_entropy(
        &mut self,
        logits: Buf,
        labels: Buf,
        rows: usize,
        classes: usize,
        loss: Buf,
        dlogits: Buf,
        grad_scale: f32,
    ) -> Result<()> {
        self.inner.softmax_cross_entropy(logits, labels, rows, classes, loss, dlogits, grad_scale)
    }
    fn im2col(&mut self, x: Buf, g: &ConvGeom, images: usize, cols: Buf) -> Result<()> {
        self.inner.im2col(x, g, images, cols)
    }
    fn col2im(&mut self, cols: Buf, g: &ConvGeom, images: usize, dx: Buf) -> Result<()> {
        self.inner.col2im(cols, g, images, dx)
    }
    fn maxpool(&mut self, x: Buf, g: &PoolGeom, images: usize, y: Buf, argmax: Buf) -> Result<()> {
        self.inner.maxpool(x, g, images, y, argmax)
    }
    fn maxpool_backward(&mut self, dy: Buf, argmax: Buf, g: &PoolGeom, images: usize, dx: Buf) -> Result<()> {
        self.inner.maxpool_backward(dy, argmax, g, images, dx)
    }
    fn grad_stats(&mut self, grad: Buf, scale: f32) -> Result<GradStats> {
        self.inner.grad_stats(grad, scale)
    }
    fn sgd_step(&mut self, p: &ParamBufs, s: &SgdStep) -> Result<()> {
        self.inner.sgd_step(p, s)
    }
    fn adamw_step(&mut self, p: &ParamBufs, s: &AdamWStep) -> Result<()> {
        self.inner.adamw_step(p, s)
    }
    fn linear_act_forward(&mut self, op: &LinearActForward) -> Result<bool> {
        self.forwards += 1;
        self.inner.linear_act_forward(op)?;
        let n = op.rows * op.i;
        self.inner.upload(op.x.prefix(n), &vec![f32::NAN; n])?;
        Ok(false)
    }
    fn linear_act_backward(&mut self, op: &LinearActBackward) -> Result<()> {
        self.backwards += 1;
        if !op.x_valid {
            self.invalid_x += 1;
        }
        self.inner.linear_act_backward(op)
    }
}

fn model() -> Model {
    Model::sequential(Shape::flat(12)).linear(16).gelu().linear(9).relu().linear(5).build().unwrap()
}

/// Three steps of the plain reference and of `Unstoring` under `policy` and `trainable`; returns the
/// unstoring backend's counts after asserting identical reports and master weights.
fn compare(policy: Policy, trainable: Trainable) -> (usize, usize, usize) {
    let opt = Optimizer::from(AdamW::new(1e-2));
    let plan = MemoryPlan::new(&model(), policy, &opt, 6).unwrap();
    let (mut a, mut b) = (HostBuffer::new(plan.total + 4096).unwrap(), HostBuffer::new(plan.total + 4096).unwrap());
    let cfg = TrainConfig::new(6, policy).trainable(trainable);
    let x: Vec<f32> = (0..6 * 12).map(|i| ((i * 7) % 11) as f32 / 11.0 - 0.5).collect();
    let y = [0u32, 1, 2, 3, 4, 1];
    let mut plain = Trainer::new(Reference::new(a.as_mut_slice()), model(), policy, opt, cfg).unwrap();
    let be = Unstoring { inner: Reference::new(b.as_mut_slice()), forwards: 0, backwards: 0, invalid_x: 0 };
    let mut head = Trainer::new(be, model(), policy, opt, cfg).unwrap();
    for step in 0..3 {
        let r1 = plain.step(&x, &y).unwrap();
        let r2 = head.step(&x, &y).unwrap();
        assert_eq!(format!("{r1:?}"), format!("{r2:?}"), "{policy} step {step}");
    }
    let (mut w1, mut w2) = (vec![0.0; plain.trainable_len()], vec![0.0; head.trainable_len()]);
    plain.read_master(&mut w1).unwrap();
    head.read_master(&mut w2).unwrap();
    assert!(w1.iter().zip(&w2).all(|(p, q)| p.to_bits() == q.to_bits()), "{policy}: the weights differ");
    // Predictions run the head forward too.
    let (mut p1, mut p2) = (vec![0u32; 6], vec![0u32; 6]);
    plain.predict(&x, &mut p1).unwrap();
    head.predict(&x, &mut p2).unwrap();
    assert_eq!(p1, p2);
    let be = head.backend();
    (be.forwards, be.backwards, be.invalid_x)
}

#[test]
fn a_head_that_does_not_store_its_input_trains_as_the_reference() {
    for policy in [Policy::FLOAT32, Policy::MIXED_BFLOAT16, Policy::MIXED_FLOAT16] {
        let (fwd, bwd, invalid) = compare(policy, Trainable::All);
        // 3 steps + 1 predict forward. Each step's backward runs both linear layers after an activation fused:
        // the head told that its input is not stored, Linear(16 -> 9) that it is.
        assert_eq!((fwd, bwd, invalid), (4, 6, 3), "{policy}");
    }
}

#[test]
fn a_head_trained_alone_recomputes_the_activation_it_did_not_store() {
    // Only the last layer trains: its backward is the plain one, which reads the activation's output.
    let (fwd, bwd, invalid) = compare(Policy::MIXED_BFLOAT16, Trainable::LastLayers(1));
    assert_eq!((fwd, bwd, invalid), (4, 0, 0));
}

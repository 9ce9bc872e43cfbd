//! Optimizers through the reference backend's fused `sgd_step` / `adamw_step` against f64 implementations of
//! `torch.optim.SGD` and `torch.optim.AdamW` (the semantics documented on `SgdStep` / `AdamWStep`).
//!
//! Tolerance: `1e-6` relative to the *magnitude* of each result, a running sum of the absolute values of
//! every term that went into it (the f64 models carry it next to each value, so a weight that cancels to
//! near zero is not held to 1e-6 of its tiny self). Each f32 operation rounds by at most 2^-24 of its
//! magnitude; five steps of a handful of operations stay under 1e-6, while a wrong formula (a missing bias
//! correction, decay applied twice, Nesterov as plain momentum, grad_scale ignored) is off by far more.
//! The working copy is checked bit for bit: it is the new master rounded to nearest even.

// Parallel arrays (backend result, f64 model, tolerance) are walked by index on purpose.
#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use mantissa_core::arena::{Arena, Buf};
use mantissa_core::backend::ParamBufs;
use mantissa_core::layers::Shape;
use mantissa_core::rng::Rng;
use mantissa_core::{AdamW, Backend, DType, Error, Model, Optimizer, Policy, Reference, Sgd, TrainConfig, Trainer};

const N: usize = 257;
const STEPS: usize = 5;
const REL: f64 = 1e-6;

/// A value and its magnitude (the same computation over absolute values), for the tolerance.
#[derive(Clone, Copy, Debug, Default)]
struct V {
    x: f64,
    mag: f64,
}

fn close(got: f32, want: V) -> bool {
    (got as f64 - want.x).abs() <= REL * want.mag
}

/// f64 `torch.optim.SGD` (dampening 0) on one parameter vector.
struct SgdRef {
    w: Vec<V>,
    buf: Option<Vec<V>>,
}

impl SgdRef {
    fn step(&mut self, o: &Sgd, grad: &[f32], grad_scale: f32) {
        let (lr, mom, wd) = (o.lr as f64, o.momentum as f64, o.weight_decay as f64);
        // d_p = grad (unscaled) + weight_decay * param
        let mut d: Vec<V> = grad
            .iter()
            .zip(&self.w)
            .map(|(&g, w)| {
                let g = g as f64 * grad_scale as f64;
                V { x: g + wd * w.x, mag: g.abs() + wd * w.mag }
            })
            .collect();
        if mom != 0.0 {
            let buf: Vec<V> = match self.buf.take() {
                // First step: buf = clone(d_p).
                None => d.clone(),
                // buf = momentum * buf + d_p
                Some(b) => b.iter().zip(&d).map(|(b, d)| V { x: mom * b.x + d.x, mag: mom * b.mag + d.mag }).collect(),
            };
            d = if o.nesterov {
                d.iter().zip(&buf).map(|(d, b)| V { x: d.x + mom * b.x, mag: d.mag + mom * b.mag }).collect()
            } else {
                buf.clone()
            };
            self.buf = Some(buf);
        }
        for (w, d) in self.w.iter_mut().zip(&d) {
            *w = V { x: w.x - lr * d.x, mag: w.mag + lr * d.mag };
        }
    }
}

/// f64 `torch.optim.AdamW` (amsgrad off) on one parameter vector.
struct AdamRef {
    w: Vec<V>,
    m: Vec<V>,
    v: Vec<V>,
    t: i32,
}

impl AdamRef {
    fn step(&mut self, o: &AdamW, grad: &[f32], grad_scale: f32) {
        let (lr, b1, b2, eps, wd) = (o.lr as f64, o.beta1 as f64, o.beta2 as f64, o.eps as f64, o.weight_decay as f64);
        self.t += 1;
        let bc1 = 1.0 - b1.powi(self.t);
        let bc2 = 1.0 - b2.powi(self.t);
        let step_size = lr / bc1;
        for i in 0..self.w.len() {
            let g = grad[i] as f64 * grad_scale as f64;
            let (w, m, v) = (&mut self.w[i], &mut self.m[i], &mut self.v[i]);
            // param.mul_(1 - lr * weight_decay)
            *w = V { x: w.x * (1.0 - lr * wd), mag: w.mag * (1.0 - lr * wd) };
            // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            *m = V { x: m.x + (g - m.x) * (1.0 - b1), mag: b1 * m.mag + (1.0 - b1) * g.abs() };
            *v = V { x: v.x * b2 + (1.0 - b2) * g * g, mag: v.mag * b2 + (1.0 - b2) * g * g };
            // denom = exp_avg_sq.sqrt() / sqrt(bias_correction2) + eps; param.addcdiv_(exp_avg, denom, -step_size)
            let denom = v.x.sqrt() / bc2.sqrt() + eps;
            let upd = step_size * m.x / denom;
            // The quotient carries the relative error of m (its magnitude) plus a few roundings of its own.
            let upd_mag = step_size * m.mag / denom + 8.0 * upd.abs();
            *w = V { x: w.x - upd, mag: w.mag + upd_mag };
        }
    }
}

fn exact(v: &[f32]) -> Vec<V> {
    v.iter().map(|&x| V { x: x as f64, mag: (x as f64).abs() }).collect()
}

struct Fixture {
    p: ParamBufs,
    w0: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

/// Parameter buffers with `states` optimizer vectors and a working copy in `working` (F32: the master itself,
/// as under the float32 policy), initial weights in `[-1, 1]` and five gradient vectors.
fn fixture(be: &mut Reference, working: DType, states: usize, seed: u64) -> Fixture {
    let mut rng = Rng::new(seed);
    let mut arena = Arena::new(be.capacity());
    let w0 = rand_vec(&mut rng, N, -1.0, 1.0);
    let master = buf_with(be, &mut arena, DType::F32, &w0);
    let working = if working == DType::F32 { master } else { buf_with(be, &mut arena, working, &w0) };
    let grad = arena.alloc(DType::F32, N).unwrap();
    let mut state = [Buf::EMPTY; 2];
    for s in state.iter_mut().take(states) {
        *s = buf_with(be, &mut arena, DType::F32, &[0.0; N]);
    }
    // Gradients of mixed magnitudes, as a loss scale of 1024 would leave them (grad_scale = 1/1024 undoes it).
    let grads = (0..STEPS).map(|_| rand_vec(&mut rng, N, -1024.0, 1024.0)).collect();
    Fixture { p: ParamBufs { master, working, grad, state1: state[0], state2: state[1] }, w0, grads }
}

fn check_working(be: &mut Reference, p: &ParamBufs, what: &str) {
    let master = down(be, p.master);
    let working = down(be, p.working);
    let want: Vec<f32> = master.iter().map(|&w| p.working.dtype.round(w)).collect();
    assert_eq!(bits(&working), bits(&want), "{what}: working ({}) == round(master)", p.working.dtype);
    // And the raw encoding is `half`'s round-to-nearest-even conversion.
    let raw = down_bytes(be, p.working);
    for (i, &w) in master.iter().enumerate() {
        let enc = match p.working.dtype {
            DType::BF16 => half::bf16::from_f32(w).to_bits().to_le_bytes().to_vec(),
            DType::F16 => half::f16::from_f32(w).to_bits().to_le_bytes().to_vec(),
            _ => w.to_le_bytes().to_vec(),
        };
        assert_eq!(raw[i * enc.len()..(i + 1) * enc.len()], enc[..], "{what}: working encoding at {i}");
    }
}

const GRAD_SCALE: f32 = 1.0 / 1024.0;

#[test]
fn sgd_matches_torch_semantics_in_f64() {
    let mut mem = AlignedBuf::new(1 << 16);
    let mut be = Reference::new(mem.bytes());
    let configs = [
        ("plain", Sgd::new(0.1)),
        ("momentum", Sgd::new(0.05).momentum(0.9)),
        ("nesterov", Sgd::new(0.05).momentum(0.9).nesterov(true)),
        ("weight decay", Sgd::new(0.1).weight_decay(0.01)),
        ("all", Sgd::new(0.02).momentum(0.8).nesterov(true).weight_decay(0.05)),
    ];
    for (name, o) in configs {
        o.validate().unwrap();
        for wdt in FLOATS {
            let f = fixture(&mut be, wdt, Optimizer::from(o).state_vectors(), 20);
            let mut r = SgdRef { w: exact(&f.w0), buf: None };
            let mut worst = 0.0f64;
            for (t, g) in f.grads.iter().enumerate() {
                be.upload(f.p.grad, g).unwrap();
                // Alternate the two entry points: the layer-level `Sgd::step` and the `Optimizer` enum.
                if t % 2 == 0 {
                    o.step(&mut be, &f.p, GRAD_SCALE).unwrap();
                } else {
                    Optimizer::from(o).step(&mut be, &f.p, t as u64 + 1, GRAD_SCALE).unwrap();
                }
                r.step(&o, g, GRAD_SCALE);
                let w = down(&mut be, f.p.master);
                for i in 0..N {
                    assert!(close(w[i], r.w[i]), "SGD {name} step {} w[{i}]: {} vs f64 {:?}", t + 1, w[i], r.w[i]);
                    worst = worst.max((w[i] as f64 - r.w[i].x).abs() / r.w[i].mag);
                }
                if let Some(buf) = &r.buf {
                    let b = down(&mut be, f.p.state1);
                    for i in 0..N {
                        assert!(
                            close(b[i], buf[i]),
                            "SGD {name} step {} momentum[{i}]: {} vs {:?}",
                            t + 1,
                            b[i],
                            buf[i]
                        );
                    }
                }
                check_working(&mut be, &f.p, &format!("SGD {name} step {}", t + 1));
            }
            println!("SGD {name:12} working {wdt:8}: max rel diff {worst:.2e}");
        }
    }
}

#[test]
fn adamw_matches_torch_semantics_in_f64() {
    let mut mem = AlignedBuf::new(1 << 16);
    let mut be = Reference::new(mem.bytes());
    let configs = [
        ("defaults", AdamW::new(1e-3)),
        ("no decay", AdamW::new(1e-2).weight_decay(0.0)),
        ("custom", AdamW::new(3e-3).betas(0.8, 0.95).eps(1e-6).weight_decay(0.1)),
    ];
    for (name, o) in configs {
        o.validate().unwrap();
        for wdt in FLOATS {
            let f = fixture(&mut be, wdt, 2, 21);
            let n = f.w0.len();
            let zeros = vec![V::default(); n];
            let mut r = AdamRef { w: exact(&f.w0), m: zeros.clone(), v: zeros, t: 0 };
            let mut worst = 0.0f64;
            for (t, g) in f.grads.iter().enumerate() {
                be.upload(f.p.grad, g).unwrap();
                if t % 2 == 0 {
                    o.step(&mut be, &f.p, t as u64 + 1, GRAD_SCALE).unwrap();
                } else {
                    Optimizer::from(o).step(&mut be, &f.p, t as u64 + 1, GRAD_SCALE).unwrap();
                }
                r.step(&o, g, GRAD_SCALE);
                let (w, m, v) = (down(&mut be, f.p.master), down(&mut be, f.p.state1), down(&mut be, f.p.state2));
                for i in 0..N {
                    assert!(close(w[i], r.w[i]), "AdamW {name} step {} w[{i}]: {} vs f64 {:?}", t + 1, w[i], r.w[i]);
                    assert!(close(m[i], r.m[i]), "AdamW {name} step {} m[{i}]: {} vs {:?}", t + 1, m[i], r.m[i]);
                    assert!(close(v[i], r.v[i]), "AdamW {name} step {} v[{i}]: {} vs {:?}", t + 1, v[i], r.v[i]);
                    worst = worst.max((w[i] as f64 - r.w[i].x).abs() / r.w[i].mag);
                }
                check_working(&mut be, &f.p, &format!("AdamW {name} step {}", t + 1));
            }
            println!("AdamW {name:9} working {wdt:8}: max rel diff {worst:.2e}");
        }
    }
}

#[test]
fn grad_scale_is_applied() {
    // The same update from gradients G with grad_scale 1 and from 1024 G with grad_scale 1/1024 (exact powers
    // of two: bit-identical), and a different one without the unscale.
    let mut mem = AlignedBuf::new(1 << 16);
    let mut be = Reference::new(mem.bytes());
    for o in [Optimizer::from(Sgd::new(0.1).momentum(0.9)), Optimizer::from(AdamW::new(1e-2).eps(1e-3))] {
        let mut results = Vec::new();
        for (mul, scale) in [(1.0f32, 1.0f32), (1024.0, 1.0 / 1024.0), (1024.0, 1.0)] {
            let f = fixture(&mut be, DType::BF16, o.state_vectors(), 22);
            for (t, g) in f.grads.iter().enumerate() {
                let g: Vec<f32> = g.iter().map(|v| v / 1024.0 * mul).collect();
                be.upload(f.p.grad, &g).unwrap();
                o.step(&mut be, &f.p, t as u64 + 1, scale).unwrap();
            }
            results.push(bits(&down(&mut be, f.p.master)));
        }
        assert_eq!(results[0], results[1], "{}: grad_scale 1/1024 undoes a loss scale of 1024", o.name());
        assert_ne!(results[0], results[2], "{}: grad_scale is used", o.name());
    }
}

#[test]
fn invalid_hyper_parameters_are_errors() {
    let bad_sgd = [
        Sgd::new(-0.1),
        Sgd::new(0.0),
        Sgd::new(f32::NAN),
        Sgd::new(f32::INFINITY),
        Sgd::new(0.1).momentum(-0.5),
        Sgd::new(0.1).momentum(f32::NAN),
        Sgd::new(0.1).weight_decay(-1e-4),
        Sgd::new(0.1).weight_decay(f32::NAN),
        Sgd::new(0.1).nesterov(true), // Nesterov without momentum
    ];
    let bad_adam = [
        AdamW::new(-1e-3),
        AdamW::new(f32::NAN),
        AdamW::new(1e-3).betas(1.0, 0.999),
        AdamW::new(1e-3).betas(0.9, 1.0),
        AdamW::new(1e-3).betas(1.5, 0.999),
        AdamW::new(1e-3).betas(-0.1, 0.999),
        AdamW::new(1e-3).betas(f32::NAN, 0.999),
        AdamW::new(1e-3).betas(0.9, f32::NAN),
        AdamW::new(1e-3).eps(0.0),
        AdamW::new(1e-3).eps(f32::NAN),
        AdamW::new(1e-3).weight_decay(-0.01),
        AdamW::new(1e-3).weight_decay(f32::INFINITY),
    ];
    let bad: Vec<Optimizer> = bad_sgd.iter().map(|&s| s.into()).chain(bad_adam.iter().map(|&a| a.into())).collect();

    let mut mem = AlignedBuf::new(1 << 20);
    let mut be = Reference::new(mem.bytes());
    let f = fixture(&mut be, DType::BF16, 2, 23);
    be.upload(f.p.grad, &f.grads[0]).unwrap();
    let before = down_bytes(&mut be, f.p.master);
    for o in &bad {
        assert!(matches!(o.validate(), Err(Error::InvalidConfig(_))), "{o:?} validates");
        // A direct step with invalid hyper-parameters is refused and leaves the weights as they were.
        assert!(matches!(o.step(&mut be, &f.p, 1, 1.0), Err(Error::InvalidConfig(_))), "{o:?} steps");
        assert_eq!(down_bytes(&mut be, f.p.master), before, "{o:?} changed the weights");
    }

    // The trainer refuses them at construction and in set_lr.
    let model = Model::sequential(Shape::flat(4)).linear(3).build().unwrap();
    for o in &bad {
        let mut mem = AlignedBuf::new(1 << 20);
        let r = Trainer::new(
            Reference::new(mem.bytes()),
            model.clone(),
            Policy::FLOAT32,
            *o,
            TrainConfig::new(2, Policy::FLOAT32),
        );
        assert!(matches!(r, Err(Error::InvalidConfig(_))), "Trainer::new accepted {o:?}");
    }
    let mut mem = AlignedBuf::new(1 << 20);
    let mut t = Trainer::new(
        Reference::new(mem.bytes()),
        model,
        Policy::FLOAT32,
        Sgd::new(0.1),
        TrainConfig::new(2, Policy::FLOAT32),
    )
    .unwrap();
    for lr in [-0.1, 0.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(t.set_lr(lr), Err(Error::InvalidConfig(_))), "set_lr({lr})");
        assert_eq!(t.optimizer().lr(), 0.1, "a refused set_lr keeps the old rate");
    }
    t.set_lr(0.05).unwrap();
    assert_eq!(t.optimizer().lr(), 0.05);
}

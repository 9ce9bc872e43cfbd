//! Finite-difference gradient checks, one model per layer kind, through the `Trainer` under `float32` on the
//! reference backend: the analytic gradient from `forward_backward(x, labels, 1.0)` against central
//! differences `(L(w + eps e_i) - L(w - eps e_i)) / 2 eps` of the trainer's own loss, for EVERY parameter.
//!
//! Smooth models: eps = 1e-2. The loss is an f32 mean of O(1) values: its rounding noise is ~1e-7 absolute,
//! so the central difference carries ~1e-7 / eps = 1e-5 of noise; the truncation error is eps^2 / 6 |L'''|
//! ~ 2e-5 |L'''|. Tolerance: `|fd - g| <= ATOL + RTOL * |g|` with ATOL = 1e-4 and RTOL = 1e-2, several times
//! both, and far below what a wrong gradient gives (a missing term, a transposed weight, a wrong stride are
//! O(|g|) errors). Models with ReLU/max-pool use eps = 1e-3 and ATOL = 3e-4 (see `KINKED`).
//!
//! ReLU and max-pool are piecewise linear: when `w +- eps` crosses a kink the central difference averages two
//! slopes. Such coordinates are detected from the losses alone and skipped (and counted): either the one-sided
//! differences `(L(w + eps) - L(w)) / eps` and `(L(w) - L(w - eps)) / eps` disagree by more than a smooth
//! curvature allows (a kink near w), or the central differences with eps and eps / 2 disagree by more than
//! their truncation and noise allow (a kink between eps / 2 and eps; two kinks on opposite sides can cancel in
//! the first test but hardly in both). At least 95% of the coordinates of every model must be checked. The
//! detector never looks at the analytic gradient, so it cannot hide a wrong one. Models without kinks must
//! skip nothing.

// Parallel arrays (backend result, f64 model, tolerance) are walked by index on purpose.
#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use mantissa_core::layers::Shape;
use mantissa_core::rng::Rng;
use mantissa_core::{MemoryPlan, Model, Optimizer, Policy, Reference, Sgd, TrainConfig, Trainer};

const BATCH: usize = 3;
const RTOL: f64 = 1e-2;

#[derive(Clone, Copy)]
struct Tol {
    eps: f32,
    atol: f64,
    /// One-sided differences of a smooth loss differ by ~eps |L''| (|L''| <= ~0.3 here) plus twice the noise
    /// over eps; a kink crossed inside `[w - eps, w + eps]` makes them differ by the jump in slope.
    kink_asym: f64,
    /// Central differences at eps and eps / 2 of a smooth loss differ by `(3/4) eps^2 / 6 |L'''|` plus the
    /// noise of the eps / 2 one; a kink between them moves one and not the other.
    kink_half: f64,
    has_kinks: bool,
}

/// Smooth models: eps = 1e-2 (noise ~1e-5, truncation ~2e-5), ATOL = 1e-4; nothing may be skipped.
const SMOOTH: Tol = Tol { eps: 1e-2, atol: 1e-4, kink_asym: 5e-3, kink_half: 5e-5, has_kinks: false };
/// Piecewise-linear models: a conv weight moves every output position, so eps = 1e-2 would cross several
/// ReLU/max-pool kinks per coordinate. eps = 1e-3 crosses few; its noise is ~1e-7 / 1e-3 = 1e-4, so
/// ATOL = 3e-4.
const KINKED: Tol = Tol { eps: 1e-3, atol: 3e-4, kink_asym: 1e-3, kink_half: 2e-4, has_kinks: true };

struct Report {
    params: usize,
    checked: usize,
    skipped: usize,
    max_abs: f64,
    max_rel: f64,
}

fn gradcheck(name: &str, model: Model, seed: u64, tol: Tol) -> Report {
    let Tol { eps, atol, kink_asym, kink_half, has_kinks } = tol;
    let policy = Policy::FLOAT32;
    let opt = Optimizer::from(Sgd::new(0.1));
    let plan = MemoryPlan::new(&model, policy, &opt, BATCH).unwrap();
    let mut mem = AlignedBuf::new(plan.total);
    let config = TrainConfig::new(BATCH, policy).seed(seed);
    let mut t = Trainer::new(Reference::new(mem.bytes()), model.clone(), policy, opt, config).unwrap();

    let mut rng = Rng::new(seed + 1000);
    let x = rand_vec(&mut rng, BATCH * model.input().len(), -1.0, 1.0);
    let labels: Vec<u32> = (0..BATCH).map(|_| rng.below(model.classes()) as u32).collect();
    let n = model.param_len();
    let mut w = vec![0.0f32; n];
    t.read_master(&mut w).unwrap();
    let loss0 = t.forward_backward(&x, &labels, 1.0).unwrap();
    let mut g = vec![0.0f32; n];
    t.read_gradients(&mut g).unwrap();
    assert_eq!(t.evaluate(&x, &labels).unwrap().loss, loss0, "{name}: evaluate and forward_backward agree");

    let loss_at = |t: &mut Trainer<Reference>, w: &[f32]| -> f64 {
        t.write_master(w).unwrap();
        t.evaluate(&x, &labels).unwrap().loss as f64
    };
    let mut r = Report { params: n, checked: 0, skipped: 0, max_abs: 0.0, max_rel: 0.0 };
    let mut wp = w.clone();
    // Central difference with step `eps` (the step actually taken: w +- eps is rounded to f32), and the
    // one-sided asymmetry.
    let mut central = |t: &mut Trainer<Reference>, i: usize, eps: f32| -> (f64, f64) {
        wp[i] = w[i] + eps;
        let lp = loss_at(t, &wp);
        wp[i] = w[i] - eps;
        let lm = loss_at(t, &wp);
        wp[i] = w[i];
        let h = ((w[i] + eps) as f64 - (w[i] - eps) as f64) / 2.0;
        ((lp - lm) / (2.0 * h), ((lp - loss0 as f64) - (loss0 as f64 - lm)).abs() / h)
    };
    for i in 0..n {
        let (fd, asym) = central(&mut t, i, eps);
        let (fd_half, _) = central(&mut t, i, eps / 2.0);
        if asym > kink_asym || (fd - fd_half).abs() > kink_half {
            assert!(
                has_kinks,
                "{name}: parameter {i} looks like a kink in a smooth model ({asym:e}, {fd:e} vs {fd_half:e})"
            );
            r.skipped += 1;
            continue;
        }
        let (an, d) = (g[i] as f64, (fd - g[i] as f64).abs());
        assert!(
            d <= atol + RTOL * an.abs(),
            "{name}: parameter {i} of {n}: analytic {an:e}, finite difference {fd:e}, |diff| {d:e}"
        );
        r.checked += 1;
        r.max_abs = r.max_abs.max(d);
        r.max_rel = r.max_rel.max(d / an.abs().max(fd.abs()).max(1e-3));
    }
    // Restore, and check the loss came back (write_master round-trips exactly).
    t.write_master(&w).unwrap();
    assert_eq!(t.evaluate(&x, &labels).unwrap().loss, loss0);
    println!(
        "{name:40} params {:4}  checked {:4}  skipped {:3}  max abs diff {:.3e}  max rel diff {:.3e}",
        r.params, r.checked, r.skipped, r.max_abs, r.max_rel
    );
    assert!(r.checked * 100 >= 95 * n, "{name}: only {} of {n} coordinates checked", r.checked);
    r
}

#[test]
fn linear() {
    let model = Model::sequential(Shape::flat(7)).linear(4).build().unwrap();
    gradcheck("Linear", model, 1, SMOOTH);
}

#[test]
fn linear_relu_linear() {
    let model = Model::sequential(Shape::flat(6)).linear(8).relu().linear(3).build().unwrap();
    gradcheck("Linear-ReLU-Linear", model, 2, KINKED);
}

#[test]
fn linear_gelu_linear() {
    let model = Model::sequential(Shape::flat(6)).linear(8).gelu().linear(3).build().unwrap();
    gradcheck("Linear-GELU-Linear", model, 3, SMOOTH);
}

#[test]
fn conv_stride1_pad0_flatten_linear() {
    let model = Model::sequential(Shape::image(2, 7, 6)).conv2d(3, 3, 1, 0).flatten().linear(4).build().unwrap();
    gradcheck("Conv2d(s1,p0)-Flatten-Linear 2x7x6", model, 4, SMOOTH);
}

#[test]
fn conv_stride2_pad1_flatten_linear() {
    let model = Model::sequential(Shape::image(2, 7, 6)).conv2d(3, 3, 2, 1).flatten().linear(4).build().unwrap();
    gradcheck("Conv2d(s2,p1)-Flatten-Linear 2x7x6", model, 5, SMOOTH);
}

#[test]
fn conv_relu_maxpool_flatten_linear() {
    let model = Model::sequential(Shape::image(2, 7, 6))
        .conv2d(4, 3, 1, 1)
        .relu()
        .maxpool2d(2, 2)
        .flatten()
        .linear(3)
        .build()
        .unwrap();
    gradcheck("Conv2d-ReLU-MaxPool2d-Flatten-Linear", model, 6, KINKED);
}

#[test]
fn deeper_mixed_stack() {
    // Every layer kind in one model, conv after conv (col2im feeding a conv's input gradient).
    let model = Model::sequential(Shape::image(1, 8, 7))
        .conv2d(2, 3, 1, 1)
        .gelu()
        .conv2d(3, 2, 2, 0)
        .relu()
        .maxpool2d(2, 1)
        .flatten()
        .linear(5)
        .gelu()
        .linear(3)
        .build()
        .unwrap();
    gradcheck("Conv-GELU-Conv-ReLU-MaxPool-Linear-GELU-Linear", model, 7, KINKED);
}

//! The step-control block on the GPU (`cuda/src/control.rs`, `kernels/control.cu`) against the provided host
//! implementations of the `Backend` methods run on the reference (`control::decide` is the specification), and
//! recording (CUDA graphs, `cuda/src/graph.rs`): a recorded step replayed N times equals the same ops run N
//! times, bit for bit.
//!
//! Every block is compared word by word, bit for bit, except `LAST_NORM` (a square root of f64 sums added in a
//! different order: relative 1e-6) and `GRAD_MUL` (which follows the norm when clipping: relative 2e-6).

mod common;

use common::{u, Both, CAP, FLOATS, GPU};
use mantissa_core::backend::{
    read_control, softmax_cross_entropy_to_composed, write_control, AdamWStep, Gemm, LossTo, ParamBufs, SgdStep,
};
use mantissa_core::control::{self, Control, StepRule};
use mantissa_core::rng::Rng;
use mantissa_core::{Arena, Backend, Buf, DType, DynamicConfig, DynamicLossScale, Error, LossScale};
use mantissa_cuda::CudaBackend;

/// f16's subnormal step (2^-24): below 2^-14 a one-ulp f32 difference can flip a rounding by this much.
fn subnormal_ulp(dt: DType) -> f64 {
    if dt == DType::F16 {
        1.0 / 16_777_216.0
    } else {
        0.0
    }
}

fn block<B: Backend>(be: &mut B, ctl: Buf) -> Control {
    read_control(be, ctl).unwrap()
}

/// Asserts the two blocks agree (see the module comment for the two words with a tolerance).
fn same_block(what: &str, g: &Control, r: &Control) {
    for w in 0..control::WORDS {
        let (a, b) = (g.words[w], r.words[w]);
        if w == control::LAST_NORM || w == control::GRAD_MUL {
            let (x, y) = (f32::from_bits(a), f32::from_bits(b));
            if x.is_nan() || y.is_nan() {
                assert!(x.is_nan() && y.is_nan(), "{what}: word {w}: gpu {x} vs reference {y}");
                continue;
            }
            let rel = if w == control::LAST_NORM { 1e-6 } else { 2e-6 };
            let d = (x as f64 - y as f64).abs();
            assert!(d <= rel * (y as f64).abs(), "{what}: word {w}: gpu {x} vs reference {y} (|diff| {d:e})");
        } else {
            assert_eq!(a, b, "{what}: word {w}: gpu {a:#010x} vs reference {b:#010x}");
        }
    }
}

fn set_block(t: &mut Both, ctl: Buf, c: &Control) {
    write_control(&mut t.gpu, ctl, c).unwrap();
    write_control(&mut t.re, ctl, c).unwrap();
}

fn bytes(be: &mut CudaBackend, b: Buf) -> Vec<u8> {
    let mut v = vec![0u8; b.bytes()];
    be.download_bytes(b, &mut v).unwrap();
    v
}

/// (logits, gradient) dtype pairs of the loss tests.
const LOSS_PAIRS: [(DType, DType); 5] = [
    (DType::F32, DType::F32),
    (DType::BF16, DType::BF16),
    (DType::F16, DType::F16),
    (DType::F32, DType::F16),
    (DType::BF16, DType::F32),
];

/// Labels `r * 7919 % classes` for `rows` rows, on both backends.
fn spread_labels(t: &mut Both, rows: usize, classes: usize) -> Buf {
    let labels = t.alloc(DType::I32, rows);
    let l: Vec<i32> = (0..rows).map(|r| ((r * 7919) % classes) as i32).collect();
    t.gpu.upload_i32(labels, &l).unwrap();
    t.re.upload_i32(labels, &l).unwrap();
    labels
}

/// A named rule and the block it starts from.
fn case(
    name: &'static str,
    (loss_scale, start): (LossScale, Control),
    clip_norm: Option<f32>,
    adam_betas: Option<(f32, f32)>,
) -> (&'static str, StepRule, Control) {
    (name, StepRule { loss_scale, clip_norm, adam_betas }, start)
}

/// A dynamic scale from `cfg` and a fresh block for it.
fn dynamic(cfg: DynamicConfig) -> (LossScale, Control) {
    let d = DynamicLossScale::new(cfg).unwrap();
    (LossScale::Dynamic(d), Control::new(d.scale, d.hysteresis_left))
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn step_control_decides_like_the_host() {
    let _ = GPU;
    let mut t = Both::new();
    let ctl = t.alloc(DType::I32, control::WORDS);
    let loss = t.alloc(DType::F32, 1);
    // Counters about to carry into their high words, so the u64 pairs are exercised.
    let mut carry = Control::new(1.0, 1);
    carry.set_u64(control::UPDATES, u32::MAX as u64);
    carry.set_u64(control::SKIPPED, u32::MAX as u64 - 1);
    let fixed = LossScale::fixed(512.0).unwrap();
    let adam = Some((0.9, 0.999));
    let cases = [
        case("none", (LossScale::None, carry), None, adam),
        case("fixed 512", (fixed, Control::new(512.0, 1)), Some(1.0), None),
        case("tensorflow", dynamic(DynamicConfig::tensorflow().growth_interval(2)), Some(5.0), adam),
        case("pytorch", dynamic(DynamicConfig::pytorch().growth_interval(3)), None, Some((0.8, 0.95))),
        case("deepspeed", dynamic(DynamicConfig::deepspeed().growth_interval(2)), Some(0.5), None),
        // Growing past f32's range keeps the old scale.
        case(
            "near f32::MAX",
            dynamic(DynamicConfig::pytorch().initial_scale(2.0f32.powi(126)).growth_interval(1)),
            None,
            adam,
        ),
        // Backing off stops at the floor (TensorFlow) or goes below 1 (PyTorch).
        case(
            "tensorflow floor",
            dynamic(DynamicConfig::tensorflow().initial_scale(1.0).growth_interval(4)),
            None,
            None,
        ),
        case("pytorch no floor", dynamic(DynamicConfig::pytorch().initial_scale(1.0).growth_interval(4)), None, None),
    ];
    let mut rng = Rng::new(11);
    for (k, (name, rule, start)) in cases.into_iter().enumerate() {
        for dt in FLOATS {
            let len = if k % 2 == 0 { 1000 } else { 100_003 };
            let grad = t.alloc(dt, len);
            set_block(&mut t, ctl, &start);
            let (mut grew, mut backed_off, mut lowest) = (false, false, f32::INFINITY);
            for step in 0..20 {
                let before = block(&mut t.re, ctl);
                let scale = before.f32(control::SCALE);
                // Unscaled gradients of about 1 (f16: capped below its range so only injected values overflow).
                let amp = if dt == DType::F16 { scale.min(30_000.0) } else { scale };
                let mut v: Vec<f32> = (0..len).map(|_| rng.uniform(-1.0, 1.0) * amp).collect();
                // Finite runs of 3, 4, 4 and 3 steps; overflows alone (hysteresis absorbs one) and in a row.
                let bad = match step {
                    3 | 14 => Some(f32::NAN),
                    4 | 15 => Some(f32::INFINITY),
                    9 | 16 => Some(f32::NEG_INFINITY),
                    _ => None,
                };
                if let Some(b) = bad {
                    v[(step * 31) % len] = b;
                }
                t.upload(grad, &v);
                let l = if step == 5 { f32::NAN } else { rng.uniform(0.0, 5.0) };
                t.upload(loss, &[l]);
                t.gpu.step_control(ctl, grad, loss, &rule).unwrap();
                t.re.step_control(ctl, grad, loss, &rule).unwrap();
                let (g, r) = (block(&mut t.gpu, ctl), block(&mut t.re, ctl));
                same_block(&format!("step_control {name} {dt} x{len} step {step}"), &g, &r);
                grew |= r.f32(control::SCALE) > scale;
                backed_off |= r.f32(control::SCALE) < scale;
                lowest = lowest.min(r.f32(control::SCALE));
            }
            let r = block(&mut t.re, ctl);
            println!(
                "step_control {name} {dt} x{len}: scale {} updates {} skipped {} norm {} (grew {grew}, backed off \
                 {backed_off})",
                r.f32(control::SCALE),
                r.u64(control::UPDATES),
                r.u64(control::SKIPPED),
                r.f32(control::LAST_NORM)
            );
            if let LossScale::Dynamic(d) = rule.loss_scale {
                assert!(grew && backed_off, "{name}: the scale should both grow and back off");
                if d.config.min_scale == 1.0 && d.config.initial_scale == 1.0 {
                    assert_eq!(lowest, 1.0, "{name}: the scale stops at the floor");
                } else if d.config.initial_scale == 1.0 {
                    assert!(lowest < 1.0, "{name}: without a floor the scale goes below 1");
                }
            }
        }
    }
    // No gradients at all: a finite step with norm 0.
    let empty = t.alloc(DType::F32, 0);
    let (loss_scale, start) = dynamic(DynamicConfig::tensorflow().growth_interval(2));
    set_block(&mut t, ctl, &start);
    let rule = StepRule { loss_scale, clip_norm: Some(1.0), adam_betas: Some((0.9, 0.999)) };
    t.gpu.step_control(ctl, empty, loss, &rule).unwrap();
    t.re.step_control(ctl, empty, loss, &rule).unwrap();
    let (g, r) = (block(&mut t.gpu, ctl), block(&mut t.re, ctl));
    same_block("step_control with no gradients", &g, &r);
    // A block that is not one is an error, as on the host.
    let short = t.alloc(DType::I32, control::WORDS - 1);
    assert!(t.gpu.step_control(short, empty, loss, &rule).is_err());
    let wrong = t.alloc(DType::F32, control::WORDS);
    assert!(matches!(t.gpu.step_control(wrong, empty, loss, &rule), Err(Error::UnsupportedDType { .. })));
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn scaled_softmax_and_counts_write_the_block() {
    let mut t = Both::new();
    let ctl = t.alloc(DType::I32, control::WORDS);
    for (lt, dt) in LOSS_PAIRS {
        for (rows, classes) in [(1, 1), (7, 10), (257, 67), (9000, 10)] {
            // Coarse logits: arg-max ties are common, the first maximum must win on both.
            let v: Vec<f32> = (0..rows * classes).map(|_| (t.rng.below(9) as f32) - 4.0).collect();
            let logits = t.alloc(lt, rows * classes);
            t.upload(logits, &v);
            let labels = spread_labels(&mut t, rows, classes);
            let loss = t.nans(DType::F32, 1);
            let d = t.nans(dt, rows * classes);
            let (loss2, d2) = (t.alloc(DType::F32, 1), t.alloc(dt, rows * classes));
            for scale in [1.0f32, 1024.0, 65536.0] {
                let mut c = Control::new(scale, 1);
                c.words[control::LAST_CORRECT] = 12345; // overwritten by count_correct_to
                c.words[control::LAST_FLUSHED] = 777;
                set_block(&mut t, ctl, &c);
                let what = format!("{lt}->{dt} [{rows},{classes}] scale {scale}");
                t.gpu.softmax_cross_entropy_scaled(logits, labels, rows, classes, loss, d, 0.5, ctl).unwrap();
                t.re.softmax_cross_entropy_scaled(logits, labels, rows, classes, loss, d, 0.5, ctl).unwrap();
                t.compare(loss, &format!("scaled xent loss {what}"), 1e-5, 1e-5);
                let g = 0.5 * scale as f64 / rows as f64;
                t.compare(d, &format!("scaled xent dlogits {what}"), 1e-6 * g + subnormal_ulp(dt), 1e-5 + 2.0 * u(dt));
                // The same kernel as the plain op with grad_scale * SCALE: bit for bit.
                t.gpu.softmax_cross_entropy(logits, labels, rows, classes, loss2, d2, 0.5 * scale).unwrap();
                assert_eq!(bytes(&mut t.gpu, d), bytes(&mut t.gpu, d2), "scaled vs plain dlogits {what}");
                assert_eq!(bytes(&mut t.gpu, loss), bytes(&mut t.gpu, loss2), "scaled vs plain loss {what}");
                same_block(&format!("block after scaled xent {what}"), &block(&mut t.gpu, ctl), &c);
                t.gpu.count_correct_to(logits, labels, rows, classes, ctl).unwrap();
                t.re.count_correct_to(logits, labels, rows, classes, ctl).unwrap();
                let (gb, rb) = (block(&mut t.gpu, ctl), block(&mut t.re, ctl));
                same_block(&format!("count_correct_to {what}"), &gb, &rb);
                if scale == 1.0 {
                    println!("count_correct_to {what}: {} of {rows}", gb.words[control::LAST_CORRECT]);
                }
                // The loss gradient's f16 underflow, as the trainer counts it.
                for to in FLOATS {
                    t.gpu.count_underflow_to(d, to, ctl).unwrap();
                    t.re.count_underflow_to(d, to, ctl).unwrap();
                    let (gb, rb) = (block(&mut t.gpu, ctl), block(&mut t.re, ctl));
                    same_block(&format!("count_underflow_to {to} of dlogits {what}"), &gb, &rb);
                }
            }
        }
        t.arena = Arena::new(t.arena.capacity());
        let _ = t.alloc(DType::I32, control::WORDS);
    }
    // Values straddling f16's flush threshold (2^-25) and bf16's (2^-134), zeros and NaN.
    let mut v: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) * 1e-10).collect();
    v.extend([0.0, -0.0, f32::NAN, 2.0f32.powi(-25), 2.0f32.powi(-24), 1e-40, 1e-45, 1.0]);
    let src = t.alloc(DType::F32, v.len());
    t.upload(src, &v);
    for to in FLOATS {
        t.gpu.count_underflow_to(src, to, ctl).unwrap();
        t.re.count_underflow_to(src, to, ctl).unwrap();
        let (gb, rb) = (block(&mut t.gpu, ctl), block(&mut t.re, ctl));
        println!(
            "count_underflow_to f32 -> {to}: {} of {}",
            gb.words[control::LAST_FLUSHED],
            gb.words[control::LAST_NON_ZERO]
        );
        same_block(&format!("count_underflow_to f32 -> {to}"), &gb, &rb);
    }
    // Empty inputs write zeros.
    let r = t.gpu.count_correct_to(src, src.prefix(0), 0, 3, ctl);
    assert!(matches!(r, Err(Error::UnsupportedDType { .. })), "labels must be I32: {r:?}");
    let labels = t.alloc(DType::I32, 1);
    t.gpu.count_correct_to(src, labels, 0, 3, ctl).unwrap();
    t.re.count_correct_to(src, labels, 0, 3, ctl).unwrap();
    t.gpu.count_underflow_to(src.prefix(0), DType::F16, ctl).unwrap();
    t.re.count_underflow_to(src.prefix(0), DType::F16, ctl).unwrap();
    let (gb, rb) = (block(&mut t.gpu, ctl), block(&mut t.re, ctl));
    same_block("counts of nothing", &gb, &rb);
    // The scaled op never waits for the device, so a bad label is not reported (the trainer checks labels on
    // the host before uploading them); its row is left untouched.
    let logits = t.random(DType::F32, 3 * 4, -1.0, 1.0);
    let labels = t.alloc(DType::I32, 3);
    t.gpu.upload_i32(labels, &[0, 4, 1]).unwrap();
    let (loss, d) = (t.alloc(DType::F32, 1), t.alloc(DType::F32, 12));
    t.gpu.softmax_cross_entropy_scaled(logits, labels, 3, 4, loss, d, 1.0, ctl).unwrap();
    let r = t.gpu.softmax_cross_entropy(logits, labels, 3, 4, loss, d, 1.0);
    assert!(matches!(r, Err(Error::LabelOutOfRange { label: 4, classes: 4 })), "{r:?}");
}

/// `softmax_cross_entropy_to` (one pass and one finishing block on the GPU) against the same op composed on the
/// GPU (the scaled softmax into f32, count_underflow_to, cast, count_correct_to): the same bits everywhere, the
/// f32 room untouched; and against the reference's composition with the tolerances of the test above.
#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn the_loss_to_the_block_is_the_composed_op_in_one_pass() {
    let _ = GPU;
    let mut t = Both::new();
    let ctl = t.alloc(DType::I32, control::WORDS);
    let mut flushes = 0;
    for (lt, dt) in LOSS_PAIRS {
        // 9000 rows: more than 1024 blocks of 8 rows, so blocks take several rows a warp.
        for (rows, classes) in [(1, 1), (7, 10), (33, 40), (257, 67), (9000, 10)] {
            // Coarse logits (arg-max ties), and in row 3 (when there is one) a NaN and -inf.
            let mut v: Vec<f32> = (0..rows * classes).map(|_| (t.rng.below(9) as f32) - 4.0).collect();
            if rows > 3 && classes > 2 {
                v[3 * classes] = f32::NAN;
                v[3 * classes + 1] = f32::NEG_INFINITY;
            }
            let logits = t.alloc(lt, rows * classes);
            t.upload(logits, &v);
            let labels = spread_labels(&mut t, rows, classes);
            let (loss, d) = (t.nans(DType::F32, 1), t.nans(dt, rows * classes));
            let room = if dt == DType::F32 { Buf::EMPTY } else { t.nans(DType::F32, rows * classes) };
            let (loss2, d2) = (t.nans(DType::F32, 1), t.nans(dt, rows * classes));
            let op =
                LossTo { logits, labels, rows, classes, loss, dlogits: d, dlogits_f32: room, grad_scale: 0.5, ctl };
            let op2 = LossTo { loss: loss2, dlogits: d2, ..op };
            // 2^-20: most of f16's gradients flush at 9000 rows.
            for scale in [1.0f32, 1024.0, 1.0 / 1_048_576.0] {
                let what = format!("{lt}->{dt} [{rows},{classes}] scale {scale}");
                let mut c = Control::new(scale, 1);
                c.words[control::LAST_CORRECT] = 12345;
                c.words[control::LAST_FLUSHED] = 777;
                c.words[control::LAST_NON_ZERO] = 778;
                set_block(&mut t, ctl, &c);
                let room_before = if room.len > 0 { bytes(&mut t.gpu, room) } else { vec![] };
                t.gpu.softmax_cross_entropy_to(&op).unwrap();
                let fused = block(&mut t.gpu, ctl);
                if room.len > 0 {
                    assert_eq!(bytes(&mut t.gpu, room), room_before, "the f32 room was written {what}");
                }
                set_block(&mut t, ctl, &c);
                softmax_cross_entropy_to_composed(&mut t.gpu, &op2).unwrap();
                let composed = block(&mut t.gpu, ctl);
                same_block(&format!("one pass vs composed {what}"), &fused, &composed);
                assert_eq!(bytes(&mut t.gpu, d), bytes(&mut t.gpu, d2), "one pass vs composed dlogits {what}");
                assert_eq!(bytes(&mut t.gpu, loss), bytes(&mut t.gpu, loss2), "one pass vs composed loss {what}");
                if dt == DType::F32 {
                    assert_eq!(fused.words[control::LAST_FLUSHED], 777, "{what}: f32 has no underflow count");
                } else {
                    flushes += fused.words[control::LAST_FLUSHED];
                }
                // The reference's composition.
                set_block(&mut t, ctl, &c);
                t.re.softmax_cross_entropy_to(&op).unwrap();
                let r = block(&mut t.re, ctl);
                assert_eq!(fused.words[control::LAST_CORRECT], r.words[control::LAST_CORRECT], "correct {what}");
                t.compare(loss, &format!("loss {what}"), 1e-5, 1e-5);
                let g = 0.5 * scale as f64 / rows as f64;
                t.compare(d, &format!("dlogits {what}"), 1e-6 * g + subnormal_ulp(dt), 1e-5 + 2.0 * u(dt));
            }
        }
        t.arena = Arena::new(t.arena.capacity());
        let _ = t.alloc(DType::I32, control::WORDS);
    }
    assert!(flushes > 0, "no case flushed a gradient to zero: the count went untested");
    // Bad arguments are errors before anything runs.
    let logits = t.random(DType::F32, 12, -1.0, 1.0);
    let labels = t.alloc(DType::I32, 3);
    let (loss, d) = (t.alloc(DType::F32, 1), t.alloc(DType::F32, 12));
    let op =
        LossTo { logits, labels, rows: 3, classes: 4, loss, dlogits: d, dlogits_f32: Buf::EMPTY, grad_scale: 1.0, ctl };
    let r = t.gpu.softmax_cross_entropy_to(&LossTo { rows: 4, ..op });
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })), "{r:?}");
    let r = t.gpu.softmax_cross_entropy_to(&LossTo { ctl: d, ..op });
    assert!(r.is_err(), "not a control block: {r:?}");
    // No rows: the loss is 0 and the counts are zeros.
    let mut c = Control::new(1.0, 1);
    c.words[control::LAST_CORRECT] = 5;
    set_block(&mut t, ctl, &c);
    t.gpu.softmax_cross_entropy_to(&LossTo { rows: 0, ..op }).unwrap();
    assert_eq!(block(&mut t.gpu, ctl).words[control::LAST_CORRECT], 0);
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn gated_optimizers_apply_or_leave_everything_untouched() {
    let mut t = Both::new();
    let ctl = t.alloc(DType::I32, control::WORDS);
    for n in [1usize, 7, 257, 100_003] {
        for wt in [None, Some(DType::F32), Some(DType::BF16), Some(DType::F16)] {
            let master = t.random(DType::F32, n, -1.0, 1.0);
            let working = match wt {
                None => master,
                Some(dt) => t.nans(dt, n),
            };
            let grad = t.random(DType::F32, n, -1000.0, 1000.0);
            let s1 = t.random(DType::F32, n, -0.1, 0.1);
            let s2 = t.random(DType::F32, n, 0.0, 0.01);
            let p = ParamBufs { master, working, grad, state1: s1, state2: s2 };
            let name = format!("{wt:?} x{n}");
            let state = |t: &mut Both| [master, working, s1, s2].map(|b| bytes(&mut t.gpu, b));
            for (step, applied) in [(1u64, true), (2, false), (3, true), (4, false)] {
                let (b1, b2) = (0.9f32, 0.999f32);
                let (bc1, bc2) = control::bias_corrections(b1, b2, step);
                let mut c = Control::new(1024.0, 1);
                c.words[control::LAST_APPLIED] = applied as u32;
                c.set_f32(control::GRAD_MUL, (1.0 / 1024.0) * 0.75); // a clipped step
                c.set_f32(control::BIAS_CORRECTION1, bc1);
                c.set_f32(control::BIAS_CORRECTION2, bc2);
                set_block(&mut t, ctl, &c);
                for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
                    // grad_scale is ignored: the block's GRAD_MUL is used.
                    let s = SgdStep { lr: 0.01, momentum, nesterov, weight_decay: 1e-4, grad_scale: f32::NAN };
                    let before = state(&mut t);
                    t.gpu.sgd_step_gated(&p, &s, ctl).unwrap();
                    t.re.sgd_step_gated(&p, &s, ctl).unwrap();
                    let what = format!("sgd gated {name} m={momentum} nesterov={nesterov} applied={applied}");
                    if applied {
                        t.exact(master, &format!("{what} master"));
                        t.exact(s1, &format!("{what} momentum"));
                        t.exact(working, &format!("{what} working"));
                    } else {
                        assert!(before == state(&mut t), "{what}: a skipped step changed the parameters");
                    }
                }
                let s = AdamWStep {
                    lr: 1e-3,
                    beta1: b1,
                    beta2: b2,
                    eps: 1e-8,
                    weight_decay: 0.01,
                    bias_correction1: f32::NAN, // ignored: the block's are used
                    bias_correction2: f32::NAN,
                    grad_scale: f32::NAN,
                };
                let before = state(&mut t);
                t.gpu.adamw_step_gated(&p, &s, ctl).unwrap();
                t.re.adamw_step_gated(&p, &s, ctl).unwrap();
                let what = format!("adamw gated {name} t={step} applied={applied}");
                if applied {
                    t.exact(master, &format!("{what} master"));
                    t.exact(s1, &format!("{what} m"));
                    t.exact(s2, &format!("{what} v"));
                    t.exact(working, &format!("{what} working"));
                } else {
                    assert!(before == state(&mut t), "{what}: a skipped step changed the parameters");
                }
                same_block(&format!("block after {what}"), &block(&mut t.gpu, ctl), &c);
            }
        }
    }
}

/// The buffers of a small mixed-precision linear classifier trained in a recorded step: f16 inputs and
/// working weights, f32 master weights, f16 loss gradients (so a large loss scale overflows and the step is
/// skipped), AdamW on the weights and SGD with momentum on the bias, all gated by the block.
struct Linear {
    rows: usize,
    input: usize,
    classes: usize,
    x: Buf,
    labels: Buf,
    w: ParamBufs,
    b: ParamBufs,
    logits: Buf,
    dlogits: Buf,
    loss: Buf,
    ctl: Buf,
    rule: StepRule,
}

impl Linear {
    fn new(be: &mut CudaBackend, arena: &mut Arena) -> Linear {
        let (rows, input, classes) = (16, 24, 10);
        let mut alloc = |dt, len| arena.alloc(dt, len).unwrap();
        let x = alloc(DType::F16, rows * input);
        let labels = alloc(DType::I32, rows);
        let w = ParamBufs {
            master: alloc(DType::F32, input * classes),
            working: alloc(DType::F16, input * classes),
            grad: alloc(DType::F32, input * classes),
            state1: alloc(DType::F32, input * classes),
            state2: alloc(DType::F32, input * classes),
        };
        let bias = alloc(DType::F32, classes);
        let b = ParamBufs {
            master: bias,
            working: bias,
            grad: alloc(DType::F32, classes),
            state1: alloc(DType::F32, classes),
            state2: Buf { offset: 0, len: 0, dtype: DType::F32 },
        };
        let logits = alloc(DType::F32, rows * classes);
        let dlogits = alloc(DType::F16, rows * classes);
        let loss = alloc(DType::F32, 1);
        let ctl = alloc(DType::I32, control::WORDS);
        // 2^22 / 16 rows overflows f16 in the loss gradient; the scale backs off to 2^20, then grows back every 3
        // finite steps and overflows again.
        let (loss_scale, c) = dynamic(DynamicConfig::pytorch().initial_scale(4_194_304.0).growth_interval(3));
        let rule = StepRule { loss_scale, clip_norm: Some(1.0), adam_betas: Some((0.9, 0.999)) };
        let mut rng = Rng::new(5);
        let xs: Vec<f32> = (0..rows * input).map(|_| rng.uniform(0.0, 1.0)).collect();
        be.upload(x, &xs).unwrap();
        let l: Vec<i32> = (0..rows).map(|r| (r % classes) as i32).collect();
        be.upload_i32(labels, &l).unwrap();
        let ws: Vec<f32> = (0..input * classes).map(|_| rng.uniform(-0.2, 0.2)).collect();
        be.upload(w.master, &ws).unwrap();
        be.cast(w.master, w.working).unwrap();
        for s in [w.state1, w.state2, b.master, b.state1] {
            be.fill(s, 0.0).unwrap();
        }
        write_control(be, ctl, &c).unwrap();
        Linear { rows, input, classes, x, labels, w, b, logits, dlogits, loss, ctl, rule }
    }

    /// One training step, every decision on the device.
    fn step(&self, be: &mut CudaBackend) -> mantissa_core::Result<()> {
        let (rows, input, classes) = (self.rows, self.input, self.classes);
        // logits: [rows, classes] = x [rows, input] @ w [input, classes] + b
        be.gemm(&Gemm::new(rows, classes, input, self.x, self.w.working, self.logits))?;
        be.add_bias(self.logits, self.b.master, rows, classes, 1)?;
        be.softmax_cross_entropy_scaled(
            self.logits,
            self.labels,
            rows,
            classes,
            self.loss,
            self.dlogits,
            1.0,
            self.ctl,
        )?;
        be.count_correct_to(self.logits, self.labels, rows, classes, self.ctl)?;
        be.count_underflow_to(self.logits, DType::F16, self.ctl)?;
        // dw: [input, classes] = x^T @ dlogits; db = column sums of dlogits
        be.gemm(&Gemm::new(input, classes, rows, self.x, self.dlogits, self.w.grad).a_t(input))?;
        be.bias_grad(self.dlogits, self.b.grad, rows, classes, 1)?;
        be.step_control(self.ctl, self.w.grad, self.loss, &self.rule)?;
        let adamw = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            bias_correction1: 1.0,
            bias_correction2: 1.0,
            grad_scale: 1.0,
        };
        be.adamw_step_gated(&self.w, &adamw, self.ctl)?;
        let sgd = SgdStep { lr: 0.05, momentum: 0.9, nesterov: false, weight_decay: 0.0, grad_scale: 1.0 };
        be.sgd_step_gated(&self.b, &sgd, self.ctl)
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn a_recorded_step_replays_like_the_ops_run_directly() {
    // A fresh backend: the kernels are first looked up while recording.
    let mut be = CudaBackend::new(0, CAP).expect("opening GPU 0");
    let mut arena = Arena::new(be.capacity());
    let lin = Linear::new(&mut be, &mut arena);
    let all = Buf { offset: 0, len: arena.used().div_ceil(4), dtype: DType::I32 };
    let start = bytes(&mut be, all);

    assert!(be.record_begin().unwrap());
    lin.step(&mut be).unwrap();
    let id = be.record_end(true).unwrap().expect("a recording id");
    // Recording runs nothing.
    assert!(bytes(&mut be, all) == start, "recording changed the arena");

    const N: usize = 12;
    let mut replayed = Vec::new();
    for _ in 0..N {
        be.replay(id).unwrap();
        let c = block(&mut be, lin.ctl);
        replayed.push(c);
    }
    let after_replays = bytes(&mut be, all);

    be.upload_bytes(all, &start).unwrap();
    for (i, r) in replayed.iter().enumerate() {
        lin.step(&mut be).unwrap();
        let c = block(&mut be, lin.ctl);
        assert_eq!(c.words, r.words, "step {i}: the replayed block differs from the direct one");
        println!(
            "step {i:2}: loss {:.5} scale {:>9} applied {} norm {:.4} correct {}/{} flushed {}/{}",
            c.f32(control::LAST_LOSS),
            c.f32(control::LAST_SCALE),
            c.words[control::LAST_APPLIED],
            c.f32(control::LAST_NORM),
            c.words[control::LAST_CORRECT],
            lin.rows,
            c.words[control::LAST_FLUSHED],
            c.words[control::LAST_NON_ZERO]
        );
    }
    assert!(bytes(&mut be, all) == after_replays, "the arena after {N} replays differs from {N} direct steps");
    let last = replayed[N - 1];
    let (updates, skipped) = (last.u64(control::UPDATES), last.u64(control::SKIPPED));
    println!("{N} replays: {updates} updates, {skipped} skipped, final scale {}", last.f32(control::SCALE));
    assert!(updates > 0 && skipped > 0, "the recorded step should both apply and skip");
    assert!(replayed[N - 1].f32(control::LAST_LOSS) < replayed[0].f32(control::LAST_LOSS), "the loss should fall");
    // The recording stays valid until cleared; then its id is refused.
    be.replay(id).unwrap();
    be.synchronize().unwrap();
    be.clear_recordings();
    assert!(be.replay(id).is_err());
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn recording_errors_discard_and_bad_ids() {
    let mut be = CudaBackend::new(0, 4 << 20).expect("opening GPU 0");
    let mut arena = Arena::new(be.capacity());
    let a = arena.alloc(DType::F32, 1000).unwrap();
    be.fill(a, 1.0).unwrap();
    assert!(be.replay(0).is_err(), "nothing recorded yet");
    assert!(be.record_end(true).is_err(), "record_end without record_begin");

    // An op that would wait for the device fails while recording; the trainer then discards the recording,
    // and nothing recorded runs.
    assert!(be.record_begin().unwrap());
    assert!(be.record_begin().is_err(), "already recording");
    be.fill(a, 2.0).unwrap();
    let mut host = vec![0.0f32; 1000];
    assert!(be.download(a, &mut host).is_err(), "download while recording");
    assert!(be.upload(a, &host).is_err(), "upload while recording");
    assert!(be.synchronize().is_err(), "synchronize while recording");
    assert!(be.grad_stats(a, 1.0).is_err(), "grad_stats returns values: not while recording");
    // The plain softmax does not wait for its bad-label flag while recording.
    let labels = arena.alloc(DType::I32, 2).unwrap();
    let (loss, d) = (arena.alloc(DType::F32, 1).unwrap(), arena.alloc(DType::F32, 10).unwrap());
    be.softmax_cross_entropy(a.prefix(10), labels, 2, 5, loss, d, 1.0).unwrap();
    assert_eq!(be.record_end(false).unwrap(), None);
    be.download(a, &mut host).unwrap();
    assert!(host.iter().all(|&v| v == 1.0), "a discarded recording ran");
    assert!(be.replay(0).is_err(), "a discarded recording has no id");

    // A kept recording runs on every replay; other ids are refused; cleared ids are never reused.
    assert!(be.record_begin().unwrap());
    be.fill(a, 3.0).unwrap();
    let id = be.record_end(true).unwrap().unwrap();
    assert!(be.replay(id + 1).is_err());
    be.fill(a, 0.0).unwrap();
    be.replay(id).unwrap();
    be.download(a, &mut host).unwrap();
    assert!(host.iter().all(|&v| v == 3.0), "the replay did not run");
    be.clear_recordings();
    assert!(be.replay(id).is_err(), "a cleared recording");
    assert!(be.record_begin().unwrap());
    be.fill(a, 4.0).unwrap();
    let id2 = be.record_end(true).unwrap().unwrap();
    assert_ne!(id, id2, "ids are not reused after clear_recordings");
    assert!(be.replay(id).is_err());
    be.replay(id2).unwrap();
    be.download(a, &mut host).unwrap();
    assert!(host.iter().all(|&v| v == 4.0));

    // Dropped in the middle of a recording: the capture is ended and the backend closes cleanly.
    assert!(be.record_begin().unwrap());
    be.fill(a, 5.0).unwrap();
    drop(be);
    let mut again = CudaBackend::new(0, 4 << 20).expect("reopening GPU 0");
    again.fill(a, 6.0).unwrap();
    again.download(a, &mut host).unwrap();
    assert!(host.iter().all(|&v| v == 6.0));
}

#[test]
#[ignore = "needs an NVIDIA GPU (run scripts/gpu-check.sh)"]
fn recording_while_other_backends_open_and_close() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    // Another thread keeps opening and closing backends (memory, modules, library handles: calls that may
    // synchronise the whole context) while this one records; no capture may be invalidated by them.
    let (stop, opened) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let churn = {
        let (stop, opened) = (stop.clone(), opened.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut b = CudaBackend::new(0, 4 << 20).expect("opening GPU 0 again");
                b.fill(Buf { offset: 0, len: 1000, dtype: DType::F32 }, 1.0).unwrap();
                b.synchronize().unwrap();
                drop(b);
                opened.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut be = CudaBackend::new(0, 4 << 20).expect("opening GPU 0");
    let mut arena = Arena::new(be.capacity());
    let n = 64;
    let mut rng = Rng::new(3);
    let v: Vec<f32> = (0..n * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let (a, b) = (arena.alloc(DType::BF16, n * n).unwrap(), arena.alloc(DType::BF16, n * n).unwrap());
    let (c, a32) = (arena.alloc(DType::F32, n * n).unwrap(), arena.alloc(DType::F32, n * n).unwrap());
    be.upload(a, &v).unwrap();
    be.upload(b, &v).unwrap();
    let mut rounds = 0;
    while (rounds < 30 || opened.load(Ordering::Relaxed) < 3) && rounds < 5000 {
        assert!(be.record_begin().unwrap());
        be.gemm(&Gemm::new(n, n, n, a, b, c)).unwrap();
        be.cast(a, a32).unwrap();
        be.gemm(&Gemm::new(n, n, n, a32, a32, c).beta(1.0)).unwrap();
        let id = be.record_end(true).unwrap_or_else(|e| panic!("round {rounds}: the capture failed: {e}"));
        be.replay(id.unwrap()).unwrap();
        be.synchronize().unwrap();
        be.clear_recordings();
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    println!("{rounds} recordings while {} backends were opened and closed", opened.load(Ordering::Relaxed));
    assert!(opened.load(Ordering::Relaxed) >= 3);
}

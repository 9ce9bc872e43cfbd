//! Loss-scale golden traces: each preset replayed over scripted finite/overflow sequences against an
//! independent model of the framework it claims to reproduce, written from that framework's source:
//!
//! - TensorFlow: `tf.keras.mixed_precision.LossScaleOptimizer` (`_DynamicLossScaleState.update`): on
//!   overflow `scale = max(scale / 2, 1)` and the counter resets; on a finite step the counter grows and at
//!   `counter + 1 >= 2000` the scale doubles if the result is finite and the counter resets.
//! - PyTorch: `GradScaler._update_scale` -> `_amp_update_scale_`: on overflow `scale *= 0.5` (no floor),
//!   `growth_tracker = 0`; else `successful = growth_tracker + 1`, and if `successful == 2000` the scale
//!   doubles when finite and the tracker resets, otherwise `growth_tracker = successful`.
//! - DeepSpeed: `DynamicLossScaler.update_scale` with its fp16 defaults (delayed_shift = hysteresis = 2,
//!   consecutive_hysteresis = False, scale_window = 1000, min_scale = 1), `cur_iter`/`last_overflow_iter`/
//!   `cur_hysteresis` kept exactly as DeepSpeed keeps them. (DeepSpeed's optional `raise_error_at_min_scale`
//!   exception is not modelled: mantissa stays at the floor instead.)
//!
//! Every framework skips the optimizer step on overflow. The whole trace (scale before each step and the skip
//! decision) must match, step by step.

use mantissa_core::layers::Shape;
use mantissa_core::rng::Rng;
use mantissa_core::{
    DynamicConfig, DynamicLossScale, Error, LossScale, Model, Policy, Reference, Sgd, TrainConfig, Trainer,
};

/// One framework's loss scaler: `update(overflow)` returns whether the optimizer step runs.
trait Framework {
    fn scale(&self) -> f32;
    fn update(&mut self, overflow: bool) -> bool;
}

/// Keras `_DynamicLossScaleState` (float32 variables, as TensorFlow keeps them).
struct Keras {
    current_loss_scale: f32,
    counter: u32,
    growth_steps: u32,
    multiplier: f32,
}

impl Framework for Keras {
    fn scale(&self) -> f32 {
        self.current_loss_scale
    }
    fn update(&mut self, overflow: bool) -> bool {
        if !overflow {
            if self.counter + 1 >= self.growth_steps {
                let new_loss_scale = self.current_loss_scale * self.multiplier;
                // _assign_if_finite
                if new_loss_scale.is_finite() {
                    self.current_loss_scale = new_loss_scale;
                }
                self.counter = 0;
            } else {
                self.counter += 1;
            }
        } else {
            self.current_loss_scale = (self.current_loss_scale / self.multiplier).max(1.0);
            self.counter = 0;
        }
        !overflow
    }
}

/// `torch.amp.GradScaler` (`_amp_update_scale_`, float32 scale tensor, int32 growth tracker).
struct Torch {
    scale: f32,
    growth_tracker: i32,
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: i32,
}

impl Framework for Torch {
    fn scale(&self) -> f32 {
        self.scale
    }
    fn update(&mut self, found_inf: bool) -> bool {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        } else {
            let successful = self.growth_tracker + 1;
            if successful == self.growth_interval {
                let new_scale = self.scale * self.growth_factor;
                if new_scale.is_finite() {
                    self.scale = new_scale;
                }
                self.growth_tracker = 0;
            } else {
                self.growth_tracker = successful;
            }
        }
        !found_inf
    }
}

/// DeepSpeed `DynamicLossScaler` (Python floats: f64).
struct DeepSpeed {
    cur_scale: f64,
    cur_iter: i64,
    last_overflow_iter: i64,
    scale_factor: f64,
    scale_window: i64,
    min_scale: f64,
    delayed_shift: u32,
    cur_hysteresis: u32,
    consecutive_hysteresis: bool,
}

impl DeepSpeed {
    fn new(init_scale: f64, scale_window: i64, min_scale: f64, delayed_shift: u32) -> Self {
        DeepSpeed {
            cur_scale: init_scale,
            cur_iter: 0,
            last_overflow_iter: -1,
            scale_factor: 2.0,
            scale_window,
            min_scale,
            delayed_shift,
            cur_hysteresis: delayed_shift,
            consecutive_hysteresis: false,
        }
    }
}

impl Framework for DeepSpeed {
    fn scale(&self) -> f32 {
        self.cur_scale as f32
    }
    fn update(&mut self, overflow: bool) -> bool {
        if overflow {
            if self.delayed_shift == 1 || self.cur_hysteresis == 1 {
                self.cur_scale = (self.cur_scale / self.scale_factor).max(self.min_scale);
            } else {
                self.cur_hysteresis -= 1;
            }
            self.last_overflow_iter = self.cur_iter;
        } else {
            if self.consecutive_hysteresis {
                self.cur_hysteresis = self.delayed_shift;
            }
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0 {
                if !self.consecutive_hysteresis {
                    self.cur_hysteresis = self.delayed_shift;
                }
                self.cur_scale *= self.scale_factor;
            }
        }
        self.cur_iter += 1;
        !overflow
    }
}

fn keras() -> Keras {
    Keras { current_loss_scale: 32768.0, counter: 0, growth_steps: 2000, multiplier: 2.0 }
}

fn torch() -> Torch {
    Torch { scale: 65536.0, growth_tracker: 0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
}

fn deepspeed() -> DeepSpeed {
    DeepSpeed::new(65536.0, 1000, 1.0, 2)
}

/// A script: runs of (finite steps, overflows).
fn script(runs: &[(usize, usize)]) -> Vec<bool> {
    let mut v = Vec::new();
    for &(finite, overflow) in runs {
        v.extend(std::iter::repeat_n(false, finite));
        v.extend(std::iter::repeat_n(true, overflow));
    }
    v
}

/// Overflow flags: `true` = this step's gradients were not finite.
fn scripts() -> Vec<(&'static str, Vec<bool>)> {
    let mut rng = Rng::new(99);
    let random_sparse: Vec<bool> = (0..30_000).map(|_| rng.below(900) == 0).collect();
    let random_bursty: Vec<bool> =
        (0..12_000).map(|i| if (i / 500) % 7 == 3 { rng.below(3) == 0 } else { rng.below(1500) == 0 }).collect();
    vec![
        ("5000 finite (growth twice or more)", script(&[(5000, 0)])),
        ("growth interval edges", script(&[(999, 1), (1000, 1), (1001, 1), (1999, 1), (2000, 1), (2001, 0)])),
        ("overflow first", script(&[(0, 1), (2500, 0)])),
        ("single overflows between runs", script(&[(10, 1), (1, 1), (0, 0), (998, 1), (999, 0), (3, 1), (2003, 0)])),
        ("overflow pairs", script(&[(5, 2), (1000, 2), (1000, 2), (2000, 2), (10, 0)])),
        ("to the floor: 300 overflows in a row", script(&[(3, 300), (2100, 1), (5, 0)])),
        ("alternating", (0..3000).map(|i| i % 2 == 1).collect()),
        ("random sparse overflows", random_sparse),
        ("random bursts", random_bursty),
    ]
}

/// Replays `flags` through mantissa's `LossScale` and the framework model; returns the scale trace.
fn replay(name: &str, preset: DynamicConfig, mut model: impl Framework, flags: &[bool]) -> Vec<f32> {
    let mut ours = LossScale::Dynamic(DynamicLossScale::new(preset).unwrap());
    let mut trace = Vec::with_capacity(flags.len() + 1);
    for (i, &overflow) in flags.iter().enumerate() {
        assert_eq!(
            ours.scale().to_bits(),
            model.scale().to_bits(),
            "{name}: scale before step {i}: mantissa {} vs framework {}",
            ours.scale(),
            model.scale()
        );
        trace.push(ours.scale());
        let apply = ours.update(!overflow);
        let want = model.update(overflow);
        assert_eq!(apply, want, "{name}: step {i} (overflow {overflow}) apply decision");
        assert_eq!(apply, !overflow, "{name}: step {i}: overflow steps are skipped, finite ones applied");
    }
    assert_eq!(ours.scale().to_bits(), model.scale().to_bits(), "{name}: final scale");
    trace.push(ours.scale());
    trace
}

fn distinct(trace: &[f32]) -> usize {
    trace.windows(2).filter(|w| w[0] != w[1]).count()
}

#[test]
fn tensorflow_preset_matches_keras() {
    for (what, flags) in scripts() {
        let trace = replay(&format!("tensorflow / {what}"), DynamicConfig::tensorflow(), keras(), &flags);
        if what.starts_with("5000") {
            // 2^15 -> 2^16 after 2000 finite steps -> 2^17 after 4000.
            assert_eq!((trace[1999], trace[2000], trace[4000], trace[5000]), (32768.0, 65536.0, 131072.0, 131072.0));
        }
        if what.starts_with("to the floor") {
            assert_eq!(*trace.iter().min_by(|a, b| a.total_cmp(b)).unwrap(), 1.0, "Keras never goes below 1");
            assert_eq!(trace[3 + 299], 1.0);
        }
    }
}

#[test]
fn pytorch_preset_matches_grad_scaler() {
    for (what, flags) in scripts() {
        let trace = replay(&format!("pytorch / {what}"), DynamicConfig::pytorch(), torch(), &flags);
        if what.starts_with("5000") {
            assert_eq!((trace[1999], trace[2000], trace[4000]), (65536.0, 131072.0, 262144.0));
        }
        if what.starts_with("to the floor") {
            // No floor: 2^16 halves to 2^-24 after 40 overflows, and underflows to 0 after 166 (f32).
            assert_eq!(trace[3 + 40], 2f32.powi(-24));
            assert_eq!(trace[3 + 165], f32::from_bits(1), "the smallest subnormal");
            assert_eq!(trace[3 + 166], 0.0);
        }
    }
}

#[test]
fn deepspeed_preset_matches_dynamic_loss_scaler() {
    for (what, flags) in scripts() {
        let trace = replay(&format!("deepspeed / {what}"), DynamicConfig::deepspeed(), deepspeed(), &flags);
        if what.starts_with("5000") {
            assert_eq!((trace[999], trace[1000], trace[2000]), (65536.0, 131072.0, 262144.0));
        }
        if what == "overflow first" {
            // Hysteresis 2: one overflow does not back off.
            assert_eq!(trace[1], 65536.0);
        }
        if what.starts_with("to the floor") {
            // The first overflow uses up the hysteresis, the next 16 halve 2^16 to 1, the rest stay at 1.
            assert_eq!((trace[3 + 1], trace[3 + 2], trace[3 + 17], trace[3 + 299]), (65536.0, 32768.0, 1.0, 1.0));
        }
        assert!(distinct(&trace) > 0 || flags.iter().all(|&o| !o));
    }
}

#[test]
fn custom_configs_follow_the_same_models() {
    // Short intervals, so growth and back-off interleave often; hysteresis 3; other floors.
    let mut rng = Rng::new(5);
    let flags: Vec<bool> = (0..20_000).map(|_| rng.below(12) == 0).collect();
    let cfg = DynamicConfig::pytorch().initial_scale(1024.0).growth_interval(7);
    replay("pytorch interval 7", cfg, Torch { scale: 1024.0, growth_interval: 7, ..torch() }, &flags);
    let cfg = DynamicConfig::tensorflow().initial_scale(4.0).growth_interval(5);
    replay("tensorflow interval 5", cfg, Keras { current_loss_scale: 4.0, growth_steps: 5, ..keras() }, &flags);
    // DeepSpeed's Python float grows without bound; keep its traces inside f32 with more overflows.
    let dense: Vec<bool> = (0..20_000).map(|_| rng.below(4) == 0).collect();
    let cfg = DynamicConfig {
        hysteresis: 3,
        min_scale: 0.25,
        ..DynamicConfig::deepspeed().initial_scale(8.0).growth_interval(9)
    };
    let t = replay("deepspeed hysteresis 3", cfg, DeepSpeed::new(8.0, 9, 0.25, 3), &dense);
    assert!(distinct(&t) > 100 && t.contains(&0.25), "the trace exercises growth, back-off and the floor");
    let cfg = DynamicConfig::deepspeed().growth_interval(1);
    let pattern: Vec<(usize, usize)> = (0..300).map(|i| [(1, 1), (2, 2), (1, 3), (3, 2), (0, 4)][i % 5]).collect();
    replay("deepspeed window 1", cfg, DeepSpeed::new(65536.0, 1, 1.0, 2), &script(&pattern));
    // Growth that would overflow f32 keeps the old scale (Keras and GradScaler).
    let big = 2f32.powi(126);
    let t = replay(
        "pytorch near f32 max",
        DynamicConfig::pytorch().initial_scale(big).growth_interval(2),
        Torch { scale: big, growth_interval: 2, ..torch() },
        &script(&[(10, 0)]),
    );
    assert_eq!(*t.last().unwrap(), 2f32.powi(127));
}

#[test]
fn invalid_dynamic_configs_are_errors() {
    let base = DynamicConfig::pytorch();
    let bad = [
        base.initial_scale(0.0),
        base.initial_scale(-1.0),
        base.initial_scale(f32::NAN),
        base.initial_scale(f32::INFINITY),
        base.growth_interval(0),
        DynamicConfig { backoff_factor: 1.0, ..base },
        DynamicConfig { backoff_factor: 2.0, ..base },
        DynamicConfig { backoff_factor: 0.0, ..base },
        DynamicConfig { backoff_factor: f32::NAN, ..base },
        DynamicConfig { growth_factor: 0.5, ..base },
        DynamicConfig { growth_factor: f32::NAN, ..base },
        DynamicConfig { growth_factor: f32::INFINITY, ..base },
        DynamicConfig { hysteresis: 0, ..base },
        DynamicConfig { min_scale: -1.0, ..base },
        DynamicConfig { min_scale: f32::NAN, ..base },
    ];
    let model = Model::sequential(Shape::flat(3)).linear(2).build().unwrap();
    for cfg in bad {
        assert!(matches!(cfg.validate(), Err(Error::InvalidConfig(_))), "{cfg:?} validates");
        assert!(matches!(DynamicLossScale::new(cfg), Err(Error::InvalidConfig(_))), "{cfg:?} builds");
        // A state built by hand around a bad config is refused by the trainer, at construction and later.
        let state = DynamicLossScale { config: cfg, scale: 1.0, good_steps: 0, hysteresis_left: 1 };
        let mut mem = vec![0u8; 1 << 16];
        let tc = TrainConfig::new(2, Policy::MIXED_FLOAT16).loss_scale(LossScale::Dynamic(state));
        let r = Trainer::new(Reference::new(&mut mem), model.clone(), Policy::MIXED_FLOAT16, Sgd::new(0.1), tc);
        assert!(matches!(r, Err(Error::InvalidConfig(_))), "Trainer::new accepted {cfg:?}");
        let mut mem = vec![0u8; 1 << 16];
        let tc = TrainConfig::new(2, Policy::MIXED_FLOAT16);
        let mut t =
            Trainer::new(Reference::new(&mut mem), model.clone(), Policy::MIXED_FLOAT16, Sgd::new(0.1), tc).unwrap();
        let before = *t.loss_scale();
        assert!(matches!(t.set_loss_scale(LossScale::Dynamic(state)), Err(Error::InvalidConfig(_))));
        assert_eq!(*t.loss_scale(), before, "a refused loss scale leaves the old one");
    }
    for preset in [DynamicConfig::tensorflow(), DynamicConfig::pytorch(), DynamicConfig::deepspeed()] {
        preset.validate().unwrap();
    }
    for s in [0.0, -512.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert!(matches!(LossScale::fixed(s), Err(Error::InvalidConfig(_))), "fixed({s})");
    }
}

#[test]
fn fixed_and_none_never_change_and_skip_non_finite_steps() {
    for (mut s, scale, name) in [(LossScale::fixed(512.0).unwrap(), 512.0, "fixed"), (LossScale::None, 1.0, "none")] {
        assert_eq!(s.name(), name);
        for (i, overflow) in script(&[(2500, 3), (1, 300), (5, 0)]).into_iter().enumerate() {
            assert_eq!(s.update(!overflow), !overflow, "{name} step {i}: skip exactly the non-finite steps");
            assert_eq!(s.scale(), scale, "{name} step {i}");
        }
    }
    assert_eq!(LossScale::Dynamic(DynamicLossScale::tensorflow()).name(), "dynamic");
}

//! Check-numerics mode: off by default (a non-finite step is skipped), on: the first non-finite tensor
//! stops the step with a report naming layer, tensor, phase, dtype, shape and counts.

use mantissa_core::numerics::Phase;
use mantissa_core::{AdamW, DType, Error, Model, Policy, Reference, Shape, TrainConfig, Trainer};

#[repr(C, align(64))]
struct Block([u8; 64]);

fn trainer(buf: &mut [Block], policy: Policy) -> Trainer<Reference<'_>> {
    // SAFETY: a slice of 64-byte blocks is a valid, aligned byte slice of 64x the length.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, buf.len() * 64) };
    let model = Model::sequential(Shape::flat(5)).linear(7).relu().linear(3).build().unwrap();
    Trainer::new(Reference::new(bytes), model, policy, AdamW::new(1e-2), TrainConfig::new(4, policy)).unwrap()
}

fn master(t: &mut Trainer<Reference<'_>>) -> Vec<f32> {
    let mut w = vec![0.0; t.model().param_len()];
    t.read_master(&mut w).unwrap();
    w
}

#[test]
fn off_by_default_a_nan_input_skips_the_step() {
    let mut buf: Vec<Block> = (0..512).map(|_| Block([0; 64])).collect();
    let mut t = trainer(&mut buf, Policy::FLOAT32);
    assert!(!t.check_numerics());
    let before = master(&mut t);
    let mut x = vec![0.1f32; 4 * 5];
    x[6] = f32::NAN;
    let r = t.step(&x, &[0, 1, 2, 0]).unwrap();
    assert!(r.skipped);
    assert_eq!(master(&mut t), before);
}

#[test]
fn nan_input_is_reported_at_the_first_layer_output() {
    let mut buf: Vec<Block> = (0..512).map(|_| Block([0; 64])).collect();
    let mut t = trainer(&mut buf, Policy::MIXED_BFLOAT16);
    t.set_check_numerics(true);
    let before = master(&mut t);
    let mut x = vec![0.1f32; 4 * 5];
    x[6] = f32::NAN; // row 1
    let err = t.step(&x, &[0, 1, 2, 0]).unwrap_err();
    let Error::NonFinite(r) = err else { panic!("expected NonFinite, got {err:?}") };
    assert_eq!(r.layer, Some(0));
    assert_eq!(r.kind, "Linear");
    assert_eq!(r.op, "output");
    assert_eq!(r.phase, Phase::Forward);
    assert_eq!(r.dtype, DType::BF16);
    assert_eq!(r.shape, [4, 7]);
    assert_eq!((r.nan, r.inf), (7, 0), "the NaN row's 7 outputs");
    let msg = err.to_string();
    for part in ["forward", "layer 0 (Linear)", "output", "bfloat16", "7 NaN", "0 Inf"] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    assert_eq!(master(&mut t), before, "a stopped step leaves the model as it was");
    assert_eq!(t.updates(), 0);
}

#[test]
fn f16_overflow_is_reported_with_its_dtype_and_inf_count() {
    let mut buf: Vec<Block> = (0..512).map(|_| Block([0; 64])).collect();
    let mut t = trainer(&mut buf, Policy::MIXED_FLOAT16);
    t.set_check_numerics(true);
    let mut x = vec![0.1f32; 4 * 5];
    for v in &mut x[..5] {
        *v = 1e6; // row 0 overflows f16 (max 65504) already in the input cast
    }
    let err = t.step(&x, &[0, 1, 2, 0]).unwrap_err();
    let Error::NonFinite(r) = err else { panic!("expected NonFinite, got {err:?}") };
    assert_eq!(r.dtype, DType::F16);
    assert_eq!(r.phase, Phase::Forward);
    assert_eq!(r.layer, Some(0));
    assert!(r.inf + r.nan > 0);
}

#[test]
fn finite_steps_pass_with_checking_on() {
    let mut buf: Vec<Block> = (0..512).map(|_| Block([0; 64])).collect();
    let mut t = trainer(&mut buf, Policy::MIXED_FLOAT16);
    t.set_check_numerics(true);
    let x: Vec<f32> = (0..20).map(|i| (i as f32 * 0.37).sin()).collect();
    for _ in 0..5 {
        let r = t.step(&x, &[0, 1, 2, 0]).unwrap();
        assert!(!r.skipped);
    }
    assert_eq!(t.updates(), 5);
}

//! The scalar f16 conversions against the `half` crate (IEEE round to nearest even), bit for bit.

use half::f16;
use mantissa_core::dtype::{f16_bits_to_f32, f32_to_f16_bits};
use mantissa_core::rng::Rng;

#[test]
fn f16_to_f32_matches_half_for_every_f16() {
    for h in 0..=u16::MAX {
        let ours = f16_bits_to_f32(h);
        let theirs = f16::from_bits(h).to_f32();
        if theirs.is_nan() {
            assert!(ours.is_nan(), "{h:#06x}");
        } else {
            assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
        }
    }
}

fn check(x: f32) {
    let ours = f32_to_f16_bits(x);
    let theirs = f16::from_f32(x).to_bits();
    if x.is_nan() {
        assert!(f16::from_bits(ours).is_nan(), "{x:e}");
    } else {
        assert_eq!(ours, theirs, "x = {x:e} ({:#010x})", x.to_bits());
    }
}

#[test]
fn f32_to_f16_matches_half_on_edges_midpoints_and_random_bits() {
    // Every f16 value, the midpoints between neighbours (ties) and their f32 neighbours.
    for h in 0..0x7c00u16 {
        let a = f16::from_bits(h).to_f32();
        let b = f16::from_bits(h + 1).to_f32();
        let mid = ((a as f64 + b as f64) / 2.0) as f32;
        for x in [a, mid, f32::from_bits(mid.to_bits() + 1), f32::from_bits(mid.to_bits().saturating_sub(1))] {
            check(x);
            check(-x);
        }
    }
    for x in [
        0.0,
        -0.0,
        65504.0,
        65519.99,
        65520.0,
        1e10,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-30,
        5.96e-8,
        2.98e-8,
        2.99e-8,
    ] {
        check(x);
        check(-x);
    }
    let mut rng = Rng::new(7);
    for _ in 0..2_000_000 {
        check(f32::from_bits(rng.next_u32()));
    }
}

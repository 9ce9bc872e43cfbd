//! The loss-scaling demonstration (`examples/loss_scaling`) as its expected outcome: without scaling f16
//! stalls (every loss gradient flushes to zero and the weights do not move); fixed and dynamic scaling land
//! within 1% of float32's final loss; bf16 needs no scaling; a dynamic scale that starts far too high skips
//! steps, backs off, and then trains.

mod common;

use common::{field, fields};

#[test]
fn loss_scaling_demonstration_shows_underflow_and_its_cure() {
    let out = common::run_example("loss_scaling", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "loss_scaling failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    let rows: Vec<_> = stdout.lines().filter(|l| l.starts_with("row: ")).map(|l| fields(l, "row: ")).collect();
    let find = |policy: &str, scaling: &str| {
        rows.iter()
            .find(|r| field(r, "policy") == policy && field(r, "scaling") == scaling)
            .unwrap_or_else(|| panic!("no row {policy}/{scaling}"))
    };
    let num = |r: &Vec<(String, String)>, k: &str| -> f64 { field(r, k).parse().unwrap() };

    let f32_row = find("float32", "none");
    let reference = num(f32_row, "final_loss");
    assert!(reference < 1.0, "float32 must learn: final loss {reference}");

    let stalled = find("mixed_float16", "none");
    assert_eq!(field(stalled, "weights_moved"), "false", "f16 without scaling must stall");
    assert!(num(stalled, "underflow") > 0.9, "f16 without scaling: underflow {}", num(stalled, "underflow"));

    for scaling in ["fixed", "dynamic"] {
        let r = find("mixed_float16", scaling);
        let loss = num(r, "final_loss");
        assert!((loss - reference).abs() <= 0.01 * reference, "f16 {scaling}: {loss} vs float32 {reference}");
        assert_eq!(field(r, "skipped"), "0");
        assert!(num(r, "underflow") < num(stalled, "underflow"));
    }

    let bf16 = find("mixed_bfloat16", "none");
    assert!((num(bf16, "final_loss") - reference).abs() <= 0.01 * reference, "bf16 without scaling must train");
    assert_eq!(num(bf16, "underflow"), 0.0);

    let overflow = find("mixed_float16", "dynamic-from-2^60");
    assert!(num(overflow, "skipped") > 0.0, "a 2^60 scale must overflow and skip");
    assert!(num(overflow, "final_loss") < 0.7, "after backing off it must train: {}", num(overflow, "final_loss"));
}

//! The firmware example's fine-tuning, replayed on the host from the committed assets with the same source
//! (`examples/firmware-cortex-m/src/scenario.rs`): it must reproduce the checksum the firmware asserts, and the
//! accuracy gain. scripts/firmware.sh runs the firmware itself under QEMU and compares the two.

use mantissa as mc;
#[path = "../examples/firmware-cortex-m/src/scenario.rs"]
mod scenario;
#[allow(dead_code)]
mod expected {
    include!("../examples/firmware-cortex-m/assets/expected.rs");
}

use mantissa::host::HostBuffer;
use mantissa::{MemoryPlan, Reference, Trainer};
use scenario::{DataBlob, ModelBlob, Split};

const MODEL: &[u8] = include_bytes!("../examples/firmware-cortex-m/assets/model.bin");
const DATA: &[u8] = include_bytes!("../examples/firmware-cortex-m/assets/data.bin");

#[test]
fn host_replay_matches_the_recorded_checksum_and_gains_10_points() {
    let model = scenario::model().unwrap();
    let (policy, why) = scenario::policy(&Reference::new(&mut []));
    assert_eq!(policy, mantissa::Policy::FLOAT32, "auto on a part without 16-bit arithmetic: {why}");
    let opt = scenario::optimizer();
    let cfg = scenario::config(policy);
    let plan = MemoryPlan::for_config(&model, policy, &opt, &cfg).unwrap();
    assert_eq!(plan.total, expected::PLAN_TOTAL, "the firmware's arena size is stale: rerun firmware_export");
    let mut arena = HostBuffer::new(plan.total).unwrap();
    let mut t = Trainer::new(Reference::new(arena.as_mut_slice()), model.clone(), policy, opt, cfg).unwrap();
    let blob = ModelBlob::parse(MODEL, &model).unwrap();
    let data = DataBlob::parse(DATA).unwrap();
    scenario::load(&mut t, &blob).unwrap();
    let before = scenario::correct(&mut t, &data, Split::Test).unwrap();
    scenario::fine_tune(&mut t, &data, |_, _| {}).unwrap();
    let after = scenario::correct(&mut t, &data, Split::Test).unwrap();
    let checksum = scenario::checksum(&mut t).unwrap();
    let n = data.len(Split::Test);
    println!("before {before}/{n}, after {after}/{n}, checksum 0x{checksum:016x}");
    assert_eq!((before, after), (expected::HOST_CORRECT_BEFORE, expected::HOST_CORRECT_AFTER));
    assert_eq!(checksum, expected::HOST_CHECKSUM, "numerics changed: rerun firmware_export (and the firmware)");
    assert!(100 * (after - before) >= 10 * n, "gain below 10 points: {before} -> {after} of {n}");
    assert_eq!(t.arena().high_water(), plan.total);
}

#[test]
fn frozen_weights_are_bf16_in_the_blob_and_halve_it() {
    let model = scenario::model().unwrap();
    let blob = ModelBlob::parse(MODEL, &model).unwrap();
    let frozen = mantissa::trainable::ParamLayout::new(&model, scenario::TRAINABLE).unwrap();
    assert_eq!(blob.data_len(), 2 * frozen.frozen_len() + 4 * frozen.trainable_len());
    assert!(blob.data_len() < 4 * model.param_len() * 6 / 10);
}

#[test]
fn corrupted_blobs_are_errors() {
    let model = scenario::model().unwrap();
    let mut m = MODEL.to_vec();
    let mid = m.len() / 2;
    m[mid] ^= 1;
    assert!(matches!(ModelBlob::parse(&m, &model), Err(mantissa::Error::Checkpoint(msg)) if msg.contains("checksum")));
    assert!(ModelBlob::parse(&MODEL[..MODEL.len() - 1], &model).is_err());
    assert!(ModelBlob::parse(b"nope", &model).is_err());
    let other = mantissa::Model::sequential(mantissa::Shape::flat(196)).linear(10).build().unwrap();
    assert!(ModelBlob::parse(MODEL, &other).is_err());
    assert!(DataBlob::parse(&DATA[..DATA.len() - 1]).is_err());
    let mut d = DATA.to_vec();
    d[20] = 10; // a label out of range
    assert!(DataBlob::parse(&d).is_err());
}

//! The main job as a user runs it: `examples/mnist` end to end on the bundled digits, and its errors.
//! These are the acceptance criteria of the core engine: MLP >= 0.95 test accuracy under every policy, each
//! mixed policy within 0.5 percentage points of float32 (same seed), CNN >= 0.975; bad input exits non-zero
//! with a clear message.

use std::path::Path;
use std::process::Output;

mod common;

fn run(args: &[&str]) -> Output {
    common::run_example("mnist", args)
}

/// The fields of the final `result:` line.
fn result_line(out: &Output) -> Vec<(String, String)> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mnist failed ({:?}):\n{stdout}\n{stderr}", out.status);
    let line =
        stdout.lines().rfind(|l| l.starts_with("result: ")).unwrap_or_else(|| panic!("no result line:\n{stdout}"));
    common::fields(line, "result: ")
}

use common::field;

fn accuracy(args: &[&str]) -> (f64, Vec<(String, String)>) {
    let fields = result_line(&run(args));
    let acc: f64 = field(&fields, "test_accuracy").parse().expect("accuracy is a number");
    println!("mnist {args:?}: {fields:?}");
    (acc, fields)
}

#[test]
fn default_run_reaches_95_percent_and_reports_everything() {
    let (acc, fields) = accuracy(&[]);
    assert!(acc >= 0.95, "default MLP run: test accuracy {acc} < 0.95");
    assert_eq!(field(&fields, "model"), "mlp");
    for key in ["policy", "backend", "epochs", "train_seconds", "arena_bytes"] {
        assert!(!field(&fields, key).is_empty());
    }
    let arena: usize = field(&fields, "arena_bytes").parse().unwrap();
    assert!(arena > 0);
}

#[test]
fn every_policy_reaches_95_percent_and_mixed_is_within_half_a_point_of_float32() {
    let (f32_acc, _) = accuracy(&["--policy", "float32", "--seed", "3"]);
    assert!(f32_acc >= 0.95, "float32: {f32_acc}");
    for policy in ["mixed_float16", "mixed_bfloat16"] {
        let (acc, fields) = accuracy(&["--policy", policy, "--seed", "3"]);
        assert_eq!(field(&fields, "policy"), policy);
        assert!(acc >= 0.95, "{policy}: {acc}");
        assert!(
            (acc - f32_acc).abs() <= 0.005 + 1e-9,
            "{policy}: {acc} vs float32 {f32_acc}: more than 0.5 points apart"
        );
    }
}

#[test]
fn cnn_reaches_97_5_percent() {
    let (acc, fields) = accuracy(&["--model", "cnn"]);
    assert_eq!(field(&fields, "model"), "cnn");
    assert!(acc >= 0.975, "cnn: test accuracy {acc} < 0.975");
}

fn assert_fails_with(args: &[&str], needles: &[&str]) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_ne!(out.status.code(), Some(0));
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: stderr lacks {n:?}:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
}

#[test]
fn unknown_policy_is_a_clear_error() {
    assert_fails_with(
        &["--policy", "mixed_float8"],
        &["unknown precision policy", "float32, mixed_float16, mixed_bfloat16, auto"],
    );
}

#[test]
fn unknown_backend_is_a_clear_error() {
    assert_fails_with(&["--backend", "tpu"], &["unknown backend", "reference, cpu-simd, cuda"]);
}

#[test]
fn corrupted_data_is_a_clear_error_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("mantissa-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let images = std::fs::read(data.join("mnist-10k-images-idx3-ubyte.gz")).unwrap();
    let labels = std::fs::read(data.join("mnist-10k-labels-idx1-ubyte.gz")).unwrap();
    std::fs::write(dir.join("mnist-10k-images-idx3-ubyte.gz"), &images[..images.len() / 2]).unwrap();
    std::fs::write(dir.join("mnist-10k-labels-idx1-ubyte.gz"), &labels).unwrap();
    assert_fails_with(&["--data", dir.to_str().unwrap()], &["mnist-10k-images-idx3-ubyte.gz"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_data_is_a_clear_error() {
    assert_fails_with(&["--data", "/nonexistent/mantissa-data"], &["/nonexistent/mantissa-data"]);
}

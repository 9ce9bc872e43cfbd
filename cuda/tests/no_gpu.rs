//! Runs everywhere, CI included: opening the backend never panics, and where it cannot run it says so with
//! `Error::DeviceUnavailable` (no driver, no GPU, no such device).

use mantissa_core::{Backend, Error};
use mantissa_cuda::CudaBackend;

#[test]
fn opening_without_a_usable_gpu_is_an_error_value_not_a_panic() {
    match CudaBackend::new(0, 1 << 20) {
        Ok(b) => println!("a GPU is present here: opened {:?} ({})", b, b.capabilities().device),
        Err(e) => {
            println!("no usable GPU here: {e}");
            assert!(matches!(e, Error::DeviceUnavailable(_)), "{e:?}");
        }
    }
    // No machine has this many GPUs.
    let e = CudaBackend::new(100_000, 1 << 20).unwrap_err();
    assert!(matches!(e, Error::DeviceUnavailable(_)), "{e:?}");
}

//! The kernels compile with NVRTC (needs libnvrtc, not a GPU).

use mantissa_cuda::CudaBackend;

#[test]
#[ignore = "needs libnvrtc (CUDA's lib64 on LD_LIBRARY_PATH; scripts/gpu-check.sh runs it on the GPU machine)"]
fn kernels_compile_for_hopper_and_the_default_target() {
    assert_eq!(CudaBackend::compile_kernels(Some("sm_90")).unwrap(), 11);
    assert_eq!(CudaBackend::compile_kernels(None).unwrap(), 11);
}

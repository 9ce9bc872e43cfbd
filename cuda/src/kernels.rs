//! The CUDA C kernels (`cuda/kernels/*.cu`, one op family per file), compiled with NVRTC at the first
//! [`crate::CudaBackend::new`] of a process and cached for the rest of it, then loaded once per backend.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as cur, sys as cu, CudaContext, CudaModule};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use mantissa_core::{DType, Error, Result};

use crate::CudaBackend;

/// Prepended to every family's source: storage types, loads and stores, reductions, instantiation lists.
const COMMON: &str = include_str!("../kernels/common.cuh");

/// The op families, in [`Family`] order: `(file name, source)`.
const FAMILIES: [(&str, &str); 11] = [
    ("elementwise.cu", include_str!("../kernels/elementwise.cu")),
    ("softmax_xent.cu", include_str!("../kernels/softmax_xent.cu")),
    ("conv.cu", include_str!("../kernels/conv.cu")),
    ("pool.cu", include_str!("../kernels/pool.cu")),
    ("reduce.cu", include_str!("../kernels/reduce.cu")),
    ("optim.cu", include_str!("../kernels/optim.cu")),
    ("gemm.cu", include_str!("../kernels/gemm.cu")),
    ("control.cu", include_str!("../kernels/control.cu")),
    ("skinny.cu", include_str!("../kernels/skinny.cu")),
    ("act_grad.cu", include_str!("../kernels/act_grad.cu")),
    ("head.cu", include_str!("../kernels/head.cu")),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    Elementwise = 0,
    SoftmaxXent = 1,
    Conv = 2,
    Pool = 3,
    Reduce = 4,
    Optim = 5,
    Gemm = 6,
    Control = 7,
    Skinny = 8,
    ActGrad = 9,
    Head = 10,
}

/// `#define CTL_<WORD> <index>` for every word of the step-control block, from [`mantissa_core::control`] (the
/// one definition of the layout), compiled into every family after `common.cuh`.
fn control_defines() -> String {
    use mantissa_core::control as c;
    let words = [
        ("WORDS", c::WORDS),
        ("SCALE", c::SCALE),
        ("GOOD_STEPS", c::GOOD_STEPS),
        ("HYSTERESIS_LEFT", c::HYSTERESIS_LEFT),
        ("UPDATES", c::UPDATES),
        ("SKIPPED", c::SKIPPED),
        ("LAST_SCALE", c::LAST_SCALE),
        ("LAST_APPLIED", c::LAST_APPLIED),
        ("LAST_NORM", c::LAST_NORM),
        ("LAST_NON_FINITE", c::LAST_NON_FINITE),
        ("LAST_LOSS", c::LAST_LOSS),
        ("LAST_CORRECT", c::LAST_CORRECT),
        ("LAST_FLUSHED", c::LAST_FLUSHED),
        ("LAST_NON_ZERO", c::LAST_NON_ZERO),
        ("GRAD_MUL", c::GRAD_MUL),
        ("BIAS_CORRECTION1", c::BIAS_CORRECTION1),
        ("BIAS_CORRECTION2", c::BIAS_CORRECTION2),
    ];
    words.iter().map(|(name, w)| format!("#define CTL_{name} {w}\n")).collect()
}

/// The kernel-name suffix of a float dtype (`cast_f32_bf16`).
pub(crate) fn suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::I32 => "i32",
    }
}

/// PTX per target architecture (`None`: NVRTC's default), compiled once per process.
type PtxCache = Mutex<HashMap<Option<&'static str>, Arc<Vec<Ptx>>>>;
static PTX: OnceLock<PtxCache> = OnceLock::new();

fn options(arch: Option<&'static str>, name: &str) -> CompileOptions {
    // No FMA contraction and IEEE division and square root: the element-wise results then equal the scalar
    // reference's (which never contracts), and these kernels are memory-bound, so it costs nothing measurable.
    CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(false),
        arch,
        name: Some(name.to_string()),
        ..Default::default()
    }
}

fn nvrtc_error(name: &str, e: CompileError) -> Error {
    match e {
        CompileError::CompileError { nvrtc, log, .. } => {
            // A kernel that does not compile is a bug in this crate: show NVRTC's log where it can be seen.
            eprintln!("mantissa-cuda: NVRTC failed on {name}:\n{}", log.to_string_lossy());
            Error::Device { what: "NVRTC compile of the kernels", code: nvrtc.0 as i32 }
        }
        CompileError::CreationError(e) | CompileError::GetLogError(e) | CompileError::GetPtxError(e) => {
            Error::Device { what: "NVRTC", code: e.0 as i32 }
        }
        _ => Error::Device { what: "NVRTC", code: -1 },
    }
}

/// Compiles every kernel file for `arch` (`sm_90`; `None` for NVRTC's default), in parallel, or returns the
/// cached PTX. Needs libnvrtc but no GPU.
pub(crate) fn compile(arch: Option<&'static str>) -> Result<Arc<Vec<Ptx>>> {
    let cache = PTX.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(p) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&arch) {
        return Ok(p.clone());
    }
    let defines = control_defines();
    let defines = defines.as_str();
    let results: Vec<Result<Ptx>> = std::thread::scope(|s| {
        let handles: Vec<_> = FAMILIES
            .iter()
            .map(|&(name, src)| {
                s.spawn(move || {
                    let full = format!("{COMMON}\n{defines}#line 1 \"{name}\"\n{src}");
                    cudarc::nvrtc::compile_ptx_with_opts(full, options(arch, name)).map_err(|e| nvrtc_error(name, e))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(Error::Device { what: "NVRTC (compiler thread panicked)", code: -1 })))
            .collect()
    });
    let ptx = Arc::new(results.into_iter().collect::<Result<Vec<Ptx>>>()?);
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(arch, ptx.clone());
    Ok(ptx)
}

/// The loaded modules of one context and the functions looked up so far.
pub(crate) struct Kernels {
    modules: Vec<Arc<CudaModule>>,
    functions: HashMap<(Family, &'static str, DType, DType), cu::CUfunction>,
}

impl Kernels {
    pub(crate) fn load(ctx: &Arc<CudaContext>, arch: Option<&'static str>) -> Result<Kernels> {
        let ptx = compile(arch)?;
        let modules = ptx
            .iter()
            .map(|p| ctx.load_module(p.clone()).map_err(crate::driver("loading the NVRTC-compiled kernels")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Kernels { modules, functions: HashMap::new() })
    }

    /// The kernel `{base}_{a}_{b}` (or `{base}_{a}` when `b` is `None`, or `{base}` when both are) of `family`.
    pub(crate) fn get(
        &mut self,
        family: Family,
        base: &'static str,
        a: Option<DType>,
        b: Option<DType>,
    ) -> Result<cu::CUfunction> {
        // I32 stands for "no dtype" in the key: no kernel is instantiated for I32 elements.
        let key = (family, base, a.unwrap_or(DType::I32), b.unwrap_or(DType::I32));
        if let Some(&f) = self.functions.get(&key) {
            return Ok(f);
        }
        let mut name = base.to_string();
        for d in [a, b].into_iter().flatten() {
            name.push('_');
            name.push_str(suffix(d));
        }
        let f = self.modules[family as usize]
            .load_function(&name)
            .map_err(crate::driver("looking up a kernel (a dtype pair without an instantiation?)"))?
            .cu_function();
        self.functions.insert(key, f);
        Ok(f)
    }
}

/// One kernel argument, passed by value. Pointers are device addresses (`u64`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    U64(u64),
    I64(i64),
    I32(i32),
    F32(f32),
}

impl Arg {
    /// The argument's bytes in the low end of an 8-byte slot (the host is little-endian: see lib.rs).
    fn slot(self) -> u64 {
        match self {
            Arg::U64(v) => v,
            Arg::I64(v) => v as u64,
            Arg::I32(v) => v as u32 as u64,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }
}

/// Queues `f` on the backend's stream. `args` must match the kernel's parameter list in order and size (u64 for
/// pointers and `u64`/`i64` counts, 4 bytes for `int` and `float`).
///
/// With [`CudaBackend::set_pdl`] on (the default on sm_90 and later) the launch allows programmatic dependent
/// launch: the kernel's blocks may be scheduled before the previous kernel in the stream has finished, and wait
/// in the `PDL_ENTRY()` every kernel starts with (common.cuh) until it has; a CUDA graph captures that as a
/// programmatic edge. Kernels that do not start with it would race: `every_kernel_starts_with_pdl_entry` below
/// checks the sources.
pub(crate) fn launch(
    be: &CudaBackend,
    f: cu::CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &[Arg],
) -> Result<()> {
    const MAX: usize = 24;
    debug_assert!(args.len() <= MAX);
    let mut slots = [0u64; MAX];
    let mut ptrs = [core::ptr::null_mut::<c_void>(); MAX];
    for (i, a) in args.iter().enumerate() {
        slots[i] = a.slot();
    }
    for (i, p) in ptrs.iter_mut().enumerate().take(args.len()) {
        *p = &mut slots[i] as *mut u64 as *mut c_void;
    }
    let stream = be.stream.cu_stream();
    if !be.pdl {
        // SAFETY: `f` is a function of a module this backend keeps loaded; each parameter pointer addresses an
        // 8-byte slot holding the value in its low bytes, and the driver copies the parameters before returning.
        // The device addresses in `args` were validated against the arena (or point into the backend's scratch).
        return unsafe { cur::launch_kernel(f, grid, block, 0, stream, &mut ptrs[..args.len()]) }
            .map_err(crate::driver("kernel launch"));
    }
    // SAFETY: an all-zero launch attribute is a valid (plain) value of the C union; the id and the one field set
    // below make it the programmatic-serialization attribute.
    let mut attr: cu::CUlaunchAttribute = unsafe { core::mem::zeroed() };
    attr.id = cu::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = cu::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: block.2,
        sharedMemBytes: 0,
        hStream: stream,
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: as above for `f` and the parameters; `config` and the attribute it points to live until the call
    // returns (the driver copies them), and `extra` is null.
    unsafe { cu::cuLaunchKernelEx(&config, f, ptrs.as_mut_ptr(), core::ptr::null_mut()) }
        .result()
        .map_err(crate::driver("kernel launch"))
}

impl CudaBackend {
    /// Whether kernels launch with programmatic dependent launch (see `kernels::launch`); on by default on sm_90 and
    /// later, where it lets a kernel's blocks be scheduled while the previous kernel finishes. Off, every launch
    /// waits for the previous kernel to finish first. Results are the same bits either way. It applies to
    /// launches from then on: set it before the first step (a recorded step graph keeps the launches it has).
    /// Before sm_90 it stays off.
    pub fn set_pdl(&mut self, on: bool) {
        self.pdl = on && self.compute_capability.0 >= 9;
    }

    /// Whether kernels launch with programmatic dependent launch ([`CudaBackend::set_pdl`]).
    pub fn pdl(&self) -> bool {
        self.pdl
    }
}

#[cfg(test)]
mod tests {
    use super::FAMILIES;

    /// The index just past the parenthesised group that opens at `s[open]`.
    fn past_group(s: &str, open: usize) -> usize {
        let mut depth = 0;
        for (i, c) in s[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return open + i + 1;
                    }
                }
                _ => {}
            }
        }
        panic!("unbalanced parentheses");
    }

    /// Every kernel launched with programmatic dependent launch must wait for the previous kernel before it
    /// reads anything: each `__global__` function's body starts with `PDL_ENTRY();` (common.cuh).
    #[test]
    fn every_kernel_starts_with_pdl_entry() {
        let mut kernels = 0;
        for (name, src) in FAMILIES {
            let mut at = 0;
            while let Some(k) = src[at..].find("__global__").map(|k| k + at) {
                let mut open = k + src[k..].find('(').unwrap();
                if src[k..open].contains("__launch_bounds__") {
                    let after = past_group(src, open);
                    open = after + src[after..].find('(').unwrap();
                }
                let params_end = past_group(src, open);
                let brace = params_end + src[params_end..].find('{').unwrap();
                let signature = &src[k..brace];
                assert!(
                    src[params_end..brace].trim().is_empty(),
                    "{name}: unexpected text before the body of {signature}"
                );
                let body = src[brace + 1..].trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
                assert!(body.starts_with("PDL_ENTRY();"), "{name}: {signature} does not start with PDL_ENTRY();");
                kernels += 1;
                at = brace;
            }
        }
        assert!(kernels >= 50, "found only {kernels} kernels: the scan is broken");
    }
}

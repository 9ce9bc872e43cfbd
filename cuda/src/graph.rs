//! Recording (CUDA graphs): [`Backend::record_begin`](mantissa_core::Backend::record_begin) starts a stream
//! capture, the ops that follow are recorded into a graph instead of running, `record_end` instantiates it
//! once, and every `replay` is one `cuGraphLaunch`: a training step's hundreds of launches cost one.
//!
//! Capture mode `THREAD_LOCAL`: a call on this thread that would make the capture unsafe (a synchronising copy,
//! an allocation) fails instead of silently running, and other threads (another backend in the same process)
//! are not affected. `record_end` must therefore come from the thread that called `record_begin`, as the
//! trainer does (both happen inside one step). The backend refuses the ops that would wait for the device or
//! copy host memory while recording (`download*`, `upload*`, `synchronize`, and the ops that return values)
//! with an error before they reach the driver, so the capture stays valid and the caller can end it with
//! `record_end(false)`.
//!
//! A recording holds the device addresses it was captured with: the arena's buffers and the backend's scratch.
//! Both live as long as the backend, and recordings are destroyed before the memory (field order, `Drop`).
//!
//! Captures and context-wide driver calls do not mix. Opening or closing a backend allocates or frees device
//! memory, loads or unloads modules and creates or destroys library handles; those calls may synchronise the
//! whole context, which invalidates a capture in progress on another thread's backend in the same process
//! (seen on the H200: two trainers in one test process, one closing while the other recorded its first step;
//! cuBLAS then failed inside the capture). So a process-wide [`Exclusive`] gate orders them: captures share it,
//! opening and closing a backend take it exclusively, each kind waiting for the other to finish.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use cudarc::driver::{sys as cu, CudaContext, CudaStream};
use mantissa_core::{Error, Result};

use crate::driver;

/// One instantiated recording.
struct Recording {
    graph: cu::CUgraph,
    exec: cu::CUgraphExec,
}

/// The recordings of one backend and the capture in progress.
pub(crate) struct Graphs {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    recording: bool,
    /// Id of `list[0]`: ids are `first..first + list.len()`; cleared ids are never handed out again.
    first: usize,
    list: Vec<Recording>,
}

/// How many captures and exclusive sections (opening or closing a backend) are in progress, process-wide.
struct Gate {
    captures: usize,
    exclusive: usize,
}

static GATE: Mutex<Gate> = Mutex::new(Gate { captures: 0, exclusive: 0 });
static GATE_CHANGED: Condvar = Condvar::new();

thread_local! {
    /// Captures this thread has open: its own exclusive sections must not wait for them (they never end).
    static CAPTURING: Cell<usize> = const { Cell::new(0) };
}

fn gate() -> MutexGuard<'static, Gate> {
    GATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait(g: MutexGuard<'static, Gate>) -> MutexGuard<'static, Gate> {
    GATE_CHANGED.wait(g).unwrap_or_else(|e| e.into_inner())
}

fn capture_enter() {
    let mut g = gate();
    while g.exclusive > 0 {
        g = wait(g);
    }
    g.captures += 1;
    CAPTURING.with(|c| c.set(c.get() + 1));
}

fn capture_exit() {
    gate().captures -= 1;
    GATE_CHANGED.notify_all();
    CAPTURING.with(|c| c.set(c.get().saturating_sub(1)));
}

/// Held while a backend is opened or closed: no capture runs meanwhile (see the module comment). Exclusive
/// sections may overlap each other; on a thread with a capture of its own open, acquiring does not wait.
pub(crate) struct Exclusive {
    held: bool,
}

impl Exclusive {
    pub(crate) fn acquire() -> Exclusive {
        if CAPTURING.with(|c| c.get()) > 0 {
            return Exclusive { held: false };
        }
        let mut g = gate();
        while g.captures > 0 {
            g = wait(g);
        }
        g.exclusive += 1;
        Exclusive { held: true }
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        if self.held {
            gate().exclusive -= 1;
            GATE_CHANGED.notify_all();
        }
    }
}

fn device(what: &'static str, r: cu::CUresult) -> Result<()> {
    r.result().map_err(driver(what))
}

impl Graphs {
    pub(crate) fn new(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Graphs {
        Graphs { ctx, stream, recording: false, first: 0, list: Vec::new() }
    }

    /// Whether a capture is in progress (ops are being recorded, not run).
    pub(crate) fn recording(&self) -> bool {
        self.recording
    }

    /// An error when recording: for the ops that would wait for the device or copy host memory.
    pub(crate) fn refuse(&self, what: &'static str) -> Result<()> {
        if self.recording {
            return Err(Error::InvalidConfig(what));
        }
        Ok(())
    }

    pub(crate) fn begin(&mut self) -> Result<bool> {
        if self.recording {
            return Err(Error::InvalidConfig("record_begin while already recording"));
        }
        self.ctx.bind_to_thread().map_err(driver("binding the CUDA context"))?;
        capture_enter();
        // SAFETY: the stream is this backend's own (not the legacy default stream) and not being captured.
        let r = unsafe {
            cu::cuStreamBeginCapture_v2(
                self.stream.cu_stream(),
                cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        };
        if let Err(e) = device("cuStreamBeginCapture", r) {
            capture_exit();
            return Err(e);
        }
        self.recording = true;
        Ok(true)
    }

    pub(crate) fn end(&mut self, keep: bool) -> Result<Option<usize>> {
        if !self.recording {
            return Err(Error::InvalidConfig("record_end without record_begin"));
        }
        self.ctx.bind_to_thread().map_err(driver("binding the CUDA context"))?;
        let mut graph: cu::CUgraph = core::ptr::null_mut();
        // SAFETY: the capture was begun on this stream by `begin`; the driver writes the graph (null when the
        // capture was invalidated) into `graph`. The stream is out of capture mode afterwards, whatever the result.
        let r = unsafe { cu::cuStreamEndCapture(self.stream.cu_stream(), &mut graph) };
        self.recording = false;
        capture_exit();
        if !keep {
            // An op failed while recording: the capture may also have been invalidated; either way nothing is kept.
            destroy_graph(graph);
            return Ok(None);
        }
        if let Err(e) = device("cuStreamEndCapture", r) {
            destroy_graph(graph);
            return Err(e);
        }
        if graph.is_null() {
            return Err(Error::Device { what: "cuStreamEndCapture (no graph)", code: -1 });
        }
        let mut exec: cu::CUgraphExec = core::ptr::null_mut();
        // SAFETY: `graph` is the valid graph just captured; the driver writes the executable into `exec`.
        let r = unsafe { cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
        if let Err(e) = device("cuGraphInstantiate", r) {
            destroy_graph(graph);
            return Err(e);
        }
        self.list.push(Recording { graph, exec });
        Ok(Some(self.first + self.list.len() - 1))
    }

    pub(crate) fn replay(&mut self, id: usize) -> Result<()> {
        if self.recording {
            return Err(Error::InvalidConfig("replay while recording"));
        }
        let rec = id
            .checked_sub(self.first)
            .and_then(|i| self.list.get(i))
            .ok_or(Error::InvalidConfig("replay: no recording with that id (never recorded, or cleared)"))?;
        self.ctx.bind_to_thread().map_err(driver("binding the CUDA context"))?;
        // SAFETY: `exec` is a live executable graph of this context; its nodes address the backend's memory,
        // which outlives it.
        device("cuGraphLaunch", unsafe { cu::cuGraphLaunch(rec.exec, self.stream.cu_stream()) })
    }

    /// Destroys every recording; their ids become invalid. A replay still running finishes first (the driver
    /// frees an executable graph that is in flight when it completes).
    pub(crate) fn clear(&mut self) {
        if self.list.is_empty() {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        self.first += self.list.len();
        for r in self.list.drain(..) {
            // SAFETY: each handle was created by `end` and is destroyed once (drained from the list).
            unsafe {
                let _ = cu::cuGraphExecDestroy(r.exec);
                let _ = cu::cuGraphDestroy(r.graph);
            }
        }
    }

    /// Ends a capture left open (the backend is being dropped mid-recording) and discards it, so that the
    /// stream can be synchronised.
    pub(crate) fn abandon(&mut self) {
        if self.recording {
            let _ = self.end(false);
        }
    }
}

fn destroy_graph(graph: cu::CUgraph) {
    if !graph.is_null() {
        // SAFETY: a graph returned by cuStreamEndCapture, destroyed once.
        let _ = unsafe { cu::cuGraphDestroy(graph) };
    }
}

impl Drop for Graphs {
    fn drop(&mut self) {
        self.abandon();
        self.clear();
    }
}

//! Compute backends. An engine owns exactly one; the pool asks it for memory.
//!
//! A backend sees only the pure decode descriptor (`crate::decode`) and the
//! format layer, never the pool, the engine or C.

pub mod cpu;
pub mod cuda;

use crate::decode::desc::DecodeOutput;
use crate::decode::Decode;
use crate::error::Result;

/// Which kind of backend runs an engine's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// What a backend is and why it was chosen.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    pub kind: BackendKind,
    /// CPU model or GPU name.
    pub device_name: String,
    /// The CPU kernel variant in use (CPU backends).
    pub cpu_isa: cpu::CpuIsa,
    /// GPU ordinal (CUDA) or 0.
    pub device_index: usize,
    /// Worker threads (CPU) or 0.
    pub threads: usize,
    /// Where the worker threads run: pinned to which CPUs, or why not
    /// (CPU); empty for GPU backends.
    pub thread_placement: String,
    /// CPU features detected at run time, space separated.
    pub cpu_features: String,
    /// Why this backend and variant were chosen.
    pub reason: String,
}

/// Memory owned by a backend (host memory for the CPU backend).
#[derive(Debug)]
pub struct Buffer {
    host: Vec<u8>,
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.host
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.host
    }
}

/// The operations every backend provides.
pub trait Backend: Send + Sync {
    fn info(&self) -> &BackendInfo;

    /// Runs a validated decode, writing every element of `out`.
    fn decode(&self, d: &Decode<'_>, out: &mut DecodeOutput<'_>) -> Result<()>;

    /// Runs `f` on the backend's worker threads (rayon calls inside use them).
    fn install(&self, f: &mut (dyn FnMut() + Send));

    /// Allocates `bytes` of zeroed memory in the backend's memory space.
    fn alloc(&self, what: &str, bytes: usize) -> Result<Buffer>;

    /// The CUDA backend behind this one, for calls on device memory.
    fn cuda(&self) -> Option<&cuda::CudaBackend> {
        None
    }
}

/// Elements to skip from `p` to the next 64-byte boundary. AMX tile rows
/// that start on a cache line load one line each instead of two: on a
/// Xeon a 2 x 2 block of tile products with its four loads ran up to 2.5x
/// faster from aligned operands.
pub(crate) fn to_line<T>(p: *const T) -> usize {
    (p as usize).wrapping_neg() % 64 / std::mem::size_of::<T>()
}

/// Grows `v` to at least `n` elements, reporting failure instead of aborting.
pub(crate) fn try_grow<T: Clone + Default>(v: &mut Vec<T>, what: &str, n: usize) -> Result<()> {
    if v.len() < n {
        v.try_reserve(n - v.len()).map_err(|_| {
            crate::error::Error::out_of_memory(what, n.saturating_mul(std::mem::size_of::<T>()))
        })?;
        v.resize(n, T::default());
    }
    Ok(())
}

impl Buffer {
    /// A zeroed host buffer, on transparent huge pages where it is large
    /// enough and the OS offers them.
    pub(crate) fn host_zeroed(what: &str, bytes: usize) -> Result<Self> {
        Ok(Buffer {
            host: zeroed_bytes(what, bytes, true)?,
        })
    }
}

/// `bytes` zeroed bytes, reporting failure instead of aborting. With
/// `huge_pages`, Linux is asked (before the memory is first touched) to
/// back the whole 2 MiB pages inside it with transparent huge pages; where
/// THP is in `madvise` mode, as on many distributions, it is otherwise off.
/// A KV cache's blocks are read in scattered order, so on 4 KiB pages each
/// block costs TLB misses: in `mlart bench --huge-pages` (one thread)
/// decode ran 8-16% faster. The advice is a hint; its failure is ignored.
pub fn zeroed_bytes(what: &str, bytes: usize, huge_pages: bool) -> Result<Vec<u8>> {
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact(bytes)
        .map_err(|_| crate::error::Error::out_of_memory(what, bytes))?;
    #[cfg(target_os = "linux")]
    if huge_pages {
        const HUGE: usize = 2 << 20;
        let p = v.as_mut_ptr() as usize;
        let start = p.next_multiple_of(HUGE);
        let end = p.saturating_add(bytes) / HUGE * HUGE;
        if end >= start + HUGE {
            // SAFETY: the range lies inside v's own (unused) allocation;
            // MADV_HUGEPAGE changes only how the kernel backs it, never its
            // contents or validity.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = huge_pages;
    v.resize(bytes, 0);
    Ok(v)
}

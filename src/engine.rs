//! An engine owns one backend (with its threads and workspace) and runs
//! decode on it. It is shared (`Arc`) by the handles that use it.

use crate::backend::cpu::{Affinity, CpuBackend};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BackendInfo};
use crate::decode::desc::DecodeOutput;
use crate::decode::Decode;
use crate::error::{Error, Result};

/// Which backend the host asked for. Numbers are the C `mlart_backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendRequest {
    Auto,
    Cpu,
    Cuda,
}

impl BackendRequest {
    pub fn from_raw(arg: &str, raw: u32) -> Result<Self> {
        match raw {
            0 => Ok(BackendRequest::Auto),
            1 => Ok(BackendRequest::Cpu),
            2 => Ok(BackendRequest::Cuda),
            _ => Err(Error::invalid(format!(
                "{arg} = {raw} is not a valid mlart_backend (AUTO=0, CPU=1, CUDA=2)"
            ))),
        }
    }
}

/// Engine construction options.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub backend: BackendRequest,
    pub device_index: usize,
    /// CPU worker threads; 0 = one per core.
    pub num_threads: usize,
    /// Whether to pin the CPU worker threads.
    pub affinity: Affinity,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            backend: BackendRequest::Auto,
            device_index: 0,
            num_threads: 0,
            affinity: Affinity::Auto,
        }
    }
}

/// Whether `MLART_BACKEND_AUTO` may choose a GPU. The CUDA kernels build
/// and their host side is tested everywhere, but no GPU run has checked
/// their numbers yet, so AUTO stays on the CPU and says so; an explicit
/// `MLART_BACKEND_CUDA` (or `MLART_BACKEND=cuda`) uses the GPU.
pub const AUTO_USES_CUDA: bool = false;

/// Environment overrides, read once per engine creation.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub struct Engine {
    backend: Box<dyn Backend>,
}

impl Engine {
    /// Creates an engine. With `BackendRequest::Auto`, `MLART_BACKEND=cpu|cuda`
    /// forces the backend; `MLART_CPU_ISA` forces the CPU kernel variant and
    /// `MLART_CPU_AFFINITY=auto|none|pin` the threads' placement.
    pub fn new(opts: &EngineOptions) -> Result<Self> {
        let mut request = opts.backend;
        let mut prefix = String::new();
        if request == BackendRequest::Auto {
            if let Some(v) = env_var("MLART_BACKEND") {
                request = match v.trim().to_ascii_lowercase().as_str() {
                    "cpu" => BackendRequest::Cpu,
                    "cuda" => BackendRequest::Cuda,
                    _ => {
                        return Err(Error::invalid(format!(
                            "MLART_BACKEND = \"{v}\" is not one of cpu, cuda"
                        )))
                    }
                };
                prefix = format!("backend forced by MLART_BACKEND={v}; ");
            } else {
                prefix = match CudaBackend::probe(opts.device_index) {
                    Ok(_) if AUTO_USES_CUDA => match CudaBackend::new(opts.device_index, "auto: ") {
                        Ok(cuda) => {
                            return Ok(Engine {
                                backend: Box::new(cuda),
                            })
                        }
                        // E.g. a driver too old for the kernels: the CPU still works.
                        Err(e) => format!("auto: the CUDA device failed to open ({}); ", e.message),
                    },
                    Ok((props, _)) => format!(
                        "auto: {} found, but the CUDA kernels are not yet verified on hardware, so AUTO uses the CPU (MLART_BACKEND=cuda to use it); ",
                        props.name
                    ),
                    Err(e) => format!("auto: no usable CUDA device ({}); ", e.message),
                };
            }
        }
        match request {
            BackendRequest::Cuda => Ok(Engine {
                backend: Box::new(
                    CudaBackend::new(opts.device_index, &prefix)
                        .map_err(|e| e.with_context("backend = CUDA"))?,
                ),
            }),
            BackendRequest::Cpu | BackendRequest::Auto => {
                if opts.device_index != 0 {
                    return Err(Error::invalid(format!(
                        "device_index = {} but the CPU backend has only device 0",
                        opts.device_index
                    )));
                }
                let isa = env_var("MLART_CPU_ISA");
                let affinity = match env_var("MLART_CPU_AFFINITY") {
                    Some(v) => Affinity::from_env(&v)?,
                    None => opts.affinity,
                };
                let cpu = CpuBackend::new(opts.num_threads, affinity, isa.as_deref(), &prefix)?;
                Ok(Engine {
                    backend: Box::new(cpu),
                })
            }
        }
    }

    pub fn info(&self) -> &BackendInfo {
        self.backend.info()
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Runs `f` on the engine's worker threads and returns its result.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let mut f = Some(f);
        let mut out = None;
        self.backend.install(&mut || {
            if let Some(f) = f.take() {
                out = Some(f());
            }
        });
        out.expect("install runs its closure exactly once")
    }

    /// Runs a validated decode.
    pub fn decode(&self, d: &Decode<'_>, out: &mut DecodeOutput<'_>) -> Result<()> {
        self.backend.decode(d, out)
    }
}

//! mlart: an embeddable engine for DeepSeek-style Multi-head Latent
//! Attention (MLA) decode, with a stable C ABI (`include/mlart.h`).
//!
//! Layers, top to bottom (each uses only those below it):
//! `ffi` (C boundary) → `kv` (managed pool) → `engine` → `backend` →
//! `decode` (pure descriptor and plan) → `format` → `error`.

pub mod backend;
pub mod decode;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod format;
pub mod kv;
pub mod model;

pub use engine::{BackendRequest, Engine, EngineOptions};
pub use error::{Error, Result, Status};

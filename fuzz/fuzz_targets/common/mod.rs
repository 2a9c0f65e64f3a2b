//! What the fuzz targets share: a CPU engine per process and a small
//! deterministic generator for cache rows and queries. Each target uses
//! part of it.
#![allow(dead_code)]

use mlart::{BackendRequest, Engine, EngineOptions};
use std::sync::{Arc, OnceLock};

/// One CPU engine (two threads, so split-KV merging runs) per process.
pub fn cpu_engine() -> Arc<Engine> {
    static E: OnceLock<Arc<Engine>> = OnceLock::new();
    E.get_or_init(|| {
        let o = EngineOptions {
            backend: BackendRequest::Cpu,
            num_threads: 2,
            ..Default::default()
        };
        Arc::new(Engine::new(&o).expect("a CPU engine"))
    })
    .clone()
}

/// A linear congruential generator: uniform values in (-1.5, 1.5).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
    }
}

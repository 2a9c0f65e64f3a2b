//! Reading a Hugging Face checkpoint directory: `model.safetensors` or the
//! shards named by `model.safetensors.index.json`, memory-mapped; tensors
//! are looked up by name and only the requested ones are copied out.

use crate::error::{Error, Result, Status};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::new(Status::Io, format!("{}: {e}", path.display()))
}

/// One mapped safetensors file and its validated header.
struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    meta: Metadata,
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|e| io(&path, e))?;
        // SAFETY: the file is opened read-only and we never write through
        // the map; a concurrent truncation by another process is the one
        // hazard of any mmap, as for every safetensors reader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io(&path, e))?;
        // read_metadata checks the header length against the file, parses
        // the JSON and checks that data_offsets are contiguous, do not
        // overlap, match each tensor's size and end at the file's end.
        let (header_len, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| Error::new(Status::Format, format!("{}: {e}", path.display())))?;
        Ok(Shard {
            path,
            map,
            header_len,
            meta,
        })
    }
}

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    Bf16,
    F16,
    Fp8E4m3,
}

impl StoredDtype {
    pub fn size(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::Bf16 | StoredDtype::F16 => 2,
            StoredDtype::Fp8E4m3 => 1,
        }
    }
}

/// A tensor copied out of the checkpoint.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Tensor {
    /// Fails unless the shape is `want`, naming the tensor.
    pub fn expect_shape(&self, want: &[usize]) -> Result<()> {
        if self.shape != want {
            return Err(Error::new(
                Status::Format,
                format!(
                    "{}: shape {:?} but the config implies {:?}",
                    self.name, self.shape, want
                ),
            ));
        }
        Ok(())
    }

    /// All elements as f32 (FP8 codes decoded, unscaled).
    pub fn to_f32(&self) -> Vec<f32> {
        let dtype = match self.dtype {
            StoredDtype::F32 => crate::format::Dtype::F32,
            StoredDtype::Bf16 => crate::format::Dtype::Bf16,
            StoredDtype::F16 => crate::format::Dtype::F16,
            StoredDtype::Fp8E4m3 => crate::format::Dtype::Fp8E4m3,
        };
        let mut out = vec![0f32; self.bytes.len() / self.dtype.size()];
        crate::format::load_slice(dtype, &self.bytes, &mut out);
        out
    }
}

/// A checkpoint directory with its shards mapped.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> shard index.
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or every shard listed in
    /// `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut files: Vec<String> = Vec::new();
        let mut wanted: HashMap<String, String> = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                Error::new(Status::Format, format!("{}: {e}", index_path.display()))
            })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::new(
                        Status::Format,
                        format!("{}: no \"weight_map\" object", index_path.display()),
                    )
                })?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::new(
                        Status::Format,
                        format!(
                            "{}: weight_map[\"{name}\"] is not a file name",
                            index_path.display()
                        ),
                    )
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(Error::new(
                        Status::Format,
                        format!("{}: weight_map[\"{name}\"] = \"{file}\" is not a file in the directory", index_path.display()),
                    ));
                }
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
                wanted.insert(name.clone(), file.to_string());
            }
        } else {
            files.push("model.safetensors".to_string());
        }
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for f in &files {
            let shard = Shard::open(dir.join(f))?;
            for name in shard.meta.tensors().keys() {
                if wanted.is_empty() || wanted.get(name) == Some(f) {
                    index.insert(name.clone(), shards.len());
                }
            }
            shards.push(shard);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Copies tensor `name` out of its shard.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let &s = self.index.get(name).ok_or_else(|| {
            Error::not_found(format!(
                "tensor {name} not found in checkpoint {}",
                self.dir.display()
            ))
        })?;
        let shard = &self.shards[s];
        let info = shard.meta.info(name).ok_or_else(|| {
            Error::internal(format!("{name}: indexed but missing from its shard"))
        })?;
        let dtype = match info.dtype {
            StDtype::F32 => StoredDtype::F32,
            StDtype::BF16 => StoredDtype::Bf16,
            StDtype::F16 => StoredDtype::F16,
            StDtype::F8_E4M3 => StoredDtype::Fp8E4m3,
            other => {
                return Err(Error::new(
                    Status::Unsupported,
                    format!("{name}: dtype {other:?} is not supported (F32, BF16, F16, F8_E4M3)"),
                ))
            }
        };
        let (a, b) = info.data_offsets;
        let base = 8 + shard.header_len;
        let bytes = shard.map.get(base + a..base + b).ok_or_else(|| {
            Error::new(
                Status::Format,
                format!(
                    "{}: {name}: data_offsets [{a}, {b}) lie outside the file",
                    shard.path.display()
                ),
            )
        })?;
        let mut owned = Vec::new();
        owned
            .try_reserve_exact(bytes.len())
            .map_err(|_| Error::out_of_memory(name, bytes.len()))?;
        owned.extend_from_slice(bytes);
        Ok(Tensor {
            name: name.to_string(),
            dtype,
            shape: info.shape.clone(),
            bytes: owned,
        })
    }
}

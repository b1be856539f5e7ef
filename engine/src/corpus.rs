//! The training corpus: a byte file split into training and validation parts, and random windows
//! over them. Benchmarks read its held-out prompts, so it needs no autodiff.

use std::path::Path;

use rand::rngs::StdRng;
use rand::Rng;

use crate::error::{EngineError, Result};

/// A corpus of bytes split into training and validation parts (the last `val_fraction`).
pub struct Corpus {
    /// Training bytes.
    pub train: Vec<u8>,
    /// Validation bytes.
    pub val: Vec<u8>,
}

impl Corpus {
    /// Reads a text file and holds out its tail for validation.
    pub fn from_file(path: &Path, val_fraction: f64) -> Result<Self> {
        if !path.exists() {
            return Err(EngineError::MissingFile { path: path.into() });
        }
        let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
            path: path.into(),
            source,
        })?;
        Ok(Self::split(bytes, val_fraction))
    }

    /// Splits bytes at `1 - val_fraction`.
    pub fn split(bytes: Vec<u8>, val_fraction: f64) -> Self {
        let cut = ((bytes.len() as f64) * (1.0 - val_fraction)) as usize;
        let val = bytes[cut..].to_vec();
        let mut train = bytes;
        train.truncate(cut);
        Self { train, val }
    }

    /// `batch` random windows of `len` bytes from `data`.
    pub fn windows(data: &[u8], batch: usize, len: usize, rng: &mut StdRng) -> Vec<i64> {
        let mut out = Vec::with_capacity(batch * len);
        for _ in 0..batch {
            let start = rng.random_range(0..data.len() - len);
            out.extend(data[start..start + len].iter().map(|&b| b as i64));
        }
        out
    }
}

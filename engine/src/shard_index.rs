//! `model.safetensors.index.json`: which shard file of a sharded checkpoint holds which tensor.

use std::collections::HashMap;
use std::path::{Component, Path};

use serde_json::Value;

use crate::error::{EngineError, Result};

/// A parsed shard index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIndex {
    /// The shard files, relative to the model directory, in the order the index first names them;
    /// never empty.
    pub files: Vec<String>,
    /// Each tensor's shard, as an index into `files`.
    pub location: HashMap<String, usize>,
}

/// Parses the text of `model.safetensors.index.json`. `path` only labels errors. Refuses an index
/// that lists no tensor, and shard names that leave the model directory (absolute, or with `..`).
pub fn parse_index(text: &str, path: &Path) -> Result<ShardIndex> {
    let bad = |reason: String| EngineError::InvalidJson {
        path: path.into(),
        reason,
    };
    let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    if map.is_empty() {
        return Err(bad("`weight_map` lists no tensor".into()));
    }
    let mut files: Vec<String> = Vec::new();
    let mut file_idx: HashMap<&str, usize> = HashMap::new();
    let mut location = HashMap::with_capacity(map.len());
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry for {name} is not a file name")))?;
        let plain = Path::new(file)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if file.is_empty() || !plain {
            return Err(bad(format!(
                "weight_map entry for {name} names {file:?}, not a file in the model directory"
            )));
        }
        let idx = *file_idx.entry(file).or_insert_with(|| {
            files.push(file.to_owned());
            files.len() - 1
        });
        location.insert(name.clone(), idx);
    }
    Ok(ShardIndex { files, location })
}

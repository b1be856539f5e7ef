//! The header of a safetensors file: an 8-byte little-endian length, a JSON table of the tensors,
//! then their data. Parsed from the file's bytes (the loader's memory map) and checked against
//! the file's length, so that every tensor's bytes lie inside it.

use std::path::Path;

use safetensors::tensor::Metadata;
use safetensors::SafeTensors;
use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

/// The longest header the safetensors crate reads.
const MAX_HEADER: u64 = 100_000_000;

/// The parsed header of one safetensors file.
#[derive(Debug)]
pub struct Header {
    /// Where the tensors' data begins in the file.
    pub data_start: usize,
    /// The tensors' names, dtypes, shapes and offsets (relative to `data_start`).
    pub meta: Metadata,
}

/// Parses the header of the safetensors file whose bytes are `file`, and checks that the data it
/// describes is all in `file`. `path` only labels errors.
pub fn parse_header(file: &[u8], path: &Path) -> Result<Header> {
    let corrupt = |reason: String| EngineError::CorruptCheckpoint {
        path: path.into(),
        reason,
    };
    let Some(len) = file.get(..8) else {
        return Err(corrupt(format!(
            "{} bytes cannot hold the 8-byte header length",
            file.len()
        )));
    };
    let header_len = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    let after = file.len() - 8;
    let Some(data_len) = usize::try_from(header_len)
        .ok()
        .and_then(|n| after.checked_sub(n))
    else {
        return Err(corrupt(format!(
            "the header is {header_len} bytes long, the file holds {after} after its length"
        )));
    };
    if header_len > MAX_HEADER {
        return Err(corrupt(format!(
            "the header is {header_len} bytes long, past the {MAX_HEADER} safetensors allows"
        )));
    }
    let data_start = file.len() - data_len;
    check_offsets(&file[8..data_start], data_len).map_err(corrupt)?;
    let (_, meta) = SafeTensors::read_metadata(file).map_err(|e| corrupt(e.to_string()))?;
    if meta.data_len() > data_len {
        return Err(corrupt(format!(
            "the header describes {} bytes of data, the file holds {data_len}",
            meta.data_len()
        )));
    }
    Ok(Header { data_start, meta })
}

/// Refuses a table whose tensors end past the `data_len` bytes that follow it. The safetensors
/// crate adds the last tensor's end to the header's length unchecked, which overflows (a panic
/// where overflow is checked) for an end near `u64::MAX`; this check runs first. A table that is
/// not a JSON object of objects is left to the crate to describe.
fn check_offsets(table: &[u8], data_len: usize) -> std::result::Result<(), String> {
    let Ok(table) = serde_json::from_slice::<Map<String, Value>>(table) else {
        return Ok(());
    };
    for (name, info) in &table {
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(Value::as_u64);
        if let Some(end) = end.filter(|&e| e > data_len as u64) {
            return Err(format!(
                "tensor {name:?} ends at byte {end} of the data, the file holds {data_len}"
            ));
        }
    }
    Ok(())
}

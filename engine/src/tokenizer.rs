//! Tokenizers from `tokenizer.json` through the `tokenizers` crate, and the byte-level one that the
//! project's own models use (byte `i` is token `i`).

use std::path::Path;

use crate::error::{EngineError, Result};

/// A Hugging Face tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(EngineError::MissingFile { path: path.into() });
        }
        let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
            path: path.into(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// Parses a tokenizer from JSON text.
    pub fn from_json(json: &str) -> Result<Self> {
        Self::from_json_bytes(json.as_bytes())
    }

    /// Parses a tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, Path::new("<memory>"))
    }

    /// `bytes` as a tokenizer; `path` only labels errors. The JSON is parsed to a value first:
    /// the tokenizers crate panics (`expect("Helper")`) on a syntax error inside `decoder`,
    /// which it never meets when it reads from a parsed value.
    fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |reason: String| EngineError::Tokenizer {
            path: path.into(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let inner = serde_json::from_value::<tokenizers::Tokenizer>(value)
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // Only the ids are kept: `encode_fast` skips converting offsets to characters.
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| EngineError::Tokenizer {
                path: "<encode>".into(),
                reason: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| EngineError::Tokenizer {
                path: "<decode>".into(),
                reason: e.to_string(),
            })
    }

    /// Vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// GPT-2's reversible map from bytes to printable characters, which byte-level BPE vocabularies use.
pub fn byte_to_char() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).expect("latin-1 is valid")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("valid code point")
        };
    }
    out
}

/// A `tokenizer.json` whose vocabulary is the 256 bytes, byte `i` as token `i`: byte-level BPE with no
/// merges, so any UTF-8 text round-trips.
pub fn byte_level_tokenizer_json() -> String {
    let chars = byte_to_char();
    let vocab: serde_json::Map<String, serde_json::Value> = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::Value::from(i)))
        .collect();
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
    });
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_maps_byte_i_to_token_i() {
        let tok = Tokenizer::from_json(&byte_level_tokenizer_json()).unwrap();
        let text = "fn main() { println!(\"héllo\"); }\n\t";
        let ids = tok.encode(text).unwrap();
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, bytes);
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.vocab_size(), 256);
    }
}

//! `config.json` as Hugging Face writes it (transformers 4 and 5), parsed into a [`ModelConfig`].
//! Every field that is present must have the right type: a wrong one is an error, not a default.

use std::path::Path;

use serde_json::Value;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(EngineError::MissingFile { path: path.into() });
        }
        let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_json_bytes(&bytes, path)
    }

    /// Parses and validates the bytes of a `config.json`. `path` only labels errors.
    pub fn from_json_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| EngineError::InvalidJson {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Self::from_json(&value, path)
    }

    /// Parses and validates an HF config object. `path` only labels errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let f = Fields { v, path };
        let arch_name = f
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| f.get("model_type").and_then(Value::as_str))
            .ok_or_else(|| f.bad("neither `architectures` nor `model_type` is set".into()))?;
        let architecture = match arch_name {
            "Qwen3ForCausalLM" | "qwen3" => Architecture::Qwen3,
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            _ => {
                return Err(EngineError::UnknownArchitecture {
                    path: path.into(),
                    found: arch_name.into(),
                })
            }
        };
        let num_heads = f.size("num_attention_heads")?;
        let hidden_size = f.size("hidden_size")?;
        let head_dim = match f.opt_size("head_dim")? {
            Some(h) => h,
            None if num_heads == 0 => 0,
            None if !hidden_size.is_multiple_of(num_heads) => {
                return Err(EngineError::InvalidConfig(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads \
                     ({num_heads}) and no head_dim is given"
                )))
            }
            None => hidden_size / num_heads,
        };
        // transformers 5 moved rope_theta and rope_scaling into `rope_parameters`.
        let rope = f.get("rope_parameters").or_else(|| f.get("rope_scaling"));
        let rope_theta = match f.opt_f64("rope_theta")? {
            Some(t) => t,
            None => match rope
                .and_then(|r| r.get("rope_theta"))
                .filter(|t| !t.is_null())
            {
                Some(t) => t
                    .as_f64()
                    .ok_or_else(|| f.bad(format!("`rope_theta` is {}", shown(t))))?,
                None => 10_000.0,
            },
        };
        let rope_scaling = parse_rope_scaling(rope).map_err(|r| f.bad(r))?;
        let config = ModelConfig {
            architecture,
            vocab_size: f.size("vocab_size")?,
            hidden_size,
            intermediate_size: f.size("intermediate_size")?,
            num_layers: f.size("num_hidden_layers")?,
            num_heads,
            num_kv_heads: f.opt_size("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
            max_position_embeddings: f.opt_size("max_position_embeddings")?.unwrap_or(2048),
            bos_token_id: f.token("bos_token_id")?,
            eos_token_id: f.token("eos_token_id")?,
            torch_dtype: f
                .get("dtype")
                .or_else(|| f.get("torch_dtype"))
                .and_then(Value::as_str)
                .unwrap_or("float32")
                .to_owned(),
        };
        config.validate()?;
        Ok(config)
    }
}

/// The fields of one config object, read with errors that name the file.
struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn bad(&self, reason: String) -> EngineError {
        EngineError::InvalidJson {
            path: self.path.into(),
            reason,
        }
    }

    /// The field, `None` when absent or `null`.
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }

    fn size(&self, key: &str) -> Result<usize> {
        self.opt_size(key)?
            .ok_or_else(|| self.bad(format!("missing `{key}`")))
    }

    fn opt_size(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|x| {
                x.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.bad(format!("`{key}` is {}, not a size", shown(x))))
            })
            .transpose()
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| self.bad(format!("`{key}` is {}, not a number", shown(x))))
            })
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|x| {
                x.as_bool()
                    .ok_or_else(|| self.bad(format!("`{key}` is {}, not a boolean", shown(x))))
            })
            .transpose()
    }

    /// A token id, or the first of a list of them.
    fn token(&self, key: &str) -> Result<Option<u32>> {
        let x = match self.get(key) {
            Some(Value::Array(a)) => a.first().filter(|x| !x.is_null()),
            x => x,
        };
        x.map(|x| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.bad(format!("`{key}` is {}, not a token id", shown(x))))
        })
        .transpose()
    }
}

/// A JSON value for an error message, cut short if long.
fn shown(x: &Value) -> String {
    let s = x.to_string();
    match s.char_indices().nth(40) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s,
    }
}

fn parse_rope_scaling(rope: Option<&Value>) -> std::result::Result<RopeScaling, String> {
    let Some(r) = rope else {
        return Ok(RopeScaling::None);
    };
    if !r.is_object() {
        return Err(format!("rope scaling is {}, not an object", shown(r)));
    }
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |key: &str| -> std::result::Result<f64, String> {
        r.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope scaling {kind:?} needs a number `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: f("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")?,
        }),
        other => Err(format!("unsupported rope_type {other:?}")),
    }
}

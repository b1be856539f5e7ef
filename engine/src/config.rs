//! Model configuration: parsed from a Hugging Face `config.json`, or one of the named presets.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EngineError, Result};

/// Which decoder family a config describes. The two differ only in Qwen3's per-head q/k RMSNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// `Qwen3ForCausalLM`.
    Qwen3,
    /// `LlamaForCausalLM` (Llama 2 / 3 / 3.1 / 3.2).
    Llama,
}

impl Architecture {
    /// The Hugging Face `architectures[0]` string.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
        }
    }

    /// The Hugging Face `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen3 => "qwen3",
            Architecture::Llama => "llama",
        }
    }
}

/// RoPE frequency scaling, as `rope_scaling` / `rope_parameters` give it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1's banded scaling of the inverse frequencies.
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length the base model was trained at.
        original_max_position_embeddings: f64,
    },
    /// Linear position interpolation: every frequency divided by `factor`.
    Linear {
        /// The factor.
        factor: f64,
    },
}

/// The shape and numerics of one decoder model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Decoder family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA groups).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry a bias.
    pub attention_bias: bool,
    /// Longest context the model was trained for (informational).
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token, if any.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token, if any.
    pub eos_token_id: Option<u32>,
    /// Dtype the checkpoint stores (`"float32"`, `"bfloat16"`, ...).
    pub torch_dtype: String,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(EngineError::MissingFile { path: path.into() });
        }
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            path: path.into(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| EngineError::InvalidJson {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Self::from_json(&value, path)
    }

    /// Parses an HF config object. `path` only labels errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| EngineError::InvalidJson {
            path: path.into(),
            reason,
        };
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| {
                v.get("model_type")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .ok_or_else(|| bad("neither `architectures` nor `model_type` is set".into()))?;
        let architecture = match arch_name.as_str() {
            "Qwen3ForCausalLM" | "qwen3" => Architecture::Qwen3,
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            _ => {
                return Err(EngineError::UnknownArchitecture {
                    path: path.into(),
                    found: arch_name,
                })
            }
        };
        let int = |key: &str| -> Result<usize> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("missing or non-integer `{key}`")))
        };
        let num_heads = int("num_attention_heads")?;
        let hidden_size = int("hidden_size")?;
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        // transformers 5 moved rope_theta and rope_scaling into `rope_parameters`.
        let rope = v.get("rope_parameters").or_else(|| v.get("rope_scaling"));
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0);
        let rope_scaling = parse_rope_scaling(rope).map_err(bad)?;
        let token = |key: &str| -> Option<u32> {
            match v.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
                Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|x| x as u32),
                _ => None,
            }
        };
        let config = ModelConfig {
            architecture,
            vocab_size: int("vocab_size")?,
            hidden_size,
            intermediate_size: int("intermediate_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads,
            num_kv_heads: v
                .get("num_key_value_heads")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: v
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
            bos_token_id: token("bos_token_id"),
            eos_token_id: token("eos_token_id"),
            torch_dtype: v
                .get("dtype")
                .or_else(|| v.get("torch_dtype"))
                .and_then(Value::as_str)
                .unwrap_or("float32")
                .to_owned(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: &str| Err(EngineError::InvalidConfig(m.to_owned()));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return fail("vocab_size, hidden_size and num_hidden_layers must be positive");
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return fail("heads and head_dim must be positive");
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return fail("num_attention_heads must be a multiple of num_key_value_heads");
        }
        if !self.head_dim.is_multiple_of(2) {
            return fail("head_dim must be even for RoPE");
        }
        Ok(())
    }

    /// The config as transformers 5 writes it (`rope_parameters`, `dtype`).
    pub fn to_hf_json(&self) -> Value {
        let mut rope = serde_json::json!({ "rope_type": "default", "rope_theta": self.rope_theta });
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                rope["rope_type"] = "linear".into();
                rope["factor"] = (*factor).into();
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                rope["rope_type"] = "llama3".into();
                rope["factor"] = (*factor).into();
                rope["low_freq_factor"] = (*low_freq_factor).into();
                rope["high_freq_factor"] = (*high_freq_factor).into();
                rope["original_max_position_embeddings"] =
                    (*original_max_position_embeddings).into();
            }
        }
        serde_json::json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "dtype": self.torch_dtype,
        })
    }

    /// Parameters in the model, counting a tied head once.
    pub fn num_parameters(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_heads * hd;
        let kv = self.num_kv_heads * hd;
        let mut layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h;
        if self.architecture == Architecture::Qwen3 {
            layer += 2 * hd;
        }
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }

    /// A named preset of a real model's shape, for random-weight benchmarks.
    pub fn preset(name: &str) -> Result<Self> {
        let qwen3 = |hidden, inter, layers, heads, kv| ModelConfig {
            architecture: Architecture::Qwen3,
            vocab_size: 151_936,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings: true,
            attention_bias: false,
            max_position_embeddings: 40_960,
            bos_token_id: None,
            eos_token_id: Some(151_645),
            torch_dtype: "bfloat16".into(),
        };
        let config = match name {
            "qwen3-0.6b" => qwen3(1024, 3072, 28, 16, 8),
            "qwen3-1.7b" => qwen3(2048, 6144, 28, 16, 8),
            "qwen3-4b" => ModelConfig {
                tie_word_embeddings: true,
                ..qwen3(2560, 9728, 36, 32, 8)
            },
            "llama-3.2-1b" => ModelConfig {
                architecture: Architecture::Llama,
                vocab_size: 128_256,
                hidden_size: 2048,
                intermediate_size: 8192,
                num_layers: 16,
                num_heads: 32,
                num_kv_heads: 8,
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope_theta: 500_000.0,
                rope_scaling: RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0,
                },
                tie_word_embeddings: true,
                attention_bias: false,
                max_position_embeddings: 131_072,
                bos_token_id: Some(128_000),
                eos_token_id: Some(128_001),
                torch_dtype: "bfloat16".into(),
            },
            // A tiny byte-level shape for tests and CPU benchmarks.
            "tiny" => ModelConfig {
                vocab_size: 256,
                hidden_size: 64,
                intermediate_size: 192,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 16,
                max_position_embeddings: 4096,
                eos_token_id: None,
                torch_dtype: "float32".into(),
                ..qwen3(0, 0, 0, 0, 0)
            },
            _ => return Err(EngineError::UnknownPreset(name.into(), PRESETS.join(", "))),
        };
        Ok(config)
    }
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &[
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "llama-3.2-1b",
    "tiny",
];

fn parse_rope_scaling(rope: Option<&Value>) -> std::result::Result<RopeScaling, String> {
    let Some(r) = rope.filter(|r| r.is_object()) else {
        return Ok(RopeScaling::None);
    };
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |key: &str| -> std::result::Result<f64, String> {
        r.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope scaling {kind:?} needs `{key}`"))
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

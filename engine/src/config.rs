//! Model configuration: parsed from a Hugging Face `config.json` (see `config_json`), or one of
//! the named presets.

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
    /// Checks that the sizes fit together, that the numerics are finite and positive, and that
    /// every tensor of the model (and the model as a whole, in f32) has a size `usize` holds.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(EngineError::InvalidConfig(m));
        let (v, h, i, l) = (
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
        );
        if v == 0 || h == 0 || i == 0 || l == 0 {
            return fail(format!(
                "vocab_size ({v}), hidden_size ({h}), intermediate_size ({i}) and \
                 num_hidden_layers ({l}) must be positive"
            ));
        }
        let (heads, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        if heads == 0 || kv == 0 || hd == 0 {
            return fail(format!(
                "num_attention_heads ({heads}), num_key_value_heads ({kv}) and head_dim ({hd}) \
                 must be positive"
            ));
        }
        if !heads.is_multiple_of(kv) {
            return fail(format!(
                "num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})"
            ));
        }
        if !hd.is_multiple_of(2) {
            return fail(format!("head_dim ({hd}) must be even for RoPE"));
        }
        if self.max_position_embeddings == 0 {
            return fail("max_position_embeddings must be positive".into());
        }
        positive("rms_norm_eps", self.rms_norm_eps)?;
        positive("rope_theta", self.rope_theta)?;
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive("rope scaling factor", factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old,
            } => {
                positive("rope scaling factor", factor)?;
                positive("low_freq_factor", low)?;
                positive("high_freq_factor", high)?;
                positive("original_max_position_embeddings", old)?;
                if low >= high {
                    return fail(format!(
                        "low_freq_factor ({low}) must be below high_freq_factor ({high})"
                    ));
                }
            }
        }
        match self.checked_num_parameters() {
            Some(n) if n <= isize::MAX as usize / 4 => Ok(()),
            n => fail(format!(
                "the sizes overflow: {} parameters (vocab_size {v}, hidden_size {h}, \
                 intermediate_size {i}, num_hidden_layers {l}, {heads} heads of {hd}) do not fit \
                 in memory as f32",
                n.map_or("more than usize::MAX".into(), |n| n.to_string())
            )),
        }
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

    /// Parameters in the model, counting a tied head once (`usize::MAX` for sizes that
    /// overflow it, which [`ModelConfig::validate`] refuses).
    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters().unwrap_or(usize::MAX)
    }

    /// Parameters in the model, counting a tied head once; `None` if the count overflows `usize`.
    pub fn checked_num_parameters(&self) -> Option<usize> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_heads.checked_mul(hd)?;
        let kv = self.num_kv_heads.checked_mul(hd)?;
        let qk_norms = match self.architecture {
            Architecture::Qwen3 => hd.checked_mul(2)?,
            Architecture::Llama => 0,
        };
        let layer = sum(&[
            h.checked_mul(kv.checked_mul(2)?.checked_add(q)?)?,
            q.checked_mul(h)?,
            h.checked_mul(i)?.checked_mul(3)?,
            h.checked_mul(2)?,
            qk_norms,
        ])?;
        let embed = self.vocab_size.checked_mul(h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        sum(&[embed, self.num_layers.checked_mul(layer)?, h, head])
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

/// `xs` summed, `None` on overflow.
fn sum(xs: &[usize]) -> Option<usize> {
    xs.iter().try_fold(0usize, |a, &x| a.checked_add(x))
}

/// An error unless `x` is finite and above zero.
fn positive(what: &str, x: f64) -> Result<()> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(EngineError::InvalidConfig(format!(
            "{what} ({x}) must be finite and positive"
        )))
    }
}

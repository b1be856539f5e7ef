//! Writing a model in the Hugging Face layout: `config.json`, `model.safetensors` (HF tensor names,
//! `[out, in]` matrices) and, when given, `tokenizer.json`.

use std::path::Path;

use burn::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype as StDtype;
use troupe_kernels::{KernelBackend, WeightLayout};

use crate::error::{EngineError, Result};
use crate::model::{Linear, Model};

struct Entry {
    name: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    dtype: StDtype,
}

fn entry<B: Backend, const D: usize>(name: String, t: Tensor<B, D>, bf16: bool) -> Result<Entry> {
    let shape = t.dims().to_vec();
    let data = t.into_data();
    let backend = |e| EngineError::Backend(format!("{name}: {e:?}"));
    let (bytes, dtype) = if bf16 {
        let v = data
            .convert::<half::bf16>()
            .into_vec::<half::bf16>()
            .map_err(backend)?;
        (bytemuck::cast_slice(&v).to_vec(), StDtype::BF16)
    } else {
        let v = data.convert::<f32>().into_vec::<f32>().map_err(backend)?;
        (bytemuck::cast_slice(&v).to_vec(), StDtype::F32)
    };
    Ok(Entry {
        name,
        shape,
        bytes,
        dtype,
    })
}

/// A projection's weight as HF stores it, `[out, in]`, from the layout the backend keeps.
fn out_in<B: KernelBackend>(w: &Tensor<B, 2>) -> Tensor<B, 2> {
    match B::weight_layout() {
        WeightLayout::OutIn => w.clone(),
        WeightLayout::InOut => w.clone().transpose(),
    }
}

/// A projection as HF stores it: `weight` `[out, in]`, and `bias` when present.
fn linear<B: KernelBackend>(
    name: &str,
    l: &Linear<B>,
    bf16: bool,
    out: &mut Vec<Entry>,
) -> Result<()> {
    out.push(entry(
        format!("{name}.weight"),
        out_in(&l.weight.to_float()),
        bf16,
    )?);
    if let Some(b) = &l.bias {
        out.push(entry(format!("{name}.bias"), b.clone(), bf16)?);
    }
    Ok(())
}

/// Tensors a model's file carries beside its decoder's, and keys its `config.json` adds (a block
/// drafter's context projection, norm and mask embedding).
pub struct Extras<'a, B: Backend> {
    /// Projections, saved as `{name}.weight` `[out, in]` (and `{name}.bias`).
    pub linears: Vec<(&'a str, &'a Linear<B>)>,
    /// Vectors, saved under their names.
    pub vectors: Vec<(&'a str, Tensor<B, 1>)>,
    /// Keys added to `config.json`.
    pub config: Vec<(&'a str, serde_json::Value)>,
}

impl<B: Backend> Default for Extras<'_, B> {
    fn default() -> Self {
        Self {
            linears: Vec::new(),
            vectors: Vec::new(),
            config: Vec::new(),
        }
    }
}

/// Saves `model` to `dir` (created if needed), in f32 or bf16.
pub fn save_pretrained<B: KernelBackend>(
    model: &Model<B>,
    dir: &Path,
    bf16: bool,
    tokenizer_json: Option<&str>,
) -> Result<()> {
    save_pretrained_with(model, dir, bf16, tokenizer_json, Extras::default())
}

/// [`save_pretrained`] with `extras` in the same file and config.
pub fn save_pretrained_with<B: KernelBackend>(
    model: &Model<B>,
    dir: &Path,
    bf16: bool,
    tokenizer_json: Option<&str>,
    extras: Extras<'_, B>,
) -> Result<()> {
    let io = |path: &Path, source| EngineError::Io {
        path: path.into(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut entries = vec![entry(
        "model.embed_tokens.weight".into(),
        model.embed.clone(),
        bf16,
    )?];
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        entries.push(entry(
            format!("{p}.input_layernorm.weight"),
            layer.input_norm.clone(),
            bf16,
        )?);
        entries.push(entry(
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_norm.clone(),
            bf16,
        )?);
        for (n, l) in [
            ("self_attn.q_proj", &layer.q_proj),
            ("self_attn.k_proj", &layer.k_proj),
            ("self_attn.v_proj", &layer.v_proj),
            ("self_attn.o_proj", &layer.o_proj),
            ("mlp.gate_proj", &layer.gate_proj),
            ("mlp.up_proj", &layer.up_proj),
            ("mlp.down_proj", &layer.down_proj),
        ] {
            linear(&format!("{p}.{n}"), l, bf16, &mut entries)?;
        }
        if let (Some(q), Some(k)) = (&layer.q_norm, &layer.k_norm) {
            entries.push(entry(
                format!("{p}.self_attn.q_norm.weight"),
                q.clone(),
                bf16,
            )?);
            entries.push(entry(
                format!("{p}.self_attn.k_norm.weight"),
                k.clone(),
                bf16,
            )?);
        }
    }
    entries.push(entry("model.norm.weight".into(), model.norm.clone(), bf16)?);
    if let Some(h) = &model.lm_head {
        entries.push(entry("lm_head.weight".into(), out_in(&h.to_float()), bf16)?);
    }
    for (name, l) in &extras.linears {
        linear(name, l, bf16, &mut entries)?;
    }
    for (name, v) in extras.vectors {
        entries.push(entry(name.into(), v, bf16)?);
    }
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|e| {
            TensorView::new(e.dtype, e.shape.clone(), &e.bytes)
                .map(|v| (e.name.clone(), v))
                .map_err(|err| EngineError::Backend(format!("{}: {err}", e.name)))
        })
        .collect::<Result<_>>()?;
    // Written beside and renamed over: a model that maps the old file keeps reading it.
    let st_path = dir.join("model.safetensors");
    let partial = dir.join("model.safetensors.partial");
    safetensors::tensor::serialize_to_file(views, None, &partial).map_err(|e| {
        EngineError::CorruptCheckpoint {
            path: partial.clone(),
            reason: e.to_string(),
        }
    })?;
    std::fs::rename(&partial, &st_path).map_err(|e| io(&st_path, e))?;
    let mut config = model.config.clone();
    config.torch_dtype = if bf16 { "bfloat16" } else { "float32" }.into();
    let cfg_path = dir.join("config.json");
    let mut json = config.to_hf_json();
    for (key, value) in extras.config {
        json[key] = value;
    }
    let text = serde_json::to_string_pretty(&json).expect("a JSON value serializes");
    std::fs::write(&cfg_path, text).map_err(|e| io(&cfg_path, e))?;
    if let Some(tok) = tokenizer_json {
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, tok).map_err(|e| io(&p, e))?;
    }
    Ok(())
}

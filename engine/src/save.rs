//! Writing a model in the Hugging Face layout: `config.json`, `model.safetensors` (HF tensor names,
//! `[out, in]` matrices) and, when given, `tokenizer.json`.

use std::path::Path;

use burn::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype as StDtype;

use crate::error::{EngineError, Result};
use crate::model::{Linear, Model};

struct Entry {
    name: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    dtype: StDtype,
}

fn host<B: Backend, const D: usize>(t: &Tensor<B, D>, bf16: bool) -> Result<(Vec<u8>, StDtype)> {
    let data = t.clone().into_data();
    if bf16 {
        let v = data
            .convert::<half::bf16>()
            .into_vec::<half::bf16>()
            .map_err(|e| EngineError::Backend(format!("{e:?}")))?;
        Ok((bytemuck::cast_slice(&v).to_vec(), StDtype::BF16))
    } else {
        let v = data
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| EngineError::Backend(format!("{e:?}")))?;
        Ok((bytemuck::cast_slice(&v).to_vec(), StDtype::F32))
    }
}

/// Saves `model` to `dir` (created if needed), in f32 or bf16.
pub fn save_pretrained<B: Backend>(model: &Model<B>, dir: &Path, bf16: bool, tokenizer_json: Option<&str>) -> Result<()> {
    let io = |path: &Path, source| EngineError::Io {
        path: path.into(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut entries: Vec<Entry> = Vec::new();
    let mut push = |name: String, t: Tensor<B, 2>, entries: &mut Vec<Entry>| -> Result<()> {
        let shape = t.dims().to_vec();
        let (bytes, dtype) = host(&t, bf16)?;
        entries.push(Entry { name, shape, bytes, dtype });
        Ok(())
    };
    let vec1 = |name: String, t: &Tensor<B, 1>, entries: &mut Vec<Entry>| -> Result<()> {
        let (bytes, dtype) = host(t, bf16)?;
        entries.push(Entry {
            name,
            shape: t.dims().to_vec(),
            bytes,
            dtype,
        });
        Ok(())
    };
    let linear = |name: String, l: &Linear<B>, entries: &mut Vec<Entry>, push: &mut dyn FnMut(String, Tensor<B, 2>, &mut Vec<Entry>) -> Result<()>| -> Result<()> {
        push(format!("{name}.weight"), l.weight.clone().transpose(), entries)?;
        if let Some(b) = &l.bias {
            vec1(format!("{name}.bias"), b, entries)?;
        }
        Ok(())
    };
    push("model.embed_tokens.weight".into(), model.embed.clone(), &mut entries)?;
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        vec1(format!("{p}.input_layernorm.weight"), &layer.input_norm, &mut entries)?;
        vec1(format!("{p}.post_attention_layernorm.weight"), &layer.post_norm, &mut entries)?;
        for (n, l) in [
            ("self_attn.q_proj", &layer.q_proj),
            ("self_attn.k_proj", &layer.k_proj),
            ("self_attn.v_proj", &layer.v_proj),
            ("self_attn.o_proj", &layer.o_proj),
            ("mlp.gate_proj", &layer.gate_proj),
            ("mlp.up_proj", &layer.up_proj),
            ("mlp.down_proj", &layer.down_proj),
        ] {
            linear(format!("{p}.{n}"), l, &mut entries, &mut push)?;
        }
        if let (Some(q), Some(k)) = (&layer.q_norm, &layer.k_norm) {
            vec1(format!("{p}.self_attn.q_norm.weight"), q, &mut entries)?;
            vec1(format!("{p}.self_attn.k_norm.weight"), k, &mut entries)?;
        }
    }
    vec1("model.norm.weight".into(), &model.norm, &mut entries)?;
    if let Some(h) = &model.lm_head {
        push("lm_head.weight".into(), h.clone().transpose(), &mut entries)?;
    }
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|e| {
            TensorView::new(e.dtype, e.shape.clone(), &e.bytes)
                .map(|v| (e.name.clone(), v))
                .map_err(|err| EngineError::Backend(format!("{}: {err}", e.name)))
        })
        .collect::<Result<_>>()?;
    let st_path = dir.join("model.safetensors");
    safetensors::tensor::serialize_to_file(views, None, &st_path).map_err(|e| EngineError::CorruptCheckpoint {
        path: st_path.clone(),
        reason: e.to_string(),
    })?;
    let mut config = model.config.clone();
    config.torch_dtype = if bf16 { "bfloat16" } else { "float32" }.into();
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config.to_hf_json()).expect("a JSON value serializes");
    std::fs::write(&cfg_path, text).map_err(|e| io(&cfg_path, e))?;
    if let Some(tok) = tokenizer_json {
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, tok).map_err(|e| io(&p, e))?;
    }
    Ok(())
}

//! A block drafter's weights: a new drafter grown from its verifier, and the Hugging Face layout
//! it is saved in and loaded from (`config.json` with a `block_drafter` key naming the verifier
//! layers it taps; `model.safetensors` with the decoder's tensors, `fc`, `hidden_norm` and
//! `mask_embedding`).

use std::path::Path;

use burn::prelude::*;
use burn::tensor::DType;
use troupe_kernels::{KernelBackend, WeightLayout};

use crate::block::model::BlockModel;
use crate::block::spec::{BlockSpec, CONFIG_KEY};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::loader::{load_model, Checkpoint, WeightDtype};
use crate::model::{Linear, LinearWeight, Model};
use crate::save::{save_pretrained_with, Extras};

/// A new drafter for `verifier`: `layers` decoder layers copied from the verifier's last ones
/// (a start that already reads hidden states of the verifier's kind), its final norm, a
/// projection that starts by reading the deepest tap, and a mask embedding of the embeddings'
/// mean. Embedding and head are the verifier's.
pub fn drafter_from_verifier<B: KernelBackend>(
    verifier: &Model<B>,
    target_layer_ids: Vec<usize>,
    layers: usize,
    block_size: usize,
) -> Result<BlockModel<B>> {
    let vc = &verifier.config;
    let spec = BlockSpec {
        target_layer_ids,
        block_size,
        verifier_hidden_size: vc.hidden_size,
        verifier_layers: vc.num_layers,
    };
    spec.check(vc.hidden_size, vc.num_layers)?;
    if layers == 0 || layers > vc.num_layers {
        return Err(EngineError::InvalidConfig(format!(
            "a drafter of {layers} layers from a verifier of {}",
            vc.num_layers
        )));
    }
    let f32 = |t: Tensor<B, 1>| t.cast(DType::F32);
    let mut stack_layers = verifier.layers[vc.num_layers - layers..].to_vec();
    for l in &mut stack_layers {
        for p in l.projections_mut() {
            p.weight = LinearWeight::Float(p.weight.to_float().cast(DType::F32));
            p.bias = p.bias.take().map(f32);
        }
        l.input_norm = f32(l.input_norm.clone());
        l.post_norm = f32(l.post_norm.clone());
        l.q_norm = l.q_norm.take().map(f32);
        l.k_norm = l.k_norm.take().map(f32);
    }
    let mut config = vc.clone();
    config.num_layers = layers;
    let embed = verifier.embed.clone().cast(DType::F32);
    let lm_head = verifier
        .lm_head
        .as_ref()
        .map(|h| LinearWeight::Float(h.to_float().cast(DType::F32)));
    let mask = embed.clone().mean_dim(0).squeeze_dim(0);
    let stack = Model::from_parts(
        config,
        embed,
        stack_layers,
        f32(verifier.norm.clone()),
        lm_head,
        verifier.device.clone(),
    );
    let h = vc.hidden_size;
    let taps = spec.target_layer_ids.len();
    // [out = h, in = taps × h]: the identity on the deepest tap, nothing from the others.
    let mut w = vec![0f32; h * taps * h];
    for i in 0..h {
        w[i * taps * h + (taps - 1) * h + i] = 1.0;
    }
    let device = &verifier.device;
    let w = Tensor::<B, 2>::from_data(TensorData::new(w, [h, taps * h]), device);
    let fc = Linear {
        weight: LinearWeight::Float(match B::weight_layout() {
            WeightLayout::OutIn => w,
            WeightLayout::InOut => w.transpose(),
        }),
        bias: None,
    };
    let hidden_norm = Tensor::<B, 1>::ones([h], device);
    Ok(BlockModel::new(spec, stack, fc, hidden_norm, mask))
}

/// Saves a drafter to `dir` in f32, with the tokenizer if given.
pub fn save_block_drafter<B: KernelBackend>(
    model: &BlockModel<B>,
    dir: &Path,
    tokenizer_json: Option<&str>,
) -> Result<()> {
    let spec = serde_json::to_value(&model.spec).expect("a spec serializes");
    let extras = Extras {
        linears: vec![("fc", &model.fc)],
        vectors: vec![
            ("hidden_norm.weight", model.hidden_norm.clone()),
            ("mask_embedding", model.mask.clone()),
        ],
        config: vec![(CONFIG_KEY, spec)],
    };
    save_pretrained_with(&model.stack, dir, false, tokenizer_json, extras)
}

/// Whether `dir` holds a block drafter (its `config.json` names one).
pub fn is_block_drafter(dir: &Path) -> Result<bool> {
    Ok(read_spec(dir)?.is_some())
}

fn read_spec(dir: &Path) -> Result<Option<BlockSpec>> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => EngineError::MissingFile { path: path.clone() },
        _ => EngineError::Io {
            path: path.clone(),
            source,
        },
    })?;
    BlockSpec::from_config_json(&text)
}

/// Loads the drafter saved in `dir`, in f32, on `device`.
pub fn load_block_model<B: KernelBackend>(dir: &Path, device: &B::Device) -> Result<BlockModel<B>> {
    let spec = read_spec(dir)?.ok_or_else(|| {
        EngineError::InvalidConfig(format!(
            "{} holds no block drafter: its config.json has no `{CONFIG_KEY}`",
            dir.display()
        ))
    })?;
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    spec.check(spec.verifier_hidden_size, spec.verifier_layers)?;
    if config.hidden_size != spec.verifier_hidden_size {
        return Err(EngineError::InvalidConfig(format!(
            "the drafter's hidden size {} is not its verifier's {}",
            config.hidden_size, spec.verifier_hidden_size
        )));
    }
    let stack = load_model::<B>(dir, &config, WeightDtype::F32, device)?;
    let mut ckpt = Checkpoint::open(dir)?;
    let h = config.hidden_size;
    let taps = spec.target_layer_ids.len();
    let transpose = B::weight_layout() == WeightLayout::InOut;
    let shape = if transpose {
        [taps * h, h]
    } else {
        [h, taps * h]
    };
    let fc = ckpt
        .read("fc.weight", &[h, taps * h], DType::F32, transpose)?
        .into_device(shape, device);
    let vector = |ckpt: &mut Checkpoint, name: &str| -> Result<Tensor<B, 1>> {
        Ok(ckpt
            .read(name, &[h], DType::F32, false)?
            .into_device([h], device))
    };
    let hidden_norm = vector(&mut ckpt, "hidden_norm.weight")?;
    let mask = vector(&mut ckpt, "mask_embedding")?;
    let fc = Linear {
        weight: LinearWeight::Float(fc),
        bias: None,
    };
    Ok(BlockModel::new(spec, stack, fc, hidden_norm, mask))
}

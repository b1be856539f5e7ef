//! Loading a Hugging Face model directory: `config.json`, one or several safetensors files, and
//! random initialisation of the same structure for benchmarks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use half::{bf16, f16};
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;

use crate::config::{Architecture, ModelConfig};
use crate::error::{EngineError, Result};
use crate::model::{DecoderLayer, Linear, Model};

/// Which dtype the weights are kept in on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// Always f32 (the CPU default: Flex's bf16 matmul is far slower).
    F32,
    /// Always bf16.
    Bf16,
    /// Whatever the checkpoint stores, bf16 and f16 kept as bf16.
    AsStored,
}

/// The checkpoint files of a model directory, and which file holds which tensor.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    location: HashMap<String, usize>,
    mapped: Vec<Option<Vec<u8>>>,
}

impl Checkpoint {
    /// Finds `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut location = HashMap::new();
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| EngineError::Io {
                path: index.clone(),
                source,
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| EngineError::InvalidJson {
                path: index.clone(),
                reason: e.to_string(),
            })?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| EngineError::InvalidJson {
                    path: index.clone(),
                    reason: "no `weight_map` object".into(),
                })?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| EngineError::InvalidJson {
                    path: index.clone(),
                    reason: format!("weight_map entry for {name} is not a file name"),
                })?;
                let path = dir.join(file);
                let idx = match files.iter().position(|f| f == &path) {
                    Some(i) => i,
                    None => {
                        files.push(path);
                        files.len() - 1
                    }
                };
                location.insert(name.clone(), idx);
            }
        } else if single.exists() {
            files.push(single);
        } else {
            return Err(EngineError::MissingFile { path: single });
        }
        for f in &files {
            if !f.exists() {
                return Err(EngineError::MissingFile { path: f.clone() });
            }
        }
        let mapped = vec![None; files.len()];
        let mut ckpt = Self {
            dir: dir.into(),
            files,
            location,
            mapped,
        };
        if ckpt.location.is_empty() {
            // A single file: learn its tensor names from its header.
            let names: Vec<String> = ckpt
                .parse(0)?
                .names()
                .into_iter()
                .map(str::to_owned)
                .collect();
            for n in names {
                ckpt.location.insert(n, 0);
            }
        }
        Ok(ckpt)
    }

    fn bytes(&mut self, file: usize) -> Result<&[u8]> {
        if self.mapped[file].is_none() {
            let path = &self.files[file];
            let data = std::fs::read(path).map_err(|source| EngineError::Io {
                path: path.clone(),
                source,
            })?;
            self.mapped[file] = Some(data);
        }
        Ok(self.mapped[file].as_deref().unwrap_or_default())
    }

    fn parse(&mut self, file: usize) -> Result<SafeTensors<'_>> {
        let path = self.files[file].clone();
        let bytes = self.bytes(file)?;
        SafeTensors::deserialize(bytes).map_err(|e| EngineError::CorruptCheckpoint {
            path,
            reason: e.to_string(),
        })
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Reads one tensor as f32 or bf16 values, checking its shape.
    pub fn read(&mut self, name: &str, expected: &[usize], keep_bf16: bool) -> Result<HostTensor> {
        let file = *self
            .location
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor {
                tensor: name.into(),
                dir: self.dir.clone(),
            })?;
        let path = self.files[file].clone();
        let st = self.parse(file)?;
        let view = st.tensor(name).map_err(|_| EngineError::MissingTensor {
            tensor: name.into(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        })?;
        if view.shape() != expected {
            return Err(EngineError::ShapeMismatch {
                tensor: name.into(),
                path,
                found: view.shape().to_vec(),
                expected: expected.to_vec(),
            });
        }
        let data = view.data();
        let host = match view.dtype() {
            StDtype::F32 => HostTensor::F32(bytemuck::pod_collect_to_vec::<u8, f32>(data)),
            StDtype::BF16 => {
                let v: Vec<bf16> = bytemuck::pod_collect_to_vec(data);
                if keep_bf16 {
                    HostTensor::Bf16(v)
                } else {
                    HostTensor::F32(v.into_iter().map(f32::from).collect())
                }
            }
            StDtype::F16 => {
                let v: Vec<f16> = bytemuck::pod_collect_to_vec(data);
                if keep_bf16 {
                    HostTensor::Bf16(v.into_iter().map(|x| bf16::from_f32(x.to_f32())).collect())
                } else {
                    HostTensor::F32(v.into_iter().map(f32::from).collect())
                }
            }
            other => {
                return Err(EngineError::UnsupportedDtype {
                    tensor: name.into(),
                    path,
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(host)
    }

    /// Frees the bytes of every file read so far.
    pub fn release(&mut self) {
        self.mapped.iter_mut().for_each(|m| *m = None);
    }
}

/// Tensor values read from a checkpoint, before they go to the device.
pub enum HostTensor {
    /// f32 values.
    F32(Vec<f32>),
    /// bf16 values.
    Bf16(Vec<bf16>),
}

impl HostTensor {
    /// Transposes a `[rows, cols]` matrix into `[cols, rows]`.
    fn transpose(self, rows: usize, cols: usize) -> Self {
        fn t<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(v.len());
            for c in 0..cols {
                out.extend((0..rows).map(|r| v[r * cols + c]));
            }
            out
        }
        match self {
            HostTensor::F32(v) => HostTensor::F32(t(&v, rows, cols)),
            HostTensor::Bf16(v) => HostTensor::Bf16(t(&v, rows, cols)),
        }
    }

    fn into_device<B: Backend, const D: usize>(
        self,
        shape: [usize; D],
        device: &B::Device,
    ) -> Tensor<B, D> {
        match self {
            HostTensor::F32(v) => {
                Tensor::from_data(TensorData::new(v, shape), (device, DType::F32))
            }
            HostTensor::Bf16(v) => {
                Tensor::from_data(TensorData::new(v, shape), (device, DType::BF16))
            }
        }
    }
}

/// Loads the weights of `config`'s architecture from `dir`.
pub fn load_model<B: Backend>(
    dir: &Path,
    config: &ModelConfig,
    dtype: WeightDtype,
    device: &B::Device,
) -> Result<Model<B>> {
    let mut ckpt = Checkpoint::open(dir)?;
    let keep_bf16 = match dtype {
        WeightDtype::F32 => false,
        WeightDtype::Bf16 => true,
        WeightDtype::AsStored => config.torch_dtype != "float32",
    };
    let c = config;
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
    let as_dtype = |t: HostTensor| if keep_bf16 { to_bf16(t) } else { t };

    let vector = |ckpt: &mut Checkpoint, name: &str, n: usize| -> Result<Tensor<B, 1>> {
        Ok(as_dtype(ckpt.read(name, &[n], keep_bf16)?).into_device([n], device))
    };
    let embed = as_dtype(ckpt.read("model.embed_tokens.weight", &[c.vocab_size, h], keep_bf16)?)
        .into_device([c.vocab_size, h], device);
    let linear = |ckpt: &mut Checkpoint,
                  name: &str,
                  out: usize,
                  inp: usize,
                  bias: bool|
     -> Result<Linear<B>> {
        let w = as_dtype(ckpt.read(&format!("{name}.weight"), &[out, inp], keep_bf16)?)
            .transpose(out, inp)
            .into_device([inp, out], device);
        let bias = if bias {
            Some(
                as_dtype(ckpt.read(&format!("{name}.bias"), &[out], keep_bf16)?)
                    .into_device([out], device),
            )
        } else {
            None
        };
        Ok(Linear { weight: w, bias })
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let qwen = c.architecture == Architecture::Qwen3;
        layers.push(DecoderLayer {
            input_norm: vector(&mut ckpt, &format!("{p}.input_layernorm.weight"), h)?,
            q_proj: linear(
                &mut ckpt,
                &format!("{p}.self_attn.q_proj"),
                qd,
                h,
                c.attention_bias,
            )?,
            k_proj: linear(
                &mut ckpt,
                &format!("{p}.self_attn.k_proj"),
                kvd,
                h,
                c.attention_bias,
            )?,
            v_proj: linear(
                &mut ckpt,
                &format!("{p}.self_attn.v_proj"),
                kvd,
                h,
                c.attention_bias,
            )?,
            o_proj: linear(
                &mut ckpt,
                &format!("{p}.self_attn.o_proj"),
                h,
                qd,
                c.attention_bias,
            )?,
            q_norm: if qwen {
                Some(vector(
                    &mut ckpt,
                    &format!("{p}.self_attn.q_norm.weight"),
                    hd,
                )?)
            } else {
                None
            },
            k_norm: if qwen {
                Some(vector(
                    &mut ckpt,
                    &format!("{p}.self_attn.k_norm.weight"),
                    hd,
                )?)
            } else {
                None
            },
            post_norm: vector(
                &mut ckpt,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
            )?,
            gate_proj: linear(&mut ckpt, &format!("{p}.mlp.gate_proj"), i, h, false)?,
            up_proj: linear(&mut ckpt, &format!("{p}.mlp.up_proj"), i, h, false)?,
            down_proj: linear(&mut ckpt, &format!("{p}.mlp.down_proj"), h, i, false)?,
        });
    }
    let norm = vector(&mut ckpt, "model.norm.weight", h)?;
    let lm_head = if c.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
        None
    } else {
        Some(linear(&mut ckpt, "lm_head", c.vocab_size, h, false)?.weight)
    };
    ckpt.release();
    Ok(Model::from_parts(
        config.clone(),
        embed,
        layers,
        norm,
        lm_head,
        device.clone(),
    ))
}

fn to_bf16(t: HostTensor) -> HostTensor {
    match t {
        HostTensor::F32(v) => HostTensor::Bf16(v.into_iter().map(bf16::from_f32).collect()),
        b => b,
    }
}

/// A model of `config`'s shape with random weights (normal, std 0.02; norms at one), for benchmarks.
pub fn random_model<B: Backend>(
    config: &ModelConfig,
    dtype: DType,
    seed: u64,
    device: &B::Device,
) -> Model<B> {
    B::seed(device, seed);
    let c = config;
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
    let normal = |shape: [usize; 2]| -> Tensor<B, 2> {
        Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 0.02), device).cast(dtype)
    };
    let ones = |n: usize| Tensor::<B, 1>::ones([n], (device, dtype));
    let linear = |inp: usize, out: usize, bias: bool| Linear {
        weight: normal([inp, out]),
        bias: bias.then(|| Tensor::zeros([out], (device, dtype))),
    };
    let qwen = c.architecture == Architecture::Qwen3;
    let layers = (0..c.num_layers)
        .map(|_| DecoderLayer {
            input_norm: ones(h),
            q_proj: linear(h, qd, c.attention_bias),
            k_proj: linear(h, kvd, c.attention_bias),
            v_proj: linear(h, kvd, c.attention_bias),
            o_proj: linear(qd, h, c.attention_bias),
            q_norm: qwen.then(|| ones(hd)),
            k_norm: qwen.then(|| ones(hd)),
            post_norm: ones(h),
            gate_proj: linear(h, i, false),
            up_proj: linear(h, i, false),
            down_proj: linear(i, h, false),
        })
        .collect();
    let embed = normal([c.vocab_size, h]);
    let lm_head = (!c.tie_word_embeddings).then(|| normal([h, c.vocab_size]));
    Model::from_parts(
        config.clone(),
        embed,
        layers,
        ones(h),
        lm_head,
        device.clone(),
    )
}

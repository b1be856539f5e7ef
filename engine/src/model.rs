//! The decoder: Qwen3 and Llama 3 share one structure, differing only in Qwen3's per-head q/k RMSNorm.
//!
//! References: the Hugging Face `modeling_qwen3.py` and `modeling_llama.py`. Projection weights
//! are kept in the layout the backend's kernels read ([`KernelBackend::weight_layout`]: `[out,
//! in]` as the checkpoint stores them on the CPU, `[in, out]` on the GPU backends), in their own
//! width (see [`crate::WeightDtype`]).

use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::DType;
use troupe_kernels::{Int8Weight, KernelBackend};

use crate::attention::{attend, SeqPlan};
use crate::batch::SeqInput;
use crate::config::ModelConfig;
use crate::dtype::to_f32;
use crate::kv_pool::KvPool;
use crate::loader::activation_dtype;
use crate::pooled_step::PooledStep;
use crate::rope::RopeTable;
use crate::window::{KvWindow, WindowSpec};

/// A projection's matrix.
#[derive(Debug, Clone)]
pub enum LinearWeight<B: Backend> {
    /// In a float width, `[out, in]` or `[in, out]` as the backend's
    /// [`KernelBackend::weight_layout`] says.
    Float(Tensor<B, 2>),
    /// int8 blocks with a scale each, `[out, in]` (see [`Int8Weight`]).
    Int8(Int8Weight<B>),
}

impl<B: Backend> LinearWeight<B> {
    /// The dtype its elements are kept in (`I8` for int8 blocks).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Float(w) => w.dtype(),
            Self::Int8(_) => DType::I8,
        }
    }

    /// The matrix in a float width and the backend's layout: itself, or its int8 blocks
    /// dequantized (`[out, in]`; only a backend that keeps `[out, in]` makes int8 weights).
    pub fn to_float(&self) -> Tensor<B, 2> {
        match self {
            Self::Float(w) => w.clone(),
            Self::Int8(q) => q.dequantize(),
        }
    }

    /// `x · W`, plus `residual`, through the backend's kernel for this kind of matrix.
    fn product(&self, x: Tensor<B, 2>, residual: Option<Tensor<B, 2>>) -> Tensor<B, 2>
    where
        B: KernelBackend,
    {
        match self {
            Self::Float(w) => B::skinny_linear(x, w, residual),
            Self::Int8(q) => B::skinny_linear_int8(x, q, residual),
        }
    }
}

/// A projection `x · W + b`.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    /// The matrix.
    pub weight: LinearWeight<B>,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: KernelBackend> Linear<B> {
    /// Applies the projection to `[n, in]` rows.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.forward_add(x, None)
    }

    /// `residual + x · W + b`: the projection with the residual add fused into it.
    pub fn forward_add(&self, x: Tensor<B, 2>, residual: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        match &self.bias {
            Some(b) => self.weight.product(x, residual) + b.clone().unsqueeze_dim(0),
            None => self.weight.product(x, residual),
        }
    }
}

/// `silu(gate(x)) ⊙ up(x)`, one fused pass over both weights when neither has a bias and both
/// are of one kind.
fn swiglu<B: KernelBackend>(x: Tensor<B, 2>, gate: &Linear<B>, up: &Linear<B>) -> Tensor<B, 2> {
    if gate.bias.is_none() && up.bias.is_none() {
        match (&gate.weight, &up.weight) {
            (LinearWeight::Float(g), LinearWeight::Float(u)) => return B::skinny_swiglu(x, g, u),
            (LinearWeight::Int8(g), LinearWeight::Int8(u)) => {
                return B::skinny_swiglu_int8(x, g, u)
            }
            _ => {}
        }
    }
    silu(gate.forward(x.clone())) * up.forward(x)
}

/// RMSNorm over the last dimension, computed in f32 whatever the activations' dtype, through
/// the backend's kernel ([`KernelBackend::rms_norm`]).
pub fn rms_norm<B: KernelBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dims = x.dims();
    let cols = dims[D - 1];
    let rows = dims.iter().product::<usize>() / cols.max(1);
    B::rms_norm(x.reshape([rows, cols]), weight, eps).reshape(dims)
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer<B: Backend> {
    /// RMSNorm before attention.
    pub input_norm: Tensor<B, 1>,
    /// Query projection.
    pub q_proj: Linear<B>,
    /// Key projection.
    pub k_proj: Linear<B>,
    /// Value projection.
    pub v_proj: Linear<B>,
    /// Output projection.
    pub o_proj: Linear<B>,
    /// Qwen3's per-head RMSNorm of queries.
    pub q_norm: Option<Tensor<B, 1>>,
    /// Qwen3's per-head RMSNorm of keys.
    pub k_norm: Option<Tensor<B, 1>>,
    /// RMSNorm before the MLP.
    pub post_norm: Tensor<B, 1>,
    /// SwiGLU gate.
    pub gate_proj: Linear<B>,
    /// SwiGLU up projection.
    pub up_proj: Linear<B>,
    /// SwiGLU down projection.
    pub down_proj: Linear<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// The layer's seven projections: q, k, v, o, gate, up, down.
    pub fn projections(&self) -> [&Linear<B>; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// [`DecoderLayer::projections`], to change.
    pub fn projections_mut(&mut self) -> [&mut Linear<B>; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

/// A loaded or randomly initialised decoder, generic over the Burn backend.
#[derive(Debug, Clone)]
pub struct Model<B: Backend> {
    /// Its configuration.
    pub config: ModelConfig,
    /// Token embedding `[vocab, hidden]`.
    pub embed: Tensor<B, 2>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final RMSNorm.
    pub norm: Tensor<B, 1>,
    /// Output head, kept as a projection; `None` when it is the embedding, read as it lies.
    pub lm_head: Option<LinearWeight<B>>,
    /// Dtype of the activations and windows (f32 where the backend widens narrower weights).
    pub dtype: DType,
    /// The device the weights live on.
    pub device: B::Device,
    rope: RopeTable<B>,
}

/// What a batched forward returns, rows in batch order.
pub struct ForwardOutput<B: Backend> {
    /// Final-normed hidden states `[tokens, hidden]`.
    pub hidden: Tensor<B, 2>,
    /// Outputs of the captured layers, each `[tokens, hidden]`, in the order they were asked for.
    pub captured: Vec<Tensor<B, 2>>,
    /// Each layer's keys (before RoPE) and values of the step's tokens, token-major
    /// `[tokens, kv_heads, head_dim]`: what a commit writes to the pool.
    pub kv: Vec<(Tensor<B, 3>, Tensor<B, 3>)>,
}

impl<B: KernelBackend> Model<B> {
    /// Assembles a model from its parts. Its activations and windows take the dtype
    /// [`activation_dtype`] gives for the embedding's.
    pub fn from_parts(
        config: ModelConfig,
        embed: Tensor<B, 2>,
        layers: Vec<DecoderLayer<B>>,
        norm: Tensor<B, 1>,
        lm_head: Option<LinearWeight<B>>,
        device: B::Device,
    ) -> Self {
        let dtype = activation_dtype::<B>(embed.dtype());
        Self::with_dtype(config, embed, layers, norm, lm_head, dtype, device)
    }
}

impl<B: Backend> Model<B> {
    /// [`Model::from_parts`] with the activations' dtype given.
    pub(crate) fn with_dtype(
        config: ModelConfig,
        embed: Tensor<B, 2>,
        layers: Vec<DecoderLayer<B>>,
        norm: Tensor<B, 1>,
        lm_head: Option<LinearWeight<B>>,
        dtype: DType,
        device: B::Device,
    ) -> Self {
        let rope = RopeTable::new(&config, 1024, &device);
        Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            dtype,
            device,
            rope,
        }
    }

    /// An empty pool for the windows of this model's sequences, on its device and in its dtype.
    pub fn new_pool(&self) -> KvPool<B> {
        let c = &self.config;
        KvPool::new(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            self.dtype,
            &self.device,
        )
    }

    /// A window at `slot` of `pool`'s windows of shape `spec` (see [`KvPool::alloc`]).
    pub fn new_window(&self, spec: WindowSpec, slot: usize) -> KvWindow<B> {
        let c = &self.config;
        KvWindow::new(
            spec,
            slot,
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            self.dtype,
        )
    }
}

impl<B: KernelBackend> Model<B> {
    /// One forward over many sequences at once. `tokens` holds each sequence's new tokens back to back,
    /// in the order of `seqs`; every sequence attends to its own window (committed keys in `pool`)
    /// plus its scratch and its earlier tokens in the step. The step's keys and values are appended
    /// to each window's scratch.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        seqs: &mut [SeqInput<'_, B>],
        pool: &KvPool<B>,
        capture: &[usize],
    ) -> ForwardOutput<B> {
        let c = self.config.clone();
        let total = tokens.len();
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [total]), &self.device);
        let mut x = self.embed.clone().select(0, ids);
        if x.dtype() != self.dtype {
            x = x.cast(self.dtype);
        }

        // The backend's pooled attention kernel serves each window shape in one launch per layer
        // and needs only RoPE rows; Burn ops need a plan per sequence.
        let pooled = B::has_attention_kernel().then(|| {
            // Every rank of the window, however little of it is filled yet: the kernel rotates
            // a key at its rank in what a query sees.
            for s in seqs.iter() {
                let seen = s.window.len() + s.window.scratch_len() + s.len;
                self.rope.ensure(seen.max(s.window.spec().capacity()));
            }
            PooledStep::new(seqs, pool)
        });
        let plans: Vec<SeqPlan<B>> = match pooled {
            Some(_) => Vec::new(),
            None => seqs
                .iter()
                .map(|s| SeqPlan::new(s.window, s.len, &c, &mut self.rope, &self.device))
                .collect(),
        };
        let mut captured = vec![None; capture.len()];
        let mut kv = Vec::with_capacity(self.layers.len());
        let (hd, h, kvh) = (c.head_dim, c.num_heads, c.num_kv_heads);
        for (li, layer) in self.layers.iter().enumerate() {
            let hn = rms_norm(x.clone(), &layer.input_norm, c.rms_norm_eps);
            let mut q = layer.q_proj.forward(hn.clone()).reshape([total, h, hd]);
            let mut k = layer.k_proj.forward(hn.clone()).reshape([total, kvh, hd]);
            let v = layer.v_proj.forward(hn).reshape([total, kvh, hd]);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(q, qn, c.rms_norm_eps);
                k = rms_norm(k, kn, c.rms_norm_eps);
            }
            let mut offset = 0;
            for seq in seqs.iter_mut() {
                let rows = offset..offset + seq.len;
                seq.window
                    .append_scratch(li, k.clone().slice(rows.clone()), v.clone().slice(rows));
                offset += seq.len;
            }
            kv.push((k.clone(), v.clone()));
            let attn = match &pooled {
                Some(step) => step.attend(
                    li,
                    q.reshape([total, h * hd]),
                    k,
                    v,
                    seqs,
                    pool,
                    self.rope.tables(),
                    &c,
                ),
                None => {
                    // [heads, tokens, head_dim]: the layout the Burn-ops attention uses.
                    let q = q.swap_dims(0, 1);
                    let mut outs = Vec::with_capacity(seqs.len());
                    let mut offset = 0;
                    for (seq, plan) in seqs.iter().zip(&plans) {
                        let qs = q.clone().slice([0..h, offset..offset + seq.len, 0..hd]);
                        let (k_all, v_all) = seq
                            .window
                            .context(li, &plan.slots, plan.n_slots, pool)
                            .expect("the scratch was just appended");
                        outs.push(attend(qs, k_all, v_all, plan, &c));
                        offset += seq.len;
                    }
                    if outs.len() == 1 {
                        outs.pop().expect("one output")
                    } else {
                        Tensor::cat(outs, 0)
                    }
                }
            };
            x = layer.o_proj.forward_add(attn, Some(x));
            let hn = rms_norm(x.clone(), &layer.post_norm, c.rms_norm_eps);
            let act = swiglu(hn, &layer.gate_proj, &layer.up_proj);
            x = layer.down_proj.forward_add(act, Some(x));
            for (slot, &want) in captured.iter_mut().zip(capture) {
                if want == li {
                    *slot = Some(x.clone());
                }
            }
        }
        for seq in seqs.iter_mut() {
            seq.window.end_append(seq.len);
        }
        ForwardOutput {
            hidden: rms_norm(x, &self.norm, c.rms_norm_eps),
            captured: captured.into_iter().flatten().collect(),
            kv,
        }
    }

    /// Each final-normed hidden row's most likely token, the argmax of [`Model::logits`], from
    /// the backend's greedy head, which writes no logits; `None` where the backend has none.
    pub fn head_argmax(&self, hidden: Tensor<B, 2>) -> Option<Vec<u32>> {
        match &self.lm_head {
            None => B::head_argmax(hidden, &self.embed),
            Some(LinearWeight::Float(w)) => B::head_argmax(hidden, w),
            Some(LinearWeight::Int8(q)) => B::head_argmax_int8(hidden, q),
        }
    }

    /// Logits `[rows, vocab]` in f32 for final-normed hidden rows. A tied head reads the
    /// embedding by rows where it lies (`x · Eᵀ`), so no step copies or transposes it.
    pub fn logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        let logits = match &self.lm_head {
            Some(w) => w.product(hidden, None),
            None => B::skinny_linear_t(hidden, &self.embed),
        };
        to_f32(logits)
    }
}

//! Training a byte-level model on a text corpus with Burn's autodiff: AdamW with warm-up and cosine
//! decay, validation in bits per byte, and checkpoints in the Hugging Face layout that can resume.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use troupe_kernels::KernelBackend;

pub use crate::corpus::Corpus;
use crate::error::{EngineError, Result};
use crate::model::{DecoderLayer, Linear, LinearWeight, Model};

/// Hyper-parameters of a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Steps in the whole run.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Decoupled weight decay on matrices.
    pub weight_decay: f64,
    /// Seed of batch sampling.
    pub seed: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seq_len: 128,
            batch: 16,
            steps: 1000,
            lr: 3e-3,
            warmup: 50,
            weight_decay: 0.01,
            seed: 0,
            eval_batches: 8,
        }
    }
}

impl TrainConfig {
    /// Learning rate at `step` (0-based): linear warm-up, then cosine down to a tenth.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.steps.saturating_sub(self.warmup)).max(1) as f64;
        let p = ((step - self.warmup) as f64 / span).min(1.0);
        self.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
    }
}

/// One parameter's moment tensor, on the backend without autodiff.
pub type Moment<B> = Tensor<<B as AutodiffBackend>::InnerBackend, 2>;

/// AdamW moments of every parameter, in the order `params` lists them.
pub struct AdamW<B: AutodiffBackend> {
    m: Vec<Tensor<B::InnerBackend, 2>>,
    v: Vec<Tensor<B::InnerBackend, 2>>,
    /// Steps taken.
    pub t: usize,
}

/// Every trainable tensor of a model viewed as 2-D (vectors as `[1, n]`), with whether weight
/// decay applies to it.
fn params<B: Backend>(m: &Model<B>) -> Vec<(Tensor<B, 2>, bool)> {
    let mut out = vec![(m.embed.clone(), true)];
    for l in &m.layers {
        layer_params(l, &mut out);
    }
    out.push(as_row(&m.norm));
    if let Some(h) = &m.lm_head {
        out.push((h.to_float(), true));
    }
    out
}

/// A vector as a `[1, n]` parameter, without weight decay.
pub(crate) fn as_row<B: Backend>(t: &Tensor<B, 1>) -> (Tensor<B, 2>, bool) {
    (t.clone().unsqueeze_dim(0), false)
}

/// A decoder layer's trainable tensors, in the order [`layer_with`] takes them back.
pub(crate) fn layer_params<B: Backend>(l: &DecoderLayer<B>, out: &mut Vec<(Tensor<B, 2>, bool)>) {
    out.push(as_row(&l.input_norm));
    out.push(as_row(&l.post_norm));
    for lin in l.projections() {
        out.push((lin.weight.to_float(), true));
        if let Some(b) = &lin.bias {
            out.push(as_row(b));
        }
    }
    if let (Some(q), Some(k)) = (&l.q_norm, &l.k_norm) {
        out.push(as_row(q));
        out.push(as_row(k));
    }
}

/// A layer shaped like `l` from tensors in [`layer_params`] order.
pub(crate) fn layer_with<B: Backend, C: Backend>(
    l: &DecoderLayer<B>,
    mat: &mut impl FnMut() -> Tensor<C, 2>,
) -> DecoderLayer<C> {
    let input_norm = mat().squeeze_dim(0);
    let post_norm = mat().squeeze_dim(0);
    let mut lin = |old: &Linear<B>| Linear {
        weight: LinearWeight::Float(mat()),
        bias: old.bias.as_ref().map(|_| mat().squeeze_dim(0)),
    };
    let q_proj = lin(&l.q_proj);
    let k_proj = lin(&l.k_proj);
    let v_proj = lin(&l.v_proj);
    let o_proj = lin(&l.o_proj);
    let gate_proj = lin(&l.gate_proj);
    let up_proj = lin(&l.up_proj);
    let down_proj = lin(&l.down_proj);
    let (q_norm, k_norm) = match (&l.q_norm, &l.k_norm) {
        (Some(_), Some(_)) => (Some(mat().squeeze_dim(0)), Some(mat().squeeze_dim(0))),
        _ => (None, None),
    };
    DecoderLayer {
        input_norm,
        q_proj,
        k_proj,
        v_proj,
        o_proj,
        q_norm,
        k_norm,
        post_norm,
        gate_proj,
        up_proj,
        down_proj,
    }
}

/// Rebuilds a model from tensors in [`params`] order (vectors as `[1, n]`), on any backend.
fn with_params<B: Backend, C: Backend>(
    m: &Model<B>,
    new: Vec<Tensor<C, 2>>,
    device: &C::Device,
) -> Model<C> {
    let mut it = new.into_iter();
    let mut mat = || it.next().expect("as many tensors as parameters");
    let embed = mat();
    let layers = m.layers.iter().map(|l| layer_with(l, &mut mat)).collect();
    let norm = mat().squeeze_dim(0);
    let lm_head = m.lm_head.as_ref().map(|_| LinearWeight::Float(mat()));
    Model::with_dtype(
        m.config.clone(),
        embed,
        layers,
        norm,
        lm_head,
        m.dtype,
        device.clone(),
    )
}

/// The same weights on the backend without autodiff (for evaluation and saving).
pub fn inner_model<B: AutodiffBackend>(m: &Model<B>) -> Model<B::InnerBackend> {
    let list = params(m).into_iter().map(|(t, _)| t.inner()).collect();
    with_params(m, list, &m.device)
}

/// The same weights marked as requiring gradients.
pub fn trainable<B: AutodiffBackend>(m: &Model<B::InnerBackend>, device: &B::Device) -> Model<B> {
    let list = params(m)
        .into_iter()
        .map(|(t, _)| Tensor::<B, 2>::from_inner(t).require_grad())
        .collect();
    with_params(m, list, device)
}

impl<B: AutodiffBackend> AdamW<B> {
    /// Zero moments for `model`'s parameters.
    pub fn new(model: &Model<B>) -> Self {
        Self::for_params(&params(model))
    }

    /// Zero moments for `params`.
    pub fn for_params(params: &[(Tensor<B, 2>, bool)]) -> Self {
        let zeros: Vec<_> = params
            .iter()
            .map(|(t, _)| t.clone().inner().zeros_like())
            .collect();
        Self {
            m: zeros.clone(),
            v: zeros,
            t: 0,
        }
    }

    /// One update of every parameter from `loss`'s gradients; returns the updated model.
    pub fn step(
        &mut self,
        model: &Model<B>,
        loss: Tensor<B, 1>,
        lr: f64,
        weight_decay: f64,
    ) -> Model<B> {
        let updated = self.update(params(model), loss, lr, weight_decay);
        with_params(model, updated, &model.device)
    }

    /// One update of `params` (with whether each decays) from `loss`'s gradients; returns the
    /// updated tensors, in order, marked as requiring gradients.
    pub fn update(
        &mut self,
        params: Vec<(Tensor<B, 2>, bool)>,
        loss: Tensor<B, 1>,
        lr: f64,
        weight_decay: f64,
    ) -> Vec<Tensor<B, 2>> {
        let (b1, b2, eps) = (0.9f64, 0.95f64, 1e-8f64);
        let grads = loss.backward();
        self.t += 1;
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        let mut updated = Vec::new();
        for (i, (p, decay)) in params.into_iter().enumerate() {
            let g = p.grad(&grads);
            let p = p.inner();
            let Some(g) = g else {
                updated.push(Tensor::<B, 2>::from_inner(p).require_grad());
                continue;
            };
            self.m[i] = self.m[i].clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
            self.v[i] = self.v[i].clone().mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
            let mhat = self.m[i].clone().div_scalar(c1);
            let vhat = self.v[i].clone().div_scalar(c2);
            let mut step = mhat / vhat.sqrt().add_scalar(eps);
            if decay {
                step = step + p.clone().mul_scalar(weight_decay);
            }
            let p = p - step.mul_scalar(lr);
            updated.push(Tensor::<B, 2>::from_inner(p).require_grad());
        }
        updated
    }

    /// The moments in `params` order, for a checkpoint.
    pub fn moments(&self) -> [&[Moment<B>]; 2] {
        [&self.m, &self.v]
    }

    /// Restores moments saved by [`Self::moments`].
    pub fn restore(
        &mut self,
        m: Vec<Tensor<B::InnerBackend, 2>>,
        v: Vec<Tensor<B::InnerBackend, 2>>,
        t: usize,
    ) -> Result<()> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return Err(EngineError::InvalidConfig(format!(
                "optimizer state has {} tensors, the model {}",
                m.len(),
                self.m.len()
            )));
        }
        self.m = m;
        self.v = v;
        self.t = t;
        Ok(())
    }
}

/// Mean validation loss in bits per byte over `batches` windows of the held-out bytes.
pub fn bits_per_byte<B: KernelBackend>(
    model: &Model<B>,
    val: &[u8],
    cfg: &TrainConfig,
    batches: usize,
) -> Result<f64> {
    let mut rng = StdRng::seed_from_u64(12345);
    let mut total = 0.0;
    for _ in 0..batches {
        let w = Corpus::windows(val, cfg.batch, cfg.seq_len + 1, &mut rng);
        let t = Tensor::<B, 2, Int>::from_data(
            TensorData::new(w, [cfg.batch, cfg.seq_len + 1]),
            &model.device,
        );
        let loss = model
            .next_token_loss(t)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>();
        total += loss.map_err(|e| EngineError::Backend(format!("{e:?}")))?[0] as f64;
    }
    Ok(total / batches.max(1) as f64 / std::f64::consts::LN_2)
}

/// The value of a one-element loss, on the host.
pub(crate) fn scalar<B: Backend>(loss: &Tensor<B, 1>) -> Result<f64> {
    let v = loss
        .clone()
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| EngineError::Backend(format!("{e:?}")))?;
    Ok(v[0] as f64)
}

/// One training step on a random batch; returns the updated model and the batch loss (nats).
pub fn train_step<B: AutodiffBackend + KernelBackend>(
    model: &Model<B>,
    opt: &mut AdamW<B>,
    corpus: &Corpus,
    cfg: &TrainConfig,
    rng: &mut StdRng,
) -> Result<(Model<B>, f64)> {
    let w = Corpus::windows(&corpus.train, cfg.batch, cfg.seq_len + 1, rng);
    let t = Tensor::<B, 2, Int>::from_data(
        TensorData::new(w, [cfg.batch, cfg.seq_len + 1]),
        &model.device,
    );
    let loss = model.next_token_loss(t);
    let value = scalar(&loss)?;
    let lr = cfg.lr_at(opt.t);
    let model = opt.step(model, loss, lr, cfg.weight_decay);
    Ok((model, value))
}

//! A plain causal forward over whole sequences (no windows): what training runs on, with RoPE
//! positions `0..len` and full causal attention.

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu, softmax};
use troupe_kernels::KernelBackend;

use crate::model::{rms_norm, Model};
use crate::rope::{self, RopeTable};

impl<B: KernelBackend> Model<B> {
    /// Logits `[batch, len, vocab]` for token ids `[batch, len]`, each position seeing itself and
    /// the positions before it.
    pub fn forward_causal(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let c = &self.config;
        let [b, t] = tokens.dims();
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let group = h / kvh;
        let table = RopeTable::<B>::new(c, t, &self.device);
        let (cos, sin) = table.range(0, t);
        let mut mask = vec![0f32; t * t];
        for i in 0..t {
            for j in i + 1..t {
                mask[i * t + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::<B, 4>::from_data(TensorData::new(mask, [1, 1, t, t]), &self.device);
        let ids = tokens.reshape([b * t]);
        let mut x = self.embed.clone().select(0, ids); // [b*t, hidden]
        let heads = |x: Tensor<B, 2>, n: usize| x.reshape([b, t, n, hd]).swap_dims(1, 2); // [b, n, t, hd]
        let rotate = |x: Tensor<B, 4>, n: usize| {
            rope::apply(x.reshape([b * n, t, hd]), &cos, &sin).reshape([b, n, t, hd])
        };
        for layer in &self.layers {
            let hn = rms_norm(x.clone(), &layer.input_norm, c.rms_norm_eps);
            let mut q = heads(layer.q_proj.forward(hn.clone()), h);
            let mut k = heads(layer.k_proj.forward(hn.clone()), kvh);
            let v = heads(layer.v_proj.forward(hn), kvh);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(q, qn, c.rms_norm_eps);
                k = rms_norm(k, kn, c.rms_norm_eps);
            }
            let q = rotate(q, h);
            let k = rotate(k, kvh);
            // GQA: each key/value head serves `group` consecutive query heads.
            let k = k
                .unsqueeze_dim::<5>(2)
                .repeat_dim(2, group)
                .reshape([b, h, t, hd]);
            let v = v
                .unsqueeze_dim::<5>(2)
                .repeat_dim(2, group)
                .reshape([b, h, t, hd]);
            let scores = q
                .matmul(k.swap_dims(2, 3))
                .mul_scalar(1.0 / (hd as f64).sqrt())
                + mask.clone();
            let attn = softmax(scores, 3).matmul(v); // [b, h, t, hd]
            let attn = attn.swap_dims(1, 2).reshape([b * t, h * hd]);
            x = x + layer.o_proj.forward(attn);
            let hn = rms_norm(x.clone(), &layer.post_norm, c.rms_norm_eps);
            let gate = silu(layer.gate_proj.forward(hn.clone()));
            x = x + layer.down_proj.forward(gate * layer.up_proj.forward(hn));
        }
        let x = rms_norm(x, &self.norm, c.rms_norm_eps);
        self.logits(x).reshape([b, t, c.vocab_size])
    }

    /// Mean next-token cross-entropy (nats) of `tokens` `[batch, len + 1]`.
    pub fn next_token_loss(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let [b, n] = tokens.dims();
        let inputs = tokens.clone().slice([0..b, 0..n - 1]);
        let targets = tokens.slice([0..b, 1..n]);
        let logp = log_softmax(self.forward_causal(inputs), 2);
        let picked = logp.gather(2, targets.unsqueeze_dim(2));
        picked.mean().neg()
    }
}

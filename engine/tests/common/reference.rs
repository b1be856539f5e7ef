//! An independent reference forward in plain Rust over f32 vectors, written from the semantics of
//! Hugging Face's `modeling_llama.py` / `modeling_qwen3.py` and `modeling_rope_utils.py`:
//!
//! * `RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)`, computed in f32;
//! * Qwen3 applies an RMSNorm over `head_dim` to every query and key head before RoPE;
//! * RoPE is rotate-half: `x * cos + cat(-x2, x1) * sin` with `cos = cat(cos(p f), cos(p f))`;
//! * inverse frequencies `theta^(-2i/d)`, with `_compute_llama3_parameters` for rope_type llama3;
//! * grouped-query attention through `repeat_kv` (query head `h` reads kv head `h / n_rep`), scaled by
//!   `head_dim^-0.5`, softmax in f32;
//! * SwiGLU MLP `down(silu(gate(x)) * up(x))`; the head is `lm_head` or the tied embedding.
//!
//! Attention takes a *visibility* function: for query `i` the list of key indices it may see (ending
//! with `i`). Positions are ranks within that list, which is plain causal attention with positions
//! `0..n` when the list is `0..=i`, and StreamingLLM's in-cache positions for a sink + window list.

use troupe_engine::{Architecture, ModelConfig, RopeScaling};

use super::Weights;

/// Inverse RoPE frequencies for `config`, from scratch.
pub fn inv_freq(config: &ModelConfig) -> Vec<f64> {
    let d = config.head_dim as f64;
    let plain: Vec<f64> = (0..config.head_dim / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / d))
        .collect();
    match config.rope_scaling {
        RopeScaling::None => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            // transformers' _compute_llama3_parameters, element by element.
            let old = original_max_position_embeddings;
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    // inv_freq_llama = where(wavelen > low_freq_wavelen, f / factor, f)
                    let llama = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    let smoothed = (1.0 - smooth) * llama / factor + smooth * llama;
                    let is_medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                    if is_medium {
                        smoothed
                    } else {
                        llama
                    }
                })
                .collect()
        }
    }
}

/// A reference model: host weights plus the inverse frequencies it rotates with (overridable, so a
/// test can show that a wrong RoPE would be caught).
pub struct Reference<'a> {
    pub w: &'a Weights,
    pub inv_freq: Vec<f64>,
}

pub fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps as f32).sqrt();
    x.iter().zip(w).map(|(v, g)| g * (v * inv)).collect()
}

/// `W x` with `W` stored `[out, in]` row-major.
pub fn matvec(w: &[f32], x: &[f32], out: usize) -> Vec<f32> {
    let inp = x.len();
    assert_eq!(w.len(), out * inp);
    (0..out)
        .map(|o| {
            w[o * inp..(o + 1) * inp]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

/// `nn.Linear`: `W x (+ b)`, the bias present when the checkpoint has `{name}.bias`.
fn linear(w: &Weights, prefix: &str, name: &str, x: &[f32], out: usize) -> Vec<f32> {
    let mut y = matvec(w.get(&format!("{prefix}.{name}.weight")), x, out);
    if let Some(b) = w.get_opt(&format!("{prefix}.{name}.bias")) {
        y.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
    y
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl<'a> Reference<'a> {
    pub fn new(w: &'a Weights) -> Self {
        Self {
            inv_freq: inv_freq(&w.config),
            w,
        }
    }

    /// Rotate-half RoPE of one head vector at `pos`.
    pub fn rope(&self, x: &[f32], pos: usize) -> Vec<f32> {
        let half = x.len() / 2;
        let mut out = vec![0.0; x.len()];
        for i in 0..half {
            let angle = pos as f64 * self.inv_freq[i];
            let (s, c) = (angle.sin() as f32, angle.cos() as f32);
            // out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
            out[i] = x[i] * c - x[i + half] * s;
            out[i + half] = x[i + half] * c + x[i] * s;
        }
        out
    }

    /// Logits of every position with full causal attention and positions `0..n`.
    pub fn forward(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        self.forward_visible(tokens, &|i| (0..=i).collect())
    }

    /// Logits of every position under StreamingLLM's visibility (sinks + latest `window` tokens up
    /// to and including the query), with in-cache positions.
    pub fn forward_streaming(&self, tokens: &[u32], sink: usize, window: usize) -> Vec<Vec<f32>> {
        self.forward_visible(tokens, &|i| streaming_visible(i, sink, window))
    }

    /// Logits of every position where query `i` attends to the keys `visible(i)` (ascending, ending
    /// with `i`) at positions equal to their ranks in that list.
    pub fn forward_visible(
        &self,
        tokens: &[u32],
        visible: &dyn Fn(usize) -> Vec<usize>,
    ) -> Vec<Vec<f32>> {
        self.run(tokens, visible).0
    }

    /// Logits and, per layer, every position's residual stream after that layer (before the final
    /// norm), with full causal attention.
    pub fn forward_with_hidden(&self, tokens: &[u32]) -> (Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>) {
        self.run(tokens, &|i| (0..=i).collect())
    }

    fn run(
        &self,
        tokens: &[u32],
        visible: &dyn Fn(usize) -> Vec<usize>,
    ) -> (Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>) {
        let w = self.w;
        let c = &w.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let n_rep = nh / nkv;
        let eps = c.rms_norm_eps;
        let embed = w.get("model.embed_tokens.weight");
        let mut x: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec())
            .collect();
        let n = tokens.len();
        let mut hidden = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let g = |s: &str| w.get(&format!("{p}.{s}"));
            let mut q = Vec::with_capacity(n);
            let mut k = Vec::with_capacity(n);
            let mut v = Vec::with_capacity(n);
            for xi in &x {
                let hn = rms_norm(xi, g("input_layernorm.weight"), eps);
                let mut qi = linear(w, &p, "self_attn.q_proj", &hn, nh * hd);
                let mut ki = linear(w, &p, "self_attn.k_proj", &hn, nkv * hd);
                let vi = linear(w, &p, "self_attn.v_proj", &hn, nkv * hd);
                if c.architecture == Architecture::Qwen3 {
                    for head in qi.chunks_mut(hd) {
                        let normed = rms_norm(head, g("self_attn.q_norm.weight"), eps);
                        head.copy_from_slice(&normed);
                    }
                    for head in ki.chunks_mut(hd) {
                        let normed = rms_norm(head, g("self_attn.k_norm.weight"), eps);
                        head.copy_from_slice(&normed);
                    }
                }
                q.push(qi);
                k.push(ki);
                v.push(vi);
            }
            // Keys rotated at their own index, reused whenever a key's rank equals its index.
            let k_rot_own: Vec<Vec<f32>> = (0..n)
                .map(|j| {
                    k[j].chunks(hd)
                        .flat_map(|head| self.rope(head, j))
                        .collect()
                })
                .collect();
            let scale = 1.0 / (hd as f32).sqrt();
            for i in 0..n {
                let vis = visible(i);
                assert_eq!(vis.last(), Some(&i), "a query must see itself last");
                let qpos = vis.len() - 1;
                let mut attn = vec![0.0f32; nh * hd];
                for head in 0..nh {
                    let kvh = head / n_rep; // repeat_kv
                    let qr = self.rope(&q[i][head * hd..(head + 1) * hd], qpos);
                    let scores: Vec<f32> = vis
                        .iter()
                        .enumerate()
                        .map(|(rank, &j)| {
                            let dot = |kr: &[f32]| {
                                qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale
                            };
                            if rank == j {
                                dot(&k_rot_own[j][kvh * hd..(kvh + 1) * hd])
                            } else {
                                dot(&self.rope(&k[j][kvh * hd..(kvh + 1) * hd], rank))
                            }
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for (pj, &j) in e.iter().zip(&vis) {
                        let vj = &v[j][kvh * hd..(kvh + 1) * hd];
                        for d in 0..hd {
                            attn[head * hd + d] += pj / z * vj[d];
                        }
                    }
                }
                let o = linear(w, &p, "self_attn.o_proj", &attn, h);
                x[i].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let hn = rms_norm(&x[i], g("post_attention_layernorm.weight"), eps);
                let inter = c.intermediate_size;
                let gate = matvec(g("mlp.gate_proj.weight"), &hn, inter);
                let up = matvec(g("mlp.up_proj.weight"), &hn, inter);
                let act: Vec<f32> = gate.iter().zip(&up).map(|(a, b)| silu(*a) * b).collect();
                let down = matvec(g("mlp.down_proj.weight"), &act, h);
                x[i].iter_mut().zip(&down).for_each(|(a, b)| *a += b);
            }
            // Queries read the keys/values computed from this layer's input above, so updating x in
            // place row by row is safe: every q/k/v was computed before the loop.
            hidden.push(x.clone());
        }
        let head = w.get_opt("lm_head.weight").unwrap_or(embed);
        let logits = x
            .iter()
            .map(|xi| {
                let xn = rms_norm(xi, w.get("model.norm.weight"), eps);
                matvec(head, &xn, c.vocab_size)
            })
            .collect();
        (logits, hidden)
    }
}

/// The tokens query `i` sees under a sink + window cache: `0..min(sink, i+1)` and the latest
/// `window` tokens up to `i`.
pub fn streaming_visible(i: usize, sink: usize, window: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..sink.min(i + 1)).collect();
    let start = (i + 1).saturating_sub(window).max(sink.min(i + 1));
    v.extend(start..=i);
    v
}

/// Softmax of `logits / temperature`.
pub fn softmax(logits: &[f32], temperature: f32) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - m) / temperature as f64).exp())
        .collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

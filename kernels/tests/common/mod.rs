//! Test bodies shared by every backend: each kernel against its reference on random inputs, many
//! shapes, odd sizes and ragged batches.
#![allow(dead_code)]

use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use troupe_kernels::accept::verdicts_from_argmax;
use troupe_kernels::{reference, DraftBlock, KernelBackend, PoolLayout, PooledSeq, WeightLayout};

pub mod sampled;

/// `(m, k, n)` shapes: single rows, odd sizes, tile edges, the 64-row limit and past it.
pub const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 64, 64),
    (1, 257, 129),
    (2, 33, 17),
    (5, 96, 300),
    (6, 128, 16),
    (7, 31, 1000),
    (16, 200, 77),
    (33, 64, 513),
    (64, 128, 96),
    (65, 40, 24),
    (130, 264, 300),
];

fn random<B: Backend>(shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), device)
}

/// Largest absolute difference, relative to the reference's largest magnitude (at least 1).
fn rel_err<B: Backend>(got: Tensor<B, 2>, want: Tensor<B, 2>) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let scale = want.clone().abs().max().into_scalar().to_f32().max(1.0);
    let diff = (got.cast(DType::F32) - want.cast(DType::F32)).abs().max();
    diff.into_scalar().to_f32() / scale
}

/// A random `[k, n]` weight as the backend keeps it (`[n, k]` where it keeps projections as
/// checkpoints store them).
fn weight<B: KernelBackend>(k: usize, n: usize, dtype: DType, device: &B::Device) -> Tensor<B, 2> {
    let shape = match B::weight_layout() {
        WeightLayout::InOut => [k, n],
        WeightLayout::OutIn => [n, k],
    };
    random::<B>(shape, device).cast(dtype)
}

/// The projection, with and without the residual, in the weights' dtype.
pub fn linear_matches_reference<B: KernelBackend>(device: &B::Device, dtype: DType, tol: f32) {
    // The kernel itself, whatever `TROUPE_KERNELS` says.
    troupe_kernels::set_enabled(true);
    for &(m, k, n) in SHAPES {
        let x = random::<B>([m, k], device);
        let w = weight::<B>(k, n, dtype, device);
        let r = random::<B>([m, n], device);
        let xw = x.clone().cast(dtype);
        let layout = B::weight_layout();
        let want = reference::project(xw.clone(), &w, layout, None);
        let got = B::skinny_linear(xw.clone(), &w, None);
        let e = rel_err(got, want);
        assert!(e < tol, "linear {m}x{k}x{n} {dtype:?}: error {e}");
        let rw = r.cast(dtype);
        let want = reference::project(xw.clone(), &w, layout, Some(rw.clone()));
        let got = B::skinny_linear(xw, &w, Some(rw));
        let e = rel_err(got, want);
        assert!(e < tol, "linear+residual {m}x{k}x{n} {dtype:?}: error {e}");
    }
}

/// The SwiGLU product of two weights.
pub fn swiglu_matches_reference<B: KernelBackend>(device: &B::Device, dtype: DType, tol: f32) {
    // The kernel itself, whatever `TROUPE_KERNELS` says.
    troupe_kernels::set_enabled(true);
    for &(m, k, n) in SHAPES {
        let x = random::<B>([m, k], device).cast(dtype);
        let g = weight::<B>(k, n, dtype, device);
        let u = weight::<B>(k, n, dtype, device);
        let want = reference::project_swiglu(x.clone(), &g, &u, B::weight_layout());
        let got = B::skinny_swiglu(x, &g, &u);
        let e = rel_err(got, want);
        assert!(e < tol, "swiglu {m}x{k}x{n} {dtype:?}: error {e}");
    }
}

/// Projections and the SwiGLU product on int8 weights against the references on their dequantized
/// values, for every shape whose rows are whole blocks of 32; others are not quantized.
pub fn int8_matches_reference<B: KernelBackend>(device: &B::Device, tol: f32) {
    troupe_kernels::set_enabled(true);
    for &(m, k, n) in SHAPES {
        let w = random::<B>([n, k], device);
        let Some(q) = B::quantize_int8(&w) else {
            assert!(k % 32 != 0, "{n}x{k}: rows of whole blocks are quantized");
            continue;
        };
        assert_eq!(q.dims(), [n, k]);
        let wide = q.dequantize();
        let e = rel_err(wide.clone(), w);
        assert!(
            e < 1.0 / 127.0,
            "{n}x{k}: dequantized within half a step: {e}"
        );
        let x = random::<B>([m, k], device);
        let r = random::<B>([m, n], device);
        let want = reference::linear_t(x.clone(), &wide, Some(r.clone()));
        let e = rel_err(B::skinny_linear_int8(x.clone(), &q, Some(r)), want);
        assert!(e < tol, "int8 linear {m}x{k}x{n}: error {e}");
        let u = B::quantize_int8(&random::<B>([n, k], device)).expect("same shape");
        let want = reference::swiglu_t(x.clone(), &wide, &u.dequantize());
        let e = rel_err(B::skinny_swiglu_int8(x, &q, &u), want);
        assert!(e < tol, "int8 swiglu {m}x{k}x{n}: error {e}");
    }
}

/// Ragged blocks whose drafts agree with the argmax for a chosen number of leading positions.
pub fn greedy_accept_matches_host<B: KernelBackend>(device: &B::Device) {
    // The kernel itself, whatever `TROUPE_KERNELS` says.
    troupe_kernels::set_enabled(true);
    let vocab = 1000;
    // (drafts, leading drafts that agree): an empty block, whole blocks, early misses.
    let plan: &[(usize, usize)] = &[
        (0, 0),
        (4, 4),
        (4, 0),
        (1, 1),
        (7, 3),
        (2, 1),
        (9, 9),
        (3, 2),
    ];
    let rows: usize = plan.iter().map(|(d, _)| d + 1).sum();
    let logits = random::<B>([rows, vocab], device);
    let argmax: Vec<u32> = logits
        .clone()
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let mut start = 0;
    let drafts: Vec<Vec<u32>> = plan
        .iter()
        .map(|&(d, agree)| {
            let block = (0..d)
                .map(|i| {
                    let a = argmax[start + i];
                    if i < agree {
                        a
                    } else {
                        (a + 1 + i as u32) % vocab as u32
                    }
                })
                .collect();
            start += d + 1;
            block
        })
        .collect();
    let blocks: Vec<DraftBlock<'_>> = drafts.iter().map(|d| DraftBlock { drafts: d }).collect();
    let want = verdicts_from_argmax(&argmax, &blocks);
    for (v, &(_, agree)) in want.iter().zip(plan) {
        assert_eq!(v.accepted, agree, "the plan's agreement");
    }
    assert_eq!(B::greedy_accept(logits.clone(), &blocks), want, "kernel");
    assert_eq!(reference::greedy_accept(logits, &blocks), want, "reference");
}

/// Pool layouts: GQA groups of 1, 2 and 4, no sinks, a window longer than every stream.
const LAYOUTS: &[PoolLayout] = &[
    PoolLayout {
        sink: 2,
        window: 5,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    },
    PoolLayout {
        sink: 0,
        window: 4,
        heads: 2,
        kv_heads: 2,
        head_dim: 16,
    },
    PoolLayout {
        sink: 3,
        window: 6,
        heads: 8,
        kv_heads: 2,
        head_dim: 8,
    },
    PoolLayout {
        sink: 1,
        window: 200,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
    },
];

/// Sessions as `(seen, step keys, queries)`: empty, short, full, wrapped many times, and a step
/// whose first keys were scratch from before (more keys than queries).
const SESSIONS: &[(u64, usize, usize)] = &[
    (0, 3, 3),
    (1, 1, 1),
    (2, 2, 2),
    (5, 4, 4),
    (7, 1, 1),
    (30, 5, 5),
    (100, 3, 2),
    (9, 6, 6),
];

/// Rotate-half RoPE rows `[positions, head_dim]`, each half repeated.
fn rope_table(positions: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for p in 0..positions {
        for i in 0..hd {
            let f = 1.0 / 10000f64.powf(2.0 * (i % (hd / 2)) as f64 / hd as f64);
            cos.push((p as f64 * f).cos() as f32);
            sin.push((p as f64 * f).sin() as f32);
        }
    }
    (cos, sin)
}

fn host_rotate(x: &[f32], cos: &[f32], sin: &[f32], pos: usize) -> Vec<f64> {
    let hd = x.len();
    let half = hd / 2;
    (0..hd)
        .map(|d| {
            let other = if d < half { -x[d + half] } else { x[d - half] };
            x[d] as f64 * cos[pos * hd + d] as f64 + other as f64 * sin[pos * hd + d] as f64
        })
        .collect()
}

fn uniform(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The signature [`KernelBackend::pooled_attention`] and its reference share.
type Attend<B> = fn(
    Tensor<B, 2>,
    Tensor<B, 2>,
    Tensor<B, 2>,
    &Tensor<B, 4>,
    &Tensor<B, 4>,
    &Tensor<B, 2>,
    &Tensor<B, 2>,
    &[PooledSeq],
    &PoolLayout,
) -> Tensor<B, 2>;

/// Pooled attention against a host computation from first principles: the stream's held tokens
/// are the sinks and the latest `window` committed ones, a query sees the sinks and the latest
/// `window` context keys up to itself, and every position is a rank in what it sees.
pub fn pooled_attention_matches_host<B: KernelBackend>(device: &B::Device, tol: f32) {
    // The kernel itself, whatever `TROUPE_KERNELS` says.
    troupe_kernels::set_enabled(true);
    let mut seed = 7u64;
    for layout in LAYOUTS {
        let (h, kvh, hd) = (layout.heads, layout.kv_heads, layout.head_dim);
        let cap = layout.capacity();
        let slots = SESSIONS.len() + 1;
        let pool_k = uniform(slots * kvh * cap * hd, &mut seed);
        let pool_v = uniform(slots * kvh * cap * hd, &mut seed);
        let step_rows: usize = SESSIONS.iter().map(|s| s.1).sum();
        let q_rows: usize = SESSIONS.iter().map(|s| s.2).sum();
        let step_k = uniform(step_rows * kvh * hd, &mut seed);
        let step_v = uniform(step_rows * kvh * hd, &mut seed);
        let q = uniform(q_rows * h * hd, &mut seed);
        // Positions up to the window's, and a table that reaches further (which a kernel may use
        // for the later queries of a step).
        let (cos, sin) = rope_table(cap + 16, hd);
        // Slots spread out; query rows in the reverse order of the step rows.
        let mut seqs = Vec::new();
        let (mut k0, mut q_end) = (0, q_rows);
        for (i, &(seen, keys, queries)) in SESSIONS.iter().enumerate() {
            seqs.push(PooledSeq {
                slot: (i * 3 + 1) % slots,
                seen,
                keys: k0..k0 + keys,
                queries: q_end - queries..q_end,
            });
            k0 += keys;
            q_end -= queries;
        }

        let mut want = vec![0f64; q_rows * h * hd];
        for seq in &seqs {
            let seen = seq.seen as usize;
            let stream_slot = |t: usize| {
                if t < layout.sink {
                    t
                } else {
                    layout.sink + (t - layout.sink) % layout.window
                }
            };
            // Context rows: the held tokens in stream order, then the step's.
            let mut ctx: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
            let held = (0..seen).filter(|&t| t < layout.sink || t + layout.window >= seen);
            for t in held {
                let s = stream_slot(t);
                let at = |g: usize| ((seq.slot * kvh + g) * cap + s) * hd;
                let row = |pool: &[f32]| {
                    (0..kvh)
                        .flat_map(|g| pool[at(g)..at(g) + hd].to_vec())
                        .collect()
                };
                ctx.push((row(&pool_k), row(&pool_v)));
            }
            for r in seq.keys.clone() {
                let span = r * kvh * hd..(r + 1) * kvh * hd;
                ctx.push((step_k[span.clone()].to_vec(), step_v[span].to_vec()));
            }
            let first_query = ctx.len() - seq.queries.len();
            for (i, row) in seq.queries.clone().enumerate() {
                let p = first_query + i;
                let seen_keys: Vec<usize> = (0..=p)
                    .filter(|&j| j < layout.sink || j + layout.window > p)
                    .collect();
                let q_pos = seen_keys.len() - 1;
                for head in 0..h {
                    let g = head / (h / kvh);
                    let qh = &q[(row * h + head) * hd..(row * h + head + 1) * hd];
                    let qr = host_rotate(qh, &cos, &sin, q_pos);
                    let scores: Vec<f64> = seen_keys
                        .iter()
                        .enumerate()
                        .map(|(rank, &j)| {
                            let kr = host_rotate(&ctx[j].0[g * hd..(g + 1) * hd], &cos, &sin, rank);
                            kr.iter().zip(&qr).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let top = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
                    let total: f64 = w.iter().sum();
                    for d in 0..hd {
                        let o: f64 = seen_keys
                            .iter()
                            .zip(&w)
                            .map(|(&j, w)| w * ctx[j].1[g * hd + d] as f64)
                            .sum();
                        want[(row * h + head) * hd + d] = o / total;
                    }
                }
            }
        }

        let t2 = |v: &[f32], rows: usize, cols: usize| {
            Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [rows, cols]), device)
        };
        let t4 = |v: &[f32]| {
            Tensor::<B, 4>::from_data(TensorData::new(v.to_vec(), [slots, kvh, cap, hd]), device)
        };
        let want = Tensor::<B, 2>::from_data(
            TensorData::new(want.iter().map(|&x| x as f32).collect(), [q_rows, h * hd]),
            device,
        );
        let (qt, sk, sv, pk, pv) = (
            t2(&q, q_rows, h * hd),
            t2(&step_k, step_rows, kvh * hd),
            t2(&step_v, step_rows, kvh * hd),
            t4(&pool_k),
            t4(&pool_v),
        );
        for positions in [cap, cap + 16] {
            let (ct, st) = (
                t2(&cos[..positions * hd], positions, hd),
                t2(&sin[..positions * hd], positions, hd),
            );
            let paths: [(&str, Attend<B>); 2] = [
                ("backend", B::pooled_attention),
                ("reference", troupe_kernels::pool::reference::<B>),
            ];
            for (path, attend) in paths {
                let got = attend(
                    qt.clone(),
                    sk.clone(),
                    sv.clone(),
                    &pk,
                    &pv,
                    &ct,
                    &st,
                    &seqs,
                    layout,
                );
                let e = rel_err(got, want.clone());
                assert!(
                    e < tol,
                    "pooled attention, {path}, {layout:?}, {positions} positions: error {e}"
                );
            }
        }
    }
}

//! Rejection-sampling acceptance against a host computation from first principles, in f64.

use burn::prelude::*;
use troupe_kernels::sampled::sampled_accept;
use troupe_kernels::{BlockVerdict, KernelBackend, SampledBlock};

use super::uniform;

/// Uniforms in `[0, 1)`.
fn unit(n: usize, seed: &mut u64) -> Vec<f32> {
    uniform(n, seed)
        .into_iter()
        .map(|x| (x + 1.0) / 2.0)
        .collect()
}

/// The verifier's distribution at one row: softmax of `logits / t` cut to its smallest nucleus of
/// mass `top_p` and renormalised, one-hot at the argmax at 0. `None` when the nucleus's edge is
/// within [`MARGIN`] of `top_p`, where f32 sums on the device could cut elsewhere.
fn target(logits: &[f32], t: f32, top_p: f32) -> Option<Vec<f64>> {
    let p = softmax(logits, t);
    if top_p >= 1.0 || t == 0.0 {
        return Some(p);
    }
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let mut cum = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        let before = cum;
        cum += p[i];
        if (before - top_p as f64).abs() < MARGIN || (cum - top_p as f64).abs() < MARGIN {
            return None;
        }
        if cum >= top_p as f64 {
            let keep = &order[..=rank];
            let mut kept = vec![0.0; p.len()];
            for &j in keep {
                kept[j] = p[j] / cum;
            }
            return Some(kept);
        }
    }
    Some(p)
}

/// Softmax of `logits / t`, one-hot at the argmax at 0.
fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
    if t == 0.0 {
        let best = (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
        return (0..logits.len()).map(|i| f64::from(i == best)).collect();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) / t as f64).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// How far a decision is from flipping: the accept test's margin, or the draw's distance to the
/// nearest edge of the cumulative distribution.
const MARGIN: f64 = 1e-4;

/// One block decided on the host; `None` when a uniform falls within [`MARGIN`] of an edge, where
/// f32 rounding on the device could decide otherwise.
fn host_block(rows: &[Vec<f32>], b: &Block) -> Option<BlockVerdict> {
    let n = b.drafts.len();
    let q_row = |i: usize| -> Vec<f64> {
        match &b.probs {
            Some(q) => q[i].iter().map(|&x| x as f64).collect(),
            None => (0..rows[i].len())
                .map(|t| f64::from(t == b.drafts[i] as usize))
                .collect(),
        }
    };
    let mut accepted = n;
    for (i, row) in rows.iter().enumerate().take(n) {
        let (p, q) = (target(row, b.temperature, b.top_p)?, q_row(i));
        let d = b.drafts[i] as usize;
        let lhs = b.accept_u[i] as f64 * q[d];
        if b.temperature > 0.0 && (lhs - p[d]).abs() < MARGIN {
            return None;
        }
        if !(q[d] > 0.0 && lhs < p[d]) {
            accepted = i;
            break;
        }
    }
    let p = target(&rows[accepted], b.temperature, b.top_p)?;
    let mut f: Vec<f64> = if accepted < n {
        p.iter()
            .zip(q_row(accepted))
            .map(|(a, b)| (a - b).max(0.0))
            .collect()
    } else {
        p.clone()
    };
    if f.iter().sum::<f64>() == 0.0 {
        f = p;
    }
    let goal = b.draw_u as f64 * f.iter().sum::<f64>();
    let mut cum = 0.0;
    for (t, &x) in f.iter().enumerate() {
        if x > 0.0
            && b.temperature > 0.0
            && ((cum - goal).abs() < MARGIN || (cum + x - goal).abs() < MARGIN)
        {
            return None;
        }
        cum += x;
        if cum > goal {
            return Some(BlockVerdict {
                accepted,
                token: t as u32,
            });
        }
    }
    unreachable!("the draw lies inside the mass")
}

struct Block {
    drafts: Vec<u32>,
    probs: Option<Vec<Vec<f32>>>,
    temperature: f32,
    top_p: f32,
    accept_u: Vec<f32>,
    draw_u: f32,
}

/// Ragged blocks at several temperatures (greedy among them), with and without the drafter's
/// distributions, drafts that mostly follow the verifier's argmax and some that do not.
pub fn sampled_accept_matches_host<B: KernelBackend>(device: &B::Device) {
    // The kernel itself, whatever `TROUPE_KERNELS` says.
    troupe_kernels::set_enabled(true);
    let vocab = 300;
    // (drafts, temperature, with the drafter's distributions, a draft off the argmax, top_p)
    let plan: &[(usize, f32, bool, Option<usize>, f32)] = &[
        (0, 1.0, false, None, 1.0),
        (4, 0.7, true, None, 0.9),
        (4, 0.0, false, None, 1.0),
        (1, 1.5, false, Some(0), 0.95),
        (7, 1.0, true, Some(5), 0.8),
        (3, 0.0, true, Some(1), 0.5),
        (0, 0.5, false, None, 0.6),
        (6, 0.8, false, Some(2), 0.5),
        (5, 0.0, false, Some(3), 1.0),
        (9, 0.3, true, None, 1.0),
        (5, 1.2, false, None, 0.7),
    ];
    let rows: usize = plan.iter().map(|p| p.0 + 1).sum();
    let mut seed = 11u64;
    // Each row has one favourite, so the drafts that follow the argmax are mostly accepted.
    let mut host_logits: Vec<f32> = uniform(rows * vocab, &mut seed)
        .iter()
        .map(|x| 2.0 * x)
        .collect();
    for (r, u) in unit(rows, &mut seed).into_iter().enumerate() {
        host_logits[r * vocab + (u * vocab as f32) as usize % vocab] += 6.0;
    }
    let logits =
        Tensor::<B, 2>::from_data(TensorData::new(host_logits.clone(), [rows, vocab]), device);
    let row_of = |r: usize| host_logits[r * vocab..(r + 1) * vocab].to_vec();
    let mut start = 0;
    let mut blocks = Vec::new();
    for &(n, temperature, with_probs, miss, top_p) in plan {
        let rows: Vec<Vec<f32>> = (start..=start + n).map(row_of).collect();
        start += n + 1;
        let drafts: Vec<u32> = (0..n)
            .map(|i| {
                let p = softmax(&rows[i], 0.0);
                let best = p.iter().position(|&x| x == 1.0).unwrap();
                (if miss == Some(i) { best + 1 } else { best } % vocab) as u32
            })
            .collect();
        let probs = with_probs.then(|| {
            drafts
                .iter()
                .map(|&d| {
                    let noise = unit(vocab, &mut seed);
                    let total: f32 = noise.iter().sum();
                    (0..vocab)
                        .map(|t| 0.5 * noise[t] / total + if t == d as usize { 0.5 } else { 0.0 })
                        .collect()
                })
                .collect()
        });
        // A nucleus whose edge is within a hair of its mass is widened a little.
        let mut top_p = top_p;
        while rows.iter().any(|r| target(r, temperature, top_p).is_none()) {
            top_p += 0.013;
        }
        // Uniforms within a hair of an edge are drawn again.
        let mut block = Block {
            drafts,
            probs,
            temperature,
            top_p,
            accept_u: Vec::new(),
            draw_u: 0.0,
        };
        let want = loop {
            block.accept_u = if temperature > 0.0 {
                unit(n, &mut seed)
            } else {
                vec![0.0; n]
            };
            block.draw_u = if temperature > 0.0 {
                unit(1, &mut seed)[0]
            } else {
                0.0
            };
            if let Some(v) = host_block(&rows, &block) {
                break v;
            }
        };
        blocks.push((block, want));
    }
    let views: Vec<SampledBlock<'_>> = blocks
        .iter()
        .map(|(b, _)| SampledBlock {
            drafts: &b.drafts,
            draft_probs: b.probs.as_deref(),
            temperature: b.temperature,
            top_p: b.top_p,
            accept_u: &b.accept_u,
            draw_u: b.draw_u,
        })
        .collect();
    let want: Vec<BlockVerdict> = blocks.iter().map(|(_, v)| *v).collect();
    // The case is only worth its name if sampled and greedy blocks each end both ways.
    let ended = |sampled: bool, whole: bool| {
        want.iter()
            .zip(plan)
            .any(|(v, p)| (p.1 > 0.0) == sampled && p.0 > 0 && (v.accepted == p.0) == whole)
    };
    assert!(ended(true, true) && ended(true, false) && ended(false, true) && ended(false, false));
    assert_eq!(B::sampled_accept(logits.clone(), &views), want, "backend");
    assert_eq!(sampled_accept(logits, &views), want, "reference");
}

/// A draft the nucleus leaves out has `p(d) = 0`, so even a zero uniform rejects it (the test is
/// strict), and the block adds the nucleus's one token.
pub fn draft_outside_the_nucleus_is_rejected<B: KernelBackend>(device: &B::Device) {
    // The kernel itself, whatever `TROUPE_KERNELS` says.
    troupe_kernels::set_enabled(true);
    let vocab = 8;
    // Row 0 keeps only token 0 at top_p 0.5 (p = e^5 / (e^5 + e^4 + 6) ≈ 0.71).
    let mut host_logits = vec![0.0f32; 2 * vocab];
    host_logits[0] = 5.0;
    host_logits[1] = 4.0;
    host_logits[vocab] = 1.0;
    let logits = Tensor::<B, 2>::from_data(TensorData::new(host_logits, [2, vocab]), device);
    let block = SampledBlock {
        drafts: &[7],
        draft_probs: None,
        temperature: 1.0,
        top_p: 0.5,
        accept_u: &[0.0],
        draw_u: 0.5,
    };
    let want = vec![BlockVerdict {
        accepted: 0,
        token: 0,
    }];
    assert_eq!(B::sampled_accept(logits.clone(), &[block]), want, "backend");
    assert_eq!(sampled_accept(logits, &[block]), want, "reference");
}

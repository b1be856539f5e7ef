//! The block drafter against a plain-Rust reference: its forward (one anchor at a time, the
//! context strictly before the anchor, the block bidirectional), its incremental context fed by
//! the verifier's captured states, the batched training layout and its per-anchor visibility,
//! and training that lowers the loss.

mod common;

use std::collections::HashMap;

use burn::prelude::*;
use common::reference::{matvec, rms_norm, silu, Reference};
use common::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use troupe_engine::block::train::{
    block_batch, generate_samples, Anchor, BlockTrainConfig, BlockTrainer, Sample, Samples,
};
use troupe_engine::block::{
    drafter_from_verifier, load_block_model, save_block_drafter, BlockModel,
};
use troupe_engine::{
    BlockDrafter, DraftRequest, Drafter, Engine, HiddenStates, Linear, LinearWeight, ModelConfig,
    SamplingParams, Verifier, WindowSpec,
};

const TAPS: [usize; 2] = [0, 1];
const BLOCK: usize = 6;

/// A drafter for a tiny random verifier, with a random context projection and mask (the grown
/// one reads only the deepest tap), saved and loaded back; and its tensors as the file holds them.
struct Setup {
    verifier: Checkpoint,
    drafter: BlockModel<B>,
    host: HashMap<String, Vec<f32>>,
    config: ModelConfig,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let verifier = Checkpoint::write(&qwen3_config(), 71, Format::F32);
    let model = verifier.load();
    let mut d = drafter_from_verifier(&model, TAPS.to_vec(), 1, BLOCK).unwrap();
    let h = model.config.hidden_size;
    let device = Default::default();
    <B as Backend>::seed(&device, 5);
    let normal = |shape: [usize; 2], std: f64| {
        Tensor::<B, 2>::random(shape, burn::tensor::Distribution::Normal(0.0, std), &device)
    };
    d.fc = Linear {
        weight: LinearWeight::Float(normal([h, TAPS.len() * h], 0.2)),
        bias: None,
    };
    d.mask = normal([1, h], 0.5).squeeze_dim(0);
    d.hidden_norm = normal([1, h], 0.1).squeeze_dim::<1>(0).add_scalar(1.0);
    let dir = tempfile::tempdir().unwrap();
    save_block_drafter(&d, dir.path(), None).unwrap();
    let loaded = load_block_model::<B>(dir.path(), &device).unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let host = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values: Vec<f32> = bytemuck::cast_slice(view.data()).to_vec();
            (name, values)
        })
        .collect();
    Setup {
        config: loaded.stack.config.clone(),
        verifier,
        drafter: loaded,
        host,
        _dir: dir,
    }
}

/// The verifier's tapped states of every position of `tokens`, by the reference forward: per
/// position the tapped layers' outputs concatenated.
fn reference_states(s: &Setup, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (_, hidden) = Reference::new(&s.verifier.weights).forward_with_hidden(tokens);
    (0..tokens.len())
        .map(|p| TAPS.iter().flat_map(|&l| hidden[l][p].clone()).collect())
        .collect()
}

/// Logits of every row of one block of `len` rows, computed plainly: the fused context of
/// `states` (the positions before the anchor) at positions `0..ctx`, the block `[known…, mask…]`
/// at `ctx..ctx + len`, each row attending to the whole context and the whole block.
fn reference_block(s: &Setup, states: &[Vec<f32>], known: &[u32], len: usize) -> Vec<Vec<f32>> {
    let w = |name: &str| -> &[f32] {
        s.host
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    };
    let c = &s.config;
    let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let eps = c.rms_norm_eps;
    let rope = Reference::new(&s.verifier.weights);
    let ctx = states.len();
    let fused: Vec<Vec<f32>> = states
        .iter()
        .map(|st| rms_norm(&matvec(w("fc.weight"), st, h), w("hidden_norm.weight"), eps))
        .collect();
    let embed = w("model.embed_tokens.weight");
    let mut x: Vec<Vec<f32>> = (0..len)
        .map(|r| match known.get(r) {
            Some(&t) => embed[t as usize * h..(t as usize + 1) * h].to_vec(),
            None => w("mask_embedding").to_vec(),
        })
        .collect();
    let p = "model.layers.0";
    let g = |n: &str| w(&format!("{p}.{n}"));
    let heads_norm = |v: &mut Vec<f32>, norm: &[f32]| {
        for head in v.chunks_mut(hd) {
            let n = rms_norm(head, norm, eps);
            head.copy_from_slice(&n);
        }
    };
    let rotate = |v: &[f32], pos: usize| -> Vec<f32> {
        v.chunks(hd).flat_map(|head| rope.rope(head, pos)).collect()
    };
    // Keys and values: the context's from the fused states, then the block's from its rows.
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (i, f) in fused.iter().enumerate() {
        let mut k = matvec(g("self_attn.k_proj.weight"), f, nkv * hd);
        heads_norm(&mut k, g("self_attn.k_norm.weight"));
        keys.push(rotate(&k, i));
        values.push(matvec(g("self_attn.v_proj.weight"), f, nkv * hd));
    }
    let mut queries = Vec::new();
    for (r, xr) in x.iter().enumerate() {
        let hn = rms_norm(xr, g("input_layernorm.weight"), eps);
        let mut q = matvec(g("self_attn.q_proj.weight"), &hn, nh * hd);
        let mut k = matvec(g("self_attn.k_proj.weight"), &hn, nkv * hd);
        heads_norm(&mut q, g("self_attn.q_norm.weight"));
        heads_norm(&mut k, g("self_attn.k_norm.weight"));
        queries.push(rotate(&q, ctx + r));
        keys.push(rotate(&k, ctx + r));
        values.push(matvec(g("self_attn.v_proj.weight"), &hn, nkv * hd));
    }
    let scale = 1.0 / (hd as f32).sqrt();
    for (r, q) in queries.iter().enumerate() {
        let mut attn = vec![0f32; nh * hd];
        for head in 0..nh {
            let kv = head / (nh / nkv);
            let qh = &q[head * hd..(head + 1) * hd];
            let scores: Vec<f32> = keys
                .iter()
                .map(|k| {
                    qh.iter()
                        .zip(&k[kv * hd..(kv + 1) * hd])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        * scale
                })
                .collect();
            let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for (pj, v) in e.iter().zip(&values) {
                for d in 0..hd {
                    attn[head * hd + d] += pj / z * v[kv * hd + d];
                }
            }
        }
        let o = matvec(g("self_attn.o_proj.weight"), &attn, h);
        x[r].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let hn = rms_norm(&x[r], g("post_attention_layernorm.weight"), eps);
        let inter = c.intermediate_size;
        let gate = matvec(g("mlp.gate_proj.weight"), &hn, inter);
        let up = matvec(g("mlp.up_proj.weight"), &hn, inter);
        let act: Vec<f32> = gate.iter().zip(&up).map(|(a, b)| silu(*a) * b).collect();
        let down = matvec(g("mlp.down_proj.weight"), &act, h);
        x[r].iter_mut().zip(&down).for_each(|(a, b)| *a += b);
    }
    x.iter()
        .map(|xr| {
            matvec(
                embed,
                &rms_norm(xr, w("model.norm.weight"), eps),
                c.vocab_size,
            )
        })
        .collect()
}

/// Prefills `tokens` into the verifier as `seq` and hands the drafter the tokens and the
/// verifier's captured states of every position, as the runtime does.
fn feed(verifier: &mut Engine<B>, drafter: &mut BlockDrafter<B>, seq: u64, tokens: &[u32]) {
    let spec = WindowSpec::new(4, 64).unwrap();
    verifier.open(seq, spec, 0).unwrap();
    drafter.open(seq, spec, 0).unwrap();
    let out = verifier
        .verify(&[greedy_work(seq, tokens.to_vec())])
        .unwrap();
    drafter.observe(seq, tokens).unwrap();
    drafter.observe_hidden(seq, 0, &out[0].hidden).unwrap();
}

#[test]
fn drafts_match_a_plain_reference_one_anchor_at_a_time() {
    let s = setup();
    let mut verifier = Engine::new(s.verifier.load());
    verifier.set_hidden_layers(TAPS.to_vec());
    let mut drafter = BlockDrafter::new(s.drafter.clone());
    // Two sequences of different context lengths in one batched forward (the shorter padded),
    // one drafting after its anchor alone, one (pipelined) after two assumed tokens.
    let a = random_tokens(81, 10, 256);
    let b = random_tokens(82, 17, 256);
    feed(&mut verifier, &mut drafter, 1, &a);
    feed(&mut verifier, &mut drafter, 2, &b);
    // The anchors: the verifier's next tokens, whose states the drafter has not been given.
    drafter.observe(1, &[7]).unwrap();
    drafter.observe(2, &[9]).unwrap();
    let request = |seq, assumed: Vec<u32>, k| DraftRequest {
        seq,
        assumed,
        k,
        params: SamplingParams::greedy(),
    };
    // Blocks of 6 and 5 rows: the shorter runs beside an absent row nothing may see.
    let requests = [request(1, vec![], BLOCK - 1), request(2, vec![3, 4], 2)];
    let got = drafter.draft_logits(&requests).unwrap();
    assert_eq!(got[0].len(), BLOCK - 1);
    assert_eq!(got[1].len(), 2);

    let want_a = reference_block(&s, &reference_states(&s, &a), &[7], BLOCK);
    let want_b = reference_block(&s, &reference_states(&s, &b), &[9, 3, 4], 5);
    assert_rows_close("anchor alone", &got[0], &want_a[1..], 2e-3);
    assert_rows_close("anchor and two assumed", &got[1], &want_b[3..5], 2e-3);
    // Alone, the shorter block drafts the same.
    let alone = drafter.draft_logits(&requests[1..]).unwrap();
    assert_rows_close("the shorter block alone", &alone[0], &want_b[3..5], 2e-3);
    // The drafts are those rows' argmax.
    let drafts = drafter.draft(&requests).unwrap();
    let argmaxes: Vec<u32> = got[0].iter().map(|r| argmax(r)).collect();
    assert_eq!(drafts[0].tokens, argmaxes);
    assert!(
        drafts[0].probs.is_none(),
        "block drafts are one-hot proposals"
    );

    // A block past the drafter's size drafts nothing; an unknown sequence is an error.
    let full = drafter.draft(&[request(1, vec![1; BLOCK - 1], 2)]).unwrap();
    assert!(full[0].tokens.is_empty());
    assert!(drafter.draft(&[request(5, vec![], 2)]).is_err());
    // States of the wrong width are refused, not mixed in.
    assert!(drafter
        .observe_hidden(1, 10, &[vec![vec![0.0; 3]]])
        .is_err());
}

#[test]
fn states_given_twice_are_taken_once_and_the_context_keeps_its_window() {
    let s = setup();
    let mut verifier = Engine::new(s.verifier.load());
    verifier.set_hidden_layers(TAPS.to_vec());
    let mut drafter = BlockDrafter::new(s.drafter.clone());
    let spec = WindowSpec::new(2, 6).unwrap();
    verifier.open(1, spec, 0).unwrap();
    drafter.open(1, spec, 0).unwrap();
    let tokens = random_tokens(83, 5, 256);
    let out = verifier.verify(&[greedy_work(1, tokens.clone())]).unwrap();
    drafter.observe(1, &tokens).unwrap();
    drafter.observe_hidden(1, 0, &out[0].hidden).unwrap();
    // A replay (after a verifier restart) gives the same positions again: nothing is added.
    drafter.observe_hidden(1, 0, &out[0].hidden).unwrap();
    assert_eq!(drafter.context_len(1), Some(5));
    let more = random_tokens(84, 6, 256);
    let out = verifier.verify(&[greedy_work(1, more.clone())]).unwrap();
    drafter.observe(1, &more).unwrap();
    drafter.observe_hidden(1, 5, &out[0].hidden).unwrap();
    assert_eq!(drafter.context_len(1), Some(8), "2 sinks + a window of 6");
    assert_eq!(
        drafter.kv_bytes(spec),
        2 * 32 * 8 * 4,
        "keys and values, 1 layer, f32"
    );
}

/// Samples of `tokens` with the reference's states.
fn samples(s: &Setup, tokens: &[Vec<u32>]) -> Samples {
    let samples = tokens
        .iter()
        .map(|t| Sample {
            tokens: t.clone(),
            prompt_len: 4,
            states: reference_states(s, &t[..t.len() - 1]).concat(),
        })
        .collect();
    Samples {
        samples,
        width: TAPS.len() * s.config.hidden_size,
    }
}

fn block_rows(s: &Setup, data: &Samples, anchors: &[Anchor]) -> Vec<Vec<f32>> {
    let batch = block_batch::<B>(data, &[0], anchors, BLOCK, 7.0, &Default::default());
    troupe_engine::engine::logits_to_host(s.drafter.batch_logits(batch)).unwrap()
}

#[test]
fn training_blocks_see_only_the_context_before_their_anchor() {
    let s = setup();
    let tokens = random_tokens(91, 24, 256);
    let data = samples(&s, std::slice::from_ref(&tokens));
    let anchors = [
        Anchor {
            sample: 0,
            at: 6,
            known: 0,
            len: BLOCK,
        },
        Anchor {
            sample: 0,
            at: 12,
            known: 2,
            len: 5,
        },
    ];
    let rows = block_rows(&s, &data, &anchors);
    let states = reference_states(&s, &tokens);
    for (n, a) in anchors.iter().enumerate() {
        let want = reference_block(&s, &states[..a.at], &tokens[a.at..=a.at + a.known], a.len);
        assert_rows_close(
            &format!("anchor at {}", a.at),
            &rows[n * BLOCK..n * BLOCK + a.len],
            &want,
            2e-3,
        );
    }
    // Changing the states of the anchor's position and later leaves its block as it was;
    // changing one before it does not.
    let perturbed = |from: usize, to: usize| {
        let mut d = data.clone();
        let w = d.width;
        d.samples[0].states[from * w..to * w]
            .iter_mut()
            .for_each(|x| *x = -*x * 3.0 + 1.0);
        block_rows(&s, &d, &anchors[..1])
    };
    let later = perturbed(6, 23);
    assert!(
        max_rows_diff(&later, &rows[..BLOCK]) < 1e-5,
        "a block saw states at or after its anchor"
    );
    let earlier = perturbed(5, 6);
    assert!(
        max_rows_diff(&earlier, &rows[..BLOCK]) > 1e-3,
        "the check cannot fail: the context before the anchor changes nothing"
    );
}

#[test]
fn training_lowers_the_loss_in_a_few_steps() {
    let s = setup();
    let mut verifier = Engine::new(s.verifier.load());
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| random_tokens(100 + i, 8, 256)).collect();
    let data = generate_samples(&mut verifier, &TAPS, &prompts, 24, 4, |_| {}).unwrap();
    assert_eq!(data.samples.len(), 8);
    assert_eq!(data.samples[0].tokens.len(), 32);
    assert_eq!(data.samples[0].states.len(), 31 * data.width);
    let cfg = BlockTrainConfig {
        layers: 1,
        taps: TAPS.to_vec(),
        block_size: BLOCK,
        steps: 15,
        batch: 4,
        anchors: 4,
        max_known: 2,
        lr: 3e-3,
        warmup: 2,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(3);
    let which: Vec<usize> = (0..8).collect();
    let fixed = troupe_engine::block::train::random_anchors(&data, &which, 4, BLOCK, 2, &mut rng);
    let loss = |m: &BlockModel<B>| -> f32 {
        let b = block_batch::<B>(&data, &which, &fixed, BLOCK, 7.0, &Default::default());
        m.block_loss(b).into_scalar()
    };
    let before = loss(&s.drafter);
    type Train = burn::backend::Autodiff<B>;
    let mut trainer = BlockTrainer::<Train>::new(&s.drafter, cfg);
    for _ in 0..15 {
        let l = trainer.step(&data, &mut rng).unwrap();
        assert!(l.is_finite());
    }
    let after = loss(&trainer.inner());
    assert!(
        after < before * 0.8,
        "15 steps took the loss from {before:.3} only to {after:.3}"
    );
}

#[test]
fn a_fork_drafts_as_its_source_and_then_keeps_to_itself() {
    let s = setup();
    let mut verifier = Engine::new(s.verifier.load());
    verifier.set_hidden_layers(TAPS.to_vec());
    let mut drafter = BlockDrafter::new(s.drafter.clone());
    let tokens = random_tokens(85, 12, 256);
    feed(&mut verifier, &mut drafter, 1, &tokens);
    drafter.observe(1, &[5]).unwrap();
    let spec = WindowSpec::new(4, 64).unwrap();
    drafter.fork(1, 2, spec, 0, &[]).unwrap();
    assert!(
        drafter.fork(1, 2, spec, 0, &[]).is_err(),
        "2 is open already"
    );
    let request = |seq| DraftRequest {
        seq,
        assumed: vec![],
        k: 3,
        params: SamplingParams::greedy(),
    };
    let before = drafter.draft_logits(&[request(1), request(2)]).unwrap();
    assert_eq!(
        before[0], before[1],
        "the fork drafts exactly as its source"
    );
    // The source moves on; the fork's context stays where it was.
    verifier.fork(1, 2, 0).unwrap();
    let out = verifier.verify(&[greedy_work(1, vec![5])]).unwrap();
    drafter.observe(1, &[6]).unwrap();
    drafter.observe_hidden(1, 12, &out[0].hidden).unwrap();
    assert_eq!(drafter.context_len(1), Some(13));
    assert_eq!(drafter.context_len(2), Some(12));
    let after = drafter.draft_logits(&[request(2)]).unwrap();
    assert_eq!(after[0], before[1]);
}

#[test]
fn one_pass_over_many_sequences_states_equals_one_per_sequence() {
    let s = setup();
    let mut verifier = Engine::new(s.verifier.load());
    verifier.set_hidden_layers(TAPS.to_vec());
    let spec = WindowSpec::new(4, 64).unwrap();
    let (a, b) = (random_tokens(86, 9, 256), random_tokens(87, 14, 256));
    let mut outs = Vec::new();
    for (seq, t) in [(1, &a), (2, &b)] {
        verifier.open(seq, spec, 0).unwrap();
        outs.push(
            verifier
                .verify(&[greedy_work(seq, t.clone())])
                .unwrap()
                .remove(0),
        );
    }
    let mut one_by_one = BlockDrafter::new(s.drafter.clone());
    let mut together = BlockDrafter::new(s.drafter.clone());
    for d in [&mut one_by_one, &mut together] {
        for (seq, t) in [(1, &a), (2, &b)] {
            d.open(seq, spec, 0).unwrap();
            d.observe(seq, t).unwrap();
            d.observe(seq, &[3]).unwrap();
        }
    }
    one_by_one.observe_hidden(1, 0, &outs[0].hidden).unwrap();
    one_by_one.observe_hidden(2, 0, &outs[1].hidden).unwrap();
    let states = [
        HiddenStates {
            seq: 1,
            from: 0,
            hidden: &outs[0].hidden,
        },
        HiddenStates {
            seq: 2,
            from: 0,
            hidden: &outs[1].hidden,
        },
        // An unknown sequence is reported, and the others are still taken.
        HiddenStates {
            seq: 9,
            from: 0,
            hidden: &outs[1].hidden,
        },
    ];
    assert!(together.observe_hidden_many(&states).is_err());
    assert_eq!(together.context_len(1), Some(9));
    assert_eq!(together.context_len(2), Some(14));
    let request = |seq| DraftRequest {
        seq,
        assumed: vec![],
        k: 4,
        params: SamplingParams::greedy(),
    };
    let want = one_by_one.draft_logits(&[request(1), request(2)]).unwrap();
    let got = together.draft_logits(&[request(1), request(2)]).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert_rows_close("one pass", g, w, 1e-5);
    }
}

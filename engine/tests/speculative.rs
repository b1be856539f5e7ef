//! Speculative decoding is lossless: greedy drafting emits exactly plain greedy decoding's tokens, and
//! sampled drafting emits tokens distributed as sampling the verifier alone.

mod common;

use common::reference::{softmax, Reference};
use common::*;
use troupe_engine::{
    generate, BlockDrafter, Drafter, Engine, GenerateOptions, Generation, ModelConfig,
    ModelDrafter, NgramDrafter, SamplingParams, WindowSpec,
};

fn run(
    model: &troupe_engine::Model<B>,
    drafter: Option<&mut dyn Drafter>,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Generation {
    let mut engine = Engine::new(model.clone());
    generate(&mut engine, drafter, prompt, opts).expect("generate")
}

/// Untied heads keep random models from just repeating their last token.
fn verifier_configs() -> [(ModelConfig, u64); 2] {
    [
        (llama_config(), 41),
        (
            ModelConfig {
                tie_word_embeddings: false,
                ..qwen3_config()
            },
            42,
        ),
    ]
}

#[test]
fn greedy_speculative_decoding_emits_plain_greedy_tokens() {
    // A small window, so tokens are evicted while generating (prompt + 32 new > 2 + 12).
    let window = WindowSpec::new(2, 12).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        [10u32, 20, 30, 40, 50].repeat(4),
        random_tokens(3, 7, 256),
        vec![9],
    ];
    let draft_ck = Checkpoint::write(&small_qwen3_config(), 40, Format::F32);
    for (config, seed) in verifier_configs() {
        let ck = Checkpoint::write(&config, seed, Format::F32);
        let model = ck.load();
        let mut ngram = NgramDrafter::default();
        let mut small = ModelDrafter::new(Engine::new(draft_ck.load()));
        let mut same = ModelDrafter::new(Engine::new(ck.load()));
        let (mut ngram_accepted, mut small_drafted, mut same_drafted, mut same_accepted) =
            (0, 0, 0, 0);
        for prompt in &prompts {
            let base = GenerateOptions {
                max_new_tokens: 32,
                draft_len: 0,
                window,
                ..Default::default()
            };
            let plain = run(&model, None, prompt, &base);
            assert_eq!(plain.tokens.len(), 32);
            assert_eq!(plain.stats.drafted, 0);
            for k in [1usize, 3, 5] {
                let opts = GenerateOptions {
                    draft_len: k,
                    ..base.clone()
                };
                let what = |d: &str| {
                    format!(
                        "{:?}, prompt {prompt:?}, {d} drafter, draft_len {k}",
                        config.architecture
                    )
                };
                let g = run(&model, Some(&mut ngram), prompt, &opts);
                assert_eq!(g.tokens, plain.tokens, "{}", what("ngram"));
                ngram_accepted += g.stats.accepted;
                let g = run(&model, Some(&mut small), prompt, &opts);
                assert_eq!(g.tokens, plain.tokens, "{}", what("small model"));
                small_drafted += g.stats.drafted;
                // The verifier as its own drafter: almost every draft is right, so whole blocks are
                // accepted, including across evictions.
                let g = run(&model, Some(&mut same), prompt, &opts);
                assert_eq!(g.tokens, plain.tokens, "{}", what("same model"));
                assert!(
                    g.stats.verify_steps < plain.stats.verify_steps,
                    "{}: no speed-up",
                    what("same model")
                );
                same_drafted += g.stats.drafted;
                same_accepted += g.stats.accepted;
            }
        }
        assert!(
            ngram_accepted > 0,
            "the n-gram drafter never had a token accepted"
        );
        assert!(small_drafted > 0, "the draft model drafted nothing");
        assert!(
            same_accepted * 10 >= same_drafted * 9,
            "self-drafting accepted {same_accepted} of {same_drafted}"
        );
    }
}

// ---- sampled ----

const TEMPERATURE: f32 = 0.8;
const RUNS: u64 = 1500;
const NEW: usize = 4;

fn tiny_vocab(config: ModelConfig) -> ModelConfig {
    ModelConfig {
        vocab_size: 8,
        head_dim: 8,
        ..config
    }
}

/// Exact distribution of the first `NEW - 1` generated tokens (joint, as a map from token tuple to
/// probability), computed with the reference forward.
fn exact_joint(w: &Weights, prompt: &[u32], depth: usize, top_p: f64) -> Vec<(Vec<u32>, f64)> {
    let reference = Reference::new(w);
    let v = w.config.vocab_size as u32;
    let mut out = Vec::new();
    let mut stack: Vec<(Vec<u32>, f64)> = vec![(vec![], 1.0)];
    while let Some((prefix, p)) = stack.pop() {
        if prefix.len() == depth {
            out.push((prefix, p));
            continue;
        }
        let ctx: Vec<u32> = prompt.iter().chain(&prefix).copied().collect();
        let row = reference.forward(&ctx).pop().unwrap();
        let probs = nucleus(softmax(&row, TEMPERATURE), top_p);
        for t in 0..v {
            let mut next = prefix.clone();
            next.push(t);
            stack.push((next, p * probs[t as usize]));
        }
    }
    out
}

/// Restricts a distribution to its smallest top-`top_p` nucleus (most probable tokens first until
/// their mass reaches `top_p`) and renormalises.
fn nucleus(p: Vec<f64>, top_p: f64) -> Vec<f64> {
    if top_p >= 1.0 {
        return p;
    }
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let mut kept = vec![0.0; p.len()];
    let mut mass = 0.0;
    for &i in &order {
        kept[i] = p[i];
        mass += p[i];
        if mass >= top_p {
            break;
        }
    }
    kept.iter().map(|x| x / mass).collect()
}

/// Marginal of position `pos` from a joint.
fn marginal(joint: &[(Vec<u32>, f64)], pos: usize, vocab: usize) -> Vec<f64> {
    let mut m = vec![0.0; vocab];
    for (toks, p) in joint {
        m[toks[pos] as usize] += p;
    }
    m
}

/// Chi-square statistic of `counts` against probabilities `expected`, pooling bins whose expected
/// count is below 5; returns (statistic, degrees of freedom).
fn chi_square(counts: &[usize], expected: &[f64], n: usize) -> (f64, usize) {
    let (mut stat, mut bins) = (0.0, 0);
    let (mut pool_c, mut pool_e) = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(expected) {
        let e = p * n as f64;
        if e < 5.0 {
            pool_c += c as f64;
            pool_e += e;
        } else {
            stat += (c as f64 - e).powi(2) / e;
            bins += 1;
        }
    }
    if pool_e >= 1.0 {
        stat += (pool_c - pool_e).powi(2) / pool_e;
        bins += 1;
    } else if pool_e > 0.0 {
        assert!(
            pool_c <= 3.0,
            "{pool_c} samples in bins of total expected count {pool_e}"
        );
    } else {
        assert_eq!(pool_c, 0.0, "samples of tokens with probability zero");
    }
    (stat, bins.max(2) - 1)
}

/// Chi-square critical value at p = 0.001 (Wilson-Hilferty).
fn critical(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.090;
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

#[test]
fn sampled_speculative_decoding_preserves_the_verifier_distribution() {
    let vocab = 8;
    let verifier_config = tiny_vocab(ModelConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_heads: 4,
        num_kv_heads: 2,
        ..llama_config()
    });
    let draft_config = tiny_vocab(ModelConfig {
        hidden_size: 16,
        intermediate_size: 32,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        ..qwen3_config()
    });
    let ck = Checkpoint::write(&verifier_config, 51, Format::F32);
    let draft_ck = Checkpoint::write(&draft_config, 52, Format::F32);
    let model = ck.load();
    let prompt = vec![1u32, 2, 3, 1, 2, 3, 1, 2];
    let depth = 3;
    let exact = exact_joint(&ck.weights, &prompt, depth, 1.0);
    let total: f64 = exact.iter().map(|(_, p)| p).sum();
    assert!((total - 1.0).abs() < 1e-9);
    let draft_exact = exact_joint(&draft_ck.weights, &prompt, depth, 1.0);
    const TOP_P: f32 = 0.8;
    let exact_top_p = exact_joint(&ck.weights, &prompt, depth, TOP_P as f64);
    assert!(
        exact_top_p.iter().filter(|(_, p)| *p == 0.0).count() > 0,
        "top-p cuts nothing"
    );

    // The check can fail: the verifier is not nearly deterministic, and the draft model's second token
    // is distributed far from the verifier's, so acceptance that leaned towards the drafts (accepting
    // too often, or a wrong residual) would shift the counts well past the bound.
    for pos in 0..depth {
        let p = marginal(&exact, pos, vocab);
        assert!(
            p.iter().cloned().fold(0.0, f64::max) < 0.8,
            "verifier too peaked at {pos}: {p:?}"
        );
    }
    let q1 = marginal(&draft_exact, 1, vocab);
    let p1 = marginal(&exact, 1, vocab);
    let counts: Vec<usize> = q1
        .iter()
        .map(|q| (q * RUNS as f64).round() as usize)
        .collect();
    let (stat, df) = chi_square(&counts, &p1, RUNS as usize);
    assert!(
        stat > 3.0 * critical(df),
        "draft and verifier distributions too close ({stat})"
    );

    let params = SamplingParams {
        temperature: TEMPERATURE,
        top_p: 1.0,
    };
    let base = GenerateOptions {
        max_new_tokens: NEW,
        draft_len: 0,
        params,
        window: WindowSpec::new(4, 64).unwrap(),
        ..Default::default()
    };
    let mut ngram = NgramDrafter::default();
    let mut small = ModelDrafter::new(Engine::new(draft_ck.load()));
    // A block drafter grown from the verifier (untrained): deterministic drafts from the
    // verifier's states, verified by rejection sampling against one-hot proposals.
    let layers = verifier_config.num_layers;
    let mut block = BlockDrafter::new(
        troupe_engine::block::drafter_from_verifier(&model, vec![0, layers - 1], 1, 4).unwrap(),
    );
    // (name, draft_len, top_p): a nucleus changes both the verifier's and the draft model's
    // distributions, and tokens outside it must never appear.
    let cases: [(&str, usize, f32); 7] = [
        ("plain", 0, 1.0),
        ("ngram", 3, 1.0),
        ("model", 3, 1.0),
        ("model", 2, TOP_P),
        ("ngram", 2, TOP_P),
        ("block", 3, 1.0),
        ("block", 2, TOP_P),
    ];
    for (name, k, top_p) in cases {
        let exact = if top_p < 1.0 { &exact_top_p } else { &exact };
        let name = format!("{name}, top_p {top_p}");
        let opts = GenerateOptions {
            draft_len: k,
            params: SamplingParams {
                temperature: TEMPERATURE,
                top_p,
            },
            ..base.clone()
        };
        let mut counts = vec![vec![0usize; vocab]; depth];
        let mut pair_counts = vec![0usize; vocab * vocab];
        let (mut drafted, mut accepted) = (0, 0);
        for seed in 0..RUNS {
            let opts = GenerateOptions {
                seed,
                ..opts.clone()
            };
            let drafter: Option<&mut dyn Drafter> = match &name[..5] {
                "ngram" => Some(&mut ngram),
                "model" => Some(&mut small),
                "block" => Some(&mut block),
                _ => None,
            };
            let g = run(&model, drafter, &prompt, &opts);
            assert_eq!(g.tokens.len(), NEW);
            for pos in 0..depth {
                counts[pos][g.tokens[pos] as usize] += 1;
            }
            pair_counts[(g.tokens[0] * vocab as u32 + g.tokens[1]) as usize] += 1;
            drafted += g.stats.drafted;
            accepted += g.stats.accepted;
        }
        if k > 0 {
            assert!(
                accepted > 0 && accepted < drafted,
                "{name}: accepted {accepted} of {drafted} drafts"
            );
        }
        for (pos, seen) in counts.iter().enumerate() {
            let p = marginal(exact, pos, vocab);
            let (stat, df) = chi_square(seen, &p, RUNS as usize);
            assert!(
                stat < critical(df),
                "{name}: token {pos}: chi2 {stat:.1} > {:.1} (df {df}); counts {:?}, expected {:?}",
                critical(df),
                seen,
                p.iter()
                    .map(|x| (x * RUNS as f64).round())
                    .collect::<Vec<_>>()
            );
        }
        // The joint of the first two tokens: the second is drawn from a verified block.
        let mut pair = vec![0.0; vocab * vocab];
        for (toks, p) in exact {
            pair[(toks[0] * vocab as u32 + toks[1]) as usize] += p;
        }
        let (stat, df) = chi_square(&pair_counts, &pair, RUNS as usize);
        assert!(
            stat < critical(df),
            "{name}: first two tokens jointly: chi2 {stat:.1} > {:.1} (df {df})",
            critical(df)
        );
        eprintln!("{name}: drafted {drafted}, accepted {accepted}, pair chi2 {stat:.1} (df {df})");
    }
}

/// A model drafter's `assumed` tokens (a block still being verified) shape the draft but leave no
/// trace: afterwards it drafts exactly like a drafter that never saw them.
#[test]
fn model_drafter_assumed_tokens_leave_no_trace() {
    use troupe_engine::DraftRequest;
    let draft_ck = Checkpoint::write(
        &ModelConfig {
            tie_word_embeddings: false,
            ..small_qwen3_config()
        },
        43,
        Format::F32,
    );
    let window = WindowSpec::new(2, 8).unwrap();
    let mut a = ModelDrafter::new(Engine::new(draft_ck.load()));
    let mut b = ModelDrafter::new(Engine::new(draft_ck.load()));
    a.open(0, window, 0).unwrap();
    b.open(0, window, 0).unwrap();
    let history = random_tokens(44, 6, 256);
    a.observe(0, &history).unwrap();
    b.observe(0, &history).unwrap();
    let req = |assumed: Vec<u32>| DraftRequest {
        seq: 0,
        assumed,
        k: 3,
        params: SamplingParams::greedy(),
    };
    for round in 0..8u64 {
        let block = random_tokens(500 + round, 2, 256);
        if round % 2 == 0 {
            // The block is confirmed: drafting on the assumption equals drafting after observing it.
            let da = a.draft(&[req(block.clone())]).unwrap();
            b.observe(0, &block).unwrap();
            let db = b.draft(&[req(vec![])]).unwrap();
            assert_eq!(da, db, "round {round}: drafting on assumed tokens");
            a.observe(0, &block).unwrap();
        } else {
            // The block is rejected: `a` drafted on it, `b` never saw it.
            let _ = a.draft(&[req(block)]).unwrap();
            let truth = random_tokens(600 + round, 1, 256);
            a.observe(0, &truth).unwrap();
            b.observe(0, &truth).unwrap();
            let da = a.draft(&[req(vec![])]).unwrap();
            let db = b.draft(&[req(vec![])]).unwrap();
            assert_eq!(da, db, "round {round}: after a rejected assumption");
            assert_eq!(da[0].tokens.len(), 3);
        }
    }
}

/// With a stop token, speculative decoding stops exactly where plain decoding does, even when the stop
/// token sits inside an accepted block.
#[test]
fn speculative_decoding_stops_like_plain_decoding() {
    let ck = Checkpoint::write(&llama_config(), 45, Format::F32);
    let model = ck.load();
    let window = WindowSpec::new(2, 12).unwrap();
    let prompt = random_tokens(46, 5, 256);
    let base = GenerateOptions {
        max_new_tokens: 32,
        draft_len: 0,
        window,
        ..Default::default()
    };
    let plain = run(&model, None, &prompt, &base).tokens;
    // A stop token whose first occurrence is well inside the continuation.
    let (pos, stop) = plain
        .iter()
        .enumerate()
        .find(|&(i, t)| i >= 6 && !plain[..i].contains(t))
        .map(|(i, &t)| (i, t))
        .expect("a fresh token late in the continuation");
    let want = plain[..=pos].to_vec();
    let stopped = GenerateOptions {
        stop_tokens: vec![stop],
        ..base.clone()
    };
    assert_eq!(
        run(&model, None, &prompt, &stopped).tokens,
        want,
        "plain decoding with a stop token"
    );
    let mut same = ModelDrafter::new(Engine::new(ck.load()));
    let mut ngram = NgramDrafter::default();
    for k in [1usize, 3, 5] {
        let opts = GenerateOptions {
            draft_len: k,
            ..stopped.clone()
        };
        assert_eq!(
            run(&model, Some(&mut same), &prompt, &opts).tokens,
            want,
            "self drafter, draft_len {k}"
        );
        assert_eq!(
            run(&model, Some(&mut ngram), &prompt, &opts).tokens,
            want,
            "ngram drafter, draft_len {k}"
        );
    }
}

//! `troupe generate`: one prompt, optionally with speculative decoding.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use troupe::engine::{
    generate, load_model_drafter, load_verifier, DeviceKind, Drafter, GenerateOptions, ModelSource,
    NgramDrafter, SamplingParams, Tokenizer, WeightDtype, WindowSpec,
};

/// Arguments of `troupe generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Drafter: a model directory, or `ngram` for prompt lookup. Without it, plain decoding.
    #[arg(long)]
    drafter: Option<String>,
    /// Tokens drafted per verify step.
    #[arg(long, default_value_t = 4)]
    draft_len: usize,
    /// Prompt text (tokenized with the model's tokenizer.json).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sink tokens kept forever in the KV window.
    #[arg(long, default_value_t = 4)]
    sink: usize,
    /// Recent tokens kept in the KV window.
    #[arg(long, default_value_t = 1020)]
    window: usize,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The width the weights are kept in: f32, bf16, f16, stored (the checkpoint's own, the
    /// default) or int8 (the projections and head quantized at load, CPU only).
    #[arg(long, value_parser = crate::bench::parse_weights)]
    weights: Option<WeightDtype>,
    /// Stop after the model's EOS token.
    #[arg(long)]
    stop_at_eos: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The tokenizer of a model directory, if it has one.
pub fn load_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(Tokenizer::from_file(&path)?))
}

/// Runs `troupe generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    let device: DeviceKind = a.device.parse()?;
    let config = troupe::engine::ModelConfig::from_file(&a.model.join("config.json"))?;
    let tokenizer = load_tokenizer(&a.model)?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) => tokenizer
            .as_ref()
            .context("--prompt needs tokenizer.json in the model directory; use --prompt-ids")?
            .encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let mut verifier = load_verifier(&ModelSource::Dir(&a.model), device, a.weights)?;
    let mut drafter: Option<Box<dyn Drafter>> = match a.drafter.as_deref() {
        None => None,
        Some("ngram") => Some(Box::new(NgramDrafter::default())),
        Some(dir) => Some(load_model_drafter(
            &ModelSource::Dir(Path::new(dir)),
            device,
            None,
        )?),
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        draft_len: if drafter.is_some() { a.draft_len } else { 0 },
        params: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
        },
        seed: a.seed,
        window: WindowSpec::new(a.sink, a.window)?,
        stop_tokens: if a.stop_at_eos {
            config.eos_token_id.into_iter().collect()
        } else {
            Vec::new()
        },
        prefill_chunk: 256,
    };
    let out = generate(verifier.as_mut(), drafter.as_deref_mut(), &prompt, &opts)?;
    let text = match &tokenizer {
        Some(t) => t.decode(&out.tokens)?,
        None => String::new(),
    };
    if a.json {
        let json = serde_json::json!({ "tokens": out.tokens, "text": text, "stats": out.stats });
        println!("{json}");
    } else {
        println!("{text}");
        let s = &out.stats;
        eprintln!(
            "{} tokens, {:.1} tokens/s, {} verify steps, {}/{} drafts accepted ({:.2} per step), KV {} bytes",
            out.tokens.len(),
            s.tokens_per_s,
            s.verify_steps,
            s.accepted,
            s.drafted,
            s.mean_accepted_per_step,
            s.kv_bytes_per_session
        );
    }
    Ok(())
}

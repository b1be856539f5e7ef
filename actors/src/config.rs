//! What a caller chooses: for a session and each of its turns, the persona, the prompt template,
//! the window, the stop tokens and the sampling; for the runtime, the scheduler's limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use troupe_engine::WindowSpec;

use crate::error::RuntimeError;

/// The template of a persona's turns when the session sets none: the prompt, a newline, then
/// the persona's name and a colon, so the model answers as that persona.
pub const DEFAULT_TEMPLATE: &str = "{prompt}\n{name}:";

/// Who a session speaks as.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct Persona {
    /// Name, used in the turn template (`{name}`).
    pub name: String,
    /// Text placed once at the start of the conversation, followed by a newline.
    pub system_prompt: String,
}

impl Persona {
    /// A persona called `name` with `system_prompt` at the start of its conversation.
    pub fn new(name: impl Into<String>, system_prompt: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            system_prompt: system_prompt.into(),
        }
    }
}

/// How to open a session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct SessionConfig {
    /// The persona; `None` sends text prompts as they are (no template, no system prompt).
    pub persona: Option<Persona>,
    /// How a persona's text turn is laid out: `{prompt}` is the turn's text and `{name}` the
    /// persona's name; `None` uses [`DEFAULT_TEMPLATE`]. Token-id prompts are never templated.
    pub template: Option<String>,
    /// The KV window; `None` uses the runtime's default.
    pub window: Option<WindowSpec>,
    /// Tokens that end every turn of the session (besides each turn's own).
    pub stop_tokens: Vec<u32>,
    /// Seed of the session's sampling; `None` derives one from the session's id, so sessions
    /// given the same prompt draw different samples (and a run that spawns its sessions in the same
    /// order draws the same ones again).
    pub seed: Option<u64>,
}

impl SessionConfig {
    /// A session that speaks as `persona`.
    pub fn persona(persona: Persona) -> Self {
        Self {
            persona: Some(persona),
            ..Self::default()
        }
    }

    /// Sets the persona.
    pub fn with_persona(mut self, persona: Persona) -> Self {
        self.persona = Some(persona);
        self
    }

    /// Lays out each text turn with `template` (`{prompt}`, and `{name}` for the persona's name).
    pub fn with_template(mut self, template: impl Into<String>) -> Self {
        self.template = Some(template.into());
        self
    }

    /// Gives the session its own window shape.
    pub fn with_window(mut self, window: WindowSpec) -> Self {
        self.window = Some(window);
        self
    }

    /// Ends every turn at any of `tokens` (Llama 3 ends a reply at either of two).
    pub fn with_stop_tokens(mut self, tokens: impl IntoIterator<Item = u32>) -> Self {
        self.stop_tokens = tokens.into_iter().collect();
        self
    }

    /// Seeds the session's sampling.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The seed the session with id `session` samples with: its own, or one mixed from the id.
    pub fn seed_for(&self, session: u64) -> u64 {
        self.seed.unwrap_or_else(|| {
            // SplitMix64's finaliser: neighbouring ids give unrelated seeds.
            let mut z = session.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }

    /// Checks what can be checked before the session opens.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        if let Some(t) = &self.template {
            if !t.contains("{prompt}") {
                return Err(RuntimeError::InvalidConfig(format!(
                    "the template {t:?} has no {{prompt}}"
                )));
            }
        }
        Ok(())
    }

    /// The text sent to the tokenizer for a turn of `text`; `first` marks the session's first
    /// turn, which carries the persona's system prompt.
    pub fn render(&self, text: &str, first: bool) -> String {
        let Some(p) = &self.persona else {
            return text.to_owned();
        };
        let mut full = String::new();
        if first && !p.system_prompt.is_empty() {
            full.push_str(&p.system_prompt);
            full.push('\n');
        }
        let template = self.template.as_deref().unwrap_or(DEFAULT_TEMPLATE);
        full.push_str(
            &template
                .replace("{name}", &p.name)
                .replace("{prompt}", text),
        );
        full
    }
}

/// Parameters of one turn.
///
/// The defaults are the scheduler's: greedy, the whole vocabulary, 64 new tokens. (The engine's
/// single-sequence [`troupe_engine::GenerateOptions`] defaults to 32 new tokens, a fixed draft of
/// 4 and prefill chunks of 256; a turn here drafts up to
/// [`SchedulerConfig::max_draft_len`](crate::SchedulerConfig) tokens, adapted, and is prefilled in
/// chunks of `SchedulerConfig::prefill_chunk`.)
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct GenerateParams {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Tokens that end the turn (the first one emitted is the turn's last token), besides the
    /// session's own.
    pub stop_tokens: Vec<u32>,
    /// Stop tokens before the turn's first token that is not one do not end it; they are
    /// emitted as ordinary tokens, so a reply that opens with the newline that ends replies is
    /// not empty.
    pub stop_after_content: bool,
    /// Seed of this turn's sampling: the session's sampling restarts from it, so the same seed
    /// on the same context gives the same reply. `None` continues the session's own draws.
    pub seed: Option<u64>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            stop_tokens: Vec::new(),
            stop_after_content: false,
            seed: None,
        }
    }
}

impl GenerateParams {
    /// Greedy decoding of at most `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            ..Self::default()
        }
    }

    /// Generates at most `n` tokens.
    pub fn with_max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }

    /// Samples at `temperature` (0: greedy) from the nucleus of mass `top_p`.
    pub fn with_sampling(mut self, temperature: f32, top_p: f32) -> Self {
        self.temperature = temperature;
        self.top_p = top_p;
        self
    }

    /// Ends the turn at any of `tokens`.
    pub fn with_stop_tokens(mut self, tokens: impl IntoIterator<Item = u32>) -> Self {
        self.stop_tokens = tokens.into_iter().collect();
        self
    }

    /// Samples this turn from `seed` (see [`GenerateParams::seed`]).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Lets stop tokens end the turn only once it has a token that is not one.
    pub fn with_stop_after_content(mut self, on: bool) -> Self {
        self.stop_after_content = on;
        self
    }
}

/// Limits and switches of the scheduler.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct SchedulerConfig {
    /// Most tokens in one verify step (decode, drafts and prefill together).
    pub max_step_tokens: usize,
    /// Most sequences in one verify step.
    pub max_step_seqs: usize,
    /// Largest prefill chunk of one sequence in one step.
    pub prefill_chunk: usize,
    /// Longest draft block; 0 turns speculation off.
    pub max_draft_len: usize,
    /// Draft block n+1 while block n is verified.
    pub pipelined: bool,
    /// Pick the draft length per sequence from acceptance and load; otherwise always the maximum.
    pub adaptive: bool,
    /// Longest a step waits for drafts; `None` adapts it to what the drafts are expected to save,
    /// and waits not at all for drafts that come back later than that (a distant or overloaded
    /// proposer), so waiting does not make decoding slower than plain.
    pub draft_wait: Option<Duration>,
    /// How long a step waits to keep sessions in the same step: for the next turns of sessions
    /// whose turn the step before ended, and, at an idle verifier, for a burst of turns. `None`
    /// adapts it: while turns keep coming (a gap of a fiftieth of a step, at most 1 ms), up to
    /// half a step (at most 50 ms), and not at all while such waits catch no turn. `Some(d)`: the
    /// gap and the cap are both `d`; `Some(Duration::ZERO)` never waits.
    #[serde(default)]
    pub turnaround_wait: Option<Duration>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_step_tokens: 1024,
            max_step_seqs: 256,
            prefill_chunk: 128,
            max_draft_len: 6,
            pipelined: true,
            adaptive: true,
            draft_wait: None,
            turnaround_wait: None,
        }
    }
}

impl SchedulerConfig {
    /// At most `n` tokens in one step.
    pub fn with_max_step_tokens(mut self, n: usize) -> Self {
        self.max_step_tokens = n;
        self
    }

    /// At most `n` sequences in one step.
    pub fn with_max_step_seqs(mut self, n: usize) -> Self {
        self.max_step_seqs = n;
        self
    }

    /// Prefill chunks of at most `n` tokens.
    pub fn with_prefill_chunk(mut self, n: usize) -> Self {
        self.prefill_chunk = n;
        self
    }

    /// Draft blocks of at most `n` tokens (0: no speculation).
    pub fn with_max_draft_len(mut self, n: usize) -> Self {
        self.max_draft_len = n;
        self
    }

    /// Whether block n+1 is drafted while block n is verified.
    pub fn with_pipelined(mut self, on: bool) -> Self {
        self.pipelined = on;
        self
    }

    /// Whether the draft length adapts to acceptance and load.
    pub fn with_adaptive(mut self, on: bool) -> Self {
        self.adaptive = on;
        self
    }

    /// A fixed longest wait for drafts, or `None` to adapt it.
    pub fn with_draft_wait(mut self, wait: Option<Duration>) -> Self {
        self.draft_wait = wait;
        self
    }

    /// A fixed longest wait for the next turn of a session whose turn just ended, or `None` to
    /// adapt it (`Some(Duration::ZERO)`: never wait).
    pub fn with_turnaround_wait(mut self, wait: Option<Duration>) -> Self {
        self.turnaround_wait = wait;
        self
    }

    /// Checks the limits: a step must hold at least one token and one sequence, and a prefill
    /// chunk at least one token.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        if self.max_step_tokens == 0 || self.max_step_seqs == 0 || self.prefill_chunk == 0 {
            return Err(RuntimeError::InvalidConfig(format!(
                "the scheduler needs room for a token in a step: {self:?}"
            )));
        }
        Ok(())
    }
}

/// A turn's input: text (templated and tokenized by the session) or token ids (sent as they are).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.into())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(t: Vec<u32>) -> Self {
        Prompt::Tokens(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_persona_turn_follows_its_template_and_the_system_prompt_comes_once() {
        let c = SessionConfig::persona(Persona::new("Ferris", "You are a crab."));
        assert_eq!(c.render("Hi", true), "You are a crab.\nHi\nFerris:");
        assert_eq!(c.render("Hi", false), "Hi\nFerris:");
        let c = c.with_template("<user>{prompt}</user><{name}>");
        assert_eq!(c.render("Hi", false), "<user>Hi</user><Ferris>");
        assert_eq!(SessionConfig::default().render("Hi", true), "Hi");
    }

    #[test]
    fn a_template_without_the_prompt_is_refused() {
        let c = SessionConfig::default().with_template("{name}:");
        assert!(matches!(c.validate(), Err(RuntimeError::InvalidConfig(_))));
        assert!(SessionConfig::default()
            .with_template("{prompt}")
            .validate()
            .is_ok());
    }
}

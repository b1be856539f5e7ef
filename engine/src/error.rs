//! The engine's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the numeric core. Each variant names what it concerns (a file, a
/// tensor, a session) so that a caller can report it without guessing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    // ---- loading ----
    /// A file the model directory must contain is not there.
    #[error("missing file {path}")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file (config, index, tokenizer) does not parse or lacks a field.
    #[error("invalid {path}: {reason}")]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A safetensors file is truncated or malformed.
    #[error("corrupt safetensors file {path}: {reason}")]
    CorruptCheckpoint {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A tensor the architecture needs is in no checkpoint file.
    #[error("tensor {tensor} is missing from the checkpoint in {dir}")]
    MissingTensor {
        /// The tensor's Hugging Face name.
        tensor: String,
        /// The model directory.
        dir: PathBuf,
    },
    /// A tensor exists but has the wrong shape for the config.
    #[error("tensor {tensor} in {path} has shape {found:?}, the config asks for {expected:?}")]
    ShapeMismatch {
        /// The tensor's Hugging Face name.
        tensor: String,
        /// The file holding it.
        path: PathBuf,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor is stored in a dtype the loader does not read.
    #[error("tensor {tensor} in {path} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The tensor's Hugging Face name.
        tensor: String,
        /// The file holding it.
        path: PathBuf,
        /// The dtype as safetensors names it.
        dtype: String,
    },
    /// `config.json` names an architecture this engine does not implement.
    #[error(
        "unknown architecture {found:?} in {path}; supported: Qwen3ForCausalLM, LlamaForCausalLM"
    )]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// What the config says.
        found: String,
    },
    /// A config is internally inconsistent (heads do not divide, zero sizes, ...).
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// No preset of that name.
    #[error("unknown preset {0:?}; known: {1}")]
    UnknownPreset(String, String),
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer error ({path}): {reason}")]
    Tokenizer {
        /// The tokenizer file, or `<memory>`.
        path: PathBuf,
        /// What the tokenizers crate said.
        reason: String,
    },

    // ---- devices ----
    /// The requested backend was not compiled into this build.
    #[error("backend {0} is not compiled in; rebuild with `--features {0}`")]
    BackendNotCompiled(String),
    /// The backend is compiled in but found no usable device.
    #[error("no {backend} device found: {reason}")]
    NoDevice {
        /// The backend.
        backend: String,
        /// What went wrong.
        reason: String,
    },
    /// An unknown `--device` string.
    #[error("unknown device {0:?}; use cpu, wgpu or cuda")]
    UnknownDevice(String),

    // ---- sessions and steps ----
    /// A step or commit named a sequence the engine does not hold.
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// A sequence id is already open.
    #[error("sequence {0} is already open")]
    DuplicateSequence(u64),
    /// A token id is outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The token.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A step asked for something impossible (empty work, commit past what was computed, ...).
    #[error("invalid step: {0}")]
    InvalidStep(String),
    /// A window spec that cannot hold a token.
    #[error("invalid window: {0}")]
    InvalidWindow(String),
    /// A window holds more positions than the model was built for.
    #[error(
        "a window of {capacity} tokens exceeds the model's {positions} positions \
         (max_position_embeddings)"
    )]
    WindowPastPositions {
        /// The window's capacity, sinks included.
        capacity: usize,
        /// The model's `max_position_embeddings`.
        positions: usize,
    },
    /// The backend failed while running a step.
    #[error("backend failure: {0}")]
    Backend(String),
}

/// Shorthand for results in this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

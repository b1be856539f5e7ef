//! troupe's numeric core: Qwen3 and Llama 3 decoders on Burn, bounded per-session KV windows
//! (StreamingLLM), one batched forward over many sessions with ragged query lengths, and lossless
//! speculative decoding (greedy prefix matching and rejection sampling) with pluggable drafters.
//!
//! The crate knows nothing of actors. [`Verifier`] and [`Drafter`] are the backend-free interfaces
//! the runtime drives; [`Engine`] implements `Verifier` for a [`Model`] on any Burn backend.

pub mod accept;
pub mod attention;
pub mod batch;
pub mod block;
pub mod causal;
pub mod config;
mod config_json;
pub mod corpus;
pub mod device;
pub mod drafter;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kv_pool;
pub mod loader;
pub mod model;
pub mod model_drafter;
pub mod pooled_step;
pub mod rope;
pub mod safetensors_header;
pub mod sampling;
pub mod save;
pub mod shard_index;
pub mod tokenizer;
#[cfg(feature = "train")]
pub mod train;
pub mod verifier;
pub mod warm_up;
pub mod window;
pub mod window_spec;

pub use block::BlockDrafter;
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use corpus::Corpus;
pub use device::{load_block_drafter, load_model_drafter, load_verifier, DeviceKind, ModelSource};
pub use drafter::{Draft, DraftCost, DraftRequest, Drafter, HiddenStates, NgramDrafter};
pub use engine::{Engine, StepItem, StepResult};
pub use error::{EngineError, Result};
pub use generate::{generate, GenerateOptions, Generation, GenerationStats};
pub use kv_pool::KvPool;
pub use loader::{load_model, quantize_model, random_model, WeightDtype};
pub use model::{Linear, LinearWeight, Model};
pub use model_drafter::ModelDrafter;
pub use sampling::SamplingParams;
pub use save::{save_pretrained, save_pretrained_with, Extras};
pub use tokenizer::Tokenizer;
pub use verifier::{SeqId, Verifier, VerifyOutcome, VerifyWork};
pub use warm_up::{warm_up, WarmUp, WarmUpProgress};
pub use window::{KvWindow, WindowSpec};

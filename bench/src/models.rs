//! Which verifier a case runs: its own small random model, a Hugging Face directory
//! (`--model DIR`), or random weights of a named real shape (`--preset NAME`). A preset is written
//! once, in bf16 as a real checkpoint would be, to a cache outside the repository, and loaded from
//! there like any other directory, so a peer (llama.cpp) can be given the very same weights.

use std::path::{Path, PathBuf};

use troupe::engine::{ModelConfig, ModelSource};

use crate::error::{BenchError, Result};

/// The verifier a case runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ModelChoice {
    /// The case's own small random model.
    #[default]
    Default,
    /// A Hugging Face model directory.
    Dir(PathBuf),
    /// Random weights of a named real shape (`qwen3-0.6b`, `qwen3-1.7b`, `llama-3.2-1b`, …).
    Preset(String),
}

impl ModelChoice {
    /// The choice the command line's `--model` and `--preset` make (at most one of them).
    pub fn from_args(model: Option<PathBuf>, preset: Option<String>) -> Result<Self> {
        match (model, preset) {
            (Some(_), Some(_)) => Err(BenchError::Invalid(
                "--model and --preset name two models; give one".into(),
            )),
            (Some(dir), None) => Ok(ModelChoice::Dir(dir)),
            (None, Some(name)) => {
                ModelConfig::preset(&name)?;
                Ok(ModelChoice::Preset(name))
            }
            (None, None) => Ok(ModelChoice::Default),
        }
    }

    /// Whether the case runs its own model.
    pub fn is_default(&self) -> bool {
        *self == ModelChoice::Default
    }

    /// The directory to load from (a preset is written first if its cache has none), or `None`
    /// for the case's own model.
    pub fn dir(&self) -> Result<Option<PathBuf>> {
        match self {
            ModelChoice::Default => Ok(None),
            ModelChoice::Dir(dir) => Ok(Some(dir.clone())),
            ModelChoice::Preset(name) => preset_dir(name, &cache_dir()).map(Some),
        }
    }

    /// The shape of the chosen model; `default` for the case's own.
    pub fn config(&self, default: &ModelConfig) -> Result<ModelConfig> {
        match self {
            ModelChoice::Default => Ok(default.clone()),
            ModelChoice::Dir(dir) => Ok(ModelConfig::from_file(&dir.join("config.json"))?),
            ModelChoice::Preset(name) => Ok(ModelConfig::preset(name)?),
        }
    }

    /// Where the verifier's weights come from: the directory, or random weights of `default`.
    pub fn source(&self, default: &ModelConfig) -> Result<Source> {
        Ok(match self.dir()? {
            Some(dir) => Source::Dir(dir),
            None => Source::Random(default.clone()),
        })
    }

    /// How a report names the model.
    pub fn name(&self) -> String {
        match self {
            ModelChoice::Default => "default".into(),
            ModelChoice::Dir(dir) => dir.display().to_string(),
            ModelChoice::Preset(name) => name.clone(),
        }
    }
}

/// Where a case's verifier is loaded from, owned (a [`ModelSource`] borrows its directory).
#[derive(Debug, Clone)]
pub enum Source {
    /// A model directory.
    Dir(PathBuf),
    /// Random weights of a shape, made in memory (seed 1).
    Random(ModelConfig),
}

impl Source {
    /// The engine's view of it.
    pub fn as_model_source(&self) -> ModelSource<'_> {
        match self {
            Source::Dir(dir) => ModelSource::Dir(dir),
            Source::Random(config) => ModelSource::Random(config.clone(), 1),
        }
    }
}

/// The cache of preset checkpoints: `$TROUPE_CACHE`, else `$XDG_CACHE_HOME/troupe`, else
/// `~/.cache/troupe`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TROUPE_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("troupe")
}

/// The directory of preset `name` under `cache`, writing its random bf16 weights first if it is
/// not there yet. A half-written directory never takes its place: the weights are written
/// beside it and renamed in.
pub fn preset_dir(name: &str, cache: &Path) -> Result<PathBuf> {
    let config = ModelConfig::preset(name)?;
    let dir = cache.join("presets").join(name);
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    write_preset(&config, &dir)?;
    Ok(dir)
}

#[cfg(feature = "cpu")]
fn write_preset(config: &ModelConfig, dir: &Path) -> Result<()> {
    use troupe::engine::device::CpuBackend;
    let parent = dir.parent().expect("a preset directory has a parent");
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| BenchError::Io { what, path, source }
    };
    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    let partial = parent.join(format!(
        ".{}.partial-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("preset"),
        std::process::id()
    ));
    eprintln!(
        "writing random {} weights to {}",
        config.torch_dtype,
        dir.display()
    );
    let model = troupe::engine::random_model::<CpuBackend>(
        config,
        burn::tensor::DType::BF16,
        1,
        &Default::default(),
    );
    troupe::engine::save_pretrained(&model, &partial, true, None)?;
    std::fs::rename(&partial, dir).map_err(io("renaming into", dir))?;
    Ok(())
}

/// Without the CPU backend there is nothing to write the weights with.
#[cfg(not(feature = "cpu"))]
fn write_preset(_config: &ModelConfig, dir: &Path) -> Result<()> {
    Err(BenchError::Invalid(format!(
        "writing a preset needs the cpu feature; put a checkpoint in {}",
        dir.display()
    )))
}

/// Resident memory at its peak so far (Linux `/proc/self/status` `VmHWM`; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    process_memory("/proc/self/status").1
}

/// Resident memory now (Linux `/proc/self/status` `VmRSS`; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    process_memory("/proc/self/status").0
}

/// A process's resident memory now and at its peak, in bytes, from its `/proc/PID/status`
/// (`VmRSS`, `VmHWM`; 0 where it cannot be read).
pub fn process_memory(status: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(status).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

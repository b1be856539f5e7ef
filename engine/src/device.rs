//! Picking a backend at run time among those compiled in, and loading models onto it behind the
//! backend-free [`Verifier`] and [`Drafter`] traits.
#![cfg_attr(
    not(any(feature = "cpu", feature = "wgpu", feature = "cuda")),
    allow(unused)
)]

use std::path::Path;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::DType;
use troupe_kernels::KernelBackend;

use crate::block::BlockDrafter;
use crate::config::ModelConfig;
use crate::drafter::Drafter;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::loader::{load_model, quantize_model, random_model, WeightDtype};
use crate::model::Model;
use crate::model_drafter::ModelDrafter;
use crate::verifier::Verifier;

/// The CPU backend: Burn's Flex.
#[cfg(feature = "cpu")]
pub type CpuBackend = burn::backend::Flex;
/// The wgpu backend (Vulkan, Metal, WebGPU).
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu;
/// The CUDA backend.
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda;

/// A compute device family, as `--device` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// Burn's Flex on the CPU.
    Cpu,
    /// wgpu: Vulkan, Metal or WebGPU.
    Wgpu,
    /// CUDA.
    Cuda,
}

impl FromStr for DeviceKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "wgpu" | "vulkan" | "metal" => Ok(DeviceKind::Wgpu),
            "cuda" => Ok(DeviceKind::Cuda),
            other => Err(EngineError::UnknownDevice(other.into())),
        }
    }
}

impl DeviceKind {
    /// The feature that compiles this backend in.
    pub fn feature(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
        }
    }

    /// Whether this build has the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            DeviceKind::Cpu => cfg!(feature = "cpu"),
            DeviceKind::Wgpu => cfg!(feature = "wgpu"),
            DeviceKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// Width weights are kept in unless asked otherwise: the checkpoint's own, on every device
    /// (the CPU kernels widen bf16 and f16 in registers).
    pub fn default_weights(self) -> WeightDtype {
        WeightDtype::AsStored
    }
}

/// Where weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource<'a> {
    /// A Hugging Face directory.
    Dir(&'a Path),
    /// Random weights of a config's shape.
    Random(ModelConfig, u64),
}

/// Runs `f` with a device of the backend, turning a panic while the device comes up into an error.
fn probe<B: Backend>(kind: DeviceKind) -> Result<B::Device> {
    let device = B::Device::default();
    let d = device.clone();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let t = Tensor::<B, 1>::ones([2], &d);
        let _ = t.sum().into_data();
    }))
    .map_err(|e| EngineError::NoDevice {
        backend: kind.feature().into(),
        reason: e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the backend panicked while starting".into()),
    })?;
    Ok(device)
}

fn build<B: KernelBackend>(
    source: &ModelSource<'_>,
    kind: DeviceKind,
    dtype: Option<WeightDtype>,
) -> Result<Model<B>> {
    let device = probe::<B>(kind)?;
    let wd = dtype.unwrap_or(kind.default_weights());
    match source {
        ModelSource::Dir(dir) => {
            let config = ModelConfig::from_file(&dir.join("config.json"))?;
            load_model::<B>(dir, &config, wd, &device)
        }
        ModelSource::Random(config, seed) => {
            let stored = match config.torch_dtype.as_str() {
                "float32" => DType::F32,
                "float16" => DType::F16,
                _ => DType::BF16,
            };
            let dt = wd.kept(stored, B::widens_weights());
            let model = random_model::<B>(config, dt, *seed, &device);
            if wd == WeightDtype::Int8 {
                quantize_model(model)
            } else {
                Ok(model)
            }
        }
    }
}

macro_rules! dispatch {
    ($kind:expr, |$b:ident| $body:expr) => {
        match $kind {
            #[cfg(feature = "cpu")]
            DeviceKind::Cpu => {
                type $b = CpuBackend;
                $body
            }
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => {
                type $b = WgpuBackend;
                $body
            }
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => {
                type $b = CudaBackend;
                $body
            }
            #[allow(unreachable_patterns)]
            other => Err(EngineError::BackendNotCompiled(other.feature().into())),
        }
    };
}

/// Loads a verifier on the chosen device.
pub fn load_verifier(
    source: &ModelSource<'_>,
    kind: DeviceKind,
    dtype: Option<WeightDtype>,
) -> Result<Box<dyn Verifier>> {
    dispatch!(kind, |B| {
        let model = build::<B>(source, kind, dtype)?;
        Ok(Box::new(Engine::new(model)) as Box<dyn Verifier>)
    })
}

/// Loads a drafter with a model on the chosen device: a block drafter where the directory holds
/// one (its `config.json` says so), a small draft model otherwise.
pub fn load_model_drafter(
    source: &ModelSource<'_>,
    kind: DeviceKind,
    dtype: Option<WeightDtype>,
) -> Result<Box<dyn Drafter>> {
    if let ModelSource::Dir(dir) = source {
        if crate::block::is_block_drafter(dir)? {
            return load_block_drafter(dir, kind);
        }
    }
    dispatch!(kind, |B| {
        let model = build::<B>(source, kind, dtype)?;
        Ok(Box::new(ModelDrafter::new(Engine::new(model))) as Box<dyn Drafter>)
    })
}

/// Loads the block drafter saved in `dir` on the chosen device (its weights in f32).
pub fn load_block_drafter(dir: &Path, kind: DeviceKind) -> Result<Box<dyn Drafter>> {
    dispatch!(kind, |B| {
        let device = probe::<B>(kind)?;
        let model = crate::block::load_block_model::<B>(dir, &device)?;
        Ok(Box::new(BlockDrafter::new(model)) as Box<dyn Drafter>)
    })
}

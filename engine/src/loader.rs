//! Loading a Hugging Face model directory: `config.json`, one or several safetensors files, and
//! random initialisation of the same structure for benchmarks.
//!
//! Each file is memory-mapped. A matrix kept in the file's width and layout (a bf16 checkpoint on
//! the CPU, whose kernels read `[out, in]` as the file stores it) is used where it lies: the
//! tensor holds the map, and its pages are the page cache's, read once when the file is mapped.
//! Any other tensor is read once, straight from the map into its final width and layout (a
//! projection transposed to `[in, out]` for the GPU kernels, in cache-sized blocks over the
//! cores), and its pages of the map are handed back, so the load never holds a second copy of
//! the model.
//!
//! A file in use is never written in place: [`crate::save_pretrained`] writes a new file and
//! renames it over the old one, so a running model keeps the file it mapped.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::{AllocationProperty, Bytes, DType, Distribution};
use half::{bf16, f16};
use memmap2::{Mmap, MmapOptions, UncheckedAdvice};
use rayon::prelude::*;
use safetensors::tensor::Metadata;
use safetensors::Dtype as StDtype;
use troupe_kernels::{KernelBackend, WeightLayout};

use crate::config::{Architecture, ModelConfig};
use crate::error::{EngineError, Result};
use crate::model::{DecoderLayer, Linear, LinearWeight, Model};
use crate::safetensors_header::{parse_header, Header};
use crate::shard_index::parse_index;

/// Which width the weight matrices (projections, embedding, head) are kept in on the device.
/// Norms and biases follow the activations (f32 on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// f32, whatever the checkpoint stores.
    F32,
    /// bf16, whatever the checkpoint stores.
    Bf16,
    /// f16, whatever the checkpoint stores.
    F16,
    /// The checkpoint's own width (its embedding's). On a backend that does not read f16
    /// weights beside f32 activations, f16 is kept as bf16.
    AsStored,
    /// The projections and the head quantized at load to int8 in blocks of 32 with an f32 scale
    /// each (llama.cpp's Q8_0 layout); the embedding, norms and biases as with `AsStored`. On
    /// the CPU backend only.
    Int8,
}

impl std::str::FromStr for WeightDtype {
    type Err = EngineError;

    /// `f32`, `bf16`, `f16`, `stored` or `int8`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            "stored" => Ok(Self::AsStored),
            "int8" => Ok(Self::Int8),
            other => Err(EngineError::InvalidConfig(format!(
                "unknown weight dtype {other:?}; expected f32, bf16, f16, stored or int8"
            ))),
        }
    }
}

impl WeightDtype {
    /// The dtype weights stored as `stored` are kept in (for `Int8`, the float width they are
    /// read in before they are quantized, and the embedding's); `widens`: whether the backend
    /// reads narrow weights beside f32 activations (see [`KernelBackend::widens_weights`]).
    pub fn kept(self, stored: DType, widens: bool) -> DType {
        match (self, stored) {
            (Self::Int8, _) => Self::AsStored.kept(stored, widens),
            (Self::F32, _) => DType::F32,
            (Self::Bf16, _) => DType::BF16,
            (Self::F16, _) => DType::F16,
            (Self::AsStored, DType::F32) => DType::F32,
            (Self::AsStored, DType::F16) if widens => DType::F16,
            (Self::AsStored, _) => DType::BF16,
        }
    }
}

/// One mapped safetensors file and its parsed header.
struct Mapped {
    /// Shared with the tensors used where they lie.
    map: Arc<Mmap>,
    /// Where the tensors' data begins.
    data_start: usize,
    meta: Metadata,
}

/// The checkpoint files of a model directory, and which file holds which tensor.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    location: HashMap<String, usize>,
    mapped: Vec<Option<Mapped>>,
    /// Whether tensors that need no conversion are handed out where they lie (and the maps
    /// populated for them), or every tensor copied and its pages handed back.
    in_place: bool,
}

impl Checkpoint {
    /// Finds `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let (files, location): (Vec<PathBuf>, _) = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| EngineError::Io {
                path: index.clone(),
                source,
            })?;
            let parsed = parse_index(&text, &index)?;
            let files = parsed.files.iter().map(|f| dir.join(f)).collect();
            (files, parsed.location)
        } else if single.exists() {
            (vec![single], HashMap::new())
        } else {
            return Err(EngineError::MissingFile { path: single });
        };
        for f in &files {
            if !f.exists() {
                return Err(EngineError::MissingFile { path: f.clone() });
            }
        }
        let mapped = (0..files.len()).map(|_| None).collect();
        let mut ckpt = Self {
            dir: dir.into(),
            files,
            location,
            mapped,
            in_place: false,
        };
        if ckpt.location.is_empty() {
            // A single file: learn its tensor names from its header.
            let names: Vec<String> = ckpt.mapped(0)?.meta.tensors().into_keys().collect();
            for n in names {
                ckpt.location.insert(n, 0);
            }
        }
        Ok(ckpt)
    }

    /// Hands out tensors that need no conversion where they lie in the map (see
    /// [`Checkpoint::read`]), the maps populated up front; off, every tensor is a copy.
    pub fn in_place(mut self, yes: bool) -> Self {
        self.in_place = yes;
        self
    }

    /// The file mapped and its header parsed, on first use.
    fn mapped(&mut self, file: usize) -> Result<&Mapped> {
        if self.mapped[file].is_none() {
            let path = &self.files[file];
            let io = |source| EngineError::Io {
                path: path.clone(),
                source,
            };
            let handle = File::open(path).map_err(io)?;
            // SAFETY: the map is read only. A file written in place while it is mapped is outside
            // what any mmap-based reader can guard against; this project's writer renames a new
            // file over the old. A map whose tensors are used in place is populated: its pages
            // are read (from the page cache, where the file usually is) now, not faulted in one
            // by one by the first step.
            let mut options = MmapOptions::new();
            if self.in_place {
                options.populate();
            }
            let map = unsafe { options.map(&handle) }.map_err(io)?;
            let map = Arc::new(map);
            let Header { data_start, meta } = parse_header(&map, path)?;
            self.mapped[file] = Some(Mapped {
                map,
                data_start,
                meta,
            });
        }
        Ok(self.mapped[file].as_ref().expect("mapped just above"))
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The dtype a tensor is stored in.
    pub fn stored_dtype(&mut self, name: &str) -> Result<DType> {
        let (file, path) = self.file_of(name)?;
        let info = self.mapped(file)?.meta.info(name).cloned();
        let info = info.ok_or_else(|| self.missing(name, &path))?;
        dtype_of(info.dtype).ok_or_else(|| EngineError::UnsupportedDtype {
            tensor: name.into(),
            path,
            dtype: format!("{:?}", info.dtype),
        })
    }

    fn file_of(&self, name: &str) -> Result<(usize, PathBuf)> {
        let file = *self
            .location
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor {
                tensor: name.into(),
                dir: self.dir.clone(),
            })?;
        Ok((file, self.files[file].clone()))
    }

    fn missing(&self, name: &str, path: &Path) -> EngineError {
        EngineError::MissingTensor {
            tensor: name.into(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        }
    }

    /// Reads one tensor into `kept`'s width, checking its shape; `transpose` turns a `[rows,
    /// cols]` matrix into `[cols, rows]` on the way. A tensor that needs neither (and lies
    /// aligned for its width) is handed out where it lies in the map; any other is copied, and its
    /// pages of the map are handed back once it is read.
    pub fn read(
        &mut self,
        name: &str,
        expected: &[usize],
        kept: DType,
        transpose: bool,
    ) -> Result<HostTensor> {
        let (file, path) = self.file_of(name)?;
        let missing = self.missing(name, &path);
        let in_place = self.in_place;
        let m = self.mapped(file)?;
        let info = m.meta.info(name).ok_or(missing)?;
        if info.shape != expected {
            return Err(EngineError::ShapeMismatch {
                tensor: name.into(),
                path,
                found: info.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        let (begin, end) = info.data_offsets;
        let bytes = &m.map[m.data_start + begin..m.data_start + end];
        let stored = dtype_of(info.dtype).ok_or_else(|| EngineError::UnsupportedDtype {
            tensor: name.into(),
            path: path.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(stored.size());
        if in_place && !transpose && stored == kept && aligned {
            let range = m.data_start + begin..m.data_start + end;
            let shared = bytes::Bytes::from_owner(SharedMap(m.map.clone())).slice(range);
            return Ok(HostTensor::Mapped(
                Bytes::from_shared(shared, AllocationProperty::File),
                kept,
            ));
        }
        let (rows, cols) = match (transpose, expected) {
            (true, [r, c]) => (*r, *c),
            _ => (1, expected.iter().product()),
        };
        let host = HostTensor::convert(bytes, stored, kept, rows, cols, transpose);
        // SAFETY: the map is private and read only; pages dropped here are read from the file
        // again if touched, and nothing borrows them past this call.
        let _ = unsafe {
            m.map.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                m.data_start + begin,
                end - begin,
            )
        };
        Ok(host)
    }

    /// Unmaps every file mapped so far.
    pub fn release(&mut self) {
        self.mapped.iter_mut().for_each(|m| *m = None);
    }
}

/// The Burn dtype of a safetensors dtype the loader reads.
fn dtype_of(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::BF16 => Some(DType::BF16),
        StDtype::F16 => Some(DType::F16),
        _ => None,
    }
}

/// A file's map as the owner of shared bytes.
struct SharedMap(Arc<Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Tensor values read from a checkpoint, in the width they are kept in, before they go to the
/// device.
pub enum HostTensor {
    /// Elements of this dtype where they lie in the file's map.
    Mapped(Bytes, DType),
    /// f32 values.
    F32(Vec<f32>),
    /// bf16 values.
    Bf16(Vec<bf16>),
    /// f16 values.
    F16(Vec<f16>),
}

/// A width a checkpoint stores or the loader keeps: converts through f32, which holds every
/// value of all three exactly.
trait Element: bytemuck::Pod + Default + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Element for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Rows of the source a transposition tile gathers at once.
const TRANSPOSE_BLOCK: usize = 32;
/// Columns of the source a transposition tile gathers from each row: runs of 512 B in bf16,
/// long enough for the prefetchers; the tile (32 KiB in f32) stays in L1.
const TRANSPOSE_RUN: usize = 256;

impl HostTensor {
    /// `bytes` (`rows × cols` elements of `stored`) in `kept`'s width, transposed to `[cols,
    /// rows]` when `transpose`.
    fn convert(
        bytes: &[u8],
        stored: DType,
        kept: DType,
        rows: usize,
        cols: usize,
        transpose: bool,
    ) -> Self {
        fn to<K: Element>(
            bytes: &[u8],
            stored: DType,
            rows: usize,
            cols: usize,
            transpose: bool,
        ) -> Vec<K> {
            match stored {
                DType::BF16 => from::<bf16, K>(bytes, rows, cols, transpose),
                DType::F16 => from::<f16, K>(bytes, rows, cols, transpose),
                _ => from::<f32, K>(bytes, rows, cols, transpose),
            }
        }
        match kept {
            DType::BF16 => Self::Bf16(to(bytes, stored, rows, cols, transpose)),
            DType::F16 => Self::F16(to(bytes, stored, rows, cols, transpose)),
            _ => Self::F32(to(bytes, stored, rows, cols, transpose)),
        }
    }

    pub(crate) fn into_device<B: Backend, const D: usize>(
        self,
        shape: [usize; D],
        device: &B::Device,
    ) -> Tensor<B, D> {
        match self {
            HostTensor::Mapped(bytes, dtype) => {
                Tensor::from_data(TensorData::from_bytes(bytes, shape, dtype), (device, dtype))
            }
            HostTensor::F32(v) => {
                Tensor::from_data(TensorData::new(v, shape), (device, DType::F32))
            }
            HostTensor::Bf16(v) => {
                Tensor::from_data(TensorData::new(v, shape), (device, DType::BF16))
            }
            HostTensor::F16(v) => {
                Tensor::from_data(TensorData::new(v, shape), (device, DType::F16))
            }
        }
    }
}

/// A pointer to the transposed matrix, shared by tasks that write disjoint elements.
struct SendPtr<K>(*mut K);

impl<K> SendPtr<K> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw pointer).
    fn get(&self) -> *mut K {
        self.0
    }
}

// SAFETY: the tasks holding it write disjoint elements, and the vector outlives them.
unsafe impl<K: Send> Send for SendPtr<K> {}
unsafe impl<K: Send> Sync for SendPtr<K> {}

/// `rows × cols` elements of `S` from `bytes` as `K`, transposed when asked. Read in place when
/// the bytes are aligned for `S` (a safetensors header pads its data to 8 bytes), through one
/// copy when not.
fn from<S: Element, K: Element>(bytes: &[u8], rows: usize, cols: usize, transpose: bool) -> Vec<K> {
    let copied;
    let src: &[S] = match bytemuck::try_cast_slice(bytes) {
        Ok(s) => s,
        Err(_) => {
            copied = bytemuck::pod_collect_to_vec::<u8, S>(bytes);
            &copied
        }
    };
    let same = std::any::TypeId::of::<S>() == std::any::TypeId::of::<K>();
    if !transpose {
        if same {
            return bytemuck::cast_slice::<S, K>(src).to_vec();
        }
        let mut out = vec![K::default(); src.len()];
        out.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(o, s)| {
                for (o, s) in o.iter_mut().zip(s) {
                    *o = K::from_f32(s.to_f32());
                }
            });
        return out;
    }
    // out[c][r] = src[r][c]: one band of `src`'s rows per task, read front to back (the way
    // the prefetchers follow a mapped file best); inside it, tiles gathered into a buffer in L1
    // and written out as runs of `out`'s rows.
    let mut out = vec![K::default(); rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    const B: usize = TRANSPOSE_BLOCK;
    let dst = SendPtr(out.as_mut_ptr());
    (0..rows.div_ceil(B)).into_par_iter().for_each(|band| {
        let r0 = band * B;
        let rb = B.min(rows - r0);
        let mut tile = [[K::default(); B]; TRANSPOSE_RUN];
        for c0 in (0..cols).step_by(TRANSPOSE_RUN) {
            let nc = TRANSPOSE_RUN.min(cols - c0);
            for (r, run) in src[r0 * cols..].chunks(cols).take(rb).enumerate() {
                for (c, v) in run[c0..c0 + nc].iter().enumerate() {
                    tile[c][r] = if same {
                        // SAFETY: `same` says `S` and `K` are one type.
                        unsafe { std::mem::transmute_copy::<S, K>(v) }
                    } else {
                        K::from_f32(v.to_f32())
                    };
                }
            }
            for (c, t) in tile.iter().take(nc).enumerate() {
                // SAFETY: `out` holds `rows · cols` elements; this task alone writes rows
                // `r0..r0 + rb` of each of `out`'s rows.
                unsafe {
                    let at = dst.get().add((c0 + c) * rows + r0);
                    std::ptr::copy_nonoverlapping(t.as_ptr(), at, rb);
                }
            }
        }
    });
    out
}

/// Loads the weights of `config`'s architecture from `dir`: the matrices in the width `dtype`
/// names, norms and biases in the activations' dtype.
pub fn load_model<B: KernelBackend>(
    dir: &Path,
    config: &ModelConfig,
    dtype: WeightDtype,
    device: &B::Device,
) -> Result<Model<B>> {
    if dtype == WeightDtype::Int8 && !B::widens_weights() {
        return Err(int8_elsewhere());
    }
    // In place where the kernels read the file's width and layout as they lie; int8 weights
    // are quantized from copies, whose pages of the map are handed back as each is done.
    let in_place = B::widens_weights() && dtype != WeightDtype::Int8;
    let mut ckpt = Checkpoint::open(dir)?.in_place(in_place);
    let stored = ckpt.stored_dtype("model.embed_tokens.weight")?;
    let kept = dtype.kept(stored, B::widens_weights());
    let int8 = dtype == WeightDtype::Int8;
    let small = activation_dtype::<B>(kept);
    let c = config;
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);

    let vector = |ckpt: &mut Checkpoint, name: &str, n: usize| -> Result<Tensor<B, 1>> {
        Ok(ckpt
            .read(name, &[n], small, false)?
            .into_device([n], device))
    };
    let embed = ckpt
        .read("model.embed_tokens.weight", &[c.vocab_size, h], kept, false)?
        .into_device([c.vocab_size, h], device);
    let transpose = B::weight_layout() == WeightLayout::InOut;
    let linear = |ckpt: &mut Checkpoint,
                  name: &str,
                  out: usize,
                  inp: usize,
                  bias: bool|
     -> Result<Linear<B>> {
        let shape = if transpose { [inp, out] } else { [out, inp] };
        let w = ckpt
            .read(&format!("{name}.weight"), &[out, inp], kept, transpose)?
            .into_device(shape, device);
        let w = if int8 {
            to_int8(w)
        } else {
            LinearWeight::Float(w)
        };
        let bias = if bias {
            Some(vector(ckpt, &format!("{name}.bias"), out)?)
        } else {
            None
        };
        Ok(Linear { weight: w, bias })
    };
    // Grown as the layers are read: `num_layers` comes from the config, not the checkpoint.
    let mut layers = Vec::new();
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let qwen = c.architecture == Architecture::Qwen3;
        layers.push(DecoderLayer {
            input_norm: vector(&mut ckpt, &format!("{p}.input_layernorm.weight"), h)?,
            q_proj: linear(
                &mut ckpt,
                &format!("{p}.self_attn.q_proj"),
                qd,
                h,
                c.attention_bias,
            )?,
            k_proj: linear(
                &mut ckpt,
                &format!("{p}.self_attn.k_proj"),
                kvd,
                h,
                c.attention_bias,
            )?,
            v_proj: linear(
                &mut ckpt,
                &format!("{p}.self_attn.v_proj"),
                kvd,
                h,
                c.attention_bias,
            )?,
            o_proj: linear(
                &mut ckpt,
                &format!("{p}.self_attn.o_proj"),
                h,
                qd,
                c.attention_bias,
            )?,
            q_norm: if qwen {
                Some(vector(
                    &mut ckpt,
                    &format!("{p}.self_attn.q_norm.weight"),
                    hd,
                )?)
            } else {
                None
            },
            k_norm: if qwen {
                Some(vector(
                    &mut ckpt,
                    &format!("{p}.self_attn.k_norm.weight"),
                    hd,
                )?)
            } else {
                None
            },
            post_norm: vector(
                &mut ckpt,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
            )?,
            gate_proj: linear(&mut ckpt, &format!("{p}.mlp.gate_proj"), i, h, false)?,
            up_proj: linear(&mut ckpt, &format!("{p}.mlp.up_proj"), i, h, false)?,
            down_proj: linear(&mut ckpt, &format!("{p}.mlp.down_proj"), h, i, false)?,
        });
    }
    let norm = vector(&mut ckpt, "model.norm.weight", h)?;
    let lm_head = if c.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
        // An int8 model reads its head in int8 too: the embedding's blocks, beside the
        // embedding kept for the input rows.
        int8.then(|| to_int8(embed.clone()))
    } else {
        Some(linear(&mut ckpt, "lm_head", c.vocab_size, h, false)?.weight)
    };
    ckpt.release();
    Ok(Model::from_parts(
        config.clone(),
        embed,
        layers,
        norm,
        lm_head,
        device.clone(),
    ))
}

/// `w` (`[out, in]`) as int8 blocks where its rows are whole blocks; in its float width where
/// not.
fn to_int8<B: KernelBackend>(w: Tensor<B, 2>) -> LinearWeight<B> {
    match B::quantize_int8(&w) {
        Some(q) => LinearWeight::Int8(q),
        None => LinearWeight::Float(w),
    }
}

/// The error for int8 weights on a backend whose kernels do not read them.
fn int8_elsewhere() -> EngineError {
    EngineError::InvalidConfig(
        "int8 weights run on the CPU backend only; use bf16, f16 or f32 on this device".into(),
    )
}

/// `model` with its projections and head in int8 blocks (see [`WeightDtype::Int8`]), as a
/// checkpoint loaded with `--weights int8` keeps them.
pub fn quantize_model<B: KernelBackend>(mut model: Model<B>) -> Result<Model<B>> {
    if !B::widens_weights() {
        return Err(int8_elsewhere());
    }
    for lin in model.layers.iter_mut().flat_map(|l| l.projections_mut()) {
        if let LinearWeight::Float(w) = &lin.weight {
            lin.weight = to_int8(w.clone());
        }
    }
    model.lm_head = match model.lm_head.take() {
        Some(LinearWeight::Float(w)) => Some(to_int8(w)),
        Some(q) => Some(q),
        None => Some(to_int8(model.embed.clone())),
    };
    Ok(model)
}

/// The dtype of the activations, norms and windows of a model whose matrices are kept in
/// `weights`: f32 on a backend that widens narrow weights, the weights' own otherwise.
pub fn activation_dtype<B: KernelBackend>(weights: DType) -> DType {
    if B::widens_weights() {
        DType::F32
    } else {
        weights
    }
}

/// A model of `config`'s shape with random weights (normal, std 0.02; norms at one), for benchmarks.
/// `dtype` is the width of its matrices; norms and biases take the activations' dtype.
pub fn random_model<B: KernelBackend>(
    config: &ModelConfig,
    dtype: DType,
    seed: u64,
    device: &B::Device,
) -> Model<B> {
    B::seed(device, seed);
    let small = activation_dtype::<B>(dtype);
    let c = config;
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
    let normal = |shape: [usize; 2]| -> Tensor<B, 2> {
        Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 0.02), device).cast(dtype)
    };
    let ones = |n: usize| Tensor::<B, 1>::ones([n], (device, small));
    let linear = |inp: usize, out: usize, bias: bool| Linear {
        weight: LinearWeight::Float(match B::weight_layout() {
            WeightLayout::InOut => normal([inp, out]),
            WeightLayout::OutIn => normal([out, inp]),
        }),
        bias: bias.then(|| Tensor::zeros([out], (device, small))),
    };
    let qwen = c.architecture == Architecture::Qwen3;
    let layers = (0..c.num_layers)
        .map(|_| DecoderLayer {
            input_norm: ones(h),
            q_proj: linear(h, qd, c.attention_bias),
            k_proj: linear(h, kvd, c.attention_bias),
            v_proj: linear(h, kvd, c.attention_bias),
            o_proj: linear(qd, h, c.attention_bias),
            q_norm: qwen.then(|| ones(hd)),
            k_norm: qwen.then(|| ones(hd)),
            post_norm: ones(h),
            gate_proj: linear(h, i, false),
            up_proj: linear(h, i, false),
            down_proj: linear(i, h, false),
        })
        .collect();
    let embed = normal([c.vocab_size, h]);
    let lm_head = (!c.tie_word_embeddings).then(|| linear(h, c.vocab_size, false).weight);
    Model::from_parts(
        config.clone(),
        embed,
        layers,
        ones(h),
        lm_head,
        device.clone(),
    )
}

//! Flex, Burn's CPU backend: the skinny products run the weight-streaming [`cpu_matmul`] kernel,
//! pooled attention runs [`cpu_attention`] on the pool's elements in place, and sampled
//! acceptance runs [`cpu_sampled`] on the logit rows.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::{bf16, f16, DType, TensorPrimitive};

use crate::accept::verdicts_from_argmax;
use crate::cpu_attention::{pooled_attention, PooledInputs};
use crate::cpu_head;
use crate::cpu_matmul::{skinny_matmul, CpuEpilogue};
use crate::cpu_norm;
use crate::cpu_weight::{quantize_q8, Q8, Q8_BLOCK};
use crate::Int8Weight;
use crate::{cpu_sampled, enabled, pool, reference, sampled, KernelBackend, WeightLayout};
use crate::{BlockVerdict, DraftBlock, PoolLayout, PooledSeq, SampledBlock};

/// Runs `$body` with `$w` bound to the contiguous elements of a weight of any width
/// [`is_weight_width`] accepts, as `&[f32]`, `&[bf16]` or `&[f16]`.
macro_rules! by_width {
    ($t:expr, |$w:ident| $body:expr) => {{
        let t: &FlexTensor = $t;
        match t.dtype() {
            DType::BF16 => {
                let $w: &[bf16] = t.as_slice().expect("made contiguous");
                $body
            }
            DType::F16 => {
                let $w: &[f16] = t.as_slice().expect("made contiguous");
                $body
            }
            _ => {
                let $w: &[f32] = t.as_slice().expect("made contiguous");
                $body
            }
        }
    }};
}

impl KernelBackend for Flex {
    /// Projections stay as the checkpoint stores them: the kernel reads `[out, in]` by rows, so
    /// a matrix kept in the file's width is used where the file is mapped.
    fn weight_layout() -> WeightLayout {
        WeightLayout::OutIn
    }

    fn skinny_linear(
        x: Tensor<Self, 2>,
        w: &Tensor<Self, 2>,
        residual: Option<Tensor<Self, 2>>,
    ) -> Tensor<Self, 2> {
        if !skinny_takes(&x, &[w]) || residual.as_ref().is_some_and(|r| r.dtype() != DType::F32) {
            return reference::linear_t(x, w, residual);
        }
        let ([m, k], n) = (x.dims(), w.dims()[0]);
        let (x, w) = (contiguous(x), contiguous(w.clone()));
        let r = residual.map(contiguous);
        let y = by_width!(&w, |w| match &r {
            Some(r) => skinny_matmul(slice(&x), w, m, k, n, CpuEpilogue::Residual(slice(r))),
            None => skinny_matmul(slice(&x), w, m, k, n, CpuEpilogue::None),
        });
        from_rows(y, [m, n])
    }

    /// The same product as a projection's: the embedding is `[vocab, hidden]`, `[out, in]`.
    fn skinny_linear_t(x: Tensor<Self, 2>, w: &Tensor<Self, 2>) -> Tensor<Self, 2> {
        Self::skinny_linear(x, w, None)
    }

    fn skinny_swiglu(
        x: Tensor<Self, 2>,
        gate: &Tensor<Self, 2>,
        up: &Tensor<Self, 2>,
    ) -> Tensor<Self, 2> {
        if !skinny_takes(&x, &[gate, up]) || gate.dims() != up.dims() {
            return reference::swiglu_t(x, gate, up);
        }
        let ([m, k], n) = (x.dims(), gate.dims()[0]);
        let (x, g, u) = (
            contiguous(x),
            contiguous(gate.clone()),
            contiguous(up.clone()),
        );
        let y = by_width!(&g, |gw| {
            let u = u.as_slice().expect("gate and up share a width");
            skinny_matmul(slice(&x), gw, m, k, n, CpuEpilogue::SwiGlu(u))
        });
        from_rows(y, [m, n])
    }

    /// Quantized over the cores, read as it lies by the same kernels as the float widths.
    fn quantize_int8(w: &Tensor<Self, 2>) -> Option<Int8Weight<Self>> {
        let [n, k] = w.dims();
        if k == 0 || !k.is_multiple_of(Q8_BLOCK) || !is_weight_width(w.dtype()) {
            return None;
        }
        let t = contiguous(w.clone());
        let (values, scales) = by_width!(&t, |s| quantize_q8(s));
        let values = FlexTensor::from_data(TensorData::new(values, [n, k]));
        Some(Int8Weight {
            values: Tensor::from_primitive(values),
            scales: from_rows(scales, [n, k / Q8_BLOCK]),
        })
    }

    fn skinny_linear_int8(
        x: Tensor<Self, 2>,
        w: &Int8Weight<Self>,
        residual: Option<Tensor<Self, 2>>,
    ) -> Tensor<Self, 2> {
        let ([m, k], [n, kw]) = (x.dims(), w.dims());
        let r_f32 = residual.as_ref().is_none_or(|r| r.dtype() == DType::F32);
        if !enabled() || x.dtype() != DType::F32 || k != kw || !r_f32 {
            return reference::linear_t(x, &w.dequantize(), residual);
        }
        let (x, r) = (contiguous(x), residual.map(contiguous));
        let (values, scales) = int8_parts(w);
        let Some(q) = int8_matrix(&values, &scales) else {
            return reference::linear_t(from_flex(x), &w.dequantize(), r.map(from_flex));
        };
        let y = match &r {
            Some(r) => skinny_matmul(slice(&x), q, m, k, n, CpuEpilogue::Residual(slice(r))),
            None => skinny_matmul(slice(&x), q, m, k, n, CpuEpilogue::None),
        };
        from_rows(y, [m, n])
    }

    fn skinny_swiglu_int8(
        x: Tensor<Self, 2>,
        gate: &Int8Weight<Self>,
        up: &Int8Weight<Self>,
    ) -> Tensor<Self, 2> {
        let ([m, k], [n, kw]) = (x.dims(), gate.dims());
        if !enabled() || x.dtype() != DType::F32 || k != kw || gate.dims() != up.dims() {
            return reference::swiglu_t(x, &gate.dequantize(), &up.dequantize());
        }
        let x = contiguous(x);
        let ((gv, gs), (uv, us)) = (int8_parts(gate), int8_parts(up));
        let (Some(g), Some(u)) = (int8_matrix(&gv, &gs), int8_matrix(&uv, &us)) else {
            return reference::swiglu_t(from_flex(x), &gate.dequantize(), &up.dequantize());
        };
        from_rows(
            skinny_matmul(slice(&x), g, m, k, n, CpuEpilogue::SwiGlu(u)),
            [m, n],
        )
    }

    /// One pass over each row where it lies (Flex's broadcasting ops walk strided iterators).
    fn rms_norm(x: Tensor<Self, 2>, weight: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        let cols = x.dims()[1];
        if !enabled() || x.dtype() != DType::F32 || weight.dtype() != DType::F32 || cols == 0 {
            return reference::rms_norm(x, weight, eps);
        }
        let rows = x.dims()[0];
        let (x, w) = (contiguous(x), contiguous(weight.clone()));
        from_rows(
            cpu_norm::rms_norm(slice(&x), slice(&w), cols, eps as f32),
            [rows, cols],
        )
    }

    /// By blocks of the vocabulary, each row keeping its best token ([`cpu_head`]).
    fn head_argmax(x: Tensor<Self, 2>, w: &Tensor<Self, 2>) -> Option<Vec<u32>> {
        if !skinny_takes(&x, &[w]) {
            return None;
        }
        let ([m, k], n) = (x.dims(), w.dims()[0]);
        let (x, w) = (contiguous(x), contiguous(w.clone()));
        Some(by_width!(&w, |w| cpu_head::head_argmax(
            slice(&x),
            w,
            m,
            k,
            n
        )))
    }

    fn head_argmax_int8(x: Tensor<Self, 2>, w: &Int8Weight<Self>) -> Option<Vec<u32>> {
        let ([m, k], [n, kw]) = (x.dims(), w.dims());
        if !enabled() || x.dtype() != DType::F32 || k != kw {
            return None;
        }
        let x = contiguous(x);
        let (values, scales) = int8_parts(w);
        let q = int8_matrix(&values, &scales)?;
        Some(cpu_head::head_argmax(slice(&x), q, m, k, n))
    }

    /// On the CPU the host is the device: the argmax rows are compared where they are.
    fn greedy_accept(logits: Tensor<Self, 2>, blocks: &[DraftBlock<'_>]) -> Vec<BlockVerdict> {
        if !enabled() {
            return reference::greedy_accept(logits, blocks);
        }
        let argmax: Vec<u32> = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .expect("an int tensor reads back as i64")
            .into_iter()
            .map(|t| t as u32)
            .collect();
        verdicts_from_argmax(&argmax, blocks)
    }

    /// On the rows where they are, each block only up to its first rejection.
    fn sampled_accept(logits: Tensor<Self, 2>, blocks: &[SampledBlock<'_>]) -> Vec<BlockVerdict> {
        if !enabled() || logits.dtype() != DType::F32 {
            return sampled::sampled_accept(logits, blocks);
        }
        let vocab = logits.dims()[1];
        let logits = contiguous(logits);
        cpu_sampled::sampled_accept(slice(&logits), vocab, blocks)
    }

    /// In place when the pool is f32, contiguous and held by nothing else (Flex's own scatter
    /// copies the whole pool).
    fn write_pool_rows(
        pool: Tensor<Self, 4>,
        rows: &Tensor<Self, 2>,
        src: &[usize],
        dst: &[[usize; 3]],
    ) -> Result<Tensor<Self, 4>, Tensor<Self, 4>> {
        let [_, kvh, cap, hd] = pool.dims();
        if !enabled() || pool.dtype() != DType::F32 || rows.dtype() != DType::F32 {
            return Err(pool);
        }
        let mut p = pool.into_primitive().tensor();
        let whole = p.layout().contiguous_offsets() == Some((0, p.layout().num_elements()));
        let written = match p.try_storage_mut::<f32>() {
            Some(buf) if whole => {
                let rows = contiguous(rows.clone());
                let rows = slice(&rows);
                for (&s, &[slot, head, pos]) in src.iter().zip(dst) {
                    buf[((slot * kvh + head) * cap + pos) * hd..][..hd]
                        .copy_from_slice(&rows[s * hd..][..hd]);
                }
                true
            }
            _ => false,
        };
        let pool = Tensor::from_primitive(TensorPrimitive::Float(p));
        if written {
            Ok(pool)
        } else {
            Err(pool)
        }
    }

    /// Flex's own zeros go through a byte buffer that is copied to be aligned, touching every
    /// page; a zeroed `f32` vector is taken over as it is, its pages zeroed by the system on first
    /// write.
    fn pool_zeros(shape: [usize; 4], dtype: DType, device: &Self::Device) -> Tensor<Self, 4> {
        if dtype != DType::F32 {
            return Tensor::zeros(shape, (device, dtype));
        }
        let n: usize = shape.iter().product();
        // glibc serves an allocation under its mmap threshold (which it raises up to 32 MiB as
        // large blocks are freed) from its heap, where `calloc` must clear it; past that it maps
        // fresh pages, which the kernel zeroes when first written. A pool tensor of a MiB or more
        // asks for past the threshold and keeps only its own length of it.
        let zeros = if n * 4 >= 1 << 20 {
            let mut v = vec![0.0f32; n.max((MAPPED_BYTES / 4) + 1)];
            v.truncate(n);
            v
        } else {
            vec![0.0f32; n]
        };
        Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(
            TensorData::new(zeros, shape),
        )))
    }

    /// On a thread of rayon's pool, where the kernels fork.
    fn on_workers<R: Send>(work: impl FnOnce() -> R + Send) -> R {
        rayon::scope(|_| work())
    }

    /// The CPU kernels widen bf16 and f16 weights in registers; the references cast them.
    fn widens_weights() -> bool {
        true
    }

    fn has_attention_kernel() -> bool {
        enabled()
    }

    fn pooled_attention(
        q: Tensor<Self, 2>,
        step_k: Tensor<Self, 2>,
        step_v: Tensor<Self, 2>,
        pool_k: &Tensor<Self, 4>,
        pool_v: &Tensor<Self, 4>,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
        seqs: &[PooledSeq],
        layout: &PoolLayout,
    ) -> Tensor<Self, 2> {
        let all_f32 = [&q, &step_k, &step_v, cos, sin]
            .iter()
            .all(|t| t.dtype() == DType::F32)
            && pool_k.dtype() == DType::F32
            && pool_v.dtype() == DType::F32;
        if !enabled() || !all_f32 {
            return pool::reference(q, step_k, step_v, pool_k, pool_v, cos, sin, seqs, layout);
        }
        let rows = q.dims()[0];
        let [q, step_k, step_v, cos, sin] =
            [q, step_k, step_v, cos.clone(), sin.clone()].map(contiguous);
        let [pool_k, pool_v] = [pool_k.clone(), pool_v.clone()].map(contiguous);
        let inputs = PooledInputs {
            q: slice(&q),
            step_k: slice(&step_k),
            step_v: slice(&step_v),
            pool_k: slice(&pool_k),
            pool_v: slice(&pool_v),
            cos: slice(&cos),
            sin: slice(&sin),
        };
        let out = pooled_attention(&inputs, seqs, layout, rows);
        from_rows(out, [rows, layout.heads * layout.head_dim])
    }
}

/// Bytes past which glibc always maps an allocation afresh (its largest mmap threshold).
const MAPPED_BYTES: usize = 32 << 20;

/// Whether the kernel takes this product: f32 rows, `[n, k]` weights of one width the kernel
/// widens (f32, bf16 or f16), matching inner sizes. A product of any height does: past
/// [`crate::cpu_matmul::MAX_BLOCK_ROWS`] it runs in blocks of rows, each faster than Flex's own
/// matmul on these shapes.
fn skinny_takes(x: &Tensor<Flex, 2>, weights: &[&Tensor<Flex, 2>]) -> bool {
    let k = x.dims()[1];
    let width = weights.first().map(|w| w.dtype());
    enabled()
        && x.dtype() == DType::F32
        && width.is_some_and(is_weight_width)
        && weights
            .iter()
            .all(|w| Some(w.dtype()) == width && w.dims()[1] == k)
}

/// Whether the CPU kernels read weights of this dtype in place.
fn is_weight_width(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// The tensor's storage, made contiguous when it is a strided view.
fn contiguous<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    let t = t.into_primitive().tensor();
    if t.layout().contiguous_offsets().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// An int8 weight's values and scales, each made contiguous.
fn int8_parts(w: &Int8Weight<Flex>) -> (FlexTensor, FlexTensor) {
    let values: FlexTensor = w.values.clone().into_primitive();
    let values = if values.layout().contiguous_offsets().is_some() {
        values
    } else {
        values.to_contiguous()
    };
    (values, contiguous(w.scales.clone()))
}

/// The kernels' view of an int8 weight's parts; `None` when they are not i8 values with an f32
/// scale per block.
fn int8_matrix<'a>(values: &'a FlexTensor, scales: &'a FlexTensor) -> Option<Q8<'a>> {
    Q8::new(values.as_slice::<i8>()?, scales.as_slice::<f32>()?)
}

/// A Flex tensor back as a Burn float tensor.
fn from_flex(t: FlexTensor) -> Tensor<Flex, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The contiguous f32 elements of an f32 tensor from [`contiguous`].
fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("an f32 tensor made contiguous")
}

/// A row-major result as a Flex tensor.
fn from_rows(y: Vec<f32>, shape: [usize; 2]) -> Tensor<Flex, 2> {
    let t = FlexTensor::from_data(TensorData::new(y, shape));
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

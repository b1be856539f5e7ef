//! The `kernels` case: each kernel against Burn's own ops on the same inputs, and against the
//! bandwidth floor (the bytes it must read and write over the device's measured copy bandwidth).
//! Then a chain of decoder layers shaped like Qwen3-1.7B (seven projections and the SwiGLU gate
//! per layer, no attention), once through the kernels and once through Burn's ops. Where the
//! backend has an attention kernel, the pooled sink-window attention over full windows too. Last,
//! one verify step's acceptance, greedy and sampled, decided on the device against every logit row
//! read back and decided on the host (that row's `burn_ms`).

use std::time::Instant;

use crate::error::{BenchError, Result};
use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use serde::Serialize;
use serde_json::json;
use troupe::engine::{DeviceKind, SamplingParams};
use troupe::kernels::{reference, set_enabled, KernelBackend, WeightLayout};

use crate::kernels_accept::{AcceptCase, AcceptShape};
use crate::kernels_attention::{AttentionCase, AttentionShape};
use crate::plot::{lines, Axes, Series};
use crate::{finish, markdown, median, progress, Case, Env};

/// What the `kernels` case measures.
#[derive(Debug, Clone)]
pub struct KernelsPlan {
    /// Rows of the skinny products.
    pub rows: Vec<usize>,
    /// `(k, n)` of the single products: `x[rows, k] · W[k, n]`.
    pub product: (usize, usize),
    /// The chain's hidden size, MLP width, attention width (q and o) and KV width (k and v).
    pub chain: ChainShape,
    /// Decoder layers in the chain (each with its own weights).
    pub chain_layers: usize,
    /// Rows of the chain runs.
    pub chain_rows: Vec<usize>,
    /// Sessions and heads of the pooled attention rows.
    pub attention: AttentionShape,
    /// Query tokens per session in the attention rows (decode, verify).
    pub attention_queries: Vec<usize>,
    /// The verify step of the acceptance rows.
    pub accept: AcceptShape,
    /// Untimed runs before each measurement.
    pub warmup: usize,
    /// Timed runs; the median is reported.
    pub reps: usize,
}

/// The widths of one decoder layer of the chain.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ChainShape {
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Query heads × head size.
    pub q: usize,
    /// KV heads × head size.
    pub kv: usize,
}

impl KernelsPlan {
    /// The shapes (`x[b, 2048] · W[2048, 6144]`, 28 Qwen3-1.7B layers), or a small plan.
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                rows: vec![1, 8],
                product: (256, 768),
                chain: ChainShape {
                    hidden: 256,
                    intermediate: 768,
                    q: 256,
                    kv: 128,
                },
                chain_layers: 2,
                chain_rows: vec![1],
                attention: AttentionShape {
                    sessions: 4,
                    heads: 4,
                    kv_heads: 2,
                    head_dim: 64,
                    sink: 4,
                    window: 60,
                },
                attention_queries: vec![1, 5],
                accept: AcceptShape {
                    blocks: 4,
                    drafts: 4,
                    vocab: 4096,
                },
                warmup: 1,
                reps: 3,
            }
        } else {
            Self {
                rows: vec![1, 8, 16, 32, 64],
                product: (2048, 6144),
                chain: ChainShape {
                    hidden: 2048,
                    intermediate: 6144,
                    q: 2048,
                    kv: 1024,
                },
                chain_layers: 28,
                chain_rows: vec![1, 8, 64],
                // Qwen3-1.7B's heads over 16 sessions of 4 sinks + 1020.
                attention: AttentionShape {
                    sessions: 16,
                    heads: 16,
                    kv_heads: 8,
                    head_dim: 128,
                    sink: 4,
                    window: 1020,
                },
                attention_queries: vec![1, 5],
                // 8 sessions' blocks of 4 drafts over Qwen3's vocabulary.
                accept: AcceptShape {
                    blocks: 8,
                    drafts: 4,
                    vocab: 151_936,
                },
                warmup: 3,
                reps: 15,
            }
        }
    }
}

/// One measured kernel and shape, in the fields.
#[derive(Debug, Clone, Serialize)]
pub struct KernelRow {
    /// `linear`, `linear+residual`, `swiglu`, `chain28`, `pooled_attention`, `greedy_accept` or
    /// `sampled_accept`.
    pub kernel: String,
    /// The shape, as `m x k x n` (or what the kernel takes).
    pub shape: String,
    /// The weights' dtype.
    pub dtype: String,
    /// The device.
    pub device: String,
    /// Median time of the kernel.
    pub ms: f64,
    /// Bytes the kernel must move over `ms`.
    pub gb_s: f64,
    /// Median time of Burn's own ops on the same inputs (for acceptance: of reading every logit
    /// row back and deciding on the host).
    pub burn_ms: f64,
    /// Bytes over the device's copy bandwidth.
    pub floor_ms: f64,
}

impl KernelRow {
    /// A row for `bytes` moved in `ms` (the kernel) and `burn_ms` (Burn's ops).
    fn new(
        kernel: String,
        shape: String,
        dtype: DType,
        env: &Env,
        bytes: usize,
        (ms, burn_ms): (f64, f64),
        copy_gb_s: f64,
    ) -> Self {
        Self {
            kernel,
            shape,
            dtype: format!("{dtype:?}").to_lowercase(),
            device: env.device_name.clone(),
            ms,
            gb_s: bytes as f64 / ms / 1e6,
            burn_ms,
            floor_ms: bytes as f64 / copy_gb_s / 1e6,
        }
    }
}

/// Runs the case on the device the environment names; returns the report it wrote.
pub fn run(plan: &KernelsPlan, env: &Env) -> Result<serde_json::Value> {
    match env.device {
        #[cfg(feature = "cpu")]
        DeviceKind::Cpu => run_on::<burn::backend::Flex>(plan, env, &[DType::F32]),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => run_on::<burn::backend::Wgpu>(plan, env, &[DType::F32]),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => run_on::<burn::backend::Cuda>(plan, env, &[DType::F32, DType::BF16]),
        #[allow(unreachable_patterns)]
        other => Err(BenchError::Invalid(format!(
            "this build has no {} backend (build with --features {})",
            other.feature(),
            other.feature()
        ))),
    }
}

fn run_on<B: KernelBackend>(
    plan: &KernelsPlan,
    env: &Env,
    dtypes: &[DType],
) -> Result<serde_json::Value> {
    let device = B::Device::default();
    let copy_gb_s = copy_bandwidth::<B>(&device, env.device);
    let attention = if B::has_attention_kernel() {
        plan.attention_queries.as_slice()
    } else {
        &[]
    };
    let per_dtype = 3 * plan.rows.len() + plan.chain_rows.len() + attention.len();
    let bar = progress((dtypes.len() * per_dtype + 3) as u64, "kernels");
    let mut rows = Vec::new();
    let timer = Timer::<B> {
        plan,
        device: &device,
    };
    let (k, n) = plan.product;
    for &dtype in dtypes {
        let w = random::<B>(kept::<B>([k, n]), &device).cast(dtype);
        let u = random::<B>(kept::<B>([k, n]), &device).cast(dtype);
        let layout = B::weight_layout();
        for &m in &plan.rows {
            let x = random::<B>([m, k], &device).cast(dtype);
            let r = random::<B>([m, n], &device).cast(dtype);
            let row = |kernel: &str, bytes: usize, times: (f64, f64)| {
                let shape = format!("{m}x{k}x{n}");
                KernelRow::new(kernel.into(), shape, dtype, env, bytes, times, copy_gb_s)
            };
            let es = dtype.size();
            let io = (m * k + m * n) * es;
            rows.push(row(
                "linear",
                k * n * es + io,
                timer.pair(
                    || B::skinny_linear(x.clone(), &w, None),
                    || reference::project(x.clone(), &w, layout, None),
                ),
            ));
            bar.inc(1);
            rows.push(row(
                "linear+residual",
                k * n * es + io + m * n * es,
                timer.pair(
                    || B::skinny_linear(x.clone(), &w, Some(r.clone())),
                    || reference::project(x.clone(), &w, layout, Some(r.clone())),
                ),
            ));
            bar.inc(1);
            rows.push(row(
                "swiglu",
                2 * k * n * es + io,
                timer.pair(
                    || B::skinny_swiglu(x.clone(), &w, &u),
                    || reference::project_swiglu(x.clone(), &w, &u, layout),
                ),
            ));
            bar.inc(1);
        }
        let chain = Chain::<B>::new(plan.chain, plan.chain_layers, dtype, &device);
        // A chain run streams every layer's weights: a few runs give a stable median.
        let chain_plan = KernelsPlan {
            warmup: 1,
            reps: plan.reps.min(5),
            ..plan.clone()
        };
        let chain_timer = Timer::<B> {
            plan: &chain_plan,
            device: &device,
        };
        for &m in &plan.chain_rows {
            let x = random::<B>([m, plan.chain.hidden], &device).cast(dtype);
            let bytes = chain.weight_bytes() + 2 * m * plan.chain.hidden * dtype.size();
            let (ms, burn_ms) = chain_timer.pair(
                || chain.forward(x.clone(), true),
                || chain.forward(x.clone(), false),
            );
            rows.push(KernelRow::new(
                format!("chain{}", plan.chain_layers),
                format!("{m}x{}", plan.chain.hidden),
                dtype,
                env,
                bytes,
                (ms, burn_ms),
                copy_gb_s,
            ));
            bar.inc(1);
        }
        for &queries in attention {
            let case = AttentionCase::<B>::new(plan.attention, queries, dtype, &device);
            let times = timer.pair(|| case.kernel(), || case.burn());
            rows.push(KernelRow::new(
                "pooled_attention".into(),
                case.label(),
                dtype,
                env,
                case.bytes(),
                times,
                copy_gb_s,
            ));
            bar.inc(1);
        }
    }
    let sampled = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
    };
    for (kernel, params) in [
        ("greedy_accept", SamplingParams::greedy()),
        ("sampled_accept", sampled),
    ] {
        let case = AcceptCase::<B>::new(plan.accept, params, &device);
        let times = timer.pair(|| case.device(), || case.host());
        rows.push(KernelRow::new(
            kernel.into(),
            case.label(),
            DType::F32,
            env,
            case.bytes(),
            times,
            copy_gb_s,
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let table = markdown(
        &[
            "kernel", "shape", "dtype", "ms", "GB/s", "burn ms", "floor ms", "vs burn",
        ],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.kernel.clone(),
                    r.shape.clone(),
                    r.dtype.clone(),
                    format!("{:.3}", r.ms),
                    format!("{:.1}", r.gb_s),
                    format!("{:.3}", r.burn_ms),
                    format!("{:.3}", r.floor_ms),
                    format!("{:.2}x", r.burn_ms / r.ms),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let table = format!("copy bandwidth {copy_gb_s:.1} GB/s\n\n{table}");
    let curve = |name: &str, f: fn(&KernelRow) -> f64| -> Series {
        let pts = rows
            .iter()
            .filter(|r| r.kernel == "linear" && r.dtype == "f32");
        let pts = pts.map(|r| {
            (
                r.shape
                    .split('x')
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(1.0),
                f(r),
            )
        });
        (name.to_owned(), pts.collect())
    };
    let axes = Axes {
        title: &format!("x[m, {k}] · W[{k}, {n}], f32"),
        x: "rows m",
        y: "ms per product",
        log_x: true,
    };
    let series = [
        curve("kernel", |r| r.ms),
        curve("burn", |r| r.burn_ms),
        curve("bandwidth floor", |r| r.floor_ms),
    ];
    lines(&env.out_file(Case::Kernels, "svg")?, &axes, &series)?;
    let report = json!({
        "case": "kernels",
        "copy_gb_s": copy_gb_s,
        "chain": { "shape": plan.chain, "layers": plan.chain_layers },
        "reps": plan.reps,
        "rows": rows,
    });
    finish(env, Case::Kernels, report, &table)
}

fn random<B: Backend>(shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), device)
}

/// Times closures that return a tensor, waiting for the device after each run.
struct Timer<'a, B: Backend> {
    plan: &'a KernelsPlan,
    device: &'a B::Device,
}

impl<B: KernelBackend> Timer<'_, B> {
    /// Median ms of `f` (kernels on) and of `g` (Burn's ops), interleaved run by run.
    fn pair<T, U>(&self, f: impl Fn() -> T, g: impl Fn() -> U) -> (f64, f64) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..self.plan.warmup + self.plan.reps {
            let ta = self.time(&f);
            let tb = self.time(&g);
            if i >= self.plan.warmup {
                a.push(ta);
                b.push(tb);
            }
        }
        (median(&a), median(&b))
    }

    fn time<T>(&self, f: impl Fn() -> T) -> f64 {
        B::sync(self.device).expect("the device syncs");
        let t = Instant::now();
        let out = f();
        B::sync(self.device).expect("the device syncs");
        let ms = t.elapsed().as_secs_f64() * 1e3;
        drop(out);
        ms
    }
}

/// The device's copy bandwidth in GB/s: bytes read plus written by copying 256 MB (64 MB on wgpu,
/// whose buffers may be capped at 128 MB), the best of five. On the CPU the copy runs on every
/// core, between buffers already mapped.
fn copy_bandwidth<B: Backend>(device: &B::Device, kind: DeviceKind) -> f64 {
    if kind == DeviceKind::Cpu {
        return host_copy_bandwidth();
    }
    let n = if kind == DeviceKind::Wgpu {
        16 << 20
    } else {
        64 << 20
    };
    let x = Tensor::<B, 1>::random([n], Distribution::Uniform(-1.0, 1.0), device);
    let best = (0..5)
        .map(|_| {
            B::sync(device).expect("the device syncs");
            let t = Instant::now();
            let y = x.clone().mul_scalar(1.0001);
            B::sync(device).expect("the device syncs");
            let s = t.elapsed().as_secs_f64();
            drop(y);
            s
        })
        .fold(f64::INFINITY, f64::min);
    (2 * n * 4) as f64 / best / 1e9
}

fn host_copy_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 64 << 20;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = n / rayon::current_num_threads().max(1);
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    std::hint::black_box(&dst);
    (2 * n * 4) as f64 / best / 1e9
}

/// The shape a `[k, n]` projection weight is kept in on `B` (see [`KernelBackend::weight_layout`]).
fn kept<B: KernelBackend>([k, n]: [usize; 2]) -> [usize; 2] {
    match B::weight_layout() {
        WeightLayout::InOut => [k, n],
        WeightLayout::OutIn => [n, k],
    }
}

/// Decoder layers without attention: `x += o(q(x))`, `k(x)` and `v(x)` computed and dropped,
/// `x += down(silu(gate(x)) ⊙ up(x))`.
struct Chain<B: Backend> {
    layers: Vec<[Tensor<B, 2>; 7]>,
}

impl<B: KernelBackend> Chain<B> {
    fn new(s: ChainShape, layers: usize, dtype: DType, device: &B::Device) -> Self {
        let shapes = [
            [s.hidden, s.q],
            [s.hidden, s.kv],
            [s.hidden, s.kv],
            [s.q, s.hidden],
            [s.hidden, s.intermediate],
            [s.hidden, s.intermediate],
            [s.intermediate, s.hidden],
        ];
        let layers = (0..layers)
            .map(|_| {
                shapes.map(|sh| {
                    random::<B>(kept::<B>(sh), device)
                        .mul_scalar(0.02)
                        .cast(dtype)
                })
            })
            .collect();
        Self { layers }
    }

    fn weight_bytes(&self) -> usize {
        let per: usize = self.layers[0]
            .iter()
            .map(|w| w.shape().num_elements() * w.dtype().size())
            .sum();
        per * self.layers.len()
    }

    /// Through the kernels (`kernels`) or Burn's ops. Returns every layer's keys and values as
    /// well as the output, so that a lazy backend computes them all.
    fn forward(&self, mut x: Tensor<B, 2>, kernels: bool) -> (Tensor<B, 2>, Vec<Tensor<B, 2>>) {
        set_enabled(kernels);
        let mut kv = Vec::with_capacity(2 * self.layers.len());
        for [q, k, v, o, gate, up, down] in &self.layers {
            let qx = B::skinny_linear(x.clone(), q, None);
            kv.push(B::skinny_linear(x.clone(), k, None));
            kv.push(B::skinny_linear(x.clone(), v, None));
            x = B::skinny_linear(qx, o, Some(x));
            let act = B::skinny_swiglu(x.clone(), gate, up);
            x = B::skinny_linear(act, down, Some(x));
        }
        set_enabled(true);
        (x, kv)
    }
}

//! Sink-window attention over the pool on CubeCL (semantics in [`crate::pool`]).
//!
//! One cube per (query row, kv head) computes the `heads / kv_heads` query heads that share that
//! kv head, so K and V are read once per group and never expanded. Its `head_dim` units first
//! rotate the group's queries into shared memory at their window position; then, a chunk of
//! `head_dim` keys at a time, each unit scores one key (read from the pool through the session's
//! sink + ring layout, or from the step's rows, and rotated at its rank inside the kernel), and
//! each unit folds one output dimension of the chunk into an online softmax, all in f32. Chunks
//! wholly between the sinks and the window are skipped.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use crate::pool::PoolLayout;

/// Fields per query row in the plan.
pub const PLAN_FIELDS: usize = 6;

/// Sizes shared by every cube of a launch.
#[derive(CubeLaunch, CubeType)]
pub struct AttentionDims {
    heads: u32,
    kv_heads: u32,
    capacity: u32,
    sink: u32,
    window: u32,
}

/// Offset of context key `j`'s row for kv head `g`, and whether it lives in the pool.
#[cube]
#[allow(clippy::too_many_arguments)]
fn key_offset(
    j: usize,
    g: usize,
    slot: usize,
    seen: usize,
    held: usize,
    step_start: usize,
    dims: &AttentionDims,
    #[comptime] head_dim: usize,
) -> (bool, usize) {
    let kv_heads = dims.kv_heads as usize;
    let sink = dims.sink as usize;
    let in_pool = j < held;
    let sinks = select(seen < sink, seen, sink);
    let mut offset = ((step_start + j - held) * kv_heads + g) * head_dim;
    if in_pool {
        let mut phys = j;
        if j >= sinks {
            let t = seen - (held - sinks) + (j - sinks);
            phys = sink + (t - sink) % (dims.window as usize);
        }
        offset = ((slot * kv_heads + g) * (dims.capacity as usize) + phys) * head_dim;
    }
    (in_pool, offset)
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn pooled_attention_kernel<F: Float, I: Int>(
    q: &Array<F>,
    step_k: &Array<F>,
    step_v: &Array<F>,
    pool_k: &Array<F>,
    pool_v: &Array<F>,
    cos: &Array<F>,
    sin: &Array<F>,
    plan: &Array<I>,
    out: &mut Array<F>,
    dims: AttentionDims,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] group: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = CUBE_POS_X as usize;
    let g = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let half = comptime!(head_dim / 2);
    let heads = dims.heads as usize;
    let sink = dims.sink as usize;
    let window = dims.window as usize;
    let full = sink + window;
    let neg = -1.0e30f32;

    let base = t * comptime!(PLAN_FIELDS);
    let active = usize::cast_from(plan[base]);
    let slot = usize::cast_from(plan[base + 1]);
    let seen = usize::cast_from(plan[base + 2]);
    let held = usize::cast_from(plan[base + 3]);
    let step_start = usize::cast_from(plan[base + 4]);
    let p = usize::cast_from(plan[base + 5]);

    if active == 0 {
        #[unroll]
        for hh in 0..group {
            out[(t * heads + g * group + hh) * head_dim + u] = F::new(0.0);
        }
        terminate!();
    }

    let overflow = p >= full;
    let q_pos = select(overflow, full - 1, p);
    let sign = select(u < half, -1.0f32, 1.0f32);
    let partner = select(u < half, u + half, u - half);

    // The group's queries, rotated at the query's window position.
    let mut qs = SharedMemory::<f32>::new(comptime!(group * head_dim));
    let c = f32::cast_from(cos[q_pos * head_dim + u]);
    let s = f32::cast_from(sin[q_pos * head_dim + u]);
    #[unroll]
    for hh in 0..group {
        let row = (t * heads + g * group + hh) * head_dim;
        let x = f32::cast_from(q[row + u]);
        let y = f32::cast_from(q[row + partner]);
        qs[hh * head_dim + u] = x * c + sign * y * s;
    }

    let mut scores = SharedMemory::<f32>::new(comptime!(group * head_dim));
    let mut probs = SharedMemory::<f32>::new(comptime!(group * head_dim));
    let mut m = Array::<f32>::new(group);
    let mut l = Array::<f32>::new(group);
    let mut acc = Array::<f32>::new(group);
    #[unroll]
    for hh in 0..group {
        m[hh] = neg;
        l[hh] = 0.0;
        acc[hh] = 0.0;
    }
    sync_cube();

    // Keys below `lo` and at or past `sink` are out of the window.
    let lo = select(p + 1 > window, p + 1 - window, 0);
    let mut c0 = 0usize;
    while c0 <= p {
        let skip = c0 >= sink && c0 + head_dim <= lo;
        if !skip {
            // Score phase: unit `u` scores key `c0 + u` for every head of the group.
            let j = c0 + u;
            let seen_by_p = j <= p && (j < sink || j >= lo);
            let mut dot = Array::<f32>::new(group);
            #[unroll]
            for hh in 0..group {
                dot[hh] = 0.0;
            }
            if seen_by_p {
                let rank = select(j < sink || !overflow, j, j + full - 1 - p);
                let (in_pool, off) =
                    key_offset(j, g, slot, seen, held, step_start, &dims, head_dim);
                for d in 0..half {
                    let (k1, k2) = if in_pool {
                        (pool_k[off + d], pool_k[off + d + half])
                    } else {
                        (step_k[off + d], step_k[off + d + half])
                    };
                    let k1 = f32::cast_from(k1);
                    let k2 = f32::cast_from(k2);
                    let r1 = k1 * f32::cast_from(cos[rank * head_dim + d])
                        - k2 * f32::cast_from(sin[rank * head_dim + d]);
                    let r2 = k2 * f32::cast_from(cos[rank * head_dim + d + half])
                        + k1 * f32::cast_from(sin[rank * head_dim + d + half]);
                    #[unroll]
                    for hh in 0..group {
                        dot[hh] += r1 * qs[hh * head_dim + d] + r2 * qs[hh * head_dim + d + half];
                    }
                }
            }
            #[unroll]
            for hh in 0..group {
                scores[hh * head_dim + u] = select(seen_by_p, dot[hh] * scale, neg);
            }
            sync_cube();

            // Softmax phase: every unit finds the chunk's maxima; unit `u` weights its key.
            #[unroll]
            for hh in 0..group {
                let mut top = m[hh];
                for cc in 0..head_dim {
                    let v = scores[hh * head_dim + cc];
                    top = select(v > top, v, top);
                }
                let alpha = f32::exp(m[hh] - top);
                m[hh] = top;
                l[hh] *= alpha;
                acc[hh] *= alpha;
                let own = scores[hh * head_dim + u];
                probs[hh * head_dim + u] = select(own > neg, f32::exp(own - top), 0.0);
            }
            sync_cube();

            // Value phase: unit `u` owns output dimension `u`.
            let end = select(c0 + head_dim <= p + 1, head_dim, p + 1 - c0);
            for cc in 0..end {
                let j = c0 + cc;
                if j < sink || j >= lo {
                    let (in_pool, off) =
                        key_offset(j, g, slot, seen, held, step_start, &dims, head_dim);
                    let v = if in_pool {
                        f32::cast_from(pool_v[off + u])
                    } else {
                        f32::cast_from(step_v[off + u])
                    };
                    #[unroll]
                    for hh in 0..group {
                        let w = probs[hh * head_dim + cc];
                        l[hh] += w;
                        acc[hh] += w * v;
                    }
                }
            }
            sync_cube();
        }
        c0 += head_dim;
    }

    #[unroll]
    for hh in 0..group {
        out[(t * heads + g * group + hh) * head_dim + u] = F::cast_from(acc[hh] / l[hh]);
    }
}

/// Launches the pooled attention of `rows` query rows into `out` (`[rows, heads · head_dim]`,
/// contiguous). Every float operand is contiguous and of `q`'s dtype; `plan` holds
/// [`PLAN_FIELDS`] integers per query row: active, slot, seen, held, first step row, context
/// index.
#[allow(clippy::too_many_arguments)]
pub fn launch<R: CubeRuntime>(
    q: CubeTensor<R>,
    step_k: CubeTensor<R>,
    step_v: CubeTensor<R>,
    pool_k: CubeTensor<R>,
    pool_v: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
    plan: CubeTensor<R>,
    out: &CubeTensor<R>,
    layout: &PoolLayout,
) {
    let rows = q.meta.shape()[0];
    let client = q.client.clone();
    let dtypes = [q.dtype.into(), plan.dtype.into()];
    // SAFETY: each array is bound to its tensor's own handle with the tensor's own element
    // count; the callers pass contiguous tensors of the dtypes in `dtypes`.
    let arg = |t: &CubeTensor<R>| unsafe {
        ArrayArg::from_raw_parts(t.handle.clone(), t.meta.shape().num_elements())
    };
    let dims = AttentionDimsLaunch::new(
        layout.heads as u32,
        layout.kv_heads as u32,
        layout.capacity() as u32,
        layout.sink as u32,
        layout.window as u32,
    );
    // SAFETY: one cube per (query row, KV head) and one unit per head dimension, so every
    // index of `q`, `out` and the step's rows is below `rows · heads · head_dim` or
    // `step rows · kv_heads · head_dim`; pool reads use the slot and positions the plan gives,
    // each below the pool's `[sessions, kv_heads, capacity, head_dim]`, and RoPE reads positions
    // below the table's length, which the caller ensures covers the window (`PoolLayout`).
    unsafe {
        pooled_attention_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(rows as u32, layout.kv_heads as u32, 1),
            CubeDim::new_1d(layout.head_dim as u32),
            arg(&q),
            arg(&step_k),
            arg(&step_v),
            arg(&pool_k),
            arg(&pool_v),
            arg(&cos),
            arg(&sin),
            arg(&plan),
            arg(out),
            dims,
            1.0 / (layout.head_dim as f32).sqrt(),
            layout.head_dim,
            layout.heads / layout.kv_heads,
            dtypes,
        );
    }
}

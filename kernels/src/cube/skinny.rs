//! The skinny matmul on CubeCL: `x[m, k] · W[k, n]` for a few rows, streaming `W` once per row
//! tile, with the residual add or the SwiGLU gate product fused into the store.
//!
//! A cube covers [`COLS`] vectors of output columns (each unit one vector of up to four columns)
//! and splits `k` between [`SPLIT`] units per column, so that consecutive units read consecutive
//! bytes of a weight row. Each unit keeps one f32 accumulator per row of its tile in registers;
//! the split partial sums meet in shared memory at the end. Row tiles of up to [`MAX_TILE`] rows
//! are the grid's second dimension; on a GPU the tiles of a tall product read the same weight
//! bytes close together in time, so the cache serves all but the first.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

/// Vectors of output columns one cube covers.
pub const COLS: u32 = 16;
/// Units that split the inner dimension of one vector of columns.
pub const SPLIT: u32 = 16;
/// Most rows one unit accumulates; taller products use several row tiles.
pub const MAX_TILE: usize = 8;

/// What the store does with the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// `x · W`.
    Plain,
    /// `x · W + residual`.
    Residual,
    /// `silu(x · W) ⊙ (x · W2)`.
    SwiGlu,
}

impl Epilogue {
    fn code(self) -> u32 {
        match self {
            Epilogue::Plain => 0,
            Epilogue::Residual => 1,
            Epilogue::SwiGlu => 2,
        }
    }
}

/// Row strides (in scalars for `x`, in vectors for the rest) and sizes of one launch.
#[derive(CubeLaunch, CubeType)]
pub struct Dims {
    m: u32,
    k: u32,
    cols: u32,
    x_stride: u32,
    w_stride: u32,
    w2_stride: u32,
    r_stride: u32,
    out_stride: u32,
}

#[cube(launch_unchecked)]
fn skinny_kernel<F: Float, N: Size>(
    x: &Array<F>,
    w: &Array<Vector<F, N>>,
    w2: &Array<Vector<F, N>>,
    residual: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    dims: Dims,
    #[comptime] tile: usize,
    #[comptime] epilogue: u32,
    #[define(F)] _dtype: StorageType,
) {
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let width = CUBE_DIM_X as usize;
    let split = CUBE_DIM_Y as usize;
    let m = dims.m as usize;
    let k = dims.k as usize;
    let cols = dims.cols as usize;
    let col = CUBE_POS_X as usize * width + tx;
    let row0 = CUBE_POS_Y as usize * tile;
    // Units past the last column read the last one and store nothing.
    let c = select(col < cols, col, cols - 1);

    let mut acc = Array::<Vector<f32, N>>::new(tile);
    let mut acc2 = Array::<Vector<f32, N>>::new(tile);
    #[unroll]
    for r in 0..tile {
        acc[r] = Vector::new(0.0);
        acc2[r] = Vector::new(0.0);
    }

    let mut kk = ty;
    while kk < k {
        let wv = Vector::<f32, N>::cast_from(w[kk * dims.w_stride as usize + c]);
        let uv = if comptime!(epilogue == 2) {
            Vector::<f32, N>::cast_from(w2[kk * dims.w2_stride as usize + c])
        } else {
            Vector::new(0.0)
        };
        #[unroll]
        for r in 0..tile {
            let row = select(row0 + r < m, row0 + r, m - 1);
            let xv = Vector::<f32, N>::new(f32::cast_from(x[row * dims.x_stride as usize + kk]));
            acc[r] += wv * xv;
            if comptime!(epilogue == 2) {
                acc2[r] += uv * xv;
            }
        }
        kk += split;
    }

    // The split partial sums meet in shared memory, one row at a time.
    let slots = comptime!(COLS as usize * SPLIT as usize);
    let mut part = SharedMemory::<Vector<f32, N>>::new(slots);
    let mut part2 = SharedMemory::<Vector<f32, N>>::new(slots);
    #[unroll]
    for r in 0..tile {
        part[ty * width + tx] = acc[r];
        if comptime!(epilogue == 2) {
            part2[ty * width + tx] = acc2[r];
        }
        sync_cube();
        let row = row0 + r;
        if ty == 0 && col < cols && row < m {
            let mut sum = part[tx];
            let mut sum2 = part2[tx];
            for j in 1..split {
                sum += part[j * width + tx];
                if comptime!(epilogue == 2) {
                    sum2 += part2[j * width + tx];
                }
            }
            if comptime!(epilogue == 1) {
                sum += Vector::<f32, N>::cast_from(residual[row * dims.r_stride as usize + col]);
            }
            if comptime!(epilogue == 2) {
                let one = Vector::<f32, N>::new(1.0);
                let gate = sum / (one + Vector::exp(Vector::new(0.0) - sum));
                sum = gate * sum2;
            }
            out[row * dims.out_stride as usize + col] = Vector::cast_from(sum);
        }
        sync_cube();
    }
}

/// Elements a tensor's handle spans, for an array argument.
fn span<R: CubeRuntime>(t: &CubeTensor<R>) -> usize {
    t.handle.size() as usize / t.dtype.size()
}

/// Row stride of a 2-d tensor whose rows are contiguous.
fn row_stride<R: CubeRuntime>(t: &CubeTensor<R>) -> usize {
    t.meta.strides()[0]
}

/// Whether a 2-d tensor's rows are contiguous (pitched layouts included).
pub fn rows_contiguous<R: CubeRuntime>(t: &CubeTensor<R>) -> bool {
    let strides = t.meta.strides();
    let shape = t.meta.shape();
    strides.len() == 2 && (strides[1] == 1 || shape[1] == 1) && strides[0] >= shape[1]
}

/// Launches the skinny product into `out` (`[m, n]`, rows contiguous). `w2` is read only by the
/// SwiGLU epilogue and `residual` only by the residual one; every tensor shares `x`'s dtype and
/// has contiguous rows.
pub fn launch<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    w2: Option<CubeTensor<R>>,
    residual: Option<CubeTensor<R>>,
    out: &CubeTensor<R>,
    epilogue: Epilogue,
) {
    let (m, k) = (x.meta.shape()[0], x.meta.shape()[1]);
    let n = w.meta.shape()[1];
    let client = x.client.clone();
    // Widest vector that divides every vectorised row.
    let mut strides = vec![n, row_stride(&w), row_stride(out)];
    strides.extend(w2.as_ref().map(row_stride));
    strides.extend(residual.as_ref().map(row_stride));
    let vector = [4usize, 2, 1]
        .into_iter()
        .find(|v| strides.iter().all(|s| s % v == 0))
        .unwrap_or(1);
    let cols = n / vector;
    let tile = m.clamp(1, MAX_TILE).next_power_of_two();
    let cube_count = CubeCount::Static(
        cols.div_ceil(COLS as usize) as u32,
        m.div_ceil(tile) as u32,
        1,
    );
    let cube_dim = CubeDim::new_2d(COLS, SPLIT);
    let dims = DimsLaunch::new(
        m as u32,
        k as u32,
        cols as u32,
        row_stride(&x) as u32,
        (row_stride(&w) / vector) as u32,
        w2.as_ref().map_or(0, |t| row_stride(t) / vector) as u32,
        residual.as_ref().map_or(0, |t| row_stride(t) / vector) as u32,
        (row_stride(out) / vector) as u32,
    );
    let dtype = x.dtype;
    // Absent operands are bound to `w`: read-only, and never read by that epilogue.
    let w2 = w2.unwrap_or_else(|| w.clone());
    let residual = residual.unwrap_or_else(|| w.clone());
    // SAFETY: each array is bound to its tensor's own handle with the elements the handle holds
    // (`span`), in the dtype `dtype` names and the vector width `vector` divides every row
    // stride by. Rows past `m` are never read or stored; units past the last column read the last
    // one and store nothing; the strides in `dims` are the tensors' own, so every index stays
    // inside its array.
    unsafe {
        skinny_kernel::launch_unchecked::<R>(
            &client,
            cube_count,
            cube_dim,
            vector,
            ArrayArg::from_raw_parts(x.handle.clone(), span(&x)),
            ArrayArg::from_raw_parts(w.handle.clone(), span(&w)),
            ArrayArg::from_raw_parts(w2.handle.clone(), span(&w2)),
            ArrayArg::from_raw_parts(residual.handle.clone(), span(&residual)),
            ArrayArg::from_raw_parts(out.handle.clone(), span(out)),
            dims,
            tile,
            epilogue.code(),
            dtype.into(),
        );
    }
}

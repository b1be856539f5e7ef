//! Skinny matmul on the CPU: `y = x · Wᵀ` for a few rows of `x` and a large row-major `W[N, K]`,
//! the layout a checkpoint stores a projection in (`[out, in]`), read where it lies.
//!
//! A decode or verify step multiplies at most a few dozen rows by every weight, so the cost is the
//! weight bytes, and the kernel's one job is to stream them at memory speed. Every weight byte is
//! read once per call, in one of two ways:
//! - Up to [`DOT_ROWS`] rows (where `K` is past [`DOT_K_F32`], fewer for f32 weights and int8
//!   blocks: [`DOT_ROWS_F32`], [`DOT_ROWS_Q8`]), each output is the dot product of a row of `x`
//!   and a row of `W` ([`crate::cpu_dot`]): `W` is read front to back in place, each load of it
//!   feeding every row of `x` in a register tile.
//! - Past that, up to [`ROWS_F32`] rows, f32 weights and int8 blocks are read in place by tiles
//!   that broadcast `W` against `xᵀ` (`cpu_rows_f32`, where the CPU has AVX-512F), summing each
//!   output in the dot products' order: up to [`ROWS_F32`] rows, a row's product is the same to
//!   the bit whatever rows are beside it.
//! - Past that otherwise (prefill, long verify blocks), each core owns a range of columns. It walks `K` in
//!   packed strips of [`KB`] and `N` in register tiles of [`MR`] rows × [`NR`] columns: each strip
//!   is packed from [`NR`] rows of `W` at a time, transposed in registers eight by eight, and
//!   serves every row of `x`. The partial sums of `y` stay in cache between strips, and `x` is
//!   packed once per call, each register tile's rows k-major.
//!
//! The same loop carries the two epilogues a decoder layer needs: a residual add (the product is
//! accumulated onto the residual) and the SwiGLU gate product `silu(x · Wgᵀ) ⊙ (x · Wuᵀ)`.

use rayon::prelude::*;

use crate::cpu_dot::dot_product;
use crate::cpu_weight::{Matrix, WeightKind};

/// Columns of one register tile: two 256-bit vectors of f32.
pub const NR: usize = 16;
/// Rows of one register tile (6 × 2 accumulators, two weight vectors and a broadcast fit in the
/// 16 vector registers of AVX2).
pub const MR: usize = 6;
/// Most rows of `x` one pass over `W` serves; taller products run in blocks of this many.
pub const MAX_BLOCK_ROWS: usize = 256;
/// Steps of `K` in one strip.
pub const KB: usize = 256;
/// Columns of a strip packed at once (128 KiB of f32, in L2).
pub const CW: usize = 128;
/// Up to this many rows the product is dot products of rows ([`crate::cpu_dot`]); past it the
/// packed strips serve enough rows to pay for their packing. f32 weights, twice the bytes to
/// stream, leave the dot products sooner where `K` is past [`DOT_K_F32`]: past [`DOT_ROWS_F32`]
/// rows or [`DOT_ROWS_F32_AVX2`].
pub const DOT_ROWS: usize = 64;
/// [`DOT_ROWS`] for f32 weights where the CPU has AVX-512F: past it the in-place tiles of
/// `cpu_rows_f32` win (`kernels/examples/cpu_skinny.rs`, 2048 × 6144, ms per product, dot vs
/// tiles: 8 rows 1.4 vs 1.9, 12 rows 1.9 vs 2.0, 15 rows 2.1 vs 2.1, 16 rows 2.3 vs 1.9, 32 rows
/// 3.8 vs 2.8). Both sum each output in the same order, so a row's product does not depend on
/// the rows beside it up to [`ROWS_F32`] rows, which the greedy guarantee rests on
/// (`docs/runtime-semantics.md`, Guarantees).
pub const DOT_ROWS_F32: usize = 15;

/// Up to this `K`, f32 products stay on the dot products up to [`DOT_ROWS`] rows, where the CPU
/// has AVX-512F too: their rows of `x` stay in cache, and they beat the in-place tiles at every
/// height (`cpu_skinny` with `K` 1024, ms per product, dot vs tiles: 6144 columns at 32 rows 1.52
/// vs 1.78, at 64 rows 3.01 vs 3.36; 2048 columns 0.54 vs 0.64 and 1.01 vs 1.12). From 1,536 the
/// tiles win past 16 to 24 rows (2048 × 6144 at 32 rows 2.78 vs 4.00, at 64 rows 5.22 vs 7.10).
/// Both sum each output in the same order, so the choice is one of speed alone.
pub const DOT_K_F32: usize = 1024;

/// [`DOT_ROWS`] for int8 blocks past [`DOT_K_F32`] where the CPU has AVX-512F: the dot products
/// widen and scale every block of `W` once per tile of `x`, the in-place tiles once per block
/// of `K` (`cpu_skinny`, 2048 × 6144, ms per product, dot vs tiles: 24 rows 2.9 vs 2.9, 32 rows
/// 4.0 vs 3.2, 64 rows 8.0 vs 5.8). bf16 and f16 weights stay on the dot products, which read
/// half the bytes and win at every height (64 rows: 4.9 vs 5.6).
pub const DOT_ROWS_Q8: usize = 31;

/// [`DOT_ROWS`] for f32 weights where the CPU lacks AVX-512F (no in-place tiles): the dot
/// products win up to 32 rows, the packed strips from 40 (2048 × 6144).
pub const DOT_ROWS_F32_AVX2: usize = 32;

/// Up to this many rows, f32 weights past [`DOT_ROWS_F32`] are read in place by
/// `cpu_rows_f32` rather than packed (`kernels/examples/cpu_skinny.rs`, 2048 × 6144, ms
/// per product, packed vs in place: 40 rows 7.6 vs 6.3, 64 rows 9.8 vs 8.0, 96 rows 13.0 vs 12.6,
/// 128 rows 16.9 vs 17.8, 256 rows 29.0 vs 44.2: past 64 rows a group of `W` no longer serves
/// enough rows from L1; measured before the tiles summed in the dot products' order, which costs
/// them 5–10%).
pub const ROWS_F32: usize = 64;

/// What happens to the product before it is stored.
#[derive(Debug, Clone, Copy)]
pub enum CpuEpilogue<'a, M> {
    /// `y = x · Wᵀ`.
    None,
    /// `y = r + x · Wᵀ`, `r` row-major `[M, N]`.
    Residual(&'a [f32]),
    /// `y = silu(x · Wᵀ) ⊙ (x · Uᵀ)`, `U` row-major `[N, K]` like `W` and in its width.
    SwiGlu(M),
}

/// `y[M, N] = epilogue(x[M, K] · w[N, K]ᵀ)`, all row-major, `x` and `y` f32, `w` any [`Matrix`]
/// (widened in registers, accumulated in f32). Panics when a slice is shorter
/// than its shape says (the callers check shapes first).
pub fn skinny_matmul<M: Matrix>(
    x: &[f32],
    w: M,
    m: usize,
    k: usize,
    n: usize,
    epilogue: CpuEpilogue<'_, M>,
) -> Vec<f32> {
    assert!(
        x.len() >= m * k && w.len() >= k * n,
        "skinny_matmul: short input"
    );
    let mut y = match epilogue {
        CpuEpilogue::Residual(r) => r[..m * n].to_vec(),
        // NaN, not zero: every element is overwritten, and an element a path missed shows in
        // any test.
        _ => vec![f32::NAN; m * n],
    };
    let accumulate = matches!(epilogue, CpuEpilogue::Residual(_));
    accumulate_product(&mut y, x, w, m, k, n, accumulate);
    if let CpuEpilogue::SwiGlu(u) = epilogue {
        assert!(u.len() >= k * n, "skinny_matmul: short up weight");
        let mut up = vec![f32::NAN; m * n];
        accumulate_product(&mut up, x, u, m, k, n, false);
        for (g, u) in y.iter_mut().zip(&up) {
            *g = silu(*g) * u;
        }
    }
    y
}

/// `v · sigmoid(v)`.
#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// `y = x · wᵀ`, or `y += x · wᵀ` when `accumulate`. A product taller than [`MAX_BLOCK_ROWS`]
/// (a prefill chunk) runs in blocks of that many rows, reading `W` once per block.
pub(crate) fn accumulate_product<M: Matrix>(
    y: &mut [f32],
    x: &[f32],
    w: M,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    if m > MAX_BLOCK_ROWS {
        for r0 in (0..m).step_by(MAX_BLOCK_ROWS) {
            let rows = MAX_BLOCK_ROWS.min(m - r0);
            let (yb, xb) = (&mut y[r0 * n..(r0 + rows) * n], &x[r0 * k..(r0 + rows) * k]);
            accumulate_product(yb, xb, w, rows, k, n, accumulate);
        }
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            y.fill(0.0);
        }
        return;
    }
    let tiles = crate::cpu_rows_f32::available();
    let dot_rows = match M::KIND {
        _ if k <= DOT_K_F32 => DOT_ROWS,
        WeightKind::F32 if tiles => DOT_ROWS_F32,
        WeightKind::F32 => DOT_ROWS_F32_AVX2,
        WeightKind::Q8 if tiles => DOT_ROWS_Q8,
        _ => DOT_ROWS,
    };
    if m <= dot_rows {
        return dot_product(y, x, w, (m, k, n), accumulate);
    }
    if m <= ROWS_F32 && tiles {
        return crate::cpu_rows_f32::product(y, x, w, (m, k, n), accumulate);
    }
    let job = Block {
        x,
        w,
        m,
        k,
        n,
        accumulate,
    };
    // Worth the cores' fork and join once `W` is 4 MiB or the arithmetic is 4M multiply-adds.
    let big = k * n >= 1 << 20 || m * k * n >= 1 << 22;
    let out = SendPtr(y.as_mut_ptr());
    // One column range per core, in whole tiles; one range when the product is too small to split.
    let parts = if big {
        rayon::current_num_threads().clamp(1, n.div_ceil(NR))
    } else {
        1
    };
    let per = n.div_ceil(NR).div_ceil(parts) * NR;
    let xpacked = job.pack_x();
    let run = |p: usize| {
        let cols = (p * per).min(n)..((p + 1) * per).min(n);
        // SAFETY: this task alone writes columns `cols` of `y`, which holds `m * n` floats.
        unsafe { job.run(cols, out, &xpacked) };
    };
    if parts > 1 {
        (0..parts).into_par_iter().for_each(run);
    } else {
        run(0);
    }
}

/// A raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the tasks holding copies write disjoint elements, and the owner outlives them all.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// One product's operands.
struct Block<'a, M> {
    x: &'a [f32],
    w: M,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
}

impl<M: Matrix> Block<'_, M> {
    /// Computes columns `cols` of `y` for all rows.
    ///
    /// # Safety
    /// `out` must point to `m * n` floats, and no other thread may touch columns `cols`.
    unsafe fn run(&self, cols: std::ops::Range<usize>, out: SendPtr, xpacked: &[f32]) {
        // Rows of W sit a multiple of 4 KiB apart in common shapes (6144 floats, say), so a strip
        // read in place would fight over a few L1 sets; each chunk of it is packed first.
        let mut packed = vec![0.0f32; KB * CW];
        let wide = wide_tiles();
        for k0 in (0..self.k).step_by(KB) {
            let kb = KB.min(self.k - k0);
            let add = self.accumulate || k0 > 0;
            for chunk in (cols.start..cols.end).step_by(CW) {
                let width = CW.min(cols.end - chunk);
                self.pack(k0, kb, chunk, width, &mut packed);
                let tiles = width.div_ceil(NR);
                let mut t = 0;
                while t < tiles {
                    let c0 = chunk + t * NR;
                    // Two whole tiles side by side where the CPU has the registers for them.
                    let pair = wide && chunk + width - c0 >= 2 * NR;
                    let nr = if pair {
                        2 * NR
                    } else {
                        NR.min(chunk + width - c0)
                    };
                    let ws = &packed[t * KB * NR..];
                    for r0 in (0..self.m).step_by(MR) {
                        let mr = MR.min(self.m - r0);
                        let xs = &xpacked[(r0 / MR * self.k + k0) * MR..][..kb * MR];
                        #[cfg(target_arch = "x86_64")]
                        if pair {
                            // SAFETY: `wide_tiles` checked AVX-512F; two packed tiles of `KB`
                            // rows follow `ws`, `xs` holds `kb` steps of `MR`, and rows
                            // `r0..r0 + mr`, columns `c0..c0 + 2 NR` of `y` are this task's.
                            unsafe {
                                avx512::pair(
                                    xs,
                                    &ws[..2 * KB * NR],
                                    kb,
                                    mr,
                                    out.0.add(r0 * self.n + c0),
                                    self.n,
                                    add,
                                )
                            };
                            continue;
                        }
                        // One tile of `nr <= NR` columns, its sums through a buffer.
                        let mut one = [[0.0f32; NR]; MR];
                        if add {
                            for (r, o) in one.iter_mut().enumerate().take(mr) {
                                let row = (r0 + r) * self.n + c0;
                                // SAFETY: row `r0 + r < m`, columns `c0..c0 + nr` are ours.
                                let src = unsafe { std::slice::from_raw_parts(out.0.add(row), nr) };
                                o[..nr].copy_from_slice(src);
                            }
                        }
                        let strip = Strip {
                            xs,
                            ws: &ws[..KB * NR],
                            ldw: NR,
                            kb,
                            mr,
                            nr: NR,
                        };
                        strip.product(&mut one);
                        for (r, o) in one.iter().enumerate().take(mr) {
                            let row = (r0 + r) * self.n + c0;
                            // SAFETY: as above.
                            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(row), nr) };
                            dst.copy_from_slice(&o[..nr]);
                        }
                    }
                    t += if pair { 2 } else { 1 };
                }
            }
        }
    }

    /// `x` as `[tile][K][MR]`: each register tile's rows k-major, so a tile's broadcasts read
    /// one contiguous run (x's rows sit `k` floats apart, often a multiple of 4 KiB). A short
    /// last tile is zero-padded to [`MR`] rows.
    fn pack_x(&self) -> Vec<f32> {
        let mut packed = vec![0.0f32; self.m.div_ceil(MR) * self.k * MR];
        for (row, src) in self.x.chunks(self.k).take(self.m).enumerate() {
            let tile = &mut packed[row / MR * self.k * MR..];
            for (kk, v) in src.iter().enumerate() {
                tile[kk * MR + row % MR] = *v;
            }
        }
        packed
    }

    /// Packs columns `c0..c0 + width` of the product, steps `k0..k0 + kb` of `K`, widened to
    /// f32, into `packed` as `[tile][KB][NR]`: column `c` is row `c` of `w`, so each tile's
    /// [`NR`] rows of `w` are transposed, eight by eight, to k-major runs. The last tile is
    /// zero-padded to [`NR`] columns.
    fn pack(&self, k0: usize, kb: usize, c0: usize, width: usize, packed: &mut [f32]) {
        let k = self.k;
        for t in 0..width.div_ceil(NR) {
            let tile = &mut packed[t * KB * NR..][..KB * NR];
            for half in 0..NR / 8 {
                let j0 = c0 + t * NR + half * 8;
                let cols = (c0 + width).saturating_sub(j0).min(8);
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if cols == 8 && crate::cpu_weight::has_avx2() {
                    let src = self.w.range(j0 * k + k0, 7 * k + kb);
                    // SAFETY: AVX2 and F16C were just checked; `src` holds 8 rows `k` apart of
                    // `kb` elements each, and `tile` holds `kb` steps of `NR` from `half · 8`.
                    done = unsafe { avx2::pack8(src, k, kb, &mut tile[half * 8..]) };
                }
                for kk in done..kb {
                    let dst = &mut tile[kk * NR + half * 8..][..8];
                    for (c, d) in dst.iter_mut().enumerate() {
                        *d = if c < cols {
                            self.w.at((j0 + c) * k + k0 + kk)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// One register tile's share of a strip: `mr` rows of `x` (packed k-major, [`MR`] floats per
/// step) times `kb` rows of `W` (stride `ldw`), `nr` columns wide.
struct Strip<'a> {
    xs: &'a [f32],
    ws: &'a [f32],
    ldw: usize,
    kb: usize,
    mr: usize,
    nr: usize,
}

impl Strip<'_> {
    /// `acc[r] += Σ_kk xs[r, kk] · ws[kk]`, on AVX2 + FMA for full tiles when the CPU has them.
    fn product(&self, acc: &mut [[f32; NR]; MR]) {
        #[cfg(target_arch = "x86_64")]
        if self.nr == NR
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected; the bounds are checked inside.
            return unsafe { avx2::product(self, acc) };
        }
        for kk in 0..self.kb {
            let wr = &self.ws[kk * self.ldw..][..self.nr];
            for (r, a) in acc.iter_mut().enumerate().take(self.mr) {
                let xv = self.xs[kk * MR + r];
                for (aj, wj) in a.iter_mut().zip(wr) {
                    *aj += xv * wj;
                }
            }
        }
    }
}

/// Whether the packed path takes two tiles at once (AVX-512F: 32 vector registers).
fn wide_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return true;
    }
    false
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{KB, MR, NR};

    /// `y[r] (+)= Σ_kk xs[r, kk] · (tile0[kk] ‖ tile1[kk])` for `mr` rows of `y` (row `r` at
    /// `y + r · ldy`, 32 floats; added to when `add`, else overwritten): two packed tiles of `W`
    /// side by side (`ws` holds tile 0's [`KB`] rows of [`NR`], then tile 1's), one 512-bit
    /// vector each, so every broadcast of `x` feeds two fused multiply-adds. The sums live in
    /// registers from `y` to `y`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; rows `0..mr` of `y` must hold 32 floats each and be the
    /// caller's alone.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pair(
        xs: &[f32],
        ws: &[f32],
        kb: usize,
        mr: usize,
        y: *mut f32,
        ldy: usize,
        add: bool,
    ) {
        assert!(kb > 0 && kb <= KB && mr > 0 && mr <= MR);
        assert!(ws.len() >= 2 * KB * NR && xs.len() >= kb * MR);
        // SAFETY (all arms): the asserts above bound every load of `xs` and `ws`; the caller
        // bounds `y`.
        unsafe {
            match mr {
                1 => rows::<1>(xs, ws, kb, y, ldy, add),
                2 => rows::<2>(xs, ws, kb, y, ldy, add),
                3 => rows::<3>(xs, ws, kb, y, ldy, add),
                4 => rows::<4>(xs, ws, kb, y, ldy, add),
                5 => rows::<5>(xs, ws, kb, y, ldy, add),
                _ => rows::<6>(xs, ws, kb, y, ldy, add),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows<const R: usize>(
        xs: &[f32],
        ws: &[f32],
        kb: usize,
        y: *mut f32,
        ldy: usize,
        add: bool,
    ) {
        // SAFETY: `pair` bounds `xs` and `ws`; its caller, the rows of `y`.
        unsafe {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            if add {
                for r in 0..R {
                    lo[r] = _mm512_loadu_ps(y.add(r * ldy));
                    hi[r] = _mm512_loadu_ps(y.add(r * ldy + NR));
                }
            }
            let (xp, w0, w1) = (xs.as_ptr(), ws.as_ptr(), ws.as_ptr().add(KB * NR));
            for kk in 0..kb {
                let a = _mm512_loadu_ps(w0.add(kk * NR));
                let b = _mm512_loadu_ps(w1.add(kk * NR));
                for r in 0..R {
                    let xv = _mm512_set1_ps(*xp.add(kk * MR + r));
                    lo[r] = _mm512_fmadd_ps(xv, a, lo[r]);
                    hi[r] = _mm512_fmadd_ps(xv, b, hi[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(y.add(r * ldy), lo[r]);
                _mm512_storeu_ps(y.add(r * ldy + NR), hi[r]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Strip, MR, NR};
    use crate::cpu_weight::{mload8, Matrix};

    /// The register-tiled loop over a full-width tile.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn product(s: &Strip<'_>, acc: &mut [[f32; NR]; MR]) {
        assert!(s.nr == NR && s.kb > 0 && s.mr > 0);
        assert!(s.ws.len() >= (s.kb - 1) * s.ldw + NR);
        assert!(s.xs.len() >= s.kb * MR);
        // SAFETY (all arms): the asserts above bound every load.
        unsafe {
            match s.mr {
                1 => rows::<1>(s, acc),
                2 => rows::<2>(s, acc),
                3 => rows::<3>(s, acc),
                4 => rows::<4>(s, acc),
                5 => rows::<5>(s, acc),
                _ => rows::<6>(s, acc),
            }
        }
    }

    /// Transposes `kb` steps of eight rows of `w` (row `c` at `src[c · ldw..]`), widened to f32,
    /// into `dst[kk · NR..][..8]` for each step `kk`, eight steps at a time; returns how many
    /// steps it wrote (a multiple of eight), the rest being the caller's.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `src` must hold `7 · ldw + kb` elements and `dst` `kb`
    /// steps of `NR`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn pack8<M: Matrix>(src: M, ldw: usize, kb: usize, dst: &mut [f32]) -> usize {
        assert!(src.len() >= 7 * ldw + kb && dst.len() >= (kb.max(1) - 1) * NR + 8);
        let d = dst.as_mut_ptr();
        let mut kk = 0;
        // SAFETY: every load reads steps `kk..kk + 8 <= kb` of a row, every store the first eight
        // floats of step `kk + i < kb` of `dst`, both bounded by the assert above.
        unsafe {
            while kk + 8 <= kb {
                let r: [__m256; 8] = std::array::from_fn(|c| mload8!(src, c * ldw + kk));
                let t: [__m256; 8] = [
                    _mm256_unpacklo_ps(r[0], r[1]),
                    _mm256_unpackhi_ps(r[0], r[1]),
                    _mm256_unpacklo_ps(r[2], r[3]),
                    _mm256_unpackhi_ps(r[2], r[3]),
                    _mm256_unpacklo_ps(r[4], r[5]),
                    _mm256_unpackhi_ps(r[4], r[5]),
                    _mm256_unpacklo_ps(r[6], r[7]),
                    _mm256_unpackhi_ps(r[6], r[7]),
                ];
                // Steps (i, i + 4) of rows 0–3, then of rows 4–7.
                let q: [__m256; 8] = [
                    _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                    _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                    _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                    _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                    _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                    _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                    _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                    _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
                ];
                for i in 0..4 {
                    let lo = _mm256_permute2f128_ps::<0x20>(q[i], q[i + 4]);
                    let hi = _mm256_permute2f128_ps::<0x31>(q[i], q[i + 4]);
                    _mm256_storeu_ps(d.add((kk + i) * NR), lo);
                    _mm256_storeu_ps(d.add((kk + i + 4) * NR), hi);
                }
                kk += 8;
            }
        }
        kk
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows<const R: usize>(s: &Strip<'_>, acc: &mut [[f32; NR]; MR]) {
        // SAFETY: the caller bounds `xs` and `ws`; `acc` rows are 16 floats.
        unsafe {
            let mut lo = [_mm256_setzero_ps(); R];
            let mut hi = [_mm256_setzero_ps(); R];
            for r in 0..R {
                lo[r] = _mm256_loadu_ps(acc[r].as_ptr());
                hi[r] = _mm256_loadu_ps(acc[r].as_ptr().add(8));
            }
            let (xp, wp) = (s.xs.as_ptr(), s.ws.as_ptr());
            for kk in 0..s.kb {
                let w0 = _mm256_loadu_ps(wp.add(kk * s.ldw));
                let w1 = _mm256_loadu_ps(wp.add(kk * s.ldw + 8));
                for r in 0..R {
                    let xv = _mm256_broadcast_ss(&*xp.add(kk * MR + r));
                    lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(acc[r].as_mut_ptr(), lo[r]);
                _mm256_storeu_ps(acc[r].as_mut_ptr().add(8), hi[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_weight::Weight;

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                y[r * n + c] = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
            }
        }
        y
    }

    fn noise(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_the_naive_product_on_odd_shapes() {
        // Past one slice of K and one block of columns, with ragged edges of each.
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 7, 17),
            (5, 33, 15),
            (7, 300, 300),
            (13, 9, 513),
            (3, 0, 5),
            (1, 1030, 1100),
            (3, 1030, 517),
            // Large enough to split over the cores.
            (2, 2050, 1030),
            (10, 700, 601),
            (64, 600, 200),
            // The packed strips: several row tiles, a ragged last one, a strip of K one past a
            // whole one, steps of K not a multiple of eight, columns not a multiple of a tile.
            (65, 257, 70),
            (70, 1030, 1100),
            (100, 13, 37),
            // Taller than one block: two whole blocks of rows and a ragged third.
            (531, 90, 70),
        ] {
            let (x, w) = (noise(m * k, 1), noise(k * n, 2));
            let y = skinny_matmul(&x, w.as_slice(), m, k, n, CpuEpilogue::None);
            let want = naive(&x, &w, m, k, n);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-3, "{m}x{k}x{n}: {a} vs {b}");
            }
            let r = noise(m * n, 3);
            let y = skinny_matmul(&x, w.as_slice(), m, k, n, CpuEpilogue::Residual(&r));
            for ((a, b), r) in y.iter().zip(&want).zip(&r) {
                assert!(
                    (a - b - r).abs() < 1e-3,
                    "{m}x{k}x{n} + r: {a} vs {b} + {r}"
                );
            }
        }
    }

    /// bf16 and f16 weights, widened in the kernel, give the f32 product of the same rounded
    /// weights on both paths (dot products and packed strips) and through the SwiGLU epilogue.
    #[test]
    fn narrow_weights_match_the_product_of_their_widened_values() {
        fn check<W: Weight>(narrow: impl Fn(f32) -> W) {
            for &(m, k, n) in &[(1, 70, 33), (3, 1030, 517), (40, 300, 77), (90, 520, 300)] {
                let x = noise(m * k, 5);
                let (w, u): (Vec<W>, Vec<W>) = (
                    noise(k * n, 6).into_iter().map(&narrow).collect(),
                    noise(k * n, 7).into_iter().map(&narrow).collect(),
                );
                let wide = |v: &[W]| v.iter().map(|e| e.to_f32()).collect::<Vec<_>>();
                let (ww, uw) = (wide(&w), wide(&u));
                let y = skinny_matmul(&x, w.as_slice(), m, k, n, CpuEpilogue::None);
                let want = naive(&x, &ww, m, k, n);
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-3, "{m}x{k}x{n}: {a} vs {b}");
                }
                let g = skinny_matmul(&x, w.as_slice(), m, k, n, CpuEpilogue::SwiGlu(u.as_slice()));
                let up = naive(&x, &uw, m, k, n);
                for ((a, gate), up) in g.iter().zip(&want).zip(&up) {
                    let want = silu(*gate) * up;
                    assert!((a - want).abs() < 1e-3, "{m}x{k}x{n} swiglu: {a} vs {want}");
                }
            }
        }
        check(half::bf16::from_f32);
        check(half::f16::from_f32);
    }

    /// int8 weights in blocks of 32 give the f32 product of their dequantized values on both
    /// paths and through the SwiGLU epilogue.
    #[test]
    fn int8_blocks_match_the_product_of_their_dequantized_values() {
        use crate::cpu_weight::{quantize_q8, Q8};
        for &(m, k, n) in &[(1, 64, 33), (3, 1024, 517), (40, 288, 77), (90, 512, 300)] {
            let x = noise(m * k, 8);
            let (wq, ws) = quantize_q8(noise(k * n, 9).as_slice());
            let (uq, us) = quantize_q8(noise(k * n, 10).as_slice());
            let (w, u) = (Q8::new(&wq, &ws).unwrap(), Q8::new(&uq, &us).unwrap());
            let wide = |q: Q8<'_>| (0..k * n).map(|i| q.at(i)).collect::<Vec<_>>();
            let want = naive(&x, &wide(w), m, k, n);
            let y = skinny_matmul(&x, w, m, k, n, CpuEpilogue::None);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-3, "{m}x{k}x{n}: {a} vs {b}");
            }
            let g = skinny_matmul(&x, w, m, k, n, CpuEpilogue::SwiGlu(u));
            let up = naive(&x, &wide(u), m, k, n);
            for ((a, gate), up) in g.iter().zip(&want).zip(&up) {
                let want = silu(*gate) * up;
                assert!((a - want).abs() < 1e-3, "{m}x{k}x{n} swiglu: {a} vs {want}");
            }
        }
    }

    /// A row's product is the same to the bit whatever else is in the call: alone (one row, a
    /// decode step) or among up to 64 (a step of many sessions, a verify block), whichever path
    /// the height takes, for f32, bf16 and int8 weights, with and without a tail past the whole
    /// vectors of `K`. The greedy guarantee rests on it.
    #[test]
    fn a_rows_product_does_not_depend_on_the_rows_beside_it() {
        fn check<M: Matrix>(w: M, k: usize, n: usize, what: &str) {
            let x = noise(ROWS_F32 * k, 11);
            let alone: Vec<Vec<f32>> = (0..ROWS_F32)
                .map(|r| skinny_matmul(&x[r * k..(r + 1) * k], w, 1, k, n, CpuEpilogue::None))
                .collect();
            for m in 2..=ROWS_F32 {
                let y = skinny_matmul(&x[..m * k], w, m, k, n, CpuEpilogue::None);
                for (r, (got, want)) in y.chunks_exact(n).zip(&alone).enumerate() {
                    let same = got
                        .iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{what} k={k}: row {r} of {m} differs from the row alone"
                    );
                }
            }
        }
        for (k, n) in [(64, 29), (1030, 37), (40, 13)] {
            let w = noise(n * k, 12);
            check(w.as_slice(), k, n, "f32");
            let narrow: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            check(narrow.as_slice(), k, n, "bf16");
        }
        // int8 blocks of 32, past 1,024 (where the tiles take them from 32 rows).
        let (q, scales) = crate::cpu_weight::quantize_q8(noise(29 * 1056, 13).as_slice());
        let w = crate::cpu_weight::Q8::new(&q, &scales).expect("a scale per block");
        check(w, 1056, 29, "int8");
    }
}

//! RMSNorm on the CPU: each row scaled by the inverse of its root mean square and by the norm's
//! weight, in one pass over the row where it lies, rows spread over the cores when there are many.

use rayon::prelude::*;

/// Below this many elements the rows are normed on the calling thread.
const PARALLEL_ELEMENTS: usize = 1 << 16;

/// `y[r] = x[r] / sqrt(mean(x[r]²) + eps) ⊙ w` for every row of `x` `[rows, w.len()]`, row-major
/// f32, the sum of squares in f64. Panics when `x` is not a whole number of rows.
pub fn rms_norm(x: &[f32], w: &[f32], cols: usize, eps: f32) -> Vec<f32> {
    assert!(
        cols > 0 && w.len() == cols && x.len().is_multiple_of(cols),
        "rms_norm: shapes"
    );
    let mut y = vec![0.0f32; x.len()];
    let norm = |(out, row): (&mut [f32], &[f32])| {
        let squares: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((squares / cols as f64) as f32 + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
            *o = v * scale * g;
        }
    };
    if x.len() >= PARALLEL_ELEMENTS {
        y.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .for_each(norm);
    } else {
        y.chunks_mut(cols).zip(x.chunks(cols)).for_each(norm);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_formula_row_by_row() {
        let cols = 5;
        let x: Vec<f32> = (0..3 * cols).map(|i| (i as f32 - 6.0) * 0.37).collect();
        let w: Vec<f32> = (0..cols).map(|i| 0.5 + i as f32 * 0.25).collect();
        let y = rms_norm(&x, &w, cols, 1e-6);
        for r in 0..3 {
            let row = &x[r * cols..(r + 1) * cols];
            let ms = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
            for c in 0..cols {
                let want = row[c] / (ms + 1e-6).sqrt() * w[c];
                assert!((y[r * cols + c] - want).abs() < 1e-5, "row {r} col {c}");
            }
        }
    }
}

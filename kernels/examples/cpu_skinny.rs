//! Times the CPU skinny matmul `x[m, 2048] · W[6144, 2048]ᵀ` for m = 1..256 the way a model meets
//! its weights: eight distinct weights (400 MB in f32, past every cache) are multiplied in turn, so
//! each product streams its weight from memory while the caches hold other weights' clean lines.
//! Prints, for weights kept in f32, bf16, f16 and int8 blocks, the median over five rounds of 32 products (ms
//! per product) and the weight bytes streamed per second at m = 1. `cpu_skinny_numpy.py` beside
//! this file does the f32 product through numpy's BLAS, for comparison on the same machine.
use std::time::Instant;

use half::{bf16, f16};
use troupe_kernels::cpu_matmul::{skinny_matmul, CpuEpilogue};
use troupe_kernels::cpu_weight::{quantize_q8, Matrix, Q8};

fn main() {
    let (k, n) = (2048usize, 6144usize); // W is [n, k]
    let weights: Vec<Vec<f32>> = (0..8)
        .map(|j| {
            (0..k * n)
                .map(|i| (((i + j) * 7919 % 1000) as f32) / 1000.0 - 0.5)
                .collect()
        })
        .collect();
    time("f32", &slices(&weights), k, n);
    let narrow = |f: fn(f32) -> bf16| -> Vec<Vec<bf16>> {
        weights
            .iter()
            .map(|w| w.iter().map(|&v| f(v)).collect())
            .collect()
    };
    time("bf16", &slices(&narrow(bf16::from_f32)), k, n);
    let halves: Vec<Vec<f16>> = weights
        .iter()
        .map(|w| w.iter().map(|&v| f16::from_f32(v)).collect())
        .collect();
    time("f16", &slices(&halves), k, n);
    let int8: Vec<(Vec<i8>, Vec<f32>)> =
        weights.iter().map(|w| quantize_q8(w.as_slice())).collect();
    let views: Vec<Q8<'_>> = int8
        .iter()
        .map(|(q, s)| Q8::new(q, s).expect("a scale per block"))
        .collect();
    time("int8", &views, k, n);
}

/// Each weight as the kernels' view of it.
fn slices<W: troupe_kernels::cpu_weight::Weight>(weights: &[Vec<W>]) -> Vec<&[W]> {
    weights.iter().map(Vec::as_slice).collect()
}

fn time<M: Matrix>(name: &str, weights: &[M], k: usize, n: usize) {
    let mut line = format!("{name:>4}");
    for m in [1usize, 2, 4, 5, 8, 16, 32, 40, 64, 96, 128, 256] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32) / 97.0 - 0.5)
            .collect();
        let mut rounds: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..4 {
                    for w in weights {
                        std::hint::black_box(skinny_matmul(&x, *w, m, k, n, CpuEpilogue::None));
                    }
                }
                t.elapsed().as_secs_f64() * 1e3 / (4 * weights.len()) as f64
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        let ms = rounds[rounds.len() / 2];
        line += &format!(" m{m}={ms:.2}");
        if m == 1 {
            let gbs = (k * n * M::BYTES) as f64 / ms / 1e6;
            line += &format!(" ({gbs:.1} GB/s)");
        }
    }
    println!("{line}");
}

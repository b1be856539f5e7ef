//! Times the CPU skinny matmul `x[m, 2048] · W[2048, 6144]` for m = 1..64 the way a model meets its
//! weights: eight distinct weights (400 MB, past every cache) are multiplied in turn, so each
//! product streams its weight from memory while the caches hold other weights' clean lines. Prints
//! the median over five rounds of 32 products (ms per product). `cpu_skinny_numpy.py` beside this
//! file does the same through numpy's BLAS, for comparison on the same machine.
use std::time::Instant;
use troupe_kernels::cpu_matmul::{skinny_matmul, CpuEpilogue};

fn main() {
    let (k, n) = (2048usize, 6144usize);
    let weights: Vec<Vec<f32>> = (0..8)
        .map(|j| {
            (0..k * n)
                .map(|i| (((i + j) * 7919 % 1000) as f32) / 1000.0 - 0.5)
                .collect()
        })
        .collect();
    let mut line = String::from("kernel");
    for m in [1usize, 2, 4, 8, 16, 32, 64] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32) / 97.0 - 0.5)
            .collect();
        let mut rounds: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..4 {
                    for w in &weights {
                        std::hint::black_box(skinny_matmul(&x, w, m, k, n, CpuEpilogue::None));
                    }
                }
                t.elapsed().as_secs_f64() * 1e3 / (4 * weights.len()) as f64
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        line += &format!(" m{m}={:.2}", rounds[rounds.len() / 2]);
    }
    println!("{line}");
}

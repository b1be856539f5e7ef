//! Times the CPU skinny matmul `x[m, 2048] · W[2048, 6144]` for m = 1..64 (medians of 15), with
//! the caches flushed before each call, as a model's weights never sit in them.
use std::time::Instant;
use troupe_kernels::cpu_matmul::{skinny_matmul, CpuEpilogue};

fn main() {
    let (k, n) = (2048usize, 6144usize);
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 7919 % 1000) as f32) / 1000.0 - 0.5)
        .collect();
    let mut flush = vec![0u8; 64 << 20];
    let mut line = String::new();
    for m in [1usize, 2, 4, 8, 16, 32, 64] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32) / 97.0 - 0.5)
            .collect();
        let mut ts: Vec<f64> = (0..17)
            .map(|i| {
                flush
                    .iter_mut()
                    .step_by(64)
                    .for_each(|b| *b = b.wrapping_add(i as u8));
                let t = Instant::now();
                std::hint::black_box(skinny_matmul(&x, &w, m, k, n, CpuEpilogue::None));
                t.elapsed().as_secs_f64() * 1e3
            })
            .skip(2)
            .collect();
        ts.sort_by(f64::total_cmp);
        line += &format!(" m{m}={:.2}", ts[ts.len() / 2]);
    }
    println!("{line}");
}

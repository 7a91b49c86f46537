//! f32 products by a transposed weight (`x · Wᵀ`, every linear layer's forward and the head's) on
//! the CPU: gemm's own path, which packs `W` one element at a time, against memtune's column
//! blocks (`matmul::gemm_column_blocks`: 16 × 16 AVX-512 transposes into a small scratch), and
//! the same product by an untransposed `B = Wᵀ` for scale. The two paths alternate, each in a
//! process of its own (`MEMTUNE_NO_COLUMN_BLOCKS=1` selects gemm's, read once per process), for
//! `--rounds` rounds; the table shows each shape's median GFLOP/s.
//!
//!     cargo run --release --example matmul_f32 -- --rounds 3
//!
//! Shapes are the benchmark matrix's (L2: hidden 256, MLP 688, vocabulary 4,096; L4: 512, 1,376,
//! 32,000) at 128, 1,024 and 2,048 rows.
use candle_core::{Device, Tensor};
use memtune::engine::matmul::matmul;
use std::process::Command;
use std::time::Instant;

const SHAPES: [(usize, usize, usize); 10] = [
    (128, 256, 256),
    (128, 256, 688),
    (128, 256, 4096),
    (128, 512, 1376),
    (128, 512, 32000),
    (1024, 256, 688),
    (1024, 512, 1376),
    (1024, 512, 32000),
    (2048, 256, 688),
    (2048, 512, 1376),
];

fn seconds(reps: usize, f: &dyn Fn() -> Tensor) -> f64 {
    let _ = f();
    let t = Instant::now();
    for _ in 0..reps {
        let _ = f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

/// One process's measurements: a line per shape, `m k n x·Wᵀ-GFLOP/s x·B-GFLOP/s`.
fn measure() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for (m, k, n) in SHAPES {
        let w = Tensor::randn(0f32, 1.0, &[n, k], &d)?;
        let b = w.t()?.contiguous()?;
        let x = Tensor::randn(0f32, 1.0, &[m, k], &d)?;
        let flop = 2.0 * (m * k * n) as f64;
        let reps = (4e9 / flop).ceil() as usize;
        let wt = w.t()?;
        let transposed = seconds(reps, &|| matmul(&x, &wt).unwrap());
        let plain = seconds(reps, &|| matmul(&x, &b).unwrap());
        println!(
            "{m} {k} {n} {} {}",
            flop / transposed / 1e9,
            flop / plain / 1e9
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--measure") {
        return Ok(measure()?);
    }
    let rounds = match args.get(1).map(String::as_str) {
        None => 3,
        Some("--rounds") => args
            .get(2)
            .and_then(|v| v.parse().ok())
            .ok_or("--rounds N")?,
        Some(_) => return Err("usage: matmul_f32 [--rounds N]".into()),
    };
    let exe = std::env::current_exe()?;
    // results[path][shape] = (x·Wᵀ, x·B) GFLOP/s of every round.
    let mut results = vec![vec![(Vec::new(), Vec::new()); SHAPES.len()]; 2];
    for round in 0..rounds {
        for (path, result) in results.iter_mut().enumerate() {
            let mut cmd = Command::new(&exe);
            cmd.arg("--measure");
            if path == 0 {
                cmd.env("MEMTUNE_NO_COLUMN_BLOCKS", "1");
            } else {
                cmd.env_remove("MEMTUNE_NO_COLUMN_BLOCKS");
            }
            let out = cmd.output()?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into());
            }
            for (line, shape) in String::from_utf8(out.stdout)?
                .lines()
                .zip(result.iter_mut())
            {
                let v: Vec<f64> = line
                    .split(' ')
                    .skip(3)
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
                shape.0.push(v[0]);
                shape.1.push(v[1]);
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    println!(
        "| m × k × n | x·Wᵀ, gemm's packing GFLOP/s | x·Wᵀ, column blocks GFLOP/s | column blocks / gemm's | x·B (no transpose) GFLOP/s |"
    );
    println!("|---|---|---|---|---|");
    for (s, (m, k, n)) in SHAPES.iter().enumerate() {
        let old = median(&mut results[0][s].0.clone());
        let new = median(&mut results[1][s].0.clone());
        let mut plain = results[0][s].1.clone();
        plain.extend_from_slice(&results[1][s].1);
        println!(
            "| {m} × {k} × {n} | {old:.0} | {new:.0} | {:.2} | {:.0} |",
            new / old,
            median(&mut plain)
        );
    }
    Ok(())
}

//! Causal attention's six products (forward: `q kᵀ`, `P v`; backward: the recomputed `q kᵀ`,
//! `Pᵀ dO`, `dO vᵀ`, `dS k`, `dSᵀ q`) with their softmax kernels, as `ops::causal_attention` runs
//! them: once with `matmul::causal_product` (on the CPU in f32 only the blocks on or below the
//! diagonal are multiplied) and once with whole products (`matmul::matmul`), alternating in one
//! process on the same inputs, best of `--reps` rounds each.
//!
//!     cargo run --release --example attention_blocks -- [--reps 20]
//!
//! Shapes: the issue-7 benchmark models' layers (L2: 8 heads of 32; L4: 8 heads of 64) at batch ×
//! sequence 1 × 128, 4 × 256 and 8 × 256, f32 (the only dtype `causal_product` skips blocks in:
//! bf16 products run on AMX whole).
use candle_core::{Device, Result, Tensor};
use memtune::engine::kernels::{scaled_causal_softmax, scaled_causal_softmax_grad};
use memtune::engine::matmul::{Causal, causal_product, matmul};
use memtune::engine::model::causal_mask;
use std::time::Instant;

/// One forward and backward pass of attention's products and softmax, with `blocks` choosing
/// causal or whole products. Returns the gradients so that nothing is optimised away.
fn pass(
    [q, k, v, d_out]: &[Tensor; 4],
    mask: &Tensor,
    scale: f64,
    blocks: bool,
) -> Result<Vec<Tensor>> {
    let product = |a: &Tensor, b: &Tensor, kind| {
        if blocks {
            causal_product(a, b, kind)
        } else {
            matmul(a, b)
        }
    };
    let probs = || scaled_causal_softmax(&product(q, &k.t()?, Causal::Output)?, mask, scale);
    let out = product(&probs()?, v, Causal::Lower)?;
    let p = probs()?;
    let dv = product(&p.t()?, d_out, Causal::Upper)?;
    let dp = product(d_out, &v.t()?, Causal::Output)?;
    let ds = scaled_causal_softmax_grad(&p, &dp, scale)?;
    let dq = product(&ds, k, Causal::Lower)?;
    let dk = product(&ds.t()?, q, Causal::Upper)?;
    Ok(vec![out, dq, dk, dv])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args
        .windows(2)
        .find(|w| w[0] == "--reps")
        .map_or(20, |w| w[1].parse().expect("--reps N"));
    let device = Device::Cpu;
    println!("| layer | b × s | causal blocks ms | whole products ms | whole / blocks |");
    println!("|---|---|---|---|---|");
    for (name, head_dim) in [("L2 (8 × 32)", 32usize), ("L4 (8 × 64)", 64)] {
        for (b, s) in [(1usize, 128usize), (4, 256), (8, 256)] {
            let heads = 8;
            // [b, s, h, d] with the heads transposed, as the projections' outputs reach attention.
            let input = |seed: f32| -> Result<Tensor> {
                (Tensor::randn(0f32, 1.0, (b, s, heads, head_dim), &device)? * f64::from(seed))?
                    .transpose(1, 2)
            };
            let tensors = [input(1.0)?, input(1.0)?, input(1.0)?, input(0.1)?];
            let mask = causal_mask(s, &device)?;
            let scale = 1.0 / (head_dim as f64).sqrt();
            // Same results where they are used (the outputs and gradients are exact products
            // of the same values; only summation order may differ).
            let (with, without) = (
                pass(&tensors, &mask, scale, true)?,
                pass(&tensors, &mask, scale, false)?,
            );
            for (x, y) in with.iter().zip(&without) {
                let diff = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = y.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff <= 1e-4 * size.max(1e-6),
                    "results differ: {diff} of {size}"
                );
            }
            let mut best = [f64::MAX; 2];
            for _ in 0..reps {
                for (i, blocks) in [true, false].into_iter().enumerate() {
                    let t = Instant::now();
                    drop(pass(&tensors, &mask, scale, blocks)?);
                    best[i] = best[i].min(t.elapsed().as_secs_f64());
                }
            }
            println!(
                "| {name} | {b} × {s} | {:.2} | {:.2} | {:.2}× |",
                best[0] * 1e3,
                best[1] * 1e3,
                best[1] / best[0]
            );
        }
    }
    Ok(())
}

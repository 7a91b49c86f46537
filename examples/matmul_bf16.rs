//! 16-bit matrix products on the CPU: candle's own (`Tensor::matmul`: for bf16 it widens both whole
//! operands to f32, for f16 it runs gemm's f16 path) against memtune's tiled product
//! (`memtune::engine::matmul::matmul`), and f32 for scale, alternating on the same shapes in one run.
//!
//!     cargo run --release --example matmul_bf16
//!
//! Shapes are Qwen2.5-0.5B's (hidden 896, MLP 4864, vocabulary 151,936) at 64–256 tokens: the head's
//! forward (x · Wᵀ) and input gradient (g · W), a layer's MLP up-projection and its weight gradient.
use candle_core::{DType, Device, Tensor};
use memtune::engine::matmul::matmul;
use std::time::Instant;

fn time(reps: usize, f: &dyn Fn() -> Tensor) -> f64 {
    let _ = f();
    let t = Instant::now();
    for _ in 0..reps {
        let _ = f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let r = |shape: &[usize]| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1.0, shape, &d)?.to_dtype(DType::BF16)
    };
    println!(
        "| product | m × k × n | f32 s | candle bf16 s | tiled bf16 s | tiled / candle | candle f16 s | tiled f16 s | tiled / candle |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for tokens in [64usize, 128, 256] {
        let head = r(&[151_936, 896])?;
        let up = r(&[4864, 896])?;
        let x = r(&[tokens, 896])?;
        let g = r(&[tokens, 151_936])?;
        let gu = r(&[tokens, 4864])?;
        let cases: Vec<(&str, Tensor, Tensor)> = vec![
            ("head x·Wᵀ", x.clone(), head.t()?),
            ("head g·W", g.clone(), head.clone()),
            ("mlp x·Wᵀ", x.clone(), up.t()?),
            ("mlp weight grad gᵀ·x", gu.t()?, x.clone()),
        ];
        for (name, a, b) in cases {
            let (a32, b32) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
            let reps = 3;
            let f32_s = time(reps, &|| a32.matmul(&b32).unwrap());
            let candle_s = time(reps, &|| a.matmul(&b).unwrap());
            let tiled_s = time(reps, &|| matmul(&a, &b).unwrap());
            let (a16, b16) = (a.to_dtype(DType::F16)?, b.to_dtype(DType::F16)?);
            let candle16_s = time(reps, &|| a16.matmul(&b16).unwrap());
            let tiled16_s = time(reps, &|| matmul(&a16, &b16).unwrap());
            let (m, k) = a.dims2()?;
            let n = b.dims2()?.1;
            println!(
                "| {name} | {m} × {k} × {n} | {f32_s:.3} | {candle_s:.3} | {tiled_s:.3} | {:.2} | {candle16_s:.3} | {tiled16_s:.3} | {:.2} |",
                tiled_s / candle_s,
                tiled16_s / candle16_s
            );
        }
    }
    Ok(())
}

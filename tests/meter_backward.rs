//! candle's backward pass as memtune builds it (vendor/candle-core, see its MEMTUNE.md): a tensor's
//! first gradient is kept as it is, not added into a fresh zeros tensor. Measured with the CPU
//! meter; one test in this file, since the counters are process-wide.

use candle_core::{DType, Device, Tensor, Var};
use memtune::probe::meter::{CpuMeter, MemoryMeter};

mod common;
use common::wait_for_the_harness;

const MIB: u64 = 1 << 20;

#[test]
fn a_first_gradient_is_kept_not_added_to_zeros() -> candle_core::Result<()> {
    let meter = CpuMeter::new();
    wait_for_the_harness(&meter);
    let x = Var::from_tensor(&Tensor::ones((1024, 1024), DType::F32, &Device::Cpu)?)?;
    let z = x.affine(3.0, 0.0)?;
    let loss = z.sum_all()?;
    // Warm up whatever the first backward pass initialises, then measure a second one.
    drop(loss.backward()?);

    meter.reset_peak();
    let start = meter.current_bytes();
    let grads = loss.backward()?;
    let peak = meter.peak_bytes() - start;
    let kept = meter.current_bytes() - start;
    // Two 4 MiB gradients are made, z's (the sum's, broadcast and made contiguous) and x's
    // (`affine` of it), and x's is kept (candle drops a non-variable's gradient once it has been
    // passed on). Added into zeros, each would also have needed a zeroed 4 MiB buffer and a 4 MiB
    // sum beside it.
    eprintln!("backward: peak {peak} B, kept {kept} B");
    assert!((4 * MIB..4 * MIB + 64 * 1024).contains(&kept), "{kept}");
    assert!((8 * MIB..8 * MIB + 64 * 1024).contains(&peak), "{peak}");
    let gx = grads.get(&x).expect("x has a gradient");
    assert_eq!(
        gx.sum_all()?.to_scalar::<f32>()?,
        3.0 * (1024 * 1024) as f32
    );
    Ok(())
}

//! The CPU meter sees candle's tensors: a 1024×1024 f32 tensor is 4 MiB of storage.
//! One test in this file: the counters are process-wide, and a second test running beside it
//! would move them.

use candle_core::{DType, Device, Tensor};
use memtune::probe::meter::{CpuMeter, MemoryMeter};

mod common;
use common::wait_for_the_harness;

const MIB: u64 = 1 << 20;

/// Bytes `current_bytes` rises by while a zero tensor of `shape` is alive.
fn bytes_while_alive(meter: &CpuMeter, shape: (usize, usize)) -> candle_core::Result<u64> {
    let before = meter.current_bytes();
    let tensor = Tensor::zeros(shape, DType::F32, &Device::Cpu)?;
    let alive = meter.current_bytes();
    drop(std::hint::black_box(tensor));
    assert_eq!(
        meter.current_bytes(),
        before,
        "dropping the tensor frees all it took"
    );
    Ok(alive - before)
}

#[test]
fn candle_cpu_tensor_storage_is_counted_exactly() -> candle_core::Result<()> {
    let meter = CpuMeter::new();
    wait_for_the_harness(&meter);
    // The first tensor may initialise process-wide state; keep that out of the figures.
    bytes_while_alive(&meter, (1, 1))?;

    let small = bytes_while_alive(&meter, (1024, 1024))?;
    let large = bytes_while_alive(&meter, (2048, 1024))?;
    // Storage: 1024 × 1024 × 4 bytes = 4 MiB, and 8 MiB for twice the rows. The tensor's own
    // bookkeeping (Arc'd header, shape and strides) is the same for both shapes, so the
    // difference is storage alone and exact.
    assert_eq!(large - small, 4 * MIB);
    let bookkeeping = small - 4 * MIB;
    eprintln!("4 MiB tensor: {small} bytes in all, {bookkeeping} of them bookkeeping");
    assert!(small >= 4 * MIB && bookkeeping < 1024, "{small}");

    meter.reset_peak();
    let start = meter.current_bytes();
    let a = Tensor::zeros((1024, 1024), DType::F32, &Device::Cpu)?;
    let b = (&a + 1.0)?;
    drop(std::hint::black_box(b));
    drop(std::hint::black_box(a));
    // Two 4 MiB tensors were alive at once.
    assert_eq!(meter.peak_bytes() - start, 2 * small);
    Ok(())
}

//! The CUDA meter: a clear error where there is no driver (never a panic), and real readings
//! where there is a GPU. The GPU test skips, saying so, on machines without one.

use memtune::device::detect_gpus;
use memtune::probe::meter::{CudaMeter, MemoryMeter, MeterError};

const MIB: u64 = 1 << 20;

#[test]
fn cuda_meter_without_a_gpu_is_an_error_not_a_panic() {
    let gpus = detect_gpus();
    let meter = CudaMeter::new(0);
    match (&gpus, &meter) {
        (Err(reason), Err(error)) => {
            println!("no GPU ({reason}); CudaMeter::new(0) says: {error}");
            if reason.starts_with("no NVIDIA driver found") {
                assert!(matches!(error, MeterError::NoDriver(_)), "{error:?}");
                assert!(
                    error.to_string().starts_with("no NVIDIA driver found ("),
                    "{error}"
                );
            }
        }
        (Ok(_), Ok(_)) => {}
        _ => panic!("detection and meter disagree: {gpus:?} vs {meter:?}"),
    }
    // An ordinal past the last device is an error on every machine.
    assert!(CudaMeter::new(1 << 20).is_err());
}

#[test]
fn cuda_meter_reads_a_real_gpu() -> Result<(), Box<dyn std::error::Error>> {
    if let Err(reason) = detect_gpus() {
        println!("skipped: needs an NVIDIA GPU ({reason})");
        return Ok(());
    }
    let meter = CudaMeter::new(0)?;
    println!("{} via {:?}", meter.device_name(), meter.usage_source());
    assert!(meter.device_name().starts_with("cuda:0 ("));

    let (free, total) = meter.free_and_total_bytes()?;
    assert!(
        free > 0 && total > 0 && free <= total,
        "free {free}, total {total}"
    );
    let start = meter.current_bytes();

    // 256 MiB allocated through the same primary context and cudarc's allocator, as candle
    // allocates its tensors, shows up in the reading and the peak.
    let context = cudarc::driver::CudaContext::new(0)?;
    let stream = context.default_stream();
    meter.reset_peak();
    let block = stream.alloc_zeros::<u8>(256 * MIB as usize)?;
    let with_block = meter.current_bytes();
    println!("before {start} B, with 256 MiB block {with_block} B, total {total} B");
    if meter.is_exact() {
        // The pool's counters: the block's bytes exactly, and the context is runtime.
        assert_eq!(with_block - start, 256 * MIB);
        assert!(
            meter.runtime_bytes() > 0,
            "a process with a CUDA context holds device memory"
        );
        drop(block);
        assert_eq!(meter.current_bytes(), start);
        // The peak saw the block though it is gone.
        assert!(meter.peak_bytes() >= start + 256 * MIB);
        meter.reset_peak();
        assert_eq!(meter.peak_bytes(), start);
    } else {
        // NVML's figure for the process: the context too, sampled.
        assert!(with_block >= start + 256 * MIB, "{with_block} vs {start}");
        assert!(meter.peak_bytes() >= with_block);
        assert_eq!(meter.runtime_bytes(), 0);
        drop(block);
    }
    Ok(())
}

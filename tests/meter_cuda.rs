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
    assert!(!meter.is_exact());

    let (free, total) = meter.free_and_total_bytes()?;
    assert!(
        free > 0 && total > 0 && free <= total,
        "free {free}, total {total}"
    );
    // The meter's context alone holds device memory.
    let start = meter.current_bytes();
    assert!(
        start > 0,
        "a process with a CUDA context uses device memory"
    );
    meter.set_tensor_bytes(0);
    assert_eq!(meter.runtime_bytes(), meter.current_bytes());

    // 256 MiB allocated through the same primary context shows up in the reading and the peak.
    let context = cudarc::driver::CudaContext::new(0)?;
    let stream = context.default_stream();
    let block = stream.alloc_zeros::<u8>(256 * MIB as usize)?;
    stream.synchronize()?;
    let with_block = meter.current_bytes();
    println!("before {start} B, with 256 MiB block {with_block} B, total {total} B");
    assert!(with_block >= start + 256 * MIB, "{with_block} vs {start}");
    assert!(meter.peak_bytes() >= with_block);
    meter.set_tensor_bytes(256 * MIB);
    // Runtime is a reading minus the tensor bytes, and no reading exceeds the peak.
    let runtime = meter.runtime_bytes();
    assert!(
        runtime + 256 * MIB <= meter.peak_bytes(),
        "runtime {runtime}"
    );
    drop(block);
    Ok(())
}

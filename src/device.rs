//! Device detection: which NVIDIA GPUs this machine has, with their memory, found through NVML
//! (or the CUDA driver when NVML is missing). Neither needs the `cuda` build: both libraries are
//! loaded at run time, and their absence is an answer ("running on CPU"), not a failure.
//!
//! cudarc panics when it calls into a driver library that is not there, so every cudarc call
//! here goes through `cuda_driver_present` first and `guard_cudarc` around it.

use serde::{Deserialize, Serialize};

/// One GPU as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML's index (PCI bus order, blind to `CUDA_VISIBLE_DEVICES`). It is the CUDA ordinal
    /// when `CUDA_DEVICE_ORDER=PCI_BUS_ID` and all GPUs are visible; when NVML is missing and the
    /// CUDA driver answered instead, it is the CUDA ordinal.
    pub index: u32,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// e.g. `580.65.06` from NVML, or `CUDA 12.8` from the driver API.
    pub driver_version: String,
}

/// The GPUs of this machine. `Ok` holds at least one GPU; `Err` says in a sentence why there is
/// none to use, e.g. `no NVIDIA driver found (libnvidia-ml.so.1 missing); running on CPU`.
pub fn detect_gpus() -> Result<Vec<GpuInfo>, String> {
    let nvml_error = match nvml_init() {
        Ok(nvml) => return gpus_from_nvml(&nvml),
        Err(error) => error,
    };
    match cuda_driver_present() {
        Ok(()) => gpus_from_cuda_driver()
            .map_err(|error| format!("{nvml_error}; the CUDA driver: {error}; running on CPU")),
        Err(driver_error) => Err(format!(
            "no NVIDIA driver found ({nvml_error}, {driver_error}); running on CPU"
        )),
    }
}

/// One line for the CLI: the GPUs found, or why the run stays on the CPU.
pub fn describe_devices() -> String {
    match detect_gpus() {
        Ok(gpus) => {
            let described: Vec<String> = gpus.iter().map(describe_gpu).collect();
            format!("devices: cpu; {}", described.join("; "))
        }
        Err(reason) => format!("devices: cpu only ({reason})"),
    }
}

fn describe_gpu(gpu: &GpuInfo) -> String {
    format!(
        "gpu {} {}: {} free of {} (driver {})",
        gpu.index,
        gpu.name,
        gib(gpu.free_bytes),
        gib(gpu.total_bytes),
        gpu.driver_version
    )
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Loads NVML (`libnvidia-ml.so.1`). The error says which part is missing.
pub(crate) fn nvml_init() -> Result<nvml_wrapper::Nvml, String> {
    use nvml_wrapper::error::NvmlError;
    nvml_wrapper::Nvml::init().map_err(|error| match error {
        NvmlError::LibloadingError(_) => "libnvidia-ml.so.1 missing".to_string(),
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".to_string(),
        other => format!("NVML: {other}"),
    })
}

fn gpus_from_nvml(nvml: &nvml_wrapper::Nvml) -> Result<Vec<GpuInfo>, String> {
    let driver_version = nvml
        .sys_driver_version()
        .map_err(|e| format!("NVML driver version: {e}"))?;
    let count = nvml
        .device_count()
        .map_err(|e| format!("NVML device count: {e}"))?;
    if count == 0 {
        return Err("no NVIDIA GPU found (NVML lists none); running on CPU".to_string());
    }
    (0..count)
        .map(|index| {
            let device = nvml
                .device_by_index(index)
                .map_err(|e| format!("NVML device {index}: {e}"))?;
            let name = device
                .name()
                .map_err(|e| format!("NVML device {index} name: {e}"))?;
            let memory = device
                .memory_info()
                .map_err(|e| format!("NVML device {index} memory: {e}"))?;
            Ok(GpuInfo {
                index,
                name,
                total_bytes: memory.total,
                free_bytes: memory.free,
                driver_version: driver_version.clone(),
            })
        })
        .collect()
}

/// The fallback when NVML is missing: ask the CUDA driver, which needs a context per device to
/// read its free memory (created and released here).
fn gpus_from_cuda_driver() -> Result<Vec<GpuInfo>, String> {
    use cudarc::driver::CudaContext;
    let count = guard_cudarc(CudaContext::device_count)?;
    if count <= 0 {
        return Err("no CUDA device".to_string());
    }
    let driver_version = guard_cudarc(cuda_driver_version)?;
    (0..count as usize)
        .map(|ordinal| {
            let context = guard_cudarc(|| CudaContext::new(ordinal))?;
            let name = guard_cudarc(|| context.name())?;
            let (free, total) = guard_cudarc(|| context.mem_get_info())?;
            Ok(GpuInfo {
                index: ordinal as u32,
                name,
                total_bytes: total as u64,
                free_bytes: free as u64,
                driver_version: driver_version.clone(),
            })
        })
        .collect()
}

fn cuda_driver_version() -> Result<String, cudarc::driver::DriverError> {
    cudarc::driver::result::init()?;
    let mut version: std::ffi::c_int = 0;
    // SAFETY: cuDriverGetVersion writes one int through the pointer.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version).result()? };
    Ok(format!("CUDA {}.{}", version / 1000, (version % 1000) / 10))
}

/// Whether the CUDA driver library can be used. In the default build cudarc loads it at run time
/// and panics on first use if it is missing, so this asks first.
#[cfg(feature = "dynamic-cuda")]
pub(crate) fn cuda_driver_present() -> Result<(), String> {
    // SAFETY: only tries to load the library (libloading) and drops it again.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("libcuda.so missing".to_string())
    }
}

/// In the `cuda` build the driver is linked: the binary would not have started without it.
#[cfg(all(feature = "cuda", not(feature = "dynamic-cuda")))]
pub(crate) fn cuda_driver_present() -> Result<(), String> {
    Ok(())
}

#[cfg(not(any(feature = "cuda", feature = "dynamic-cuda")))]
pub(crate) fn cuda_driver_present() -> Result<(), String> {
    Err("built without the CUDA driver (features `dynamic-cuda` and `cuda` both off)".to_string())
}

/// Runs a cudarc call, turning both its error and a panic (a symbol this driver lacks) into a
/// message. Call only after [`cuda_driver_present`] said yes.
pub(crate) fn guard_cudarc<T>(
    call: impl FnOnce() -> Result<T, cudarc::driver::DriverError>,
) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(panic) => Err(match panic.downcast_ref::<String>() {
            Some(message) => format!("the CUDA driver library failed: {message}"),
            None => match panic.downcast_ref::<&str>() {
                Some(message) => format!("the CUDA driver library failed: {message}"),
                None => "the CUDA driver library failed".to_string(),
            },
        }),
    }
}

/// A device UUID's 16 bytes as 8-4-4-4-12 hex digits; NVML prefixes `GPU-` (or `MIG-` for a MIG
/// instance).
pub(crate) fn uuid_hex(bytes: &[std::ffi::c_char; 16]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{:02x}", *b as u8)).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_gpus_answers_without_panicking() {
        match detect_gpus() {
            Ok(gpus) => {
                assert!(!gpus.is_empty());
                for gpu in &gpus {
                    assert!(
                        gpu.total_bytes > 0 && gpu.free_bytes <= gpu.total_bytes,
                        "{gpu:?}"
                    );
                }
            }
            // The sentence must say the run goes on on the CPU.
            Err(reason) => assert!(reason.ends_with("running on CPU"), "{reason}"),
        }
        let line = describe_devices();
        assert!(line.starts_with("devices: cpu"), "{line}");
        println!("{line}");
    }

    #[test]
    fn uuid_is_spelled_as_nvml_spells_it_after_its_prefix() {
        let bytes: [u8; 16] = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        let as_driver_gives_them = bytes.map(|b| b as std::ffi::c_char);
        assert_eq!(
            uuid_hex(&as_driver_gives_them),
            "12345678-9abc-def0-0123-456789abcdef"
        );
    }

    #[test]
    fn gpu_line_shows_name_memory_and_driver() {
        let gpu = GpuInfo {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".to_string(),
            total_bytes: 80 << 30,
            free_bytes: 79 << 30,
            driver_version: "580.65.06".to_string(),
        };
        assert_eq!(
            describe_gpu(&gpu),
            "gpu 0 NVIDIA H100 80GB HBM3: 79.00 GiB free of 80.00 GiB (driver 580.65.06)"
        );
    }
}

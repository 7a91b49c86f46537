//! The training engine: a Llama-family model written from basic candle ops (so every parameter gets
//! a gradient), LoRA and quantized bases, checkpointing, losses, precision, and optimizers.

pub mod kernels;
pub mod matmul;
pub mod model;
pub mod ops;
pub mod optim;
pub mod step;
pub mod weights;

pub use model::{Model, RandomInit, WeightSource};
pub use step::{Batch, Engine, NoObserver, StepObserver, StepStats};

/// How long candle's CPU worker threads spin after an element-wise op before they sleep, unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set already. candle's default (25,000 spins, about half a
/// millisecond) keeps its worker busy-waiting while the next op, often a matrix multiply on
/// rayon's threads, needs that core: on 2 cores a step ran 15–20% slower (`reports/BENCHMARKS.md`,
/// issue 7).
pub const CANDLE_SPIN_LIMIT: &str = "100";

/// How many rounds an idle rayon worker yields its core before it sleeps, unless
/// `RAYON_SPIN_ROUNDS` is set already (read by the patched rayon-core in `vendor/rayon-core`;
/// rayon's own is 32, a few microseconds). A training step hands each op's work to rayon's
/// workers; one that has gone to sleep must be woken with a futex call, which on a virtual
/// machine costs more than a small op's share of work: on 2 vCPUs a step made 8–20 times more
/// context switches and ran 3–22% slower (`reports/BENCHMARKS.md`, issue 7).
pub const RAYON_SPIN_ROUNDS: &str = "3000";

/// Sets up the CPU runtime for training speed: see [`CANDLE_SPIN_LIMIT`] and
/// [`RAYON_SPIN_ROUNDS`]. Call it first thing in `main`, before any thread starts (the binary and
/// the benchmark examples do), and run the work through [`on_rayon_worker`].
///
/// # Safety
/// No other thread may be running: it sets environment variables.
pub unsafe fn configure_cpu_runtime() {
    for (var, value) in [
        ("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT),
        ("RAYON_SPIN_ROUNDS", RAYON_SPIN_ROUNDS),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: the caller guarantees that no other thread reads or writes the environment.
            unsafe { std::env::set_var(var, value) };
        }
    }
}

/// Whether the engine runs its GPU code paths on the CPU too ([`set_gpu_paths_on_cpu`]).
static GPU_PATHS_ON_CPU: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the engine take, on the CPU, the code paths it takes on a GPU: candle's ops in place of
/// memtune's fused CPU kernels, products and early releases, which keep fewer and smaller
/// tensors. CPU probes taken so measure the tensors a CUDA step allocates (the same ops, shapes
/// and dtypes), which is what a plan for a GPU from a CPU-only machine (`--target-gpu`) needs: on
/// an H200, LoRA steps held 2.3 times the activations the CPU's kernels keep
/// (`reports/BENCHMARKS.md`, "GPU"). Process-wide; set it before building a model.
pub fn set_gpu_paths_on_cpu(on: bool) {
    GPU_PATHS_ON_CPU.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_gpu_paths_on_cpu`] is on.
pub fn gpu_paths_on_cpu() -> bool {
    GPU_PATHS_ON_CPU.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether probes on the device named `device` (a probe's device label: `cpu`, `cuda:0 (…)`) run
/// the engine's GPU code paths: on a CUDA device, or on the CPU under [`set_gpu_paths_on_cpu`].
pub fn gpu_code_paths(device: &str) -> bool {
    device.starts_with("cuda") || gpu_paths_on_cpu()
}

/// Whether memtune's CPU kernels serve tensors on `device`: on the CPU, unless
/// [`set_gpu_paths_on_cpu`] asked for the GPU's code paths there.
pub fn cpu_paths(device: &candle_core::Device) -> bool {
    device.is_cpu() && !gpu_paths_on_cpu()
}

/// Runs `work` on one of rayon's global worker threads and returns its result (a panic in it
/// resumes here). The engine's ops hand their work to rayon: called from a thread outside the
/// pool, each op wakes a worker, sleeps until the work is done and is woken again; called from a
/// worker, that worker takes its share at once and no thread sleeps between ops. The workers get
/// a 256 MiB stack (address space, touched as used) in place of the main thread's, for
/// autograd's recursion over deep graphs; if the global pool exists already, it is used as it
/// is.
pub fn on_rayon_worker<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(256 << 20)
        .build_global();
    rayon::scope(move |_| work())
}

#[cfg(test)]
mod tests {
    #[test]
    fn work_handed_to_on_rayon_worker_runs_on_a_worker_and_returns_its_result() {
        assert_eq!(rayon::current_thread_index(), None);
        let (index, sum) = super::on_rayon_worker(|| {
            let sum: u64 = rayon::join(|| 1 + 2, || 3 + 4).0 + 4 + 3;
            (rayon::current_thread_index(), sum)
        });
        assert!(index.is_some());
        assert_eq!(sum, 10);
    }
}

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

/// Sets up the CPU runtime for training speed: see [`CANDLE_SPIN_LIMIT`]. Call it first thing in
/// `main`, before any thread starts (the binary and the benchmark examples do).
///
/// # Safety
/// No other thread may be running: it sets an environment variable.
pub unsafe fn configure_cpu_runtime() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // SAFETY: the caller guarantees that no other thread reads or writes the environment.
        unsafe { std::env::set_var(VAR, CANDLE_SPIN_LIMIT) };
    }
}

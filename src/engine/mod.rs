//! The training engine: a Llama-family model written from basic candle ops (so every parameter gets
//! a gradient), LoRA and quantized bases, checkpointing, losses, precision, and optimizers.

pub mod model;
pub mod ops;
pub mod optim;
pub mod step;
pub mod weights;

pub use model::{Model, RandomInit, WeightSource};
pub use step::{Batch, Engine, NoObserver, StepObserver, StepStats};

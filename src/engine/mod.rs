//! The training engine: a Llama-family model written from basic candle ops (so every parameter gets
//! a gradient), LoRA and quantized bases, checkpointing, losses, precision, and optimizers.

pub mod optim;

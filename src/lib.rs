//! memtune: measure what fine-tuning a language model costs, fit a cost model to the measurements,
//! pick the fastest configuration that fits a memory budget, and run it.
//!
//! The pipeline, one module per stage: [`spec`] (the model's shape) → [`engine`] (the candle model,
//! its training step, optimizers) → [`probe`] (instrumented steps and memory meters) → [`train`]
//! (the trainer loop). [`config`] holds the knobs every stage shares.

pub mod config;
pub mod cost;
pub mod engine;
pub mod probe;
pub mod search;
pub mod spec;

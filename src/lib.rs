//! memtune: measure what fine-tuning a language model costs, fit a cost model to the measurements,
//! pick the fastest configuration that fits a memory budget, and run it.
//!
//! The pipeline, one module per stage: [`spec`] (the model's shape) → [`engine`] (the candle model,
//! its training step, optimizers) → [`probe`] (instrumented steps and memory meters) → [`train`]
//! (the trainer loop) → [`report`] (exports). [`config`] holds the knobs every stage shares;
//! [`data`] the datasets; [`device`] GPU detection; [`gpu_plan`] the GPU catalog and planning for a
//! GPU from CPU probes; [`cli`] and [`commands`] the command line.

pub mod cli;
pub mod commands;
pub mod config;
pub mod cost;
pub mod data;
pub mod device;
pub mod engine;
pub mod gpu_plan;
pub mod probe;
pub mod report;
pub mod search;
pub mod spec;
pub mod train;

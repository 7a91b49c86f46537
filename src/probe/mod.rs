//! Probes: instrumented training steps and the memory meters behind them. A probe's figures are the
//! ground truth the cost model is fitted to and judged against.

pub mod meter;
pub mod runner;

use crate::config::Knobs;
use crate::spec::ModelSpec;
use serde::{Deserialize, Serialize};

/// The six memory components, in the order every table and chart uses.
pub const COMPONENT_NAMES: [&str; 6] = [
    "weights",
    "gradients",
    "optimizer",
    "activations",
    "transient",
    "runtime",
];

/// Bytes by component. `peak` is never the sum of these: it is measured; these explain it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Components {
    /// Parameters as stored: frozen base (possibly quantized) plus trainable ones.
    pub weights: u64,
    /// Gradients of trainable parameters (the accumulated total and the micro-batch's).
    pub gradients: u64,
    /// Optimizer state: moments, 8-bit states and scales, factored statistics.
    pub optimizer: u64,
    /// Tensors saved for backward at the peak.
    pub activations: u64,
    /// Short-lived buffers above the rest at the peak: logits, scores, recomputation, workspaces.
    pub transient: u64,
    /// What the device costs beyond tensors (CUDA context, library workspaces, allocator slack).
    pub runtime: u64,
}

impl Components {
    pub fn as_array(&self) -> [u64; 6] {
        [
            self.weights,
            self.gradients,
            self.optimizer,
            self.activations,
            self.transient,
            self.runtime,
        ]
    }

    pub fn from_array(a: [u64; 6]) -> Self {
        Self {
            weights: a[0],
            gradients: a[1],
            optimizer: a[2],
            activations: a[3],
            transient: a[4],
            runtime: a[5],
        }
    }

    pub fn total(&self) -> u64 {
        self.as_array().iter().sum()
    }
}

/// One row of a step's memory timeline: the meter read at a named mark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineRow {
    /// Seconds since the probe started.
    pub t_s: f64,
    /// e.g. `weights`, `optimizer_init`, `forward`, `loss`, `backward`, `optimizer_step`.
    pub phase: String,
    /// Decoder layer, for per-layer marks.
    pub layer: Option<usize>,
    /// Micro-batch index within the optimizer step.
    pub micro_batch: usize,
    pub current_bytes: u64,
    /// The running peak: the highest memory since the step started.
    pub peak_bytes: u64,
    /// The highest memory since the previous mark (what the work between the two marks needed).
    #[serde(default)]
    pub segment_peak_bytes: u64,
}

/// What one probe measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The model as probed (possibly at reduced depth: `spec.num_hidden_layers`).
    pub spec: ModelSpec,
    pub knobs: Knobs,
    /// e.g. `cpu` or `cuda:0 (NVIDIA H100 80GB HBM3)`.
    pub device: String,
    /// Measured peak over the timed steps, above the memory in use before the model was built.
    pub peak_bytes: u64,
    /// What was live at the moment of the peak, by component.
    pub components: Components,
    /// Median wall time of one optimizer step (all micro-batches).
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub timeline: Vec<TimelineRow>,
}

/// The process's resident memory now and at its high-water mark, for progress lines.
pub fn rss_text() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| format!("{:.0} MiB", kb as f64 / 1024.0))
            .unwrap_or_else(|| "?".to_string())
    };
    format!("{} (peak {})", field("VmRSS:"), field("VmHWM:"))
}

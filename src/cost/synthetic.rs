//! A stand-in engine whose memory and speed follow a known formula, written tensor by tensor (hidden,
//! intermediate, q/kv widths, heads × seq², vocab) rather than through [`super::features`], so that
//! fitting it tests that the features span what a Llama step allocates. Tests and the CLI's
//! end-to-end tests use it where no real engine should run; it is not a model of any device.

use super::{Prober, exact};
use crate::config::{Knobs, LossMode, Method, OptimizerKind, Precision, live_logits};
use crate::probe::{Components, ProbeResult, TimelineRow};
use crate::spec::ModelSpec;

/// A prober with noise-free, known truth. `fail_above_bytes` makes probes whose true peak exceeds it
/// fail, as an out-of-memory probe would.
#[derive(Debug, Clone, Default)]
pub struct SyntheticProber {
    pub fail_above_bytes: Option<u64>,
    /// Report running peaks in the timeline instead of each phase's own peak.
    pub running_peaks: bool,
    /// Probes run so far (tests check that a cached calibration runs none).
    pub probes_run: usize,
}

impl SyntheticProber {
    pub fn new() -> Self {
        Self::default()
    }

    /// The true measurement of one configuration.
    pub fn truth(spec: &ModelSpec, knobs: &Knobs) -> ProbeResult {
        let l = spec.num_hidden_layers as f64;
        let (b, s) = (knobs.batch as f64, knobs.seq as f64);
        let n = b * s;
        let h = spec.hidden_size as f64;
        let i = spec.intermediate_size as f64;
        let q = spec.q_dim() as f64;
        let kv = spec.kv_dim() as f64;
        let heads = spec.num_attention_heads as f64;
        let v = spec.vocab_size as f64;
        let cb = exact::compute_dtype_bytes(knobs.precision) as f64;
        let tb = exact::trainable_dtype_bytes(knobs.precision) as f64;
        let frozen = knobs.method != Method::Full;

        // Per kept layer: norms' inputs and outputs (fp32 statistics), q/k/v, attention output and
        // the MLP's gate/up/act products. Scores and probabilities are live for one layer at a
        // time (attention keeps q, k and v and recomputes them in backward).
        let trained_extra = if frozen { 0.0 } else { 1.0 };
        let layer_tokens = n
            * ((3.0 + trained_extra) * h * cb
                + 2.0 * h * 4.0
                + 2.0 * q * cb
                + 2.0 * kv * cb
                + 3.0 * i * cb);
        let scores = b * heads * s * s * (2.0 * cb + 4.0);
        let mut lora = 0.0;
        if frozen {
            let r = knobs.lora.rank as f64;
            for &t in &knobs.lora.targets {
                let (out, inp) = exact::projection_shape(spec, t);
                let (out, inp) = (out as f64, inp as f64);
                lora += n * r * tb + n * out * tb;
                if cb != tb {
                    lora += n * inp * tb;
                }
            }
        }
        let casts = if !frozen && cb != tb {
            spec.layer_params() as f64 * cb
        } else {
            0.0
        };
        let (rows, cols) = live_logits(knobs, knobs.batch * knobs.seq, spec.vocab_size);
        let elements = (rows * cols) as f64;
        let logits = match knobs.loss {
            LossMode::Full => elements * (cb + 3.0 * 4.0),
            LossMode::Chunked => elements * (cb + 2.0 * 4.0),
        };
        let dequant = if knobs.method == Method::Qlora {
            exact::projection_params(spec) as f64 / l * cb
        } else {
            0.0
        };
        // What stays between steps: a constant, and the sequence tables (as the engine keeps them).
        let runtime = 65_536.0 + exact::seq_table_bytes(spec, knobs) as f64;
        let grad_bytes = exact::trainable_dtype_bytes(knobs.precision) as f64;
        let all_grads = exact::gradient_bytes(spec, knobs) as f64;
        let layer_grads = exact::trainable_params_per_layer(spec, knobs) as f64 * grad_bytes;
        let other_grads = all_grads - l * layer_grads;
        let weights = exact::weight_bytes(spec, knobs);
        let optimizer = exact::optimizer_bytes(spec, knobs);
        let largest = exact::largest_trainable_tensor(spec, knobs) as f64 * 4.0;
        let temporaries = match knobs.optimizer {
            OptimizerKind::Adamw => 3.0 * largest,
            OptimizerKind::Adamw8bit => 4.0 * largest,
            OptimizerKind::Adafactor => 2.0 * largest,
            OptimizerKind::Sgd => largest,
        };
        let kept_layer = layer_tokens + lora + casts;
        let input = n * h * cb;
        let embedded = n * h * (2.0 * cb + 4.0);
        let full_loss = if knobs.loss == LossMode::Full {
            1.0
        } else {
            0.0
        };
        let recompute_extra = n * (6.0 * h + 3.0 * i) * cb + scores;

        // Time: matmuls at a rate per precision, attention at half that rate, a fixed cost per
        // layer pass and per micro-batch, an optimizer pass over the trainable parameters. Each
        // segment is charged its own work, so the timeline's marks carry times as a real step's do.
        let rate = match knobs.precision {
            Precision::Fp32 => 1.0e11,
            Precision::Bf16 => 0.6e11,
            Precision::Fp16 => 0.7e11,
            Precision::Bf16Pure => 0.65e11,
        };
        let layer_lin = exact::projection_params(spec) as f64;
        let adapters = if frozen {
            exact::adapter_params_per_layer(spec, &knobs.lora) as f64
        } else {
            0.0
        };
        let attention = n * 4.0 * s * q / (0.5 * rate);
        let forward_s = 2.0 * n * (layer_lin + adapters) / rate + attention + 2e-4;
        // A recomputation skips the down projection's product (nobody reads its output).
        let recompute_s = forward_s
            - 2.0 * n * (layer_lin - exact::recomputed_projection_params(spec) as f64) / rate;
        // Backward: the input's gradient through every matrix, the trained weights' gradients
        // (the base's under full fine-tuning, the adapters' otherwise), attention's twice.
        let backward_s = 2.0 * n * (layer_lin * (1.0 + trained_extra) + 2.0 * adapters) / rate
            + 2.0 * attention
            + 4e-4;
        let head_s = 2.0 * n * v * h / rate;
        let chunked = if knobs.loss == LossMode::Chunked {
            1.0
        } else {
            0.0
        };
        let head_backward_s = head_s * (1.0 + trained_extra + chunked);
        let embed_s = 1e-3;
        let trainable = exact::trainable_params(spec, knobs) as f64;
        let optimizer_s = trainable * 2e-9 + 5e-3;

        // One step, segment by segment, as the engine walks it: (mark, layer, change in
        // activations, change in gradients, transient above the segment's start and change).
        let mut walk = Walk::new(weights as f64 + optimizer as f64 + runtime);
        for m in 0..knobs.accum {
            walk.micro_batch = m;
            walk.segment("embed", None, embedded, 0.0, 0.0, embed_s);
            for layer in 0..spec.num_hidden_layers {
                if knobs.checkpointing.recomputes(layer) {
                    walk.segment(
                        "forward",
                        Some(layer),
                        input,
                        0.0,
                        kept_layer + scores + dequant,
                        forward_s,
                    );
                } else {
                    walk.segment(
                        "forward",
                        Some(layer),
                        kept_layer,
                        0.0,
                        n * i * cb + scores + dequant,
                        forward_s,
                    );
                }
            }
            walk.segment(
                "loss",
                None,
                n * 4.0 + full_loss * elements * 4.0,
                0.0,
                logits,
                head_s,
            );
            walk.segment(
                "backward",
                Some(spec.num_hidden_layers),
                -full_loss * elements * 4.0,
                other_grads,
                logits,
                head_backward_s,
            );
            for layer in (0..spec.num_hidden_layers).rev() {
                if knobs.checkpointing.recomputes(layer) {
                    walk.segment(
                        "recompute",
                        Some(layer),
                        kept_layer - input,
                        0.0,
                        recompute_extra + dequant,
                        recompute_s,
                    );
                }
                walk.segment(
                    "backward",
                    Some(layer),
                    -kept_layer + super::segments::boundary_bytes(layer, spec, knobs),
                    layer_grads,
                    0.5 * kept_layer + scores + dequant,
                    backward_s,
                );
            }
            let merged = if m > 0 { all_grads } else { 0.0 };
            walk.segment("micro_batch_done", None, -embedded, -merged, merged, 0.0);
        }
        walk.segment("clip", None, 0.0, 0.0, largest, 0.0);
        walk.segment(
            "optimizer_step",
            None,
            0.0,
            -all_grads,
            temporaries,
            optimizer_s,
        );
        let step_s = walk.t_s;
        let (peak, acts, grads) = walk.best;
        let components = Components {
            weights,
            gradients: grads.max(0.0) as u64,
            optimizer,
            activations: acts.max(0.0) as u64,
            transient: 0,
            runtime: runtime as u64,
        };
        let components = Components {
            transient: (peak as u64).saturating_sub(components.total()),
            ..components
        };

        let tokens = n * knobs.accum as f64;
        ProbeResult {
            spec: spec.clone(),
            knobs: knobs.clone(),
            device: "synthetic".to_string(),
            peak_bytes: components.total(),
            components,
            step_s,
            tokens_per_s: tokens / step_s,
            // One step's marks, each with the peak reached since the previous one.
            timeline: walk.rows,
        }
    }
}

/// Builds a synthetic step's timeline: memory now, and the highest point with the activations and
/// gradients live there.
struct Walk {
    current: f64,
    /// Seconds since the step started.
    t_s: f64,
    acts: f64,
    grads: f64,
    micro_batch: usize,
    best: (f64, f64, f64),
    rows: Vec<TimelineRow>,
}

impl Walk {
    fn new(start: f64) -> Self {
        let mut walk = Self {
            current: start,
            t_s: 0.0,
            acts: 0.0,
            grads: 0.0,
            micro_batch: 0,
            best: (start, 0.0, 0.0),
            rows: Vec::new(),
        };
        walk.mark("step_start", None, start);
        walk
    }

    fn mark(&mut self, phase: &str, layer: Option<usize>, segment_peak: f64) {
        self.rows.push(TimelineRow {
            t_s: self.t_s,
            phase: phase.to_string(),
            layer,
            micro_batch: self.micro_batch,
            current_bytes: self.current as u64,
            peak_bytes: segment_peak as u64,
            segment_peak_bytes: segment_peak as u64,
        });
    }

    /// A segment that changes activations and gradients by `acts` and `grads`, goes `extra` above
    /// that while it runs, and takes `seconds`.
    fn segment(
        &mut self,
        phase: &str,
        layer: Option<usize>,
        acts: f64,
        grads: f64,
        extra: f64,
        seconds: f64,
    ) {
        self.t_s += seconds;
        // What a segment allocates is live at its top; what it frees goes at its end.
        let top = self.current + acts.max(0.0) + grads.max(0.0) + extra;
        if top > self.best.0 {
            self.best = (top, self.acts + acts.max(0.0), self.grads + grads.max(0.0));
        }
        self.current += acts + grads;
        self.acts += acts;
        self.grads += grads;
        self.mark(phase, layer, top);
    }
}

/// Rewrites a timeline whose rows carry the peak within each phase so that they carry the running
/// peak since the probe started (the other way a meter may report it).
pub fn running_peaks(timeline: &mut [TimelineRow]) {
    let mut peak = 0;
    for row in timeline {
        peak = peak.max(row.peak_bytes);
        row.peak_bytes = peak;
    }
}

impl Prober for SyntheticProber {
    fn probe(&mut self, spec: &ModelSpec, knobs: &Knobs) -> anyhow::Result<ProbeResult> {
        let mut result = Self::truth(spec, knobs);
        if self.running_peaks {
            running_peaks(&mut result.timeline);
        }
        if let Some(limit) = self.fail_above_bytes
            && result.peak_bytes > limit
        {
            anyhow::bail!(
                "out of memory: needs {} bytes, {} available",
                result.peak_bytes,
                limit
            );
        }
        self.probes_run += 1;
        Ok(result)
    }

    fn device(&self) -> String {
        "synthetic".to_string()
    }
}

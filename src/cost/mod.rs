//! The cost model: bytes per memory component and seconds per optimizer step, as functions of a
//! model's shape and the knobs. Weights and optimizer state are exact arithmetic ([`exact`]); the
//! rest is a non-negative combination of shape-derived features ([`features`]) whose coefficients are
//! fitted ([`nnls`], argmin) to probes that memtune chooses and runs itself ([`calibrate()`]).
//!
//! A step's memory peaks in one of two phases: during forward/backward (activations, logits, scores
//! live) or during the optimizer step (all gradients plus the optimizer's temporaries, no
//! activations). Which one wins depends on the configuration — small-batch full fine-tunes peak in the
//! optimizer step, long sequences in backward — so each phase has its own fitted model, every probe
//! trains the phase it peaked in, and a prediction is the larger of the two. Where the probes'
//! timelines carry the engine's segment marks, the segment model ([`segments`]) replaces both with
//! a replay of the step at full depth.
//!
//! Step time follows the same segments: a probe's timeline times each layer's forward and backward,
//! the loss, the head's backward and the update, and each segment's seconds are fitted over its
//! FLOPs and a per-call constant ([`segments::SegmentModel::step_seconds`]). A step at full depth
//! is the sum over the segments it walks. Fitting whole-step times instead (`Coefficients::time`,
//! kept for probes without marks and for models planned for a GPU) made each layer's time the
//! difference between 1- and 2-layer probes, most of whose time is the head (Qwen2.5's vocabulary
//! is 152k), and missed full-depth runs by up to +186%.

pub mod calibrate;
pub mod exact;
pub mod features;
pub mod nnls;
pub mod segments;
pub mod synthetic;

use crate::config::Knobs;
use crate::probe::{Components, ProbeResult};
use crate::spec::ModelSpec;
use features::Feature;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use calibrate::{
    CalibrationProgress, Evaluation, EvaluationRow, calibrate, calibration_plan, evaluate,
    holdout_plan, leave_one_out, probe_label,
};

/// Runs one probe: a few instrumented training steps of `spec` (usually at reduced depth) with
/// `knobs`, on one device. The engine implements it for real; [`synthetic::SyntheticProber`] is a
/// known-formula stand-in for tests.
pub trait Prober {
    fn probe(&mut self, spec: &ModelSpec, knobs: &Knobs) -> anyhow::Result<ProbeResult>;
    /// Called once before the probes of `plan` run (those not cached), e.g. to warm up the runtime.
    /// Returns the probes of `plan` it measured on the way (calibration does not run them again).
    fn prepare(&mut self, _plan: &[(ModelSpec, Knobs)]) -> anyhow::Result<Vec<ProbeResult>> {
        Ok(Vec::new())
    }
    /// The device the probes run on, e.g. `cpu` or `cuda:0 (NVIDIA H100 80GB HBM3)`.
    fn device(&self) -> String;
}

/// Bumped whenever the features, the fit or the engine's memory behaviour change, so cached
/// calibrations are not reused across them. (5: caches written by the vocabulary-reduced probes of
/// commits fb28124–71a7855, also version 4, hold probes of another shape key. 6: the fused CPU
/// kernels of `engine::kernels` keep fewer and smaller temporaries. 7: segment times are fitted.
/// 8: bf16 products on the CPU widen tiles, not whole operands (`engine::matmul`). 9: so do f16
/// products, and gemm ran its AVX-512 kernels. 10: gemm back on its AVX2 kernels. 11: a tiled
/// product makes every worker's buffers before its tiles run. 12: bf16 products run natively on
/// AVX512-BF16. 13: RMSNorm's input gradient is one fused pass. 14: excess fits keep shape
/// coefficients non-negative and the head's growing piece logits-sized; the CUDA meter reads the
/// memory pool, and the GPU path keeps the CPU's tensors. 15: a training step's chunked loss
/// makes its gradients in the forward pass. 16: the backward pass keeps a tensor's first gradient
/// instead of adding it to zeros (vendor/candle-core/MEMTUNE.md); the step-time fit down-weights
/// slowed segments. 17: gemm's AVX-512 kernels where the CPU runs them at full width, bf16
/// products on AMX, vectorised fused kernels and bf16 additions: faster steps, same bytes. 18:
/// AMX products write their output directly and f32 products call gemm without a zero fill;
/// LoRA scales its rank-wide intermediate: faster steps, and LoRA's transient output goes. 19:
/// attention keeps q, k and v only and recomputes its probabilities in backward: no layer keeps
/// scores or probabilities, one layer's are live at a time; a kept layer's input is not copied,
/// nor are q, k, v and attention's output transposed into copies; the chunked loss writes its
/// fp32 gradient over the logits. 20: attention's f32 products on the CPU skip the blocks above
/// the diagonal, and its softmax kernels no longer zero-fill their outputs first: faster steps,
/// the same bytes. 21: a trained embedding's gradient is made in one buffer (candle's
/// `index_add` held the zeros and the sum at once), and clipping's coefficient goes into AdamW's
/// update instead of a scaled copy of each gradient: a full fine-tune's update phase holds one
/// vocabulary-sized matrix fewer. 22: f32 products call gemm on at most 4,096 output rows at a
/// time, so that gemm no longer packs a copy of a vocabulary-sized operand (the chunked loss's
/// head gradient). 23: f32 products by a transposed weight (`x · Wᵀ`) of up to 512 rows copy
/// it in column blocks with AVX-512 transposes instead of gemm's element-by-element packing:
/// faster short forward products, a 128 KiB scratch per thread. 24: a 16-bit head's gradient stays
/// 16-bit until a second loss chunk is added to it (a single chunk's was widened to f32 and
/// rounded back): 16-bit full fine-tunes peak lower in the loss. 25: a training forward pass
/// frees the activations no backward formula reads (`engine::ops::release`): the projections'
/// outputs once RoPE or a sum has copied them, a frozen product's input where no adapter reads
/// it; a layer keeps fewer bytes. 26: the chunked loss's composite gradient (16-bit logits, and
/// on a GPU) exponentiates its shifted logits in place on the CPU: one logits-sized f32 tensor
/// fewer at the loss's peak. 27: bf16 products on AVX512-BF16 without AMX run on AMX's driver
/// (each task packs its columns once per inner block of up to 4,096, its rows as rows of pairs, and
/// rounds its sums straight into the output): faster bf16 steps, other scratch bytes. 28: gemm's
/// AVX-512 kernels on AMD's Zen 4 too (they were kept to its AVX2 ones there): faster f32 steps.
/// 29: `vdpbf16ps` products spread their packed left rows over the first-level cache's sets (an
/// odd number of lines apart): weight gradients over 1,024 tokens or more run faster in bf16. 30: a
/// layer recomputed in backward skips its down projection's product, whose output nobody reads
/// (`Model::layer_recompute`): a recomputation's time counts its FLOPs without that product. 31:
/// the binary runs its work on a rayon worker whose idle peers yield for about a millisecond before
/// they sleep (`engine::on_rayon_worker`, `engine::RAYON_SPIN_ROUNDS`): faster probes, so cached
/// step times are stale. 32: a frozen embedding (LoRA, QLoRA) leaves the first layer's input
/// untracked, so backward skips what only its gradient needs (layer 0's q/k/v input products, its
/// input norm, the keys' attention gradient): faster adapter steps, fewer bytes in layer 0's
/// backward. 33: no transposed copies: RoPE reads q and k with their heads side by side and writes
/// them transposed, attention writes its output and v's gradient with the heads side by side, a
/// trainable weight's gradient is made in the weight's own layout, and precomputed values become
/// their op's output without a copy; the chunked loss's 16-bit gradient converts and scales its
/// logits on every thread; mixed precision's f32 norm weights take the fused RMSNorm gradient
/// (their gradient kept in f32): faster steps. 34: a frozen head's loss (LoRA, QLoRA) takes up to
/// 4,096 rows at once and the vocabulary in blocks of columns, its softmax block by block
/// (`config::loss_block`): no logits-sized tensor, one block of about 1 Mi logits. 35: off the
/// CPU, QLoRA's forward dequantizes and the composite softmax frees its intermediates one by one
/// (GPU probes measure less); the loss and the head's backward see whether a trained head's loss
/// takes more than one chunk (`HeadChunks`).)
pub const COST_MODEL_VERSION: u32 = 35;

/// The version string calibrations are cached under: memtune's version plus the cost model's.
pub fn version() -> String {
    format!("{}+cost{}", env!("CARGO_PKG_VERSION"), COST_MODEL_VERSION)
}

/// Relative weight of the ridge toward each coefficient's prior (see [`nnls::fit_nonnegative`]).
const RIDGE: f64 = 1e-9;

/// Where in a step the memory peaked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Forward or backward: activations and short-lived buffers live.
    Compute,
    /// The optimizer step: gradients and update temporaries live, activations freed.
    Update,
}

impl Phase {
    /// The phase a timeline mark belongs to: `optimizer_step*` is the update; `weights` and
    /// `optimizer_init` (before any step) belong to neither; every other mark (forward, loss,
    /// backward, per-layer marks) is compute.
    pub fn of_mark(phase: &str) -> Option<Phase> {
        if phase.starts_with("optimizer_step") {
            Some(Phase::Update)
        } else if phase == "weights" || phase.starts_with("optimizer") {
            None
        } else {
            Some(Phase::Compute)
        }
    }

    /// The phase a probe peaked in: the mark at which the peak was first reached names it. Without a
    /// timeline, a peak with no activations live is taken to be the update.
    pub fn of_probe(probe: &ProbeResult) -> Phase {
        if let Some(row) = probe
            .timeline
            .iter()
            .find(|r| r.peak_bytes >= probe.peak_bytes)
        {
            return Phase::of_mark(&row.phase).unwrap_or(Phase::Update);
        }
        if probe.components.activations == 0 {
            Phase::Update
        } else {
            Phase::Compute
        }
    }

    /// The highest memory a probe reached in this phase, when that is not its overall peak and the
    /// timeline tells: the largest mark of the phase below the overall peak. This works whether marks
    /// carry the peak within their phase or the running peak (a running peak that already includes
    /// the overall one equals it and is skipped).
    pub fn secondary_peak(self, probe: &ProbeResult) -> Option<u64> {
        if Phase::of_probe(probe) == self {
            return None;
        }
        probe
            .timeline
            .iter()
            .filter(|r| Phase::of_mark(&r.phase) == Some(self) && r.peak_bytes < probe.peak_bytes)
            .map(|r| r.peak_bytes)
            .max()
    }
}

/// Fitted coefficients of one phase, per fitted component, by feature name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseCoefficients {
    pub gradients: BTreeMap<String, f64>,
    pub activations: BTreeMap<String, f64>,
    pub transient: BTreeMap<String, f64>,
    pub runtime: BTreeMap<String, f64>,
}

/// Every fitted coefficient of a cost model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Coefficients {
    pub compute: PhaseCoefficients,
    pub update: PhaseCoefficients,
    /// Seconds per unit of each time feature.
    pub time: BTreeMap<String, f64>,
}

/// A probe the calibration could not run, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedProbe {
    pub label: String,
    pub error: String,
}

/// A fitted cost model for one model shape on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// [`version`] at fitting time.
    pub version: String,
    pub device: String,
    /// [`shape_key`] of the model the probes ran.
    pub shape_key: String,
    pub coefficients: Coefficients,
    /// Per-segment fits replayed over a step (see [`segments`]); preferred where they cover a
    /// configuration, the phase coefficients otherwise.
    #[serde(default)]
    pub segments: segments::SegmentModel,
    pub fitted_on: Vec<ProbeResult>,
    pub failed: Vec<FailedProbe>,
}

/// What the cost model predicts for one configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Components at the predicted peak (of the phase that peaks).
    pub components: Components,
    pub peak_bytes: u64,
    pub phase: Phase,
    pub step_s: f64,
    pub tokens_per_s: f64,
}

/// Why a model could not be fitted.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error("no probes to fit the cost model to")]
    NoProbes,
    #[error("probes of different model shapes cannot be fitted together ({0} vs {1})")]
    MixedShapes(String, String),
    #[error(transparent)]
    Fit(#[from] nnls::FitError),
}

/// Identifies a model's shape for calibration caching: everything that changes tensor sizes except
/// the depth (probes run at reduced depth; predictions extrapolate to any depth).
pub fn shape_key(spec: &ModelSpec) -> String {
    let canonical = format!(
        "{:?}|v{}|h{}|i{}|a{}|kv{}|d{}|tie{}|bias{}",
        spec.architecture,
        spec.vocab_size,
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_attention_heads,
        spec.num_key_value_heads,
        spec.head_dim,
        spec.tie_word_embeddings,
        spec.attention_bias
    );
    format!(
        "h{}-l{}-{:016x}",
        spec.hidden_size,
        spec.intermediate_size,
        fnv1a(canonical.as_bytes())
    )
}

/// FNV-1a, 64-bit: a hash that is stable across Rust versions and platforms (file names depend on it).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Which features a component may use, by group prefix (see [`features`]).
fn allowed(phase: Phase, component: usize, name: &str) -> bool {
    let live = name.starts_with("live_");
    match (component, phase) {
        (1, _) => name.starts_with("grad_"),
        (3, _) => live,
        (4, Phase::Compute) => live || name == "const",
        (4, Phase::Update) => name.starts_with("upd_") || name == "const",
        (5, _) => name == "const",
        _ => false,
    }
}

/// Indices into `Components::as_array` of the fitted components.
const FITTED: [usize; 4] = [1, 3, 4, 5];

fn dot(coefficients: &BTreeMap<String, f64>, features: &[Feature]) -> f64 {
    features
        .iter()
        .map(|(name, value)| coefficients.get(*name).map_or(0.0, |c| c * value))
        .sum()
}

fn memory_feature_names() -> Vec<&'static str> {
    // Names do not depend on the configuration: any one gives them all.
    features::memory_features(&ModelSpec::tiny(), &Knobs::default())
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

fn value(features: &[Feature], name: &str) -> f64 {
    features
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(0.0, |(_, v)| *v)
}

/// Fits one phase's four components jointly. A probe that peaked in the phase gives one row per
/// component (its measured split); a probe that peaked in the other phase but whose timeline shows
/// this phase's high-water mark gives one row for the sum (that mark less the exact weights and
/// optimizer state). The second kind matters: at probe sizes a full fine-tune peaks in the optimizer
/// step, and only those marks tell what its forward/backward costs. Rows are relative to the bytes
/// they explain, since probes span orders of magnitude.
fn fit_phase(probes: &[ProbeResult], phase: Phase) -> Result<PhaseCoefficients, CostError> {
    let names = memory_feature_names();
    let blocks: Vec<Vec<&'static str>> = FITTED
        .iter()
        .map(|&c| {
            names
                .iter()
                .copied()
                .filter(|n| allowed(phase, c, n))
                .collect()
        })
        .collect();
    let width: usize = blocks.iter().map(Vec::len).sum();
    let mut rows: Vec<Vec<f64>> = Vec::new();
    let mut targets: Vec<f64> = Vec::new();
    for probe in probes {
        let feats = features::memory_features(&probe.spec, &probe.knobs);
        if Phase::of_probe(probe) == phase {
            let weight = 1.0 / probe.peak_bytes.max(1) as f64;
            let measured = probe.components.as_array();
            let mut offset = 0;
            for (block, &component) in blocks.iter().zip(&FITTED) {
                let mut row = vec![0.0; width];
                for (i, name) in block.iter().enumerate() {
                    row[offset + i] = value(&feats, name) * weight;
                }
                rows.push(row);
                targets.push(measured[component] as f64 * weight);
                offset += block.len();
            }
        } else if let Some(peak) = phase.secondary_peak(probe) {
            let exact = exact::weight_bytes(&probe.spec, &probe.knobs)
                + exact::optimizer_bytes(&probe.spec, &probe.knobs);
            let weight = 1.0 / peak.max(1) as f64;
            let row: Vec<f64> = blocks
                .iter()
                .flatten()
                .map(|name| value(&feats, name) * weight)
                .collect();
            rows.push(row);
            targets.push((peak as f64 - exact as f64) * weight);
        }
    }
    let prior: Vec<f64> = blocks
        .iter()
        .flatten()
        .map(|n| features::memory_prior(n))
        .collect();
    let solution = nnls::fit_nonnegative(&rows, &targets, &prior, RIDGE)?;
    let mut fitted = PhaseCoefficients::default();
    let mut values = solution.into_iter();
    for (block, &component) in blocks.iter().zip(&FITTED) {
        let map: BTreeMap<String, f64> = block
            .iter()
            .map(|n| (n.to_string(), values.next().unwrap_or(0.0)))
            .collect();
        *match component {
            1 => &mut fitted.gradients,
            3 => &mut fitted.activations,
            4 => &mut fitted.transient,
            _ => &mut fitted.runtime,
        } = map;
    }
    Ok(fitted)
}

/// Fits seconds per step to the timed probes, relative to each probe's time.
fn fit_time(probes: &[ProbeResult]) -> Result<BTreeMap<String, f64>, CostError> {
    let names: Vec<&'static str> = features::time_features(&ModelSpec::tiny(), &Knobs::default())
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let timed: Vec<&ProbeResult> = probes
        .iter()
        .filter(|p| p.step_s > 0.0 && p.step_s.is_finite())
        .collect();
    let rows: Vec<Vec<f64>> = timed
        .iter()
        .map(|p| {
            let feats = features::time_features(&p.spec, &p.knobs);
            names.iter().map(|n| value(&feats, n) / p.step_s).collect()
        })
        .collect();
    let targets = vec![1.0; rows.len()];
    let solution = nnls::fit_nonnegative(&rows, &targets, &vec![0.0; names.len()], RIDGE)?;
    Ok(names.iter().map(|n| n.to_string()).zip(solution).collect())
}

impl CostModel {
    /// Fits a model to `probes` (all of one model shape, on `device`).
    pub fn fit(
        probes: Vec<ProbeResult>,
        device: &str,
        failed: Vec<FailedProbe>,
    ) -> Result<Self, CostError> {
        let first = probes.first().ok_or(CostError::NoProbes)?;
        let key = shape_key(&first.spec);
        if let Some(other) = probes.iter().find(|p| shape_key(&p.spec) != key) {
            return Err(CostError::MixedShapes(key, shape_key(&other.spec)));
        }
        let coefficients = Coefficients {
            compute: fit_phase(&probes, Phase::Compute)?,
            update: fit_phase(&probes, Phase::Update)?,
            time: fit_time(&probes)?,
        };
        let segments = segments::SegmentModel::fit(&probes)?;
        Ok(Self {
            version: version(),
            device: device.to_string(),
            shape_key: key,
            coefficients,
            segments,
            fitted_on: probes,
            failed,
        })
    }

    /// Whether this model was fitted to `spec`'s shape (any depth).
    pub fn fits_shape(&self, spec: &ModelSpec) -> bool {
        self.shape_key == shape_key(spec)
    }

    /// Components, peak and speed of one configuration.
    pub fn predict(&self, spec: &ModelSpec, knobs: &Knobs) -> Prediction {
        let memory = features::memory_features(spec, knobs);
        let weights = exact::weight_bytes(spec, knobs);
        let optimizer = exact::optimizer_bytes(spec, knobs);
        let phase_components = |c: &PhaseCoefficients| {
            let bytes = |map: &BTreeMap<String, f64>| dot(map, &memory).max(0.0).round() as u64;
            Components {
                weights,
                gradients: bytes(&c.gradients),
                optimizer,
                activations: bytes(&c.activations),
                transient: bytes(&c.transient),
                runtime: bytes(&c.runtime),
            }
        };
        let (phase, components) = match self.segments.simulate(spec, knobs) {
            Some((components, kind)) => (
                if matches!(kind, segments::Kind::Clip | segments::Kind::Opt) {
                    Phase::Update
                } else {
                    Phase::Compute
                },
                components,
            ),
            None => {
                let compute = phase_components(&self.coefficients.compute);
                let update = phase_components(&self.coefficients.update);
                if update.total() > compute.total() {
                    (Phase::Update, update)
                } else {
                    (Phase::Compute, compute)
                }
            }
        };
        // The segments' fitted times where the probes timed every segment of this step; the
        // whole-step fit otherwise (and for a model planned for another device).
        let step_s = self.segments.step_seconds(spec, knobs).unwrap_or_else(|| {
            dot(
                &self.coefficients.time,
                &features::time_features(spec, knobs),
            )
            .max(0.0)
        });
        let tokens = (knobs.batch * knobs.accum * knobs.seq) as f64;
        Prediction {
            components,
            peak_bytes: components.total(),
            phase,
            step_s,
            tokens_per_s: if step_s > 0.0 { tokens / step_s } else { 0.0 },
        }
    }
}

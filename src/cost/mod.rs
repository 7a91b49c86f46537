//! The cost model: bytes per memory component and seconds per optimizer step, as functions of a
//! model's shape and the knobs. Weights and optimizer state are exact arithmetic ([`exact`]); the
//! rest is a non-negative combination of shape-derived features ([`features`]) whose coefficients are
//! fitted ([`nnls`], argmin) to probes that memtune chooses and runs itself ([`calibrate`]).
//!
//! A step's memory peaks in one of two phases: during forward/backward (activations, logits, scores
//! live) or during the optimizer step (all gradients plus the optimizer's temporaries, no
//! activations). Which one wins depends on the configuration — small-batch full fine-tunes peak in the
//! optimizer step, long sequences in backward — so each phase has its own fitted model, every probe
//! trains the phase it peaked in, and a prediction is the larger of the two.

pub mod calibrate;
pub mod exact;
pub mod features;
pub mod nnls;
pub mod synthetic;

use crate::config::Knobs;
use crate::probe::{Components, ProbeResult};
use crate::spec::ModelSpec;
use features::Feature;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use calibrate::{
    CalibrationProgress, Evaluation, EvaluationRow, calibrate, calibration_plan, evaluate,
    holdout_plan, probe_label,
};

/// Runs one probe: a few instrumented training steps of `spec` (usually at reduced depth) with
/// `knobs`, on one device. The engine implements it for real; [`synthetic::SyntheticProber`] is a
/// known-formula stand-in for tests.
pub trait Prober {
    fn probe(&mut self, spec: &ModelSpec, knobs: &Knobs) -> anyhow::Result<ProbeResult>;
    /// The device the probes run on, e.g. `cpu` or `cuda:0 (NVIDIA H100 80GB HBM3)`.
    fn device(&self) -> String;
}

/// Bumped whenever the features or the fit change, so cached calibrations are not reused across them.
pub const COST_MODEL_VERSION: u32 = 1;

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
    /// The phase a probe peaked in: the first timeline mark at which the running peak reached the
    /// final one names it (`optimizer_*` → update). Without a timeline, a peak with no activations
    /// live is taken to be the update.
    pub fn of_probe(probe: &ProbeResult) -> Phase {
        if let Some(row) = probe
            .timeline
            .iter()
            .find(|r| r.peak_bytes >= probe.peak_bytes)
        {
            return if row.phase.starts_with("optim") {
                Phase::Update
            } else {
                Phase::Compute
            };
        }
        if probe.components.activations == 0 {
            Phase::Update
        } else {
            Phase::Compute
        }
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
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
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

fn fit_map(
    features: &[Vec<Feature>],
    targets: &[f64],
    weights: &[f64],
    select: impl Fn(&str) -> bool,
    prior: impl Fn(&str) -> f64,
) -> Result<BTreeMap<String, f64>, CostError> {
    let names: Vec<&'static str> = feature_names(features)
        .into_iter()
        .filter(|n| select(n))
        .collect();
    let rows: Vec<Vec<f64>> = features
        .iter()
        .zip(weights)
        .map(|(f, w)| {
            names
                .iter()
                .map(|n| f.iter().find(|(m, _)| m == n).map_or(0.0, |(_, v)| v * w))
                .collect()
        })
        .collect();
    let scaled: Vec<f64> = targets.iter().zip(weights).map(|(t, w)| t * w).collect();
    let priors: Vec<f64> = names.iter().map(|n| prior(n)).collect();
    let solution = nnls::fit_nonnegative(&rows, &scaled, &priors, RIDGE)?;
    Ok(names.iter().map(|n| n.to_string()).zip(solution).collect())
}

fn feature_names(features: &[Vec<Feature>]) -> Vec<&'static str> {
    match features.first() {
        Some(f) => f.iter().map(|(n, _)| *n).collect(),
        // Names do not depend on the configuration: any one gives them all.
        None => features::memory_features(&ModelSpec::tiny(), &Knobs::default())
            .into_iter()
            .map(|(n, _)| n)
            .collect(),
    }
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
        let mut coefficients = Coefficients::default();
        for phase in [Phase::Compute, Phase::Update] {
            let members: Vec<&ProbeResult> = probes
                .iter()
                .filter(|p| Phase::of_probe(p) == phase)
                .collect();
            let feats: Vec<Vec<Feature>> = members
                .iter()
                .map(|p| features::memory_features(&p.spec, &p.knobs))
                .collect();
            // Residuals relative to each probe's peak: probes span orders of magnitude.
            let weights: Vec<f64> = members
                .iter()
                .map(|p| 1.0 / (p.peak_bytes.max(1) as f64))
                .collect();
            let mut fitted = PhaseCoefficients::default();
            for component in FITTED {
                let targets: Vec<f64> = members
                    .iter()
                    .map(|p| p.components.as_array()[component] as f64)
                    .collect();
                let map = fit_map(
                    &feats,
                    &targets,
                    &weights,
                    |n| allowed(phase, component, n),
                    features::memory_prior,
                )?;
                *match component {
                    1 => &mut fitted.gradients,
                    3 => &mut fitted.activations,
                    4 => &mut fitted.transient,
                    _ => &mut fitted.runtime,
                } = map;
            }
            match phase {
                Phase::Compute => coefficients.compute = fitted,
                Phase::Update => coefficients.update = fitted,
            }
        }
        let timed: Vec<&ProbeResult> = probes
            .iter()
            .filter(|p| p.step_s > 0.0 && p.step_s.is_finite())
            .collect();
        let feats: Vec<Vec<Feature>> = timed
            .iter()
            .map(|p| features::time_features(&p.spec, &p.knobs))
            .collect();
        let targets: Vec<f64> = timed.iter().map(|p| p.step_s).collect();
        let weights: Vec<f64> = timed.iter().map(|p| 1.0 / p.step_s).collect();
        let names = if feats.is_empty() {
            vec![features::time_features(
                &ModelSpec::tiny(),
                &Knobs::default(),
            )]
        } else {
            feats
        };
        coefficients.time = if timed.is_empty() {
            names[0].iter().map(|(n, _)| (n.to_string(), 0.0)).collect()
        } else {
            fit_map(&names, &targets, &weights, |_| true, |_| 0.0)?
        };
        Ok(Self {
            version: version(),
            device: device.to_string(),
            shape_key: key,
            coefficients,
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
        let compute = phase_components(&self.coefficients.compute);
        let update = phase_components(&self.coefficients.update);
        let (phase, components) = if update.total() > compute.total() {
            (Phase::Update, update)
        } else {
            (Phase::Compute, compute)
        };
        let step_s = dot(
            &self.coefficients.time,
            &features::time_features(spec, knobs),
        )
        .max(0.0);
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

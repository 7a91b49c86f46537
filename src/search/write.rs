//! The search's files: `candidates.csv` (every evaluated configuration, one row each) and
//! `tuned.toml` (the pick, in the form the trainer reads). Both are written atomically.

use super::{Candidate, SearchOutcome};
use crate::config::{Hyper, Knobs, Method};
use crate::cost::Prediction;
use crate::cost::calibrate::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One row of `candidates.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateRow {
    pub rank: usize,
    pub method: String,
    /// Empty under `full`.
    pub lora_rank: String,
    /// Empty unless `qlora`.
    pub quant: String,
    pub precision: String,
    pub checkpointing: String,
    pub micro_batch: usize,
    pub accum: usize,
    pub seq: usize,
    pub optimizer: String,
    pub loss: String,
    pub weights_bytes: u64,
    pub gradients_bytes: u64,
    pub optimizer_bytes: u64,
    pub activations_bytes: u64,
    pub transient_bytes: u64,
    pub runtime_bytes: u64,
    pub peak_bytes: u64,
    /// Peak plus the margin: what is compared with the budget.
    pub required_bytes: u64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub fits: bool,
    pub reason: String,
}

impl CandidateRow {
    pub fn new(rank: usize, c: &Candidate) -> Self {
        let k = &c.knobs;
        let p = c.prediction.components;
        Self {
            rank,
            method: k.method.to_string(),
            lora_rank: if k.method == Method::Full {
                String::new()
            } else {
                k.lora.rank.to_string()
            },
            quant: if k.method == Method::Qlora {
                k.quant.to_string()
            } else {
                String::new()
            },
            precision: k.precision.to_string(),
            checkpointing: k.checkpointing.to_string(),
            micro_batch: k.batch,
            accum: k.accum,
            seq: k.seq,
            optimizer: k.optimizer.to_string(),
            loss: k.loss.to_string(),
            weights_bytes: p.weights,
            gradients_bytes: p.gradients,
            optimizer_bytes: p.optimizer,
            activations_bytes: p.activations,
            transient_bytes: p.transient,
            runtime_bytes: p.runtime,
            peak_bytes: c.prediction.peak_bytes,
            required_bytes: c.required_bytes,
            step_s: c.prediction.step_s,
            tokens_per_s: c.prediction.tokens_per_s,
            fits: c.fits,
            reason: c.reason.clone(),
        }
    }
}

/// `candidates.csv` as bytes, in the outcome's order (the pick first).
pub fn candidates_csv(outcome: &SearchOutcome) -> anyhow::Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for (i, c) in outcome.candidates.iter().enumerate() {
        writer.serialize(CandidateRow::new(i + 1, c))?;
    }
    writer.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))
}

pub fn write_candidates_csv(path: &Path, outcome: &SearchOutcome) -> anyhow::Result<()> {
    use anyhow::Context;
    let bytes = candidates_csv(outcome)?;
    write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// `tuned.toml`: the configuration to train with, and what was predicted for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunedConfig {
    /// The model as the user named it (catalog name or path).
    pub model: String,
    pub budget_bytes: u64,
    /// Safety margin the pick was chosen with (fraction).
    pub margin: f64,
    /// The policy the search ran under, one line per knob.
    pub policy: Vec<String>,
    pub knobs: Knobs,
    pub hyper: Hyper,
    pub predicted: Prediction,
}

impl TunedConfig {
    /// The pick of `outcome`, or `None` when nothing fits.
    pub fn from_outcome(model: &str, outcome: &SearchOutcome, hyper: Hyper) -> Option<Self> {
        outcome.best().map(|best| Self {
            model: model.to_string(),
            budget_bytes: outcome.budget_bytes,
            margin: outcome.margin,
            policy: outcome.policy.clone(),
            knobs: best.knobs.clone(),
            hyper,
            predicted: best.prediction,
        })
    }

    pub fn to_toml(&self) -> anyhow::Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }
}

pub fn write_tuned_toml(path: &Path, tuned: &TunedConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = tuned.to_toml()?;
    write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{CostModel, Phase, synthetic::SyntheticProber};
    use crate::probe::Components;
    use crate::search::{PolicyRequest, SearchSpace, search};
    use crate::spec::ModelSpec;

    fn outcome() -> SearchOutcome {
        let spec = ModelSpec::tiny();
        let space = SearchSpace::from_request(&PolicyRequest {
            precisions: Some(vec![crate::config::Precision::Fp32]),
            effective_batch: 4,
            seq: 128,
            ..PolicyRequest::default()
        })
        .unwrap();
        let probes = crate::cost::calibration_plan(&spec, &space)
            .iter()
            .map(|(s, k)| SyntheticProber::truth(s, k))
            .collect();
        let model = CostModel::fit(probes, "synthetic", Vec::new()).unwrap();
        search(&model, &spec, &space, 64 * 1024 * 1024, 0.1)
    }

    #[test]
    fn candidates_csv_parses_back_with_every_row_and_column() {
        let outcome = outcome();
        let bytes = candidates_csv(&outcome).unwrap();
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        for column in [
            "method",
            "lora_rank",
            "checkpointing",
            "micro_batch",
            "accum",
            "weights_bytes",
            "peak_bytes",
            "tokens_per_s",
            "fits",
            "reason",
        ] {
            assert!(
                header.iter().any(|h| h == column),
                "{column} missing from {header:?}"
            );
        }
        let rows: Vec<CandidateRow> = reader.deserialize().collect::<Result<_, _>>().unwrap();
        assert_eq!(rows.len(), outcome.candidates.len());
        assert_eq!(rows[0], CandidateRow::new(1, &outcome.candidates[0]));
        assert_eq!(rows.iter().filter(|r| r.fits).count(), outcome.fitting);
        let c = &outcome.candidates[0].prediction.components;
        assert_eq!(rows[0].peak_bytes, c.total());
    }

    #[test]
    fn tuned_toml_round_trips_and_is_written_atomically() {
        let outcome = outcome();
        let tuned = TunedConfig::from_outcome("tiny", &outcome, Hyper::default()).unwrap();
        let text = tuned.to_toml().unwrap();
        assert!(
            text.contains("[knobs]")
                && text.contains("[hyper]")
                && text.contains("[predicted.components]"),
            "{text}"
        );
        assert_eq!(TunedConfig::from_toml(&text).unwrap(), tuned);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out").join("tuned.toml");
        write_tuned_toml(&path, &tuned).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        write_candidates_csv(&dir.path().join("candidates.csv"), &outcome).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
        // A prediction with a zero component still round-trips.
        let zero = Prediction {
            components: Components::default(),
            peak_bytes: 0,
            phase: Phase::Update,
            step_s: 0.0,
            tokens_per_s: 0.0,
        };
        let t2 = TunedConfig {
            predicted: zero,
            ..tuned
        };
        assert_eq!(TunedConfig::from_toml(&t2.to_toml().unwrap()).unwrap(), t2);
    }
}

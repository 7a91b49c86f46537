//! The search: every configuration the policy allows, predicted by the cost model, filtered by
//! `predicted peak × (1 + margin) ≤ budget`, ranked by predicted tokens per second. The result keeps
//! every candidate (for `candidates.csv`), the pick and its runners-up, a reason for each knob value
//! not picked, and — when nothing fits — the closest configuration and by how much it misses.

pub mod bytes;
pub mod space;
pub mod write;

pub use bytes::{BytesError, format_bytes, parse_bytes};
pub use space::{PolicyError, PolicyRequest, SearchSpace};
pub use write::{TunedConfig, candidates_csv, write_candidates_csv, write_tuned_toml};

use crate::config::{Knobs, Method};
use crate::cost::{CostModel, Prediction};
use crate::spec::ModelSpec;

/// One evaluated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub knobs: Knobs,
    pub prediction: Prediction,
    /// Predicted peak plus the margin, the number compared with the budget.
    pub required_bytes: u64,
    pub fits: bool,
    /// Why it was or was not picked.
    pub reason: String,
}

/// Why a knob value other than the pick's was not chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct KnobReason {
    pub knob: &'static str,
    pub value: String,
    pub reason: String,
}

/// What the policy's limits cost when nothing fits: the fastest configuration that would fit with the
/// learning-changing knobs opened up.
#[derive(Debug, Clone, PartialEq)]
pub struct OutsidePolicy {
    pub knobs: Knobs,
    pub prediction: Prediction,
}

/// The search's full answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchOutcome {
    pub model: String,
    pub budget_bytes: u64,
    /// Safety margin as a fraction (0.1 = 10%).
    pub margin: f64,
    /// Every candidate: fitting ones fastest first, then the rest smallest first.
    pub candidates: Vec<Candidate>,
    /// Number of leading `candidates` that fit.
    pub fitting: usize,
    /// Reasons for the knob values not picked (empty when nothing fits).
    pub knob_reasons: Vec<KnobReason>,
    /// When nothing fits: the fastest fitting configuration outside the policy, if any.
    pub outside_policy: Option<OutsidePolicy>,
    /// The policy, one line per knob.
    pub policy: Vec<String>,
}

/// Runners-up listed by [`SearchOutcome::explain`].
pub const RUNNERS_UP: usize = 5;

fn required(prediction: &Prediction, margin: f64) -> u64 {
    (prediction.peak_bytes as f64 * (1.0 + margin.max(0.0))).ceil() as u64
}

fn describe(knobs: &Knobs) -> String {
    let method = match knobs.method {
        Method::Full => "full".to_string(),
        Method::Lora => format!("lora r{}", knobs.lora.rank),
        Method::Qlora => format!("qlora {} r{}", knobs.quant, knobs.lora.rank),
    };
    format!(
        "{method}, {}, checkpointing {}, micro-batch {} × accumulation {}, {}, {} loss",
        knobs.precision, knobs.checkpointing, knobs.batch, knobs.accum, knobs.optimizer, knobs.loss
    )
}

/// "fits but slower: …" or, for a tie in predicted speed (under 0.05%), why the pick won it.
fn slower(speed: f64, best: f64, what: &str) -> String {
    let percent = percent_slower(speed, best);
    if percent < 0.05 {
        format!("{what}; as fast as the pick, which needs less memory")
    } else {
        format!("{what} but slower: {speed:.0} tokens/s, {percent:.1}% below the pick")
    }
}

fn percent_slower(slow: f64, fast: f64) -> f64 {
    if fast > 0.0 {
        100.0 * (1.0 - slow / fast)
    } else {
        0.0
    }
}

/// The value of one knob dimension, for comparing candidates that differ only there.
fn knob_value(knobs: &Knobs, knob: &str) -> String {
    match knob {
        "method" => knobs.method.to_string(),
        "lora rank" => knobs.lora.rank.to_string(),
        "quantization" => knobs.quant.to_string(),
        "precision" => knobs.precision.to_string(),
        "checkpointing" => knobs.checkpointing.to_string(),
        "optimizer" => knobs.optimizer.to_string(),
        "loss" => knobs.loss.to_string(),
        _ => format!("{} × {}", knobs.batch, knobs.accum),
    }
}

const KNOBS: [&str; 8] = [
    "method",
    "lora rank",
    "quantization",
    "precision",
    "checkpointing",
    "optimizer",
    "loss",
    "micro-batch × accumulation",
];

fn rank_candidates(
    model: &CostModel,
    spec: &ModelSpec,
    knobs: Vec<Knobs>,
    budget: u64,
    margin: f64,
) -> Vec<Candidate> {
    let mut candidates: Vec<Candidate> = knobs
        .into_iter()
        .map(|knobs| {
            let prediction = model.predict(spec, &knobs);
            let required_bytes = required(&prediction, margin);
            Candidate {
                knobs,
                prediction,
                required_bytes,
                fits: required_bytes <= budget,
                reason: String::new(),
            }
        })
        .collect();
    candidates.sort_by(|a, b| match (a.fits, b.fits) {
        (true, false) => std::cmp::Ordering::Less,
        (false, true) => std::cmp::Ordering::Greater,
        (true, true) => b
            .prediction
            .tokens_per_s
            .total_cmp(&a.prediction.tokens_per_s)
            .then(a.required_bytes.cmp(&b.required_bytes)),
        (false, false) => a.required_bytes.cmp(&b.required_bytes),
    });
    candidates
}

/// Searches `space` for the fastest configuration of `spec` whose predicted peak plus `margin` (a
/// fraction) fits `budget_bytes`.
pub fn search(
    model: &CostModel,
    spec: &ModelSpec,
    space: &SearchSpace,
    budget_bytes: u64,
    margin: f64,
) -> SearchOutcome {
    let mut candidates = rank_candidates(model, spec, space.candidates(), budget_bytes, margin);
    let fitting = candidates.iter().take_while(|c| c.fits).count();
    let best_speed = candidates
        .first()
        .filter(|c| c.fits)
        .map(|c| c.prediction.tokens_per_s);
    for (index, c) in candidates.iter_mut().enumerate() {
        c.reason = match (c.fits, best_speed) {
            (true, _) if index == 0 => "pick: fastest that fits".to_string(),
            (true, Some(best)) => slower(c.prediction.tokens_per_s, best, "fits"),
            _ => format!(
                "does not fit: over budget by {}",
                format_bytes(c.required_bytes.saturating_sub(budget_bytes))
            ),
        };
    }
    let knob_reasons = match candidates.first().filter(|c| c.fits) {
        Some(best) => explain_knobs(best, &candidates, space, budget_bytes),
        None => Vec::new(),
    };
    let outside_policy = if fitting == 0 {
        rank_candidates(
            model,
            spec,
            space.relaxed().candidates(),
            budget_bytes,
            margin,
        )
        .into_iter()
        .find(|c| c.fits)
        .map(|c| OutsidePolicy {
            knobs: c.knobs,
            prediction: c.prediction,
        })
    } else {
        None
    };
    SearchOutcome {
        model: spec.name.clone(),
        budget_bytes,
        margin,
        candidates,
        fitting,
        knob_reasons,
        outside_policy,
        policy: space.policy.clone(),
    }
}

/// For each knob and each allowed value the pick does not use: what happens if only that knob
/// changes (does not fit by how much, or how much slower), else the best fitting configuration with
/// that value.
fn explain_knobs(
    best: &Candidate,
    candidates: &[Candidate],
    space: &SearchSpace,
    budget: u64,
) -> Vec<KnobReason> {
    let mut reasons = Vec::new();
    let best_speed = best.prediction.tokens_per_s;
    for knob in KNOBS {
        let values: Vec<String> = match knob {
            "method" => space.methods.iter().map(|v| v.to_string()).collect(),
            "lora rank" if best.knobs.method != Method::Full => {
                space.ranks.iter().map(|v| v.to_string()).collect()
            }
            "quantization" if best.knobs.method == Method::Qlora => {
                space.quants.iter().map(|v| v.to_string()).collect()
            }
            "precision" => space.precisions.iter().map(|v| v.to_string()).collect(),
            "checkpointing" => space.checkpointing.iter().map(|v| v.to_string()).collect(),
            "optimizer" => space.optimizers.iter().map(|v| v.to_string()).collect(),
            "loss" => space.losses.iter().map(|v| v.to_string()).collect(),
            "micro-batch × accumulation" => space
                .micro_batches
                .iter()
                .map(|m| format!("{m} × {}", space.effective_batch / m))
                .collect(),
            _ => Vec::new(),
        };
        let picked = knob_value(&best.knobs, knob);
        for value in values.into_iter().filter(|v| *v != picked) {
            let neighbour = candidates.iter().find(|c| {
                knob_value(&c.knobs, knob) == value
                    && KNOBS.iter().filter(|&&k| k != knob).all(|k| {
                        // Rank and quantization only matter where the method uses them.
                        let irrelevant = (*k == "lora rank" && c.knobs.method == Method::Full)
                            || (*k == "quantization" && c.knobs.method != Method::Qlora);
                        irrelevant || knob_value(&c.knobs, k) == knob_value(&best.knobs, k)
                    })
            });
            let reason = match neighbour {
                Some(c) if !c.fits => format!(
                    "does not fit with the pick's other knobs: needs {}, over budget by {}",
                    format_bytes(c.required_bytes),
                    format_bytes(c.required_bytes - budget)
                ),
                Some(c) => slower(
                    c.prediction.tokens_per_s,
                    best_speed,
                    "fits with the pick's other knobs",
                ),
                None => match candidates
                    .iter()
                    .find(|c| c.fits && knob_value(&c.knobs, knob) == value)
                {
                    Some(c) => format!(
                        "best fitting configuration with it is {:.1}% slower",
                        percent_slower(c.prediction.tokens_per_s, best_speed)
                    ),
                    None => "no configuration with it fits".to_string(),
                },
            };
            reasons.push(KnobReason {
                knob,
                value,
                reason,
            });
        }
    }
    reasons
}

impl SearchOutcome {
    /// The pick, if anything fits.
    pub fn best(&self) -> Option<&Candidate> {
        self.candidates.first().filter(|c| c.fits)
    }

    /// Fitting configurations after the pick, fastest first.
    pub fn runners_up(&self) -> &[Candidate] {
        &self.candidates[self.fitting.min(1)..self.fitting]
    }

    /// When nothing fits: the configuration needing the least memory, and how far over it is.
    pub fn closest(&self) -> Option<(&Candidate, u64)> {
        if self.fitting > 0 {
            return None;
        }
        self.candidates
            .first()
            .map(|c| (c, c.required_bytes.saturating_sub(self.budget_bytes)))
    }

    /// A short explanation: the policy, the pick and why, the runners-up, the knob values not picked;
    /// or, when nothing fits, the closest configuration and what the policy costs.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let margin = 100.0 * self.margin;
        out.push_str("Policy:\n");
        for line in &self.policy {
            out.push_str(&format!("  {line}\n"));
        }
        out.push_str(&format!(
            "Budget {} with a {margin:.0}% margin: {} of {} configurations fit.\n",
            format_bytes(self.budget_bytes),
            self.fitting,
            self.candidates.len()
        ));
        if let Some(best) = self.best() {
            let p = &best.prediction;
            out.push_str(&format!("Pick: {}\n", describe(&best.knobs)));
            out.push_str(&format!(
                "  predicted peak {} (+{margin:.0}% = {}), {:.0} tokens/s, {:.3} s per step\n",
                format_bytes(p.peak_bytes),
                format_bytes(best.required_bytes),
                p.tokens_per_s,
                p.step_s
            ));
            let c = p.components;
            out.push_str(&format!(
                "  weights {}, gradients {}, optimizer {}, activations {}, transient {}, runtime {}\n",
                format_bytes(c.weights),
                format_bytes(c.gradients),
                format_bytes(c.optimizer),
                format_bytes(c.activations),
                format_bytes(c.transient),
                format_bytes(c.runtime)
            ));
            let runners = self.runners_up();
            if !runners.is_empty() {
                out.push_str("Runners-up:\n");
                for (i, c) in runners.iter().take(RUNNERS_UP).enumerate() {
                    out.push_str(&format!(
                        "  {}. {}: {:.0} tokens/s ({:.1}% slower), needs {}\n",
                        i + 2,
                        describe(&c.knobs),
                        c.prediction.tokens_per_s,
                        percent_slower(c.prediction.tokens_per_s, p.tokens_per_s),
                        format_bytes(c.required_bytes)
                    ));
                }
            }
            if !self.knob_reasons.is_empty() {
                out.push_str("Not picked:\n");
                for r in &self.knob_reasons {
                    out.push_str(&format!("  {} {}: {}\n", r.knob, r.value, r.reason));
                }
            }
        } else if let Some((closest, over)) = self.closest() {
            out.push_str(&format!(
                "Nothing fits. Closest: {}\n  needs {} (peak {} + {margin:.0}%), over budget by {}\n",
                describe(&closest.knobs),
                format_bytes(closest.required_bytes),
                format_bytes(closest.prediction.peak_bytes),
                format_bytes(over)
            ));
            match &self.outside_policy {
                Some(o) => out.push_str(&format!(
                    "  Outside the policy, {} would fit ({}, {:.0} tokens/s): allow those knobs to use it.\n",
                    describe(&o.knobs),
                    format_bytes(o.prediction.peak_bytes),
                    o.prediction.tokens_per_s
                )),
                None => out.push_str("  Nothing fits even with every method, quantization and optimizer allowed: shorten the sequence or add memory.\n"),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Checkpointing, LossMode, Precision};
    use crate::cost::{calibrate, synthetic::SyntheticProber};

    fn spec() -> ModelSpec {
        ModelSpec {
            name: "synthetic-8l".to_string(),
            vocab_size: 4096,
            hidden_size: 256,
            intermediate_size: 704,
            num_hidden_layers: 8,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            head_dim: 32,
            max_position_embeddings: 4096,
            ..ModelSpec::tiny()
        }
    }

    fn space() -> SearchSpace {
        SearchSpace::from_request(&PolicyRequest {
            effective_batch: 8,
            seq: 1024,
            ..PolicyRequest::default()
        })
        .unwrap()
    }

    fn fitted() -> CostModel {
        calibrate(
            &spec(),
            &space(),
            &mut SyntheticProber::new(),
            None,
            &mut |_| {},
        )
        .unwrap()
    }

    #[test]
    fn picks_the_truly_fastest_fitting_config_and_explains_the_rest() {
        let model = fitted();
        // A budget between the smallest and the largest configurations, so that some do not fit.
        let all: Vec<u64> = space()
            .candidates()
            .iter()
            .map(|k| SyntheticProber::truth(&spec(), k).peak_bytes)
            .collect();
        let budget = (all.iter().min().unwrap() + all.iter().max().unwrap()) / 2;
        let outcome = search(&model, &spec(), &space(), budget, 0.05);
        let best = outcome.best().expect("something fits");
        // Against the truth: the pick fits with the margin, and no truly fitting config is >1% faster.
        let truth = SyntheticProber::truth(&spec(), &best.knobs);
        assert!(truth.peak_bytes as f64 * 1.05 <= budget as f64 * 1.01);
        let fastest_true = space()
            .candidates()
            .iter()
            .map(|k| SyntheticProber::truth(&spec(), k))
            .filter(|t| t.peak_bytes as f64 * 1.05 <= budget as f64)
            .map(|t| t.tokens_per_s)
            .fold(0.0, f64::max);
        assert!(
            truth.tokens_per_s >= 0.99 * fastest_true,
            "{} vs {}",
            truth.tokens_per_s,
            fastest_true
        );
        // Candidates are ordered and every one has a reason.
        assert!(outcome.fitting > 1 && outcome.fitting < outcome.candidates.len());
        assert!(outcome.candidates.iter().all(|c| !c.reason.is_empty()));
        assert!(
            outcome.candidates[outcome.fitting]
                .reason
                .starts_with("does not fit: over budget by")
        );
        // Every allowed value the pick does not use is explained.
        let s = space();
        let expected = (s.precisions.len() - 1)
            + (s.checkpointing.len() - 1)
            + (s.optimizers.len() - 1)
            + (s.losses.len() - 1)
            + (s.micro_batches.len() - 1);
        assert_eq!(outcome.knob_reasons.len(), expected);
        let text = outcome.explain();
        assert!(text.contains("Pick: lora r8"), "{text}");
        assert!(
            text.contains("Runners-up:") && text.contains("Not picked:"),
            "{text}"
        );
        assert!(text.contains("method: lora (default policy"), "{text}");
    }

    #[test]
    fn a_memory_hungry_knob_is_rejected_for_not_fitting() {
        let model = fitted();
        // Everything fixed but checkpointing, and a budget one byte under what no checkpointing needs:
        // the pick must checkpoint, and the reason for not picking `none` must be memory.
        let fixed = SearchSpace::from_request(&PolicyRequest {
            precisions: Some(vec![Precision::Fp32]),
            optimizers: Some(vec![crate::config::OptimizerKind::Adamw]),
            losses: Some(vec![LossMode::Chunked]),
            micro_batches: Some(vec![8]),
            effective_batch: 8,
            seq: 1024,
            ..PolicyRequest::default()
        })
        .unwrap();
        let none = Knobs {
            checkpointing: Checkpointing::None,
            batch: 8,
            accum: 1,
            seq: 1024,
            ..Knobs::default()
        };
        let need = model.predict(&spec(), &none).peak_bytes;
        let outcome = search(&model, &spec(), &fixed, need - 1, 0.0);
        let best = outcome.best().expect("checkpointing makes it fit");
        assert_ne!(best.knobs.checkpointing, Checkpointing::None);
        let reason = outcome
            .knob_reasons
            .iter()
            .find(|r| r.knob == "checkpointing" && r.value == "none")
            .unwrap();
        assert!(reason.reason.starts_with("does not fit"), "{reason:?}");
    }

    #[test]
    fn nothing_fits_reports_the_closest_and_the_overage() {
        let model = fitted();
        let budget = 1024 * 1024; // 1 MiB: less than the weights.
        let outcome = search(&model, &spec(), &space(), budget, 0.1);
        assert!(outcome.best().is_none());
        let (closest, over) = outcome.closest().unwrap();
        let smallest = outcome
            .candidates
            .iter()
            .map(|c| c.required_bytes)
            .min()
            .unwrap();
        assert_eq!(closest.required_bytes, smallest);
        assert_eq!(over, smallest - budget);
        assert!(outcome.outside_policy.is_none());
        let text = outcome.explain();
        assert!(text.contains("Nothing fits. Closest:"), "{text}");
        assert!(
            text.contains(&format!("over budget by {}", format_bytes(over))),
            "{text}"
        );
    }

    #[test]
    fn when_only_a_policy_excluded_knob_fits_the_explanation_says_so() {
        let model = calibrate(
            &spec(),
            &SearchSpace::from_request(&PolicyRequest {
                methods: Some(vec![Method::Lora, Method::Qlora]),
                ..PolicyRequest::default()
            })
            .unwrap()
            .relaxed(),
            &mut SyntheticProber::new(),
            None,
            &mut |_| {},
        )
        .unwrap();
        let lora_only = space();
        let smallest_lora = lora_only
            .candidates()
            .iter()
            .map(|k| model.predict(&spec(), k).peak_bytes)
            .min()
            .unwrap();
        let outcome = search(&model, &spec(), &lora_only, smallest_lora - 1, 0.0);
        assert!(outcome.best().is_none());
        let outside = outcome
            .outside_policy
            .as_ref()
            .expect("qlora or a leaner optimizer fits");
        assert!(
            outside.knobs.method != Method::Lora
                || outside.knobs.optimizer != crate::config::OptimizerKind::Adamw,
            "{outside:?}"
        );
        assert!(outcome.explain().contains("Outside the policy"));
    }
}

//! The search space and the policy behind it. Knobs that only trade memory against speed
//! (micro-batch × accumulation, checkpointing, loss mode) are searched freely. Knobs that change what
//! is learned are governed by an explicit policy, printed with every result:
//!
//! | knob | default when the user says nothing | why |
//! |---|---|---|
//! | method | `lora` | full fine-tuning and a quantized base learn something else |
//! | LoRA rank | 8 | rank is model capacity |
//! | quantization | only with `qlora` allowed; then `q8` and `q4` | quantizing the base changes the model |
//! | optimizer | `adamw`, `adafactor`, `sgd`; never `adamw8bit` unless allowed | 8-bit states round the moments |
//! | precision | all of `fp32`, `bf16`, `fp16`, `bf16-pure` | the user did not fix numerics |
//!
//! Fixing a knob (one value) or allowing a set overrides its default. Micro-batch × accumulation always
//! equals the effective batch, so the optimizer sees the same batch whatever the pick.

use crate::config::{
    Checkpointing, Knobs, LoraSettings, LossMode, Method, OptimizerKind, Precision, Quant,
};
use std::fmt::Display;

/// What the user said about each knob: `None` leaves it to the default policy; `Some(values)` fixes it
/// (one value) or allows exactly that set.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRequest {
    pub methods: Option<Vec<Method>>,
    pub ranks: Option<Vec<usize>>,
    pub quants: Option<Vec<Quant>>,
    pub optimizers: Option<Vec<OptimizerKind>>,
    pub precisions: Option<Vec<Precision>>,
    pub checkpointing: Option<Vec<Checkpointing>>,
    pub losses: Option<Vec<LossMode>>,
    /// Micro-batch sizes to consider; by default every divisor of the effective batch.
    pub micro_batches: Option<Vec<usize>>,
    /// Sequences per optimizer step (micro-batch × accumulation).
    pub effective_batch: usize,
    pub seq: usize,
    /// Alpha, dropout and targets for LoRA candidates (the rank comes from `ranks`).
    pub lora: LoraSettings,
}

impl Default for PolicyRequest {
    fn default() -> Self {
        Self {
            methods: None,
            ranks: None,
            quants: None,
            optimizers: None,
            precisions: None,
            checkpointing: None,
            losses: None,
            micro_batches: None,
            effective_batch: 8,
            seq: 512,
            lora: LoraSettings::default(),
        }
    }
}

/// The allowed values of every knob, after the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchSpace {
    pub methods: Vec<Method>,
    pub ranks: Vec<usize>,
    pub quants: Vec<Quant>,
    pub optimizers: Vec<OptimizerKind>,
    pub precisions: Vec<Precision>,
    pub checkpointing: Vec<Checkpointing>,
    pub losses: Vec<LossMode>,
    pub micro_batches: Vec<usize>,
    pub effective_batch: usize,
    pub seq: usize,
    pub lora: LoraSettings,
    /// One line per knob: its values and where they came from.
    pub policy: Vec<String>,
    /// True when the precisions are the default policy's (fp32 and bf16), which swaps bf16 for
    /// fp16 on a device without bf16 (see `gpu_plan::restrict_space`).
    pub default_precisions: bool,
}

/// A request the policy cannot turn into a search space.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("`{0}` allows no values; give at least one")]
    Empty(&'static str),
    #[error("the effective batch and the sequence length must be at least 1")]
    ZeroBatch,
    #[error("LoRA rank must be at least 1")]
    ZeroRank,
    #[error(
        "micro-batch {micro} does not divide the effective batch {effective} (micro-batch × accumulation must equal it)"
    )]
    Indivisible { micro: usize, effective: usize },
}

fn choose<T: Clone + Display + PartialEq>(
    knob: &'static str,
    given: &Option<Vec<T>>,
    default: Vec<T>,
    why: &str,
    lines: &mut Vec<String>,
) -> Result<Vec<T>, PolicyError> {
    let (mut values, source) = match given {
        Some(v) if v.len() == 1 => (v.clone(), "fixed by the user".to_string()),
        Some(v) => (v.clone(), "allowed by the user".to_string()),
        None => (default, format!("default policy: {why}")),
    };
    let mut seen = Vec::new();
    values.retain(|v| {
        let new = !seen.contains(v);
        seen.push(v.clone());
        new
    });
    if values.is_empty() {
        return Err(PolicyError::Empty(knob));
    }
    let list: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    lines.push(format!("{knob}: {} ({source})", list.join(", ")));
    Ok(values)
}

impl SearchSpace {
    /// Applies the policy to a request.
    pub fn from_request(request: &PolicyRequest) -> Result<Self, PolicyError> {
        if request.effective_batch == 0 || request.seq == 0 {
            return Err(PolicyError::ZeroBatch);
        }
        let mut policy = Vec::new();
        let methods = choose(
            "method",
            &request.methods,
            vec![Method::Lora],
            "lora; full and qlora learn something else, allow them explicitly",
            &mut policy,
        )?;
        let frozen = methods.iter().any(|&m| m != Method::Full);
        let ranks = choose(
            "lora rank",
            &request.ranks,
            vec![LoraSettings::default().rank],
            "8; rank is capacity, never changed silently",
            &mut policy,
        )?;
        if ranks.contains(&0) {
            return Err(PolicyError::ZeroRank);
        }
        if !frozen {
            policy.pop();
        }
        let quants = choose(
            "quantization",
            &request.quants,
            vec![Quant::Q8, Quant::Q4],
            "q8 and q4, used only because qlora is allowed",
            &mut policy,
        )?;
        if !methods.contains(&Method::Qlora) {
            policy.pop();
        }
        let optimizers = choose(
            "optimizer",
            &request.optimizers,
            vec![OptimizerKind::Adamw],
            "adamw; adamw8bit, adafactor and sgd change the training dynamics, allow them explicitly",
            &mut policy,
        )?;
        let precisions = choose(
            "precision",
            &request.precisions,
            vec![Precision::Fp32, Precision::Bf16],
            "fp32 or bf16 mixed precision (fp32 master weights); fp16 only on a device without bf16 \
             (the same bytes as bf16, but a narrower range that needs loss scaling); bf16-pure rounds \
             updates; allow them explicitly",
            &mut policy,
        )?;
        let checkpointing = choose(
            "checkpointing",
            &request.checkpointing,
            vec![
                Checkpointing::None,
                Checkpointing::Every(2),
                Checkpointing::Full,
            ],
            "searched; recomputation changes no result",
            &mut policy,
        )?;
        let losses = choose(
            "loss",
            &request.losses,
            vec![LossMode::Chunked, LossMode::Full],
            "searched; both compute the same loss",
            &mut policy,
        )?;
        let divisors: Vec<usize> = (1..=request.effective_batch)
            .filter(|d| request.effective_batch.is_multiple_of(*d))
            .collect();
        let micro_batches = choose(
            "micro-batch",
            &request.micro_batches,
            divisors,
            "every divisor of the effective batch",
            &mut policy,
        )?;
        if let Some(&micro) = micro_batches
            .iter()
            .find(|&&m| m == 0 || !request.effective_batch.is_multiple_of(m))
        {
            return Err(PolicyError::Indivisible {
                micro,
                effective: request.effective_batch,
            });
        }
        policy.push(format!(
            "effective batch: {} sequences of {} tokens per optimizer step (micro-batch × accumulation)",
            request.effective_batch, request.seq
        ));
        Ok(Self {
            methods,
            ranks,
            quants,
            optimizers,
            precisions,
            checkpointing,
            losses,
            micro_batches,
            effective_batch: request.effective_batch,
            seq: request.seq,
            lora: request.lora.clone(),
            policy,
            default_precisions: request.precisions.is_none(),
        })
    }

    /// Every configuration in the space.
    pub fn candidates(&self) -> Vec<Knobs> {
        let mut out = Vec::new();
        for &method in &self.methods {
            let ranks: &[usize] = if method == Method::Full {
                &self.ranks[..1]
            } else {
                &self.ranks
            };
            let quants: &[Quant] = if method == Method::Qlora {
                &self.quants
            } else {
                &self.quants[..1]
            };
            for &rank in ranks {
                for &quant in quants {
                    for &precision in &self.precisions {
                        for &checkpointing in &self.checkpointing {
                            for &optimizer in &self.optimizers {
                                for &loss in &self.losses {
                                    for &micro in &self.micro_batches {
                                        out.push(Knobs {
                                            method,
                                            lora: LoraSettings {
                                                rank,
                                                ..self.lora.clone()
                                            },
                                            quant,
                                            precision,
                                            checkpointing,
                                            batch: micro,
                                            accum: self.effective_batch / micro,
                                            seq: self.seq,
                                            optimizer,
                                            loss,
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The same space with the learning-changing knobs opened up (every method, both quantizations,
    /// every optimizer): used only to tell the user what the policy costs when nothing fits.
    pub fn relaxed(&self) -> Self {
        Self {
            methods: vec![Method::Full, Method::Lora, Method::Qlora],
            quants: vec![Quant::Q8, Quant::Q4],
            optimizers: vec![
                OptimizerKind::Adamw,
                OptimizerKind::Adamw8bit,
                OptimizerKind::Adafactor,
                OptimizerKind::Sgd,
            ],
            precisions: vec![
                Precision::Fp32,
                Precision::Bf16,
                Precision::Fp16,
                Precision::Bf16Pure,
            ],
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_lora_rank8_without_quantization_or_8bit_states() {
        let space = SearchSpace::from_request(&PolicyRequest::default()).unwrap();
        assert_eq!(space.methods, vec![Method::Lora]);
        assert_eq!(space.ranks, vec![8]);
        assert!(!space.optimizers.contains(&OptimizerKind::Adamw8bit));
        assert_eq!(space.micro_batches, vec![1, 2, 4, 8]);
        assert_eq!(space.optimizers, vec![OptimizerKind::Adamw]);
        assert_eq!(space.precisions, vec![Precision::Fp32, Precision::Bf16]);
        assert!(space.default_precisions);
        // lora: 1 rank × 1 quant × 2 precisions × 3 checkpointing × 1 optimizer × 2 losses × 4 micro.
        assert_eq!(space.candidates().len(), 2 * 3 * 2 * 4);
        assert!(space.candidates().iter().all(|k| k.batch * k.accum == 8));
        let text = space.policy.join("\n");
        assert!(text.contains("method: lora (default policy"), "{text}");
        assert!(!text.contains("quantization"), "{text}");
    }

    #[test]
    fn user_choices_fix_or_allow_and_are_reported() {
        let request = PolicyRequest {
            methods: Some(vec![Method::Qlora]),
            optimizers: Some(vec![OptimizerKind::Adamw, OptimizerKind::Adamw8bit]),
            effective_batch: 4,
            ..PolicyRequest::default()
        };
        let space = SearchSpace::from_request(&request).unwrap();
        let text = space.policy.join("\n");
        assert!(text.contains("method: qlora (fixed by the user)"), "{text}");
        assert!(
            text.contains("quantization: q8, q4 (default policy"),
            "{text}"
        );
        assert!(
            text.contains("optimizer: adamw, adamw8bit (allowed by the user)"),
            "{text}"
        );
        let bad = PolicyRequest {
            micro_batches: Some(vec![3]),
            effective_batch: 4,
            ..PolicyRequest::default()
        };
        assert_eq!(
            SearchSpace::from_request(&bad).unwrap_err(),
            PolicyError::Indivisible {
                micro: 3,
                effective: 4
            }
        );
        let empty = PolicyRequest {
            losses: Some(vec![]),
            ..PolicyRequest::default()
        };
        assert_eq!(
            SearchSpace::from_request(&empty).unwrap_err(),
            PolicyError::Empty("loss")
        );
    }
}

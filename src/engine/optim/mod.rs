//! Optimizers over the engine's trainable parameters: AdamW, 8-bit AdamW (block-wise quantized
//! moments, as bitsandbytes), Adafactor (factored second moments) and SGD with momentum; plus global
//! gradient-norm clipping. State is allocated when the optimizer is built, so a probe measures it
//! before the first step. Updates are written into the parameters' `Var`s.
//!
//! Parameters are `Var`s of dtype F32 (the usual case) or BF16/F16 (pure low-precision training);
//! gradients have the parameter's dtype. Element-wise arithmetic for a low-precision parameter runs
//! in f32 and is rounded once when stored, as PyTorch's fused `opmath` does: candle's own bf16 ops
//! would round the constants first (β2 = 0.999 becomes exactly 1.0 in bf16).
//!
//! Checkpoints: `state_tensors` names every state tensor `<parameter name>.<state>` (PyTorch's and
//! bitsandbytes' state names) plus `step`, a one-element I64 tensor; `load_state_tensors` takes the
//! same map back and makes the next step identical to the one the saved optimizer would have taken.

pub mod adafactor;
pub mod adamw;
pub mod adamw8bit;
pub mod sgd;
#[cfg(test)]
mod testkit;

use crate::config::{Hyper, OptimizerKind};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, TensorId, Var};
use std::collections::{HashMap, HashSet};

/// Adam's first-moment decay (PyTorch's and bitsandbytes' default).
pub const ADAM_BETA1: f64 = 0.9;
/// Adam's second-moment decay.
pub const ADAM_BETA2: f64 = 0.999;
/// Adam's denominator epsilon.
pub const ADAM_EPS: f64 = 1e-8;

/// Name of the step-count tensor in `state_tensors`.
pub const STEP_STATE: &str = "step";

/// A trainable parameter with its Hugging Face-style name.
#[derive(Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
}

pub trait Optimizer {
    /// Counts one optimizer step (the step number Adam's bias corrections and Adafactor's decay
    /// read) without updating anything. [`Optimizer::step`] calls it once and then updates every
    /// parameter; a step that updates its parameters in parts, as backward makes their gradients
    /// (`Hyper::update_in_backward`), calls it once and then [`Optimizer::update`] per part.
    fn begin_step(&mut self);
    /// Updates the parameters that have a gradient in `grads` (already averaged over
    /// micro-batches, unscaled and clipped) at learning rate `lr`, as the step counted by the last
    /// [`Optimizer::begin_step`]. Parameters without a gradient in `grads` are left alone.
    fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()>;
    /// [`Optimizer::update`] from `grads` multiplied by `grad_scale` (gradient clipping's
    /// coefficient, 1 for none): the same values as scaling every gradient first. That is what
    /// this default does (one scaled copy of a gradient at a time); AdamW on the CPU multiplies
    /// inside its update instead, so no gradient-sized copy is made.
    fn update_scaled(&mut self, grads: &mut GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        let ids = grads.get_ids().copied().collect();
        scale_grads(grads, ids, grad_scale)?;
        self.update(grads, lr)
    }
    /// One whole optimizer step: [`Optimizer::begin_step`], then [`Optimizer::update`].
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.begin_step();
        self.update(grads, lr)
    }
    /// One whole optimizer step from `grads` multiplied by `grad_scale`
    /// ([`Optimizer::update_scaled`]).
    fn step_scaled(&mut self, grads: &mut GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.begin_step();
        self.update_scaled(grads, lr, grad_scale)
    }
    /// Whether [`Optimizer::update_rows`] can update `var` (a matrix) a block of rows at a time:
    /// an element-wise update whose state the CPU's in-place kernels can write a block of (AdamW
    /// on the CPU). False by default.
    fn updates_rows(&self, var: &Var) -> bool {
        let _ = var;
        false
    }
    /// Updates rows `start..start + grad.dim(0)` of `var` from `grad`, those rows' gradient
    /// (unscaled, unclipped), to the values [`Optimizer::update`] gives them from the whole
    /// gradient, for the step counted by the last [`Optimizer::begin_step`]. Only where
    /// [`Optimizer::updates_rows`] holds: a head updated in blocks as the loss makes its gradient
    /// (`Hyper::update_in_backward`) never holds the whole gradient.
    fn update_rows(&mut self, var: &Var, start: usize, grad: &Tensor, lr: f64) -> Result<()> {
        let _ = (var, start, grad, lr);
        candle_core::bail!("{}: no update by rows", self.name())
    }
    /// Exact bytes of optimizer state currently held (the step counter excluded).
    fn state_bytes(&self) -> u64;
    /// Every state tensor under a stable name, plus the step count (`STEP_STATE`), for checkpoints.
    /// Tensors may share storage with the live state (no copy): save them before the next step.
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores the state saved by `state_tensors` (names and shapes must match; other names are
    /// ignored). Tensors may come on any device; they are moved to the state's device and dtype.
    fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
    /// Short name, as `OptimizerKind` spells it.
    fn name(&self) -> &'static str;
}

/// Builds the optimizer `kind` for `params`, allocating its state.
pub fn build(kind: OptimizerKind, params: Vec<Param>, hyper: &Hyper) -> Result<Box<dyn Optimizer>> {
    Ok(match kind {
        OptimizerKind::Adamw => Box::new(adamw::AdamW::new(params, hyper)?),
        OptimizerKind::Adamw8bit => Box::new(adamw8bit::AdamW8bit::new(params, hyper)?),
        OptimizerKind::Adafactor => Box::new(adafactor::Adafactor::new(params, hyper)?),
        OptimizerKind::Sgd => Box::new(sgd::Sgd::new(params, hyper)?),
    })
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping. `max_norm <= 0` only measures. ([`grad_norm`], [`clip_coefficient`] and
/// [`Optimizer::step_scaled`] do the same without scaling the gradients first.)
///
/// As `torch.nn.utils.clip_grad_norm_`: squares are summed in f32, and when the norm exceeds the
/// threshold every gradient is multiplied by `max_norm / (norm + 1e-6)`. A non-finite norm is
/// returned without scaling anything, so the caller can skip the step (fp16 loss scaling does).
pub fn clip_grad_norm(params: &[Param], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(params, grads)?;
    let ids = params.iter().map(|p| p.var.as_tensor().id()).collect();
    scale_grads(grads, ids, clip_coefficient(norm, max_norm))?;
    Ok(norm)
}

/// The global L2 norm of `params`' gradients (squares summed in f32, as torch does).
pub fn grad_norm(params: &[Param], grads: &GradStore) -> Result<f64> {
    let mut squares = Vec::new();
    for param in params {
        if let Some(grad) = grads.get(param.var.as_tensor()) {
            squares.push(squares_on_device(grad)?);
        }
    }
    let Some(first) = squares.first() else {
        return Ok(0.0);
    };
    // One device-to-host read for the whole sum, not one per parameter.
    let device = first.device().clone();
    let squares = squares
        .iter()
        .map(|s| s.to_device(&device))
        .collect::<Result<Vec<_>>>()?;
    let total = Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()?;
    Ok((total as f64).sqrt())
}

/// `Σ g²` of one gradient, summed in f32 as [`grad_norm`] sums a parameter's.
pub fn squares(grad: &Tensor) -> Result<f64> {
    Ok(squares_on_device(grad)?.to_scalar::<f32>()? as f64)
}

/// `Σ g²` of one gradient in f32, a scalar tensor on its device: [`sum_of_squares`] where it
/// applies, else candle's ops.
fn squares_on_device(grad: &Tensor) -> Result<Tensor> {
    match sum_of_squares(grad) {
        Some(sum) => Tensor::new(sum, grad.device()),
        None => grad.detach().to_dtype(DType::F32)?.sqr()?.sum_all(),
    }
}

/// What clipping to `max_norm` multiplies every gradient by at global norm `norm`:
/// `max_norm / (norm + 1e-6)` when that is below 1, else 1 (also for `max_norm <= 0`, which
/// does not clip, and for a non-finite norm, whose step the caller skips).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 || !norm.is_finite() {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// The gradients of `ids` in `grads` multiplied by `factor` (nothing when it is 1), one at a
/// time: each scaled copy replaces its gradient before the next is made.
fn scale_grads(grads: &mut GradStore, ids: Vec<TensorId>, factor: f64) -> Result<()> {
    if factor == 1.0 {
        return Ok(());
    }
    for id in ids {
        let Some(grad) = grads.get_id(id).cloned() else {
            continue;
        };
        let scaled = scaled_grad(&grad, factor)?;
        drop(grad);
        grads.insert_id(id, scaled);
    }
    Ok(())
}

/// `grad · factor` in `grad`'s dtype: the fused kernel where it applies, else widened to f32,
/// scaled and rounded back (the same values).
fn scaled_grad(grad: &Tensor, factor: f64) -> Result<Tensor> {
    match crate::engine::kernels::scale(grad, factor)? {
        Some(scaled) => Ok(scaled),
        None => working(grad)?.affine(factor, 0.0)?.to_dtype(grad.dtype()),
    }
}

/// `Σ g²` in f32 of a contiguous CPU tensor (f32, bf16, f16), in one pass that reads it in place
/// (candle's ops make an f32 copy and a squared one first); `None` for anything else.
fn sum_of_squares(t: &Tensor) -> Option<f32> {
    use crate::engine::kernels::{Elem, GRAIN, sum_by, vectorized};
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;
    fn sum<T: Elem>(data: &[T]) -> f32 {
        data.par_chunks(GRAIN)
            .map(|c| {
                vectorized(
                    #[inline(always)]
                    || sum_by(c, |x| x.get() * x.get()),
                )
            })
            .collect::<Vec<f32>>()
            .iter()
            .sum()
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(d)) => Some(sum(&d[start..end])),
        Storage::Cpu(CpuStorage::BF16(d)) => Some(sum(&d[start..end])),
        Storage::Cpu(CpuStorage::F16(d)) => Some(sum(&d[start..end])),
        _ => None,
    }
}

/// The f32 tensor the arithmetic runs on: a detached view for f32 (no copy, no graph), an f32
/// copy for low-precision tensors.
fn working(t: &Tensor) -> Result<Tensor> {
    t.detach().to_dtype(DType::F32)
}

/// Rejects parameter lists the optimizers cannot handle: a duplicate name would collide in
/// checkpoints, a duplicate `Var` would be updated twice, and integer dtypes have no gradient.
fn validate(params: &[Param]) -> Result<()> {
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for param in params {
        if !names.insert(param.name.as_str()) {
            candle_core::bail!("optimizer: parameter `{}` listed twice", param.name);
        }
        if !ids.insert(param.var.as_tensor().id()) {
            candle_core::bail!(
                "optimizer: parameter `{}` is the same Var as an earlier one",
                param.name
            );
        }
        if !param.var.dtype().is_float() {
            candle_core::bail!(
                "optimizer: parameter `{}` has dtype {:?}; expected a float dtype",
                param.name,
                param.var.dtype()
            );
        }
    }
    Ok(())
}

/// The step count as a checkpoint tensor.
fn step_tensor(step: u64) -> Result<Tensor> {
    Tensor::new(&[step as i64], &Device::Cpu)
}

/// Reads the step count saved by `step_tensor`.
fn read_step(state: &HashMap<String, Tensor>) -> Result<u64> {
    let tensor = lookup(state, STEP_STATE)?;
    let values = tensor
        .flatten_all()?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    match values.as_slice() {
        [step] if *step >= 0 => Ok(*step as u64),
        _ => candle_core::bail!(
            "optimizer state `{STEP_STATE}`: expected one non-negative count, got {values:?}"
        ),
    }
}

fn lookup<'a>(state: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    state
        .get(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state `{name}` is missing")))
}

/// Copies each saved tensor into its `Var`, converted to the Var's dtype and device. Every name and
/// shape is checked before anything is written, so a mismatched checkpoint changes nothing.
fn load_vars(state: &HashMap<String, Tensor>, targets: &[(String, &Var)]) -> Result<()> {
    let mut sources = Vec::with_capacity(targets.len());
    for (name, var) in targets {
        let saved = lookup(state, name)?;
        if saved.dims() != var.dims() {
            candle_core::bail!(
                "optimizer state `{name}`: saved shape {:?}, expected {:?}",
                saved.dims(),
                var.dims()
            );
        }
        sources.push(saved);
    }
    for (saved, (_, var)) in sources.into_iter().zip(targets) {
        let converted = saved.to_dtype(var.dtype())?.to_device(var.device())?;
        // `Var::set` refuses a tensor sharing the Var's storage (as `state_tensors` hands out),
        // and candle cannot tell us whether it does: copy when no conversion already did.
        if converted.dtype() == saved.dtype() && converted.device().same_device(saved.device()) {
            var.set(&converted.copy()?)?;
        } else {
            var.set(&converted)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::testkit::{LeastSquares, values};
    use super::*;

    const KINDS: [OptimizerKind; 4] = [
        OptimizerKind::Adamw,
        OptimizerKind::Adamw8bit,
        OptimizerKind::Adafactor,
        OptimizerKind::Sgd,
    ];

    /// 128 × 64 inputs, 80 outputs: `weight` has 5120 elements (≥ 4096: 8-bit AdamW quantizes it,
    /// in 20 blocks; Adafactor factors it), `bias` 80 (f32 states; Adafactor's full moment).
    fn problem() -> Result<LeastSquares> {
        LeastSquares::new(128, 64, 80, DType::F32)
    }

    fn curve(problem: &LeastSquares, kind: OptimizerKind, lr: f64) -> Result<Vec<f32>> {
        let params = problem.params()?;
        let mut optimizer = build(kind, params.clone(), &Hyper::default())?;
        problem.train(optimizer.as_mut(), &params, 100, lr)
    }

    #[test]
    fn build_names_each_kind() -> Result<()> {
        let problem = problem()?;
        for kind in KINDS {
            let optimizer = build(kind, problem.params()?, &Hyper::default())?;
            assert_eq!(optimizer.name(), kind.to_string());
        }
        Ok(())
    }

    #[test]
    fn every_optimizer_reduces_the_loss() -> Result<()> {
        let problem = problem()?;
        // SGD's steps are lr · gradient rather than ~lr per coordinate, so it gets a larger lr.
        for (kind, lr) in KINDS.into_iter().zip([1e-2, 1e-2, 1e-2, 0.1]) {
            let losses = curve(&problem, kind, lr)?;
            let (first, last) = (losses[0], losses[100]);
            assert!(last < 0.5 * first, "{kind}: loss {first} -> {last}");
        }
        Ok(())
    }

    /// On the same problem and learning rate, 100 steps:
    /// - 8-bit AdamW's loss stays within 5% of fp32 AdamW's at every step (observed: within 1.8%).
    ///   Its first step is AdamW's (the moments are updated in f32 before being quantized); after
    ///   that the moments carry the dynamic map's rounding (up to ~0.7% of a block's absmax near the
    ///   top of the map, more for values far below it), which moves the trajectory a little. A wrong
    ///   map, absmax or bias correction moves the loss by far more than 5% within a few steps.
    /// - Adafactor is not Adam (no first moment; β2_t = 1 − t^−0.8 forgets old gradients, where
    ///   Adam's β2 = 0.999 remembers the large early ones and so shrinks its steps as the gradient
    ///   shrinks), so its curve cannot coincide: it runs ahead. Both take normalized steps of about
    ///   lr per coordinate, so the loss stays within a factor of 2 of AdamW's at every step
    ///   (observed ratio 0.56–1.0); a missing row normalization, update clipping or lr scale
    ///   breaks that band.
    #[test]
    fn adamw8bit_and_adafactor_follow_adamw() -> Result<()> {
        let problem = problem()?;
        let adamw = curve(&problem, OptimizerKind::Adamw, 1e-2)?;
        let adamw8bit = curve(&problem, OptimizerKind::Adamw8bit, 1e-2)?;
        let adafactor = curve(&problem, OptimizerKind::Adafactor, 1e-2)?;
        assert!(
            adamw[100] < adamw[0] / 20.0,
            "AdamW itself must make progress: {adamw:?}"
        );
        for step in 0..=100 {
            let ratio = adamw8bit[step] / adamw[step];
            assert!(
                (ratio - 1.0).abs() < 0.05,
                "8-bit step {step}: ratio {ratio}"
            );
            let ratio = adafactor[step] / adamw[step];
            assert!(
                (0.5..=2.0).contains(&ratio),
                "Adafactor step {step}: ratio {ratio}"
            );
        }
        Ok(())
    }

    /// Shapes [300, 40] (12000 elements) and [16]:
    /// - AdamW f32: 2 moments × 4 bytes × 12016 = 96128; bf16: 2 × 2 × 12016 = 48064.
    /// - 8-bit: 12000 ≥ 4096 → 2 × 12000 codes + 2 × 4 × ⌈12000 / 256⌉ = 24000 + 8 × 47; [16] keeps
    ///   two f32 moments, 2 × 4 × 16 = 128: 24504 in all.
    /// - Adafactor: rows + columns, 4 × (300 + 40) = 1360, plus the full [16]: 64 → 1424.
    /// - SGD, momentum 0.9: one buffer, 4 × 12016 = 48064; momentum 0: nothing.
    #[test]
    fn state_bytes_are_exact() -> Result<()> {
        let params = |dtype: DType| -> Result<Vec<Param>> {
            Ok(vec![
                Param {
                    name: "w".into(),
                    var: Var::zeros((300, 40), dtype, &Device::Cpu)?,
                },
                Param {
                    name: "b".into(),
                    var: Var::zeros(16, dtype, &Device::Cpu)?,
                },
            ])
        };
        let hyper = Hyper::default();
        let no_momentum = Hyper {
            momentum: 0.0,
            ..Hyper::default()
        };
        let cases = [
            (OptimizerKind::Adamw, DType::F32, &hyper, 96128),
            (OptimizerKind::Adamw, DType::BF16, &hyper, 48064),
            (OptimizerKind::Adamw8bit, DType::F32, &hyper, 24504),
            (OptimizerKind::Adafactor, DType::F32, &hyper, 1424),
            (OptimizerKind::Adafactor, DType::BF16, &hyper, 1424),
            (OptimizerKind::Sgd, DType::F32, &hyper, 48064),
            (OptimizerKind::Sgd, DType::F32, &no_momentum, 0),
        ];
        for (kind, dtype, hyper, expected) in cases {
            let optimizer = build(kind, params(dtype)?, hyper)?;
            assert_eq!(optimizer.state_bytes(), expected, "{kind} {dtype:?}");
            // The checkpointed tensors are the state: their bytes add up to the same figure.
            let held: usize = optimizer
                .state_tensors()?
                .iter()
                .filter(|(name, _)| name != STEP_STATE)
                .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
                .sum();
            assert_eq!(held as u64, expected, "{kind} {dtype:?} tensors");
        }
        Ok(())
    }

    fn copy_params(params: &[Param]) -> Result<Vec<Param>> {
        params
            .iter()
            .map(|p| {
                Ok(Param {
                    name: p.name.clone(),
                    var: Var::from_tensor(&p.var.as_tensor().copy()?)?,
                })
            })
            .collect()
    }

    /// Train 3 steps, save; a fresh optimizer on copies of the parameters loads the state; both
    /// then take 2 more steps and must agree bit for bit. A fresh optimizer that does not load
    /// must disagree, or the test would prove nothing.
    #[test]
    fn state_round_trip_resumes_exactly() -> Result<()> {
        let problem = problem()?;
        let hyper = Hyper {
            weight_decay: 0.1,
            ..Hyper::default()
        };
        for kind in KINDS {
            let original = problem.params()?;
            let mut saved = build(kind, original.clone(), &hyper)?;
            problem.train(saved.as_mut(), &original, 3, 1e-2)?;
            let state: HashMap<String, Tensor> = saved.state_tensors()?.into_iter().collect();

            let resumed = copy_params(&original)?;
            let mut loaded = build(kind, resumed.clone(), &hyper)?;
            loaded.load_state_tensors(&state)?;
            let fresh = copy_params(&original)?;
            let mut unloaded = build(kind, fresh.clone(), &hyper)?;

            for _ in 0..2 {
                saved.step(&problem.loss_and_grads(&original)?.1, 1e-2)?;
                loaded.step(&problem.loss_and_grads(&resumed)?.1, 1e-2)?;
                unloaded.step(&problem.loss_and_grads(&fresh)?.1, 1e-2)?;
            }
            assert!(
                values(&original)? == values(&resumed)?,
                "{kind}: resumed run differs"
            );
            assert!(
                values(&original)? != values(&fresh)?,
                "{kind}: state made no difference"
            );
        }
        Ok(())
    }

    #[test]
    fn loading_rejects_missing_or_misshapen_state() -> Result<()> {
        let problem = problem()?;
        for kind in KINDS {
            let mut optimizer = build(kind, problem.params()?, &Hyper::default())?;
            let state: HashMap<String, Tensor> = optimizer.state_tensors()?.into_iter().collect();
            let mut missing = state.clone();
            missing.remove(STEP_STATE);
            assert!(optimizer.load_state_tensors(&missing).is_err(), "{kind}");
            let Some(name) = state.keys().find(|n| n.as_str() != STEP_STATE).cloned() else {
                continue; // nothing but the step (not the case with the default momentum)
            };
            let mut misshapen = state.clone();
            misshapen.insert(name.clone(), Tensor::zeros(3, DType::F32, &Device::Cpu)?);
            let err = optimizer.load_state_tensors(&misshapen).unwrap_err();
            assert!(err.to_string().contains(&name), "{kind}: {err}");
            optimizer.load_state_tensors(&state)?;
        }
        Ok(())
    }

    #[test]
    fn duplicate_parameters_are_rejected() -> Result<()> {
        let var = Var::zeros(4, DType::F32, &Device::Cpu)?;
        let same_var = vec![
            Param {
                name: "a".into(),
                var: var.clone(),
            },
            Param {
                name: "b".into(),
                var,
            },
        ];
        assert!(build(OptimizerKind::Adamw, same_var, &Hyper::default()).is_err());
        let same_name = vec![
            Param {
                name: "a".into(),
                var: Var::zeros(4, DType::F32, &Device::Cpu)?,
            },
            Param {
                name: "a".into(),
                var: Var::zeros(4, DType::F32, &Device::Cpu)?,
            },
        ];
        assert!(build(OptimizerKind::Sgd, same_name, &Hyper::default()).is_err());
        Ok(())
    }

    #[test]
    fn a_scaled_step_equals_clipping_first() -> Result<()> {
        // Every optimizer, f32 and bf16 parameters (AdamW's in-place kernel multiplies inside
        // its update, the others scale first): three steps with a clipping coefficient below 1
        // give bit for bit the parameters of clipping the gradients and then stepping.
        for dtype in [DType::F32, DType::BF16] {
            let problem = LeastSquares::new(128, 64, 80, dtype)?;
            for kind in KINDS {
                let run = |fused: bool| -> Result<Vec<Vec<f32>>> {
                    let params = problem.params()?;
                    let mut optimizer = build(kind, params.clone(), &Hyper::default())?;
                    for _ in 0..3 {
                        let (_, mut grads) = problem.loss_and_grads(&params)?;
                        let norm = grad_norm(&params, &grads)?;
                        let coefficient = clip_coefficient(norm, 0.05);
                        assert!(coefficient < 1.0, "{kind}: norm {norm}");
                        if fused {
                            optimizer.step_scaled(&mut grads, 1e-2, coefficient)?;
                        } else {
                            clip_grad_norm(&params, &mut grads, 0.05)?;
                            optimizer.step(&grads, 1e-2)?;
                        }
                    }
                    values(&params)
                };
                assert_eq!(run(true)?, run(false)?, "{kind} {dtype:?}");
            }
        }
        assert_eq!(clip_coefficient(13.0, 20.0), 1.0);
        assert_eq!(clip_coefficient(f64::NAN, 1.0), 1.0);
        assert_eq!(clip_coefficient(13.0, 0.0), 1.0);
        Ok(())
    }

    /// Parameters [2] and [1] with loss Σ p·c give gradients exactly c = [3, 4] and [12]:
    /// norm √(9 + 16 + 144) = 13.
    fn clip_setup(dtype: DType) -> Result<(Vec<Param>, GradStore)> {
        let params = vec![
            Param {
                name: "a".into(),
                var: Var::ones(2, dtype, &Device::Cpu)?,
            },
            Param {
                name: "b".into(),
                var: Var::ones(1, dtype, &Device::Cpu)?,
            },
            // No gradient: skipped by the norm and left alone.
            Param {
                name: "frozen".into(),
                var: Var::ones(1, dtype, &Device::Cpu)?,
            },
        ];
        let a = Tensor::new(&[3f32, 4.0], &Device::Cpu)?.to_dtype(dtype)?;
        let b = Tensor::new(&[12f32], &Device::Cpu)?.to_dtype(dtype)?;
        let loss = ((params[0].var.as_tensor() * a)?.sum_all()?
            + (params[1].var.as_tensor() * b)?.sum_all()?)?;
        Ok((params, loss.backward()?))
    }

    fn grad_values(params: &[Param], grads: &GradStore) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for p in &params[..2] {
            let g = grads.get(p.var.as_tensor()).expect("gradient present");
            out.extend(g.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    #[test]
    fn clip_scales_the_norm_to_the_threshold() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let (params, mut grads) = clip_setup(dtype)?;
            assert_eq!(clip_grad_norm(&params, &mut grads, 6.5)?, 13.0);
            let clipped = grad_values(&params, &grads)?;
            // torch's coefficient 6.5 / (13 + 1e-6) halves each gradient, to within bf16 rounding.
            let tolerance = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            for (got, want) in clipped.iter().zip([1.5f32, 2.0, 6.0]) {
                assert!(
                    (got - want).abs() <= tolerance * want,
                    "{dtype:?}: {clipped:?}"
                );
            }
            let norm = clip_grad_norm(&params, &mut grads, 0.0)?;
            assert!(
                (norm - 6.5).abs() < 6.5 * tolerance as f64,
                "{dtype:?}: {norm}"
            );
            assert!(grads.get(params[2].var.as_tensor()).is_none());
        }
        Ok(())
    }

    #[test]
    fn clip_leaves_small_norms_and_measure_only_alone() -> Result<()> {
        let (params, mut grads) = clip_setup(DType::F32)?;
        assert_eq!(clip_grad_norm(&params, &mut grads, 0.0)?, 13.0);
        assert_eq!(clip_grad_norm(&params, &mut grads, 20.0)?, 13.0);
        assert_eq!(grad_values(&params, &grads)?, vec![3.0, 4.0, 12.0]);
        Ok(())
    }
}

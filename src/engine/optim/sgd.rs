//! SGD with momentum as `torch.optim.SGD` (dampening 0, no Nesterov): weight decay is L2, added to
//! the gradient (`d = g + wd · p`), as PyTorch's SGD does; `buf ← μ · buf + d`, `p ← p − lr · buf`.
//! The buffer is kept in the parameter's dtype, and none is kept when momentum is 0.

use super::{Optimizer, Param, STEP_STATE, load_vars, read_step, step_tensor, validate, working};
use crate::config::Hyper;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::collections::HashMap;

struct Slot {
    param: Param,
    momentum_buffer: Option<Var>,
}

pub struct Sgd {
    slots: Vec<Slot>,
    momentum: f64,
    weight_decay: f64,
    step: u64,
}

impl Sgd {
    pub fn new(params: Vec<Param>, hyper: &Hyper) -> Result<Self> {
        validate(&params)?;
        if !(hyper.momentum >= 0.0 && hyper.momentum.is_finite()) {
            candle_core::bail!("sgd: momentum {} must be finite and ≥ 0", hyper.momentum);
        }
        let slots = params
            .into_iter()
            .map(|param| {
                let var = &param.var;
                let momentum_buffer = if hyper.momentum != 0.0 {
                    Some(Var::zeros(var.shape(), var.dtype(), var.device())?)
                } else {
                    None
                };
                Ok(Slot {
                    param,
                    momentum_buffer,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            momentum: hyper.momentum,
            weight_decay: hyper.weight_decay,
            step: 0,
        })
    }
}

impl Optimizer for Sgd {
    fn begin_step(&mut self) {
        self.step += 1;
    }

    fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for slot in &self.slots {
            let var = &slot.param.var;
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let dtype = var.dtype();
            let mut direction = working(grad)?;
            if self.weight_decay != 0.0 {
                let decay = working(var.as_tensor())?.affine(self.weight_decay, 0.0)?;
                direction = (direction + decay)?;
            }
            if let Some(buffer) = &slot.momentum_buffer {
                // A zero buffer makes the first step buf = d, as torch's clone on first use.
                let mut next = working(buffer.as_tensor())?.affine(self.momentum, 0.0)?;
                next = (next + direction)?;
                buffer.set(&next.to_dtype(dtype)?)?;
                drop(next);
                // torch steps along the stored (rounded) buffer.
                direction = working(buffer.as_tensor())?;
            }
            let mut next = direction.affine(lr, 0.0)?;
            next = (working(var.as_tensor())? - next)?;
            var.set(&next.to_dtype(dtype)?)?;
        }
        Ok(())
    }

    fn state_bytes(&self) -> u64 {
        self.slots
            .iter()
            .filter_map(|s| s.momentum_buffer.as_ref())
            .map(|b| (b.elem_count() * b.dtype().size_in_bytes()) as u64)
            .sum()
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(STEP_STATE.to_string(), step_tensor(self.step)?)];
        for slot in &self.slots {
            if let Some(buffer) = &slot.momentum_buffer {
                let name = format!("{}.momentum_buffer", slot.param.name);
                out.push((name, buffer.as_detached_tensor()));
            }
        }
        Ok(out)
    }

    fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let step = read_step(state)?;
        let targets: Vec<_> = self
            .slots
            .iter()
            .filter_map(|s| {
                let buffer = s.momentum_buffer.as_ref()?;
                Some((format!("{}.momentum_buffer", s.param.name), buffer))
            })
            .collect();
        load_vars(state, &targets)?;
        self.step = step;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "sgd"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::optim::testkit::LeastSquares;
    use candle_core::{DType, Device};

    /// Two steps from p = 1 with the gradient of Σ p·1 (g = 1 both times), lr 0.5, momentum 0.5,
    /// weight decay 0.25 (every number is a dyadic fraction, so f32 is exact):
    ///   step 1: d = 1 + 0.25·1 = 1.25;       buf = 1.25;                  p = 1 − 0.625 = 0.375
    ///   step 2: d = 1 + 0.25·0.375 = 1.09375; buf = 0.625 + 1.09375 = 1.71875; p = 0.375 − 0.859375
    ///           = −0.484375
    #[test]
    fn two_steps_match_hand_computation() -> Result<()> {
        let var = Var::ones(1, DType::F32, &Device::Cpu)?;
        let params = vec![Param {
            name: "p".into(),
            var: var.clone(),
        }];
        let hyper = Hyper {
            momentum: 0.5,
            weight_decay: 0.25,
            ..Hyper::default()
        };
        let mut optimizer = Sgd::new(params, &hyper)?;
        let mut seen = Vec::new();
        for _ in 0..2 {
            let grads = var.as_tensor().sum_all()?.backward()?;
            optimizer.step(&grads, 0.5)?;
            let state: HashMap<String, Tensor> = optimizer.state_tensors()?.into_iter().collect();
            seen.push((
                var.to_vec1::<f32>()?[0],
                state["p.momentum_buffer"].to_vec1::<f32>()?[0],
            ));
        }
        assert_eq!(seen, vec![(0.375, 1.25), (-0.484375, 1.71875)]);
        Ok(())
    }

    /// Momentum 0 keeps no buffer: p ← p − lr·g, exactly (1 − 0.5·3 = −0.5).
    #[test]
    fn no_momentum_no_buffer() -> Result<()> {
        let var = Var::ones(2, DType::F32, &Device::Cpu)?;
        let params = vec![Param {
            name: "p".into(),
            var: var.clone(),
        }];
        let hyper = Hyper {
            momentum: 0.0,
            ..Hyper::default()
        };
        let mut optimizer = Sgd::new(params, &hyper)?;
        assert_eq!(optimizer.state_bytes(), 0);
        let grads = (var.as_tensor() * 3.0)?.sum_all()?.backward()?;
        optimizer.step(&grads, 0.5)?;
        assert_eq!(var.to_vec1::<f32>()?, vec![-0.5, -0.5]);
        let names: Vec<_> = optimizer
            .state_tensors()?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec![STEP_STATE.to_string()]);
        Ok(())
    }

    #[test]
    fn bf16_params_train() -> Result<()> {
        let problem = LeastSquares::new(64, 16, 8, DType::BF16)?;
        let params = problem.params()?;
        let mut optimizer = Sgd::new(params.clone(), &Hyper::default())?;
        let losses = problem.train(&mut optimizer, &params, 60, 0.05)?;
        // Observed: 1.75 → 0.027.
        assert!(losses[60] < 0.1 * losses[0], "{losses:?}");
        let buffer = &optimizer.state_tensors()?[1].1;
        assert_eq!(buffer.dtype(), DType::BF16);
        Ok(())
    }
}

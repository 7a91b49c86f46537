//! AdamW (Loshchilov & Hutter) as `torch.optim.AdamW`: decoupled weight decay applied first, bias
//! corrected moments, moments stored in the parameter's dtype. Written with candle tensor ops and
//! `Var::set`, so it runs on any device. Each update is a chain of reassigned temporaries, so at most
//! two parameter-sized working tensors are alive at once (beyond the state itself).

use super::{
    ADAM_BETA1, ADAM_BETA2, ADAM_EPS, Optimizer, Param, STEP_STATE, load_vars, read_step,
    step_tensor, validate, working,
};
use crate::config::Hyper;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::collections::HashMap;

struct Slot {
    param: Param,
    exp_avg: Var,
    exp_avg_sq: Var,
}

pub struct AdamW {
    slots: Vec<Slot>,
    weight_decay: f64,
    step: u64,
}

impl AdamW {
    pub fn new(params: Vec<Param>, hyper: &Hyper) -> Result<Self> {
        validate(&params)?;
        let slots = params
            .into_iter()
            .map(|param| {
                let (shape, dtype, device) =
                    (param.var.shape(), param.var.dtype(), param.var.device());
                Ok(Slot {
                    exp_avg: Var::zeros(shape, dtype, device)?,
                    exp_avg_sq: Var::zeros(shape, dtype, device)?,
                    param,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            weight_decay: hyper.weight_decay,
            step: 0,
        })
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as f64;
        let bias_correction1 = 1.0 - ADAM_BETA1.powf(t);
        let bias_correction2 = 1.0 - ADAM_BETA2.powf(t);
        let step_size = lr / bias_correction1;
        let decay = 1.0 - lr * self.weight_decay;
        for slot in &self.slots {
            let Some(grad) = grads.get(slot.param.var.as_tensor()) else {
                continue;
            };
            let var = &slot.param.var;
            let dtype = var.dtype();
            let g = working(grad)?;

            // m ← m + (1 − β1)(g − m)   (torch's lerp_)
            let m = working(slot.exp_avg.as_tensor())?;
            let mut next = (&g - &m)?;
            next = next.affine(1.0 - ADAM_BETA1, 0.0)?;
            next = (next + m)?;
            slot.exp_avg.set(&next.to_dtype(dtype)?)?;
            drop(next);

            // v ← v + (1 − β2)(g² − v)
            let mut next = g.sqr()?;
            drop(g);
            let v = working(slot.exp_avg_sq.as_tensor())?;
            next = (next - &v)?;
            next = next.affine(1.0 - ADAM_BETA2, 0.0)?;
            next = (next + v)?;
            slot.exp_avg_sq.set(&next.to_dtype(dtype)?)?;
            drop(next);

            // update = (lr / bc1) · m / (√v / √bc2 + eps), from the stored (rounded) moments.
            let mut update = working(slot.exp_avg_sq.as_tensor())?.sqrt()?;
            update = update.affine(1.0 / bias_correction2.sqrt(), ADAM_EPS)?;
            update = (working(slot.exp_avg.as_tensor())? / update)?;
            update = update.affine(step_size, 0.0)?;

            // p ← p·(1 − lr·wd), then p ← p − update: torch's order and roundings.
            if decay != 1.0 {
                let decayed = working(var.as_tensor())?.affine(decay, 0.0)?;
                var.set(&decayed.to_dtype(dtype)?)?;
            }
            let next = (working(var.as_tensor())? - update)?;
            var.set(&next.to_dtype(dtype)?)?;
        }
        Ok(())
    }

    fn state_bytes(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| 2 * (s.param.var.elem_count() * s.param.var.dtype().size_in_bytes()) as u64)
            .sum()
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(STEP_STATE.to_string(), step_tensor(self.step)?)];
        for slot in &self.slots {
            let name = &slot.param.name;
            out.push((format!("{name}.exp_avg"), slot.exp_avg.as_detached_tensor()));
            out.push((
                format!("{name}.exp_avg_sq"),
                slot.exp_avg_sq.as_detached_tensor(),
            ));
        }
        Ok(out)
    }

    fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let step = read_step(state)?;
        let mut targets = Vec::with_capacity(2 * self.slots.len());
        for slot in &self.slots {
            let name = &slot.param.name;
            targets.push((format!("{name}.exp_avg"), &slot.exp_avg));
            targets.push((format!("{name}.exp_avg_sq"), &slot.exp_avg_sq));
        }
        load_vars(state, &targets)?;
        self.step = step;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "adamw"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::optim::testkit::LeastSquares;
    use candle_core::{DType, Device};

    /// First step, lr 0.1, weight decay 0.5, from p = [1, −0.5, 2, 0.25] with g = [0.5, −2, 0, 1e-3]
    /// (the gradient of Σ p·g). Ideally m̂ = g and v̂ = g², so p' = p·(1 − lr·wd) − lr·g/(|g| + eps)
    /// ≈ [0.85, −0.375, 1.9, 0.1375 + 1e-6]. The f32 reference below repeats the implementation's
    /// arithmetic (each candle op rounds to f32; affine constants are f64 rounded to f32):
    ///   m = 0 + f32(1 − β1)·(g − 0);  v = 0 + f32(1 − β2)·(g² − 0)
    ///   d = √v · f32(1/√(1 − β2)) + f32(eps);  u = (m / d) · f32(lr / (1 − β1))
    ///   p' = p · f32(1 − lr·wd) − u
    #[test]
    fn first_step_matches_hand_computation() -> Result<()> {
        let p0 = [1f32, -0.5, 2.0, 0.25];
        let g = [0.5f32, -2.0, 0.0, 1e-3];
        let (lr, wd) = (0.1, 0.5);
        let var = Var::new(&p0, &Device::Cpu)?;
        let params = vec![Param {
            name: "p".into(),
            var: var.clone(),
        }];
        let grads = (var.as_tensor() * Tensor::new(&g, &Device::Cpu)?)?
            .sum_all()?
            .backward()?;
        let hyper = Hyper {
            weight_decay: wd,
            ..Hyper::default()
        };
        let mut optimizer = AdamW::new(params, &hyper)?;
        optimizer.step(&grads, lr)?;
        let got = var.to_vec1::<f32>()?;

        let (b1, b2) = (ADAM_BETA1, ADAM_BETA2);
        let expected: Vec<f32> = p0
            .iter()
            .zip(g)
            .map(|(&p, g)| {
                let m = 0.0 + (1.0 - b1) as f32 * (g - 0.0);
                let v = 0.0 + (1.0 - b2) as f32 * (g * g - 0.0);
                let d = v.sqrt() * (1.0 / (1.0 - b2).sqrt()) as f32 + ADAM_EPS as f32;
                let u = (m / d) * (lr / (1.0 - b1)) as f32;
                p * (1.0 - lr * wd) as f32 - u
            })
            .collect();
        assert_eq!(got, expected);
        let ideal = [0.85f32, -0.375, 1.9, 0.1375 + 1e-6];
        for (got, ideal) in got.iter().zip(ideal) {
            assert!((got - ideal).abs() < 1e-6, "{got} vs {ideal}");
        }
        Ok(())
    }

    #[test]
    fn moments_hold_the_documented_values_after_one_step() -> Result<()> {
        let var = Var::new(&[1f32, 1.0], &Device::Cpu)?;
        let grads = (var.as_tensor() * Tensor::new(&[2f32, -4.0], &Device::Cpu)?)?
            .sum_all()?
            .backward()?;
        let params = vec![Param {
            name: "p".into(),
            var,
        }];
        let mut optimizer = AdamW::new(params, &Hyper::default())?;
        optimizer.step(&grads, 1e-3)?;
        let state: HashMap<String, Tensor> = optimizer.state_tensors()?.into_iter().collect();
        // m = 0.1·g, v = 0.001·g² (to f32 rounding), step 1.
        let m = state["p.exp_avg"].to_vec1::<f32>()?;
        let v = state["p.exp_avg_sq"].to_vec1::<f32>()?;
        assert!(
            (m[0] - 0.2).abs() < 1e-7 && (m[1] + 0.4).abs() < 1e-7,
            "{m:?}"
        );
        assert!(
            (v[0] - 0.004).abs() < 1e-9 && (v[1] - 0.016).abs() < 1e-9,
            "{v:?}"
        );
        assert_eq!(state[STEP_STATE].to_vec1::<i64>()?, vec![1]);
        Ok(())
    }

    /// Pure bf16: parameters, gradients and moments in bf16; the loss still falls. bf16 keeps 8
    /// significant bits, so an update below half an ulp of the weight is lost: lr is large enough
    /// here (0.02 on weights ~0.1–1) for the steps to register.
    #[test]
    fn bf16_params_train() -> Result<()> {
        let problem = LeastSquares::new(64, 16, 8, DType::BF16)?;
        let params = problem.params()?;
        let mut optimizer = AdamW::new(params.clone(), &Hyper::default())?;
        let losses = problem.train(&mut optimizer, &params, 60, 0.02)?;
        // Observed: 1.75 → 0.013.
        assert!(losses[60] < 0.05 * losses[0], "{losses:?}");
        assert!(params.iter().all(|p| p.var.dtype() == DType::BF16));
        let state = optimizer.state_tensors()?;
        assert!(state.iter().skip(1).all(|(_, t)| t.dtype() == DType::BF16));
        Ok(())
    }
}

//! Adafactor (Shazeer & Stern 2018) as transformers' `Adafactor` with an explicit learning rate
//! (`relative_step=False, scale_parameter=False, warmup_init=False, beta1=None`): eps1 1e-30,
//! clip_threshold 1.0, decay_rate −0.8. A parameter of rank ≥ 2 keeps factored second moments: row
//! averages over the last dimension and column averages over the second-to-last (n + m floats for
//! an n×m matrix); others keep a full second moment. State and arithmetic are f32 whatever the
//! parameter's dtype. Weight decay, when set, is decoupled (`p −= wd · lr · p`), as transformers does.

use super::{Optimizer, Param, STEP_STATE, load_vars, read_step, step_tensor, validate, working};
use crate::config::Hyper;
use candle_core::backprop::GradStore;
use candle_core::{D, DType, Result, Tensor, Var};
use std::collections::HashMap;

/// Added to g² before averaging (transformers' `eps[0]`).
pub const EPS1: f64 = 1e-30;
/// Updates are scaled down so their RMS is at most this.
pub const CLIP_THRESHOLD: f64 = 1.0;
/// β2_t = 1 − t^DECAY_RATE.
pub const DECAY_RATE: f64 = -0.8;

enum SecondMoment {
    /// `row` has the parameter's shape without its last dimension, `col` without its
    /// second-to-last (transformers' `exp_avg_sq_row` / `exp_avg_sq_col`).
    Factored {
        row: Var,
        col: Var,
    },
    Full(Var),
}

struct Slot {
    param: Param,
    moment: SecondMoment,
}

impl Slot {
    fn named_state(&self) -> Vec<(String, &Var)> {
        let name = &self.param.name;
        match &self.moment {
            SecondMoment::Factored { row, col } => vec![
                (format!("{name}.exp_avg_sq_row"), row),
                (format!("{name}.exp_avg_sq_col"), col),
            ],
            SecondMoment::Full(v) => vec![(format!("{name}.exp_avg_sq"), v)],
        }
    }
}

pub struct Adafactor {
    slots: Vec<Slot>,
    weight_decay: f64,
    step: u64,
}

impl Adafactor {
    pub fn new(params: Vec<Param>, hyper: &Hyper) -> Result<Self> {
        validate(&params)?;
        let slots = params
            .into_iter()
            .map(|param| {
                let dims = param.var.dims();
                let device = param.var.device();
                let moment = if dims.len() >= 2 {
                    let rank = dims.len();
                    let row_dims = &dims[..rank - 1];
                    let col_dims: Vec<usize> = dims[..rank - 2]
                        .iter()
                        .chain(&dims[rank - 1..])
                        .copied()
                        .collect();
                    SecondMoment::Factored {
                        row: Var::zeros(row_dims, DType::F32, device)?,
                        col: Var::zeros(col_dims, DType::F32, device)?,
                    }
                } else {
                    SecondMoment::Full(Var::zeros(dims, DType::F32, device)?)
                };
                Ok(Slot { param, moment })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            weight_decay: hyper.weight_decay,
            step: 0,
        })
    }
}

/// `beta · state + (1 − beta) · fresh`, written into `state`.
fn decay_into(state: &Var, fresh: Tensor, beta: f64) -> Result<()> {
    let mut next = fresh.affine(1.0 - beta, 0.0)?;
    next = (next + state.as_detached_tensor().affine(beta, 0.0)?)?;
    state.set(&next)
}

impl Optimizer for Adafactor {
    fn begin_step(&mut self) {
        self.step += 1;
    }

    fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let beta = 1.0 - (self.step as f64).powf(DECAY_RATE);
        for slot in &self.slots {
            let var = &slot.param.var;
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = working(grad)?;
            let squares = g.sqr()?.affine(1.0, EPS1)?;
            let mut update = match &slot.moment {
                SecondMoment::Factored { row, col } => {
                    decay_into(row, squares.mean(D::Minus1)?, beta)?;
                    decay_into(col, squares.mean(D::Minus2)?, beta)?;
                    drop(squares);
                    let row = row.as_detached_tensor();
                    let col = col.as_detached_tensor();
                    // rsqrt(R_i / mean(R)) · rsqrt(C_j)
                    let row_factor = row
                        .broadcast_div(&row.mean_keepdim(D::Minus1)?)?
                        .sqrt()?
                        .recip()?
                        .unsqueeze(D::Minus1)?;
                    let col_factor = col.sqrt()?.recip()?.unsqueeze(D::Minus2)?;
                    g.broadcast_mul(&row_factor)?.broadcast_mul(&col_factor)?
                }
                SecondMoment::Full(v) => {
                    decay_into(v, squares, beta)?;
                    (g / v.as_detached_tensor().sqrt()?)?
                }
            };
            // update /= max(1, RMS(update) / clip_threshold); stays on the device (no sync).
            let rms = update.sqr()?.mean_all()?.sqrt()?;
            let divisor = rms.affine(1.0 / CLIP_THRESHOLD, 0.0)?.maximum(1.0)?;
            update = update.broadcast_div(&divisor)?;
            update = update.affine(lr, 0.0)?;

            let mut next = working(var.as_tensor())?;
            if self.weight_decay != 0.0 {
                next = next.affine(1.0 - self.weight_decay * lr, 0.0)?;
            }
            next = (next - update)?;
            var.set(&next.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    fn state_bytes(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.named_state())
            .map(|(_, v)| (v.elem_count() * v.dtype().size_in_bytes()) as u64)
            .sum()
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(STEP_STATE.to_string(), step_tensor(self.step)?)];
        for slot in &self.slots {
            for (name, var) in slot.named_state() {
                out.push((name, var.as_detached_tensor()));
            }
        }
        Ok(out)
    }

    fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let step = read_step(state)?;
        let targets: Vec<_> = self.slots.iter().flat_map(|s| s.named_state()).collect();
        load_vars(state, &targets)?;
        self.step = step;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "adafactor"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::optim::testkit::LeastSquares;
    use candle_core::Device;

    /// One step on `var` with gradient `c` (from the loss Σ var·c).
    fn step_with(optimizer: &mut Adafactor, var: &Var, c: &Tensor, lr: f64) -> Result<()> {
        let grads = (var.as_tensor() * c)?.sum_all()?.backward()?;
        optimizer.step(&grads, lr)
    }

    fn assert_close(got: &[f32], want: &[f32], tolerance: f32) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tolerance, "{got:?} vs {want:?}");
        }
    }

    /// At step 1, β2_1 = 1 − 1^−0.8 = 0, so R = mean over columns of g², C = mean over rows. For a
    /// rank-1 gradient g = a·bᵀ: R_i / mean(R) = a_i² / mean(a²) and C_j = mean(a²)·b_j², so the
    /// update g_ij · rsqrt(R_i / mean R) · rsqrt(C_j) = sign(g_ij): RMS 1, no clipping, and
    /// p' = p·(1 − wd·lr) − lr·sign(g).
    #[test]
    fn first_factored_step_is_lr_times_sign() -> Result<()> {
        let (a, b) = ([1f32, -2.0, 0.5], [2f32, -1.0, 4.0, 0.25]);
        let c: Vec<f32> = a
            .iter()
            .flat_map(|x| b.iter().map(move |y| x * y))
            .collect();
        let var = Var::ones((3, 4), DType::F32, &Device::Cpu)?;
        let params = vec![Param {
            name: "w".into(),
            var: var.clone(),
        }];
        let hyper = Hyper {
            weight_decay: 0.5,
            ..Hyper::default()
        };
        let mut optimizer = Adafactor::new(params, &hyper)?;
        step_with(
            &mut optimizer,
            &var,
            &Tensor::from_slice(&c, (3, 4), &Device::Cpu)?,
            0.1,
        )?;
        let want: Vec<f32> = c.iter().map(|g| 0.95 - 0.1 * g.signum()).collect();
        assert_close(&var.flatten_all()?.to_vec1::<f32>()?, &want, 1e-6);
        Ok(())
    }

    /// Vector, step 1: v = g² + eps1, update g/√v = sign(g) (RMS 1): p − lr. Step 2 with g ten
    /// times larger: β2_2 = 1 − 2^−0.8 ≈ 0.4257, v ≈ 0.4257 + 0.5743·100 ≈ 57.86, so g/√v ≈ 1.3147
    /// everywhere; its RMS exceeds the threshold 1, so the update is divided by it and p moves by
    /// exactly lr again. Without clipping it would move 1.31·lr.
    #[test]
    fn vector_steps_and_update_clipping() -> Result<()> {
        let var = Var::zeros(4, DType::F32, &Device::Cpu)?;
        let params = vec![Param {
            name: "b".into(),
            var: var.clone(),
        }];
        let mut optimizer = Adafactor::new(params, &Hyper::default())?;
        let ones = Tensor::ones(4, DType::F32, &Device::Cpu)?;
        step_with(&mut optimizer, &var, &ones, 0.1)?;
        assert_close(&var.to_vec1::<f32>()?, &[-0.1; 4], 1e-7);
        step_with(&mut optimizer, &var, &(ones * 10.0)?, 0.1)?;
        assert_close(&var.to_vec1::<f32>()?, &[-0.2; 4], 1e-6);
        let state: HashMap<String, Tensor> = optimizer.state_tensors()?.into_iter().collect();
        let beta = 1.0 - 2f32.powf(-0.8);
        let v = beta * 1.0 + (1.0 - beta) * 100.0;
        assert_close(&state["b.exp_avg_sq"].to_vec1::<f32>()?, &[v; 4], 1e-4);
        Ok(())
    }

    /// Rank 3: the leading dimension is a batch of matrices; rows over the last dimension, columns
    /// over the second-to-last, as transformers shapes them. A constant gradient is rank 1 in each
    /// slice, so the first step is again p − lr.
    #[test]
    fn rank3_parameters_factor_per_slice() -> Result<()> {
        let var = Var::zeros((2, 3, 4), DType::F32, &Device::Cpu)?;
        let params = vec![Param {
            name: "t".into(),
            var: var.clone(),
        }];
        let mut optimizer = Adafactor::new(params, &Hyper::default())?;
        assert_eq!(optimizer.state_bytes(), 4 * (2 * 3 + 2 * 4));
        let state = optimizer.state_tensors()?;
        let dims: Vec<_> = state
            .iter()
            .skip(1)
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        assert_eq!(
            dims,
            vec![
                ("t.exp_avg_sq_row".to_string(), vec![2, 3]),
                ("t.exp_avg_sq_col".to_string(), vec![2, 4])
            ]
        );
        step_with(
            &mut optimizer,
            &var,
            &Tensor::full(3f32, (2, 3, 4), &Device::Cpu)?,
            0.1,
        )?;
        assert_close(&var.flatten_all()?.to_vec1::<f32>()?, &[-0.1; 24], 1e-7);
        Ok(())
    }

    /// bf16 parameters: state stays f32, arithmetic runs in f32, the loss falls (observed 1.75 →
    /// 0.008 with this lr; bf16 rounds away updates under half an ulp of the weight).
    #[test]
    fn bf16_params_train_with_f32_state() -> Result<()> {
        let problem = LeastSquares::new(64, 16, 8, DType::BF16)?;
        let params = problem.params()?;
        let mut optimizer = Adafactor::new(params.clone(), &Hyper::default())?;
        let losses = problem.train(&mut optimizer, &params, 60, 0.02)?;
        assert!(losses[60] < 0.05 * losses[0], "{losses:?}");
        let state = optimizer.state_tensors()?;
        assert!(state.iter().skip(1).all(|(_, t)| t.dtype() == DType::F32));
        Ok(())
    }
}

//! Test fixtures shared by the optimizer tests: a small noisy linear-regression problem with
//! deterministic data (no RNG state, so every run and every optimizer sees the same numbers).

use super::{Optimizer, Param};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};

/// `n` values in [−1, 1) from a fixed xorshift sequence.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Fit `y ≈ x · weight + bias` by mean squared error; `y` has noise, so the minimum is above 0.
pub struct LeastSquares {
    x: Tensor,
    y: Tensor,
    inputs: usize,
    outputs: usize,
    dtype: DType,
}

impl LeastSquares {
    pub fn new(rows: usize, inputs: usize, outputs: usize, dtype: DType) -> Result<Self> {
        let cpu = Device::Cpu;
        let x = Tensor::from_vec(pseudo_random(rows * inputs, 1), (rows, inputs), &cpu)?;
        let w = Tensor::from_vec(pseudo_random(inputs * outputs, 2), (inputs, outputs), &cpu)?;
        let b = Tensor::from_vec(pseudo_random(outputs, 3), outputs, &cpu)?;
        let noise = Tensor::from_vec(pseudo_random(rows * outputs, 4), (rows, outputs), &cpu)?;
        let y = (x.matmul(&w)?.broadcast_add(&b)? + (noise * 0.1)?)?;
        Ok(Self {
            x: x.to_dtype(dtype)?,
            y: y.to_dtype(dtype)?,
            inputs,
            outputs,
            dtype,
        })
    }

    /// `weight` [inputs, outputs] (small, deterministic) and `bias` [outputs] (zero).
    pub fn params(&self) -> Result<Vec<Param>> {
        let w = pseudo_random(self.inputs * self.outputs, 5);
        let w = (Tensor::from_vec(w, (self.inputs, self.outputs), &Device::Cpu)? * 0.1)?;
        Ok(vec![
            Param {
                name: "weight".into(),
                var: Var::from_tensor(&w.to_dtype(self.dtype)?)?,
            },
            Param {
                name: "bias".into(),
                var: Var::zeros(self.outputs, self.dtype, &Device::Cpu)?,
            },
        ])
    }

    /// The loss (as f32) and its gradients at `params`.
    pub fn loss_and_grads(&self, params: &[Param]) -> Result<(f32, GradStore)> {
        let prediction = self
            .x
            .matmul(params[0].var.as_tensor())?
            .broadcast_add(params[1].var.as_tensor())?;
        let loss = (prediction - &self.y)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        Ok((loss.to_dtype(DType::F32)?.to_scalar::<f32>()?, grads))
    }

    /// Takes `steps` optimizer steps at `lr`; returns the loss before each step and after the last.
    pub fn train(
        &self,
        optimizer: &mut dyn Optimizer,
        params: &[Param],
        steps: usize,
        lr: f64,
    ) -> Result<Vec<f32>> {
        let mut losses = Vec::with_capacity(steps + 1);
        for _ in 0..steps {
            let (loss, grads) = self.loss_and_grads(params)?;
            losses.push(loss);
            optimizer.step(&grads, lr)?;
        }
        losses.push(self.loss_and_grads(params)?.0);
        Ok(losses)
    }
}

/// The parameters' values, flattened, as f32.
pub fn values(params: &[Param]) -> Result<Vec<Vec<f32>>> {
    params
        .iter()
        .map(|p| p.var.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>())
        .collect()
}

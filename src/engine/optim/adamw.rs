//! AdamW (Loshchilov & Hutter) as `torch.optim.AdamW`: decoupled weight decay applied first, bias
//! corrected moments, moments stored in the parameter's dtype. On the CPU each update is three
//! in-place passes (the two moments, then the parameter; `InPlace`), with no temporaries; elsewhere
//! it is written with candle tensor ops and `Var::set`, a chain of reassigned temporaries, so at
//! most two parameter-sized working tensors are alive at once (beyond the state itself). Both do
//! the same f32 operations in the same order, rounding to the stored dtype at the same points.

use super::{
    ADAM_BETA1, ADAM_BETA2, ADAM_EPS, Optimizer, Param, STEP_STATE, load_vars, read_step,
    scaled_grad, step_tensor, validate, working,
};
use crate::config::Hyper;
use crate::engine::kernels::{Elem, GRAIN, fusable, slice, vectorized};
use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;

/// One in-place pass of the CPU update over contiguous storage (see the module docs).
#[derive(Clone, Copy)]
enum InPlace {
    /// `m ← (g − m)·c + m` with c = 1 − β1 (source: g, first multiplied by `s`, gradient
    /// clipping's coefficient, and rounded to its dtype as a separate scaling pass leaves it; 1
    /// leaves it as it is).
    FirstMoment { c: f32, s: f32 },
    /// `v ← (g² − v)·c + v` with c = 1 − β2 (source: g, multiplied by `s` as above).
    SecondMoment { c: f32, s: f32 },
    /// `p ← round(p·decay)` (when decay ≠ 1), then `p ← p − (m / (√v·k + eps))·step_size`
    /// (sources: m, v).
    Param {
        decay: f32,
        k: f32,
        eps: f32,
        step_size: f32,
    },
}

/// `g · s` rounded to `T` and widened again (what a scaling pass stores), or `g` for `s` = 1.
#[inline(always)]
fn scaled<T: Elem>(g: T, s: f32) -> f32 {
    if s == 1.0 {
        g.get()
    } else {
        T::put(g.get() * s + 0.0).get()
    }
}

impl InPlace {
    /// The pass over one run: `dst` and its sources, element by element.
    fn run<T: Elem>(self, dst: &mut [T], a: &[T], b: &[T]) {
        dst.par_chunks_mut(GRAIN)
            .zip(a.par_chunks(GRAIN))
            .zip(b.par_chunks(GRAIN))
            .for_each(|((dst, a), b)| {
                vectorized(
                    #[inline(always)]
                    || match self {
                        InPlace::FirstMoment { c, s } => {
                            for (m, g) in dst.iter_mut().zip(a) {
                                let (m0, g) = (m.get(), scaled(*g, s));
                                *m = T::put(((g - m0) * c + 0.0) + m0);
                            }
                        }
                        InPlace::SecondMoment { c, s } => {
                            for (v, g) in dst.iter_mut().zip(a) {
                                let (v0, g) = (v.get(), scaled(*g, s));
                                *v = T::put(((g * g - v0) * c + 0.0) + v0);
                            }
                        }
                        InPlace::Param {
                            decay,
                            k,
                            eps,
                            step_size,
                        } => {
                            for ((p, m), v) in dst.iter_mut().zip(a).zip(b) {
                                let update =
                                    (m.get() / (v.get().sqrt() * k + eps)) * step_size + 0.0;
                                let p0 = if decay != 1.0 {
                                    T::put(p.get() * decay + 0.0).get()
                                } else {
                                    p.get()
                                };
                                *p = T::put(p0 - update);
                            }
                        }
                    },
                )
            });
    }
}

impl InPlace {
    /// The pass over `dst` (contiguous CPU storage) with sources `a` and `b` of its dtype.
    fn on_storage(
        self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        (a, al): (&CpuStorage, &Layout),
        (b, bl): (&CpuStorage, &Layout),
    ) -> Result<()> {
        let Some((start, end)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("adamw: non-contiguous parameter or state");
        };
        match (dst, a, b) {
            (CpuStorage::F32(d), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                self.run(&mut d[start..end], slice(a, al)?, slice(b, bl)?)
            }
            (CpuStorage::BF16(d), CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                self.run(&mut d[start..end], slice(a, al)?, slice(b, bl)?)
            }
            (CpuStorage::F16(d), CpuStorage::F16(a), CpuStorage::F16(b)) => {
                self.run(&mut d[start..end], slice(a, al)?, slice(b, bl)?)
            }
            (d, ..) => candle_core::bail!(
                "adamw: state of mixed or unsupported dtypes ({:?})",
                d.dtype()
            ),
        }
        Ok(())
    }
}

impl InplaceOp2 for InPlace {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, d: &mut CpuStorage, dl: &Layout, a: &CpuStorage, al: &Layout) -> Result<()> {
        self.on_storage(d, dl, (a, al), (a, al))
    }
}

impl InplaceOp3 for InPlace {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        d: &mut CpuStorage,
        dl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        self.on_storage(d, dl, (a, al), (b, bl))
    }
}

/// Whether the in-place CPU passes apply: the fused kernels' conditions (CPU, contiguous, one
/// dtype they store), over tensors of one size.
fn in_place(ts: &[&Tensor]) -> bool {
    fusable(ts) && ts.iter().all(|t| t.elem_count() == ts[0].elem_count())
}

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

/// One step's constants.
#[derive(Clone, Copy)]
struct Consts {
    bias_correction2: f64,
    step_size: f64,
    decay: f64,
    /// What every gradient is multiplied by first (clipping's coefficient; 1 for none).
    grad_scale: f64,
}

/// The CPU's in-place update (see the module docs) of parameter `p` with moments `m` and `v`
/// (the whole tensors or the same block of each): three passes, no temporaries.
fn update_in_place(p: &Tensor, m: &Tensor, v: &Tensor, grad: &Tensor, c: Consts) -> Result<()> {
    // The same f32 constants as candle's affine in `update_with_ops` (f64 rounded to f32).
    let s = c.grad_scale as f32;
    let first = InPlace::FirstMoment {
        c: (1.0 - ADAM_BETA1) as f32,
        s,
    };
    let second = InPlace::SecondMoment {
        c: (1.0 - ADAM_BETA2) as f32,
        s,
    };
    m.inplace_op2(grad, &first)?;
    v.inplace_op2(grad, &second)?;
    let param = InPlace::Param {
        decay: c.decay as f32,
        k: (1.0 / c.bias_correction2.sqrt()) as f32,
        eps: ADAM_EPS as f32,
        step_size: c.step_size as f32,
    };
    p.inplace_op3(m, v, &param)
}

impl Slot {
    /// The CPU's in-place update of the whole parameter.
    fn update_in_place(&self, grad: &Tensor, c: Consts) -> Result<()> {
        let (m, v) = (self.exp_avg.as_tensor(), self.exp_avg_sq.as_tensor());
        update_in_place(self.param.var.as_tensor(), m, v, grad, c)
    }

    /// The update with candle's ops, on any device.
    fn update_with_ops(&self, grad: &Tensor, c: Consts) -> Result<()> {
        let var = &self.param.var;
        let dtype = var.dtype();
        // Scaled in the gradient's dtype, as a separate scaling pass would leave it.
        let g = if c.grad_scale != 1.0 {
            working(&scaled_grad(grad, c.grad_scale)?)?
        } else {
            working(grad)?
        };

        // m ← m + (1 − β1)(g − m)   (torch's lerp_)
        let m = working(self.exp_avg.as_tensor())?;
        let mut next = (&g - &m)?;
        next = next.affine(1.0 - ADAM_BETA1, 0.0)?;
        next = (next + m)?;
        self.exp_avg.set(&next.to_dtype(dtype)?)?;
        drop(next);

        // v ← v + (1 − β2)(g² − v)
        let mut next = g.sqr()?;
        drop(g);
        let v = working(self.exp_avg_sq.as_tensor())?;
        next = (next - &v)?;
        next = next.affine(1.0 - ADAM_BETA2, 0.0)?;
        next = (next + v)?;
        self.exp_avg_sq.set(&next.to_dtype(dtype)?)?;
        drop(next);

        // update = (lr / bc1) · m / (√v / √bc2 + eps), from the stored (rounded) moments.
        let mut update = working(self.exp_avg_sq.as_tensor())?.sqrt()?;
        update = update.affine(1.0 / c.bias_correction2.sqrt(), ADAM_EPS)?;
        update = (working(self.exp_avg.as_tensor())? / update)?;
        update = update.affine(c.step_size, 0.0)?;

        // p ← p·(1 − lr·wd), then p ← p − update: torch's order and roundings.
        if c.decay != 1.0 {
            let decayed = working(var.as_tensor())?.affine(c.decay, 0.0)?;
            var.set(&decayed.to_dtype(dtype)?)?;
        }
        let next = (working(var.as_tensor())? - update)?;
        var.set(&next.to_dtype(dtype)?)
    }
}

impl AdamW {
    /// The constants of the step counted last.
    fn consts(&self, lr: f64, grad_scale: f64) -> Consts {
        let t = self.step as f64;
        let bias_correction1 = 1.0 - ADAM_BETA1.powf(t);
        Consts {
            bias_correction2: 1.0 - ADAM_BETA2.powf(t),
            step_size: lr / bias_correction1,
            decay: 1.0 - lr * self.weight_decay,
            grad_scale,
        }
    }

    /// One update from `grads` multiplied by `grad_scale` ([`Optimizer::update_scaled`]).
    fn update_with(&self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        let c = self.consts(lr, grad_scale);
        for slot in &self.slots {
            let Some(grad) = grads.get(slot.param.var.as_tensor()) else {
                continue;
            };
            let state = [
                slot.param.var.as_tensor(),
                slot.exp_avg.as_tensor(),
                slot.exp_avg_sq.as_tensor(),
                grad,
            ];
            if in_place(&state) {
                slot.update_in_place(grad, c)?;
            } else {
                slot.update_with_ops(grad, c)?;
            }
        }
        Ok(())
    }
}

impl AdamW {
    /// `var`'s slot, and its parameter and moments as tensors.
    fn slot_of(&self, var: &Var) -> Option<[&Tensor; 3]> {
        let id = var.as_tensor().id();
        self.slots
            .iter()
            .find(|s| s.param.var.as_tensor().id() == id)
            .map(|s| {
                [
                    s.param.var.as_tensor(),
                    s.exp_avg.as_tensor(),
                    s.exp_avg_sq.as_tensor(),
                ]
            })
    }
}

impl Optimizer for AdamW {
    fn begin_step(&mut self) {
        self.step += 1;
    }

    fn updates_rows(&self, var: &Var) -> bool {
        self.slot_of(var)
            .is_some_and(|state| state[0].rank() == 2 && in_place(&state))
    }

    fn update_rows(&mut self, var: &Var, start: usize, grad: &Tensor, lr: f64) -> Result<()> {
        let Some(state) = self.slot_of(var) else {
            candle_core::bail!("adamw: rows of a parameter it does not update");
        };
        let rows = grad.dim(0)?;
        let [p, m, v] = state.map(|t| t.narrow(0, start, rows));
        let (p, m, v) = (p?, m?, v?);
        if !in_place(&[&p, &m, &v, grad]) {
            candle_core::bail!("adamw: rows update needs the CPU's in-place kernels");
        }
        update_in_place(&p, &m, &v, grad, self.consts(lr, 1.0))
    }

    fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.update_with(grads, lr, 1.0)
    }

    fn update_scaled(&mut self, grads: &mut GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.update_with(grads, lr, grad_scale)
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

    /// The CPU's in-place passes and candle's ops give the same bits, step after step, in f32
    /// and bf16, with weight decay: parameters and both moments.
    #[test]
    fn in_place_update_matches_the_ops_bit_for_bit() -> Result<()> {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let make = || -> Result<AdamW> {
                let p = Tensor::randn(0f32, 1.0, (3, 700), &Device::Cpu)?;
                let params = vec![Param {
                    name: "p".into(),
                    var: Var::from_tensor(&p.to_dtype(dtype)?)?,
                }];
                let hyper = Hyper {
                    weight_decay: 0.1,
                    ..Hyper::default()
                };
                AdamW::new(params, &hyper)
            };
            let (mut fused, mut ops) = (make()?, make()?);
            ops.slots[0]
                .param
                .var
                .set(fused.slots[0].param.var.as_tensor())?;
            for step in 0..4 {
                let g = (Tensor::randn(0f32, 1.0, (3, 700), &Device::Cpu)? * 10f64.powi(-step))?
                    .to_dtype(dtype)?;
                fused.begin_step();
                let c = fused.consts(1e-2, 1.0);
                assert!(in_place(&[fused.slots[0].param.var.as_tensor(), &g]));
                fused.slots[0].update_in_place(&g, c)?;
                ops.begin_step();
                let c = ops.consts(1e-2, 1.0);
                ops.slots[0].update_with_ops(&g, c)?;
                let bits = |t: &Tensor| -> Result<Vec<f32>> {
                    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
                };
                for (a, b) in [
                    (&fused.slots[0].param.var, &ops.slots[0].param.var),
                    (&fused.slots[0].exp_avg, &ops.slots[0].exp_avg),
                    (&fused.slots[0].exp_avg_sq, &ops.slots[0].exp_avg_sq),
                ] {
                    let (a, b) = (bits(a.as_tensor())?, bits(b.as_tensor())?);
                    let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{dtype:?} step {step}: the two updates differ");
                }
            }
        }
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

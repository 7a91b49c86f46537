//! 8-bit AdamW as bitsandbytes' `AdamW8bit` (block-wise variant; Dettmers et al., arXiv 2110.02861):
//! both moments stored as one byte per element, a code into a 256-entry "dynamic" quantization map
//! (signed for the first moment, unsigned for the second), scaled by one f32 absmax per block of 256
//! elements. Tensors with fewer than 4096 elements keep f32 moments, as bitsandbytes does.
//!
//! A step dequantizes a block, updates the moments and the parameter in f32, then requantizes the
//! block against its new absmax, each value to the nearest map entry. The arithmetic runs on the
//! host in plain loops over slices: in place for a CPU parameter, whose state lives in host vectors.
//! A parameter on another device keeps its state there (so a device memory probe sees it), and each
//! step copies parameter, gradient and state to the host, updates them, and copies parameter and
//! state back: correct on any device, but slow on a GPU (there is no CUDA kernel).

use super::{
    ADAM_BETA1, ADAM_BETA2, ADAM_EPS, Optimizer, Param, STEP_STATE, lookup, read_step, step_tensor,
    validate,
};
use crate::config::Hyper;
use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, DType, Device, InplaceOp2, Layout, Result, Shape, Tensor, WithDType,
};
use std::cell::RefCell;
use std::collections::HashMap;

/// Elements per quantization block (one absmax per block and state).
pub const BLOCK_SIZE: usize = 256;
/// Tensors with fewer elements keep f32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// A sorted 256-entry quantization map and the decision thresholds between its neighbours.
pub struct QuantMap {
    values: [f32; 256],
    /// `thresholds[k]` is the midpoint of `values[k - 1]` and `values[k]`; `thresholds[0]` is −∞.
    /// The code of `x` is the largest `k` with `thresholds[k] <= x`: the nearest value. In f64,
    /// where the midpoint of two f32 values is exact (an f32 midpoint can round across `x`).
    thresholds: [f64; 256],
}

impl QuantMap {
    /// bitsandbytes' `create_dynamic_map(signed)` (7 exponent bits, 8 bits in all): for decade
    /// i = 0..6, the midpoints of `linspace(0.1, 1, k + 1)` times 10^(i − 6), with k = 2^i intervals
    /// (signed, each value also negated) or 2^(i + 1) (unsigned); then 0 and 1, sorted. Computed in
    /// f32 as torch does.
    pub fn dynamic(signed: bool) -> Self {
        let mut values = Vec::with_capacity(256);
        for i in 0..7 {
            let intervals = if signed {
                1usize << i
            } else {
                1usize << (i + 1)
            };
            let boundaries = linspace_f32(0.1, 1.0, intervals + 1);
            let scale = 10f64.powi(i - 6) as f32;
            for pair in boundaries.windows(2) {
                let mean = (pair[0] + pair[1]) / 2.0;
                values.push(scale * mean);
                if signed {
                    values.push(-(scale * mean));
                }
            }
        }
        values.push(0.0);
        values.push(1.0);
        values.sort_by(f32::total_cmp);
        let values: [f32; 256] = values
            .try_into()
            .expect("the dynamic map has 127·2 + 2 (signed) or 254 + 2 (unsigned) entries");
        let mut thresholds = [f64::NEG_INFINITY; 256];
        for k in 1..256 {
            thresholds[k] = (values[k - 1] as f64 + values[k] as f64) / 2.0;
        }
        Self { values, thresholds }
    }

    pub fn values(&self) -> &[f32; 256] {
        &self.values
    }

    #[inline]
    pub fn dequantize(&self, code: u8) -> f32 {
        self.values[code as usize]
    }

    /// The code of the map entry nearest to `x` (binary search over the midpoints, branch-free).
    #[inline]
    pub fn quantize(&self, x: f32) -> u8 {
        let x = x as f64;
        let mut k = 0usize;
        for step in [128, 64, 32, 16, 8, 4, 2, 1] {
            if self.thresholds[k + step] <= x {
                k += step;
            }
        }
        k as u8
    }
}

/// torch.linspace in f32: the first half counts up from `start`, the second down from `end`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// Quantizes `values` (one block) against `absmax` into `codes`.
fn quantize_block(values: &[f32], absmax: f32, map: &QuantMap, codes: &mut [u8]) {
    // An all-zero block has absmax 0: every value is 0 and any code dequantizes to 0 · 0.
    let inverse = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
    for (code, &value) in codes.iter_mut().zip(values) {
        *code = map.quantize(value * inverse);
    }
}

/// Block-wise quantization of a whole slice: codes and one absmax per block.
pub fn quantize_blockwise(values: &[f32], map: &QuantMap) -> (Vec<u8>, Vec<f32>) {
    let mut codes = vec![0u8; values.len()];
    let mut absmax = Vec::with_capacity(values.len().div_ceil(BLOCK_SIZE));
    for (block, codes) in values.chunks(BLOCK_SIZE).zip(codes.chunks_mut(BLOCK_SIZE)) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        quantize_block(block, max, map, codes);
        absmax.push(max);
    }
    (codes, absmax)
}

/// The inverse of `quantize_blockwise`.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], map: &QuantMap) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &code)| map.dequantize(code) * absmax[i / BLOCK_SIZE])
        .collect()
}

/// Both moments of one parameter, on the host.
enum Moments {
    /// ≥ `MIN_8BIT_SIZE` elements: codes (`state1` signed map, `state2` unsigned) and block absmax.
    Blockwise {
        state1: Vec<u8>,
        state2: Vec<u8>,
        absmax1: Vec<f32>,
        absmax2: Vec<f32>,
    },
    /// Small tensors: plain f32 moments.
    Full { state1: Vec<f32>, state2: Vec<f32> },
}

const BLOCKWISE_NAMES: [&str; 4] = ["state1", "state2", "absmax1", "absmax2"];
const FULL_NAMES: [&str; 2] = ["state1", "state2"];

impl Moments {
    fn zeros(elements: usize) -> Self {
        if elements >= MIN_8BIT_SIZE {
            // Codes 0 with absmax 0 dequantize to 0: zeroed memory is the zero state.
            let blocks = elements.div_ceil(BLOCK_SIZE);
            Moments::Blockwise {
                state1: vec![0; elements],
                state2: vec![0; elements],
                absmax1: vec![0.0; blocks],
                absmax2: vec![0.0; blocks],
            }
        } else {
            Moments::Full {
                state1: vec![0.0; elements],
                state2: vec![0.0; elements],
            }
        }
    }

    fn bytes(elements: usize) -> u64 {
        let elements = elements as u64;
        if elements >= MIN_8BIT_SIZE as u64 {
            2 * elements + 2 * 4 * elements.div_ceil(BLOCK_SIZE as u64)
        } else {
            2 * 4 * elements
        }
    }

    fn names(elements: usize) -> &'static [&'static str] {
        if elements >= MIN_8BIT_SIZE {
            &BLOCKWISE_NAMES
        } else {
            &FULL_NAMES
        }
    }

    /// The expected (dtype, shape) of each named tensor, in `names` order.
    fn layouts(shape: &Shape) -> Vec<(DType, Shape)> {
        let elements = shape.elem_count();
        if elements >= MIN_8BIT_SIZE {
            let blocks = Shape::from(elements.div_ceil(BLOCK_SIZE));
            vec![
                (DType::U8, shape.clone()),
                (DType::U8, shape.clone()),
                (DType::F32, blocks.clone()),
                (DType::F32, blocks),
            ]
        } else {
            vec![(DType::F32, shape.clone()), (DType::F32, shape.clone())]
        }
    }

    /// Copies the moments into tensors on `device`, in `names` order.
    fn to_tensors(&self, shape: &Shape, device: &Device) -> Result<Vec<Tensor>> {
        match self {
            Moments::Blockwise {
                state1,
                state2,
                absmax1,
                absmax2,
            } => Ok(vec![
                Tensor::from_slice(state1, shape, device)?,
                Tensor::from_slice(state2, shape, device)?,
                Tensor::from_slice(absmax1, absmax1.len(), device)?,
                Tensor::from_slice(absmax2, absmax2.len(), device)?,
            ]),
            Moments::Full { state1, state2 } => Ok(vec![
                Tensor::from_slice(state1, shape, device)?,
                Tensor::from_slice(state2, shape, device)?,
            ]),
        }
    }

    /// Reads moments back from tensors in `names` order (already checked against `layouts`).
    fn from_tensors(elements: usize, tensors: &[Tensor]) -> Result<Self> {
        let flat = |i: usize| tensors[i].flatten_all();
        if elements >= MIN_8BIT_SIZE {
            Ok(Moments::Blockwise {
                state1: flat(0)?.to_vec1::<u8>()?,
                state2: flat(1)?.to_vec1::<u8>()?,
                absmax1: flat(2)?.to_vec1::<f32>()?,
                absmax2: flat(3)?.to_vec1::<f32>()?,
            })
        } else {
            Ok(Moments::Full {
                state1: flat(0)?.to_vec1::<f32>()?,
                state2: flat(1)?.to_vec1::<f32>()?,
            })
        }
    }

    fn len(&self) -> usize {
        match self {
            Moments::Blockwise { state1, .. } => state1.len(),
            Moments::Full { state1, .. } => state1.len(),
        }
    }
}

/// Where a parameter's moments live: host vectors for a CPU parameter, tensors (in
/// `Moments::names` order) on the parameter's device otherwise.
enum Stored {
    Host(Moments),
    Device(Vec<Tensor>),
}

struct Slot {
    param: Param,
    stored: Stored,
}

/// Per-step scalars, in f32 as bitsandbytes' kernels compute them.
#[derive(Clone, Copy)]
struct StepConstants {
    beta1: f32,
    beta2: f32,
    /// −lr · √(1 − β2^t) / (1 − β1^t)
    step_size: f32,
    /// eps · √(1 − β2^t)
    eps_scaled: f32,
    /// 1 − lr · weight_decay, applied after the update when weight decay is on.
    decay: Option<f32>,
}

impl StepConstants {
    fn new(step: u64, lr: f64, weight_decay: f64) -> Self {
        let t = step as f64;
        let correction1 = 1.0 - ADAM_BETA1.powf(t);
        let correction2 = (1.0 - ADAM_BETA2.powf(t)).sqrt();
        Self {
            beta1: ADAM_BETA1 as f32,
            beta2: ADAM_BETA2 as f32,
            step_size: (-lr * correction2 / correction1) as f32,
            eps_scaled: (ADAM_EPS * correction2) as f32,
            decay: (weight_decay > 0.0).then_some((1.0 - lr * weight_decay) as f32),
        }
    }

    /// One element of bitsandbytes' Adam update: the moments in place, the new parameter returned.
    /// A non-finite gradient zeroes both moments and leaves the parameter alone.
    #[inline]
    fn apply(&self, p: f32, g: f32, m: &mut f32, v: &mut f32) -> f32 {
        if !g.is_finite() {
            *m = 0.0;
            *v = 0.0;
            return p;
        }
        *m = *m * self.beta1 + (1.0 - self.beta1) * g;
        *v = *v * self.beta2 + (1.0 - self.beta2) * g * g;
        let p = p + self.step_size * (*m / (v.sqrt() + self.eps_scaled));
        match self.decay {
            Some(decay) => p * decay,
            None => p,
        }
    }
}

/// The update of one parameter over host slices.
fn update_slices<T: WithDType>(
    p: &mut [T],
    g: &[T],
    moments: &mut Moments,
    signed: &QuantMap,
    unsigned: &QuantMap,
    k: StepConstants,
) {
    match moments {
        Moments::Full { state1, state2 } => {
            for (((p, g), m), v) in p.iter_mut().zip(g).zip(state1).zip(state2) {
                let next = k.apply(p.to_f64() as f32, g.to_f64() as f32, m, v);
                *p = T::from_f64(next as f64);
            }
        }
        Moments::Blockwise {
            state1,
            state2,
            absmax1,
            absmax2,
        } => {
            // The block's moments in f32 between the update and the requantization.
            let mut m = [0f32; BLOCK_SIZE];
            let mut v = [0f32; BLOCK_SIZE];
            let blocks = p
                .chunks_mut(BLOCK_SIZE)
                .zip(g.chunks(BLOCK_SIZE))
                .zip(state1.chunks_mut(BLOCK_SIZE))
                .zip(state2.chunks_mut(BLOCK_SIZE))
                .zip(absmax1.iter_mut().zip(absmax2.iter_mut()));
            for ((((p, g), codes1), codes2), (absmax1, absmax2)) in blocks {
                let (mut max1, mut max2) = (0f32, 0f32);
                for j in 0..p.len() {
                    m[j] = signed.dequantize(codes1[j]) * *absmax1;
                    v[j] = unsigned.dequantize(codes2[j]) * *absmax2;
                    let next = k.apply(
                        p[j].to_f64() as f32,
                        g[j].to_f64() as f32,
                        &mut m[j],
                        &mut v[j],
                    );
                    p[j] = T::from_f64(next as f64);
                    max1 = max1.max(m[j].abs());
                    max2 = max2.max(v[j]);
                }
                *absmax1 = max1;
                *absmax2 = max2;
                quantize_block(&m[..p.len()], max1, signed, codes1);
                quantize_block(&v[..p.len()], max2, unsigned, codes2);
            }
        }
    }
}

/// The host update as an in-place candle op on the parameter's CPU storage (gradient read-only).
struct HostStep<'a> {
    moments: RefCell<&'a mut Moments>,
    signed: &'a QuantMap,
    unsigned: &'a QuantMap,
    constants: StepConstants,
}

impl InplaceOp2 for HostStep<'_> {
    fn name(&self) -> &'static str {
        "adamw8bit-step"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, pl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let Some((p0, p1)) = pl.contiguous_offsets() else {
            candle_core::bail!("adamw8bit: parameter is not contiguous")
        };
        let Some((g0, g1)) = gl.contiguous_offsets() else {
            candle_core::bail!("adamw8bit: gradient is not contiguous")
        };
        let mut moments = self.moments.borrow_mut();
        if p1 - p0 != g1 - g0 || p1 - p0 != moments.len() {
            candle_core::bail!(
                "adamw8bit: parameter, gradient and state sizes differ ({}, {}, {})",
                p1 - p0,
                g1 - g0,
                moments.len()
            );
        }
        let (s, u, k) = (self.signed, self.unsigned, self.constants);
        match (p, g) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => {
                update_slices(&mut p[p0..p1], &g[g0..g1], &mut moments, s, u, k)
            }
            (CpuStorage::BF16(p), CpuStorage::BF16(g)) => {
                update_slices(&mut p[p0..p1], &g[g0..g1], &mut moments, s, u, k)
            }
            (CpuStorage::F16(p), CpuStorage::F16(g)) => {
                update_slices(&mut p[p0..p1], &g[g0..g1], &mut moments, s, u, k)
            }
            (CpuStorage::F64(p), CpuStorage::F64(g)) => {
                update_slices(&mut p[p0..p1], &g[g0..g1], &mut moments, s, u, k)
            }
            (p, g) => candle_core::bail!(
                "adamw8bit: parameter dtype {:?} with gradient dtype {:?}",
                p.dtype(),
                g.dtype()
            ),
        }
        Ok(())
    }
}

pub struct AdamW8bit {
    slots: Vec<Slot>,
    signed: QuantMap,
    unsigned: QuantMap,
    weight_decay: f64,
    step: u64,
}

impl AdamW8bit {
    pub fn new(params: Vec<Param>, hyper: &Hyper) -> Result<Self> {
        Self::with_residence(params, hyper, crate::engine::cpu_paths)
    }

    /// `on_host(device)` chooses host vectors over device tensors for a parameter's state (the
    /// tests force the device path on a CPU).
    fn with_residence(
        params: Vec<Param>,
        hyper: &Hyper,
        on_host: impl Fn(&Device) -> bool,
    ) -> Result<Self> {
        validate(&params)?;
        let slots = params
            .into_iter()
            .map(|param| {
                let moments = Moments::zeros(param.var.elem_count());
                let stored = if on_host(param.var.device()) {
                    Stored::Host(moments)
                } else {
                    Stored::Device(moments.to_tensors(param.var.shape(), param.var.device())?)
                };
                Ok(Slot { param, stored })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            signed: QuantMap::dynamic(true),
            unsigned: QuantMap::dynamic(false),
            weight_decay: hyper.weight_decay,
            step: 0,
        })
    }
}

impl Optimizer for AdamW8bit {
    fn begin_step(&mut self) {
        self.step += 1;
    }

    fn update(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let constants = StepConstants::new(self.step, lr, self.weight_decay);
        for slot in &mut self.slots {
            let var = &slot.param.var;
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let grad = grad.detach().to_dtype(var.dtype())?;
            match &mut slot.stored {
                Stored::Host(moments) => {
                    let op = HostStep {
                        moments: RefCell::new(moments),
                        signed: &self.signed,
                        unsigned: &self.unsigned,
                        constants,
                    };
                    var.as_tensor().inplace_op2(&grad.contiguous()?, &op)?;
                }
                Stored::Device(tensors) => {
                    let host = Device::Cpu;
                    let mut moments = Moments::from_tensors(var.elem_count(), tensors)?;
                    // A host copy of the parameter (for a CPU parameter, its own storage).
                    let p = var.as_detached_tensor().to_device(&host)?;
                    let g = grad.to_device(&host)?.contiguous()?;
                    let op = HostStep {
                        moments: RefCell::new(&mut moments),
                        signed: &self.signed,
                        unsigned: &self.unsigned,
                        constants,
                    };
                    p.inplace_op2(&g, &op)?;
                    if !var.device().is_cpu() {
                        var.set(&p.to_device(var.device())?)?;
                    }
                    *tensors = moments.to_tensors(var.shape(), var.device())?;
                }
            }
        }
        Ok(())
    }

    fn state_bytes(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| Moments::bytes(s.param.var.elem_count()))
            .sum()
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(STEP_STATE.to_string(), step_tensor(self.step)?)];
        for slot in &self.slots {
            let var = &slot.param.var;
            let tensors = match &slot.stored {
                Stored::Host(moments) => moments.to_tensors(var.shape(), &Device::Cpu)?,
                Stored::Device(tensors) => tensors.clone(),
            };
            let names = Moments::names(var.elem_count());
            for (state, tensor) in names.iter().zip(tensors) {
                out.push((format!("{}.{state}", slot.param.name), tensor));
            }
        }
        Ok(out)
    }

    fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let step = read_step(state)?;
        // Check and convert everything before replacing anything, so a bad file changes nothing.
        let mut loaded = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let var = &slot.param.var;
            let names = Moments::names(var.elem_count());
            let mut tensors = Vec::with_capacity(names.len());
            for (state_name, (dtype, shape)) in names.iter().zip(Moments::layouts(var.shape())) {
                let name = format!("{}.{state_name}", slot.param.name);
                let saved = lookup(state, &name)?;
                if saved.shape() != &shape {
                    candle_core::bail!(
                        "optimizer state `{name}`: saved shape {:?}, expected {:?}",
                        saved.dims(),
                        shape.dims()
                    );
                }
                if saved.dtype() != dtype {
                    candle_core::bail!(
                        "optimizer state `{name}`: saved dtype {:?}, expected {dtype:?}",
                        saved.dtype()
                    );
                }
                tensors.push(saved.to_device(var.device())?);
            }
            loaded.push(match slot.stored {
                Stored::Host(_) => Stored::Host(Moments::from_tensors(var.elem_count(), &tensors)?),
                Stored::Device(_) => Stored::Device(tensors),
            });
        }
        for (slot, stored) in self.slots.iter_mut().zip(loaded) {
            slot.stored = stored;
        }
        self.step = step;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "adamw8bit"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::optim::adamw::AdamW;
    use crate::engine::optim::testkit::{LeastSquares, pseudo_random, values};
    use candle_core::Var;

    /// The index of the map entry nearest to `x`, by brute force.
    fn nearest(map: &QuantMap, x: f32) -> usize {
        let distance = |k: usize| (map.values()[k] - x).abs();
        (0..256)
            .min_by(|&a, &b| distance(a).total_cmp(&distance(b)))
            .unwrap_or(0)
    }

    #[test]
    fn dynamic_maps_have_the_documented_shape() {
        for (signed, smallest, lowest) in
            [(true, 5.5e-7f32, -0.992_968_75f32), (false, 3.25e-7, 0.0)]
        {
            let map = QuantMap::dynamic(signed);
            let values = map.values();
            assert!(
                values.windows(2).all(|w| w[0] < w[1]),
                "signed {signed}: not strictly sorted"
            );
            assert_eq!(values[255], 1.0);
            // Signed: the last decade's largest midpoint, 1 − 0.9/128, negated; unsigned: 0.
            assert!(
                (values[0] - lowest).abs() < 1e-7,
                "signed {signed}: {}",
                values[0]
            );
            assert!(values.contains(&0.0));
            // bitsandbytes: 0.55e-6 signed (the one midpoint of [0.1, 1] in the 1e-6 decade),
            // 0.325e-6 unsigned (the first of two midpoints).
            let min_positive = values
                .iter()
                .copied()
                .filter(|&v| v > 0.0)
                .fold(1.0, f32::min);
            assert!(
                (min_positive - smallest).abs() < 1e-12,
                "signed {signed}: {min_positive}"
            );
            if signed {
                // Symmetric apart from 1.0, which has no negative twin.
                for k in 0..127 {
                    assert_eq!(values[k], -values[254 - k]);
                }
            }
        }
    }

    #[test]
    fn quantize_picks_the_nearest_entry() {
        for signed in [true, false] {
            let map = QuantMap::dynamic(signed);
            for (code, &value) in map.values().iter().enumerate() {
                assert_eq!(
                    map.quantize(value) as usize,
                    code,
                    "entry {value} maps to itself"
                );
            }
            // A dense grid in [−1, 1] (or [0, 1]) plus values around the smallest entries.
            let low = if signed { -1.0 } else { 0.0 };
            let grid = (0..=20_000).map(|i| low + (1.0 - low) * i as f32 / 20_000.0);
            let tiny = (0..=200).map(|i| low * 1e-5 + (1e-5 - low * 1e-5) * i as f32 / 200.0);
            for x in grid.chain(tiny) {
                let code = map.quantize(x) as usize;
                let (got, best) = (map.values()[code], map.values()[nearest(&map, x)]);
                assert!(
                    (got - x).abs() <= (best - x).abs(),
                    "x {x}: got {got}, nearest {best}"
                );
            }
        }
    }

    /// Block-wise round trip: each value comes back as the nearest map entry times its block's
    /// absmax, so the error is at most half the gap between the two entries around it (scaled);
    /// below the signed map's lowest entry (−0.99296875: −1 has no entry), the distance to it.
    #[test]
    fn blockwise_round_trip_is_within_the_map_resolution() {
        let map = QuantMap::dynamic(true);
        // 1000 values (4 blocks, the last partial) spanning several decades of magnitude.
        let values: Vec<f32> = pseudo_random(1000, 9)
            .iter()
            .enumerate()
            .map(|(i, v)| v * 10f32.powi(-((i % 5) as i32)))
            .collect();
        let (codes, absmax) = quantize_blockwise(&values, &map);
        assert_eq!(absmax.len(), 4);
        for (block, &max) in values.chunks(BLOCK_SIZE).zip(&absmax) {
            assert_eq!(max, block.iter().fold(0f32, |m, v| m.max(v.abs())));
        }
        let restored = dequantize_blockwise(&codes, &absmax, &map);
        let entries = map.values();
        for (i, (&x, &y)) in values.iter().zip(&restored).enumerate() {
            let scale = absmax[i / BLOCK_SIZE];
            let normalized = x / scale;
            let bound = if normalized < entries[0] {
                entries[0] - normalized
            } else {
                let k = entries.partition_point(|&v| v < normalized).clamp(1, 255);
                (entries[k] - entries[k - 1]) / 2.0
            };
            // 1e-6 relative slack for the f32 rounding of x / scale and code · scale.
            assert!(
                (x - y).abs() <= bound * scale * 1.000_001,
                "{i}: {x} -> {y}"
            );
        }
    }

    /// One step from zero state equals fp32 AdamW's to f32 rounding: the moments are updated in
    /// f32 before any quantization, and bitsandbytes' `eps · √(1 − β2^t)` form is AdamW's
    /// `√v̂ + eps` multiplied through by √(1 − β2^t).
    #[test]
    fn first_step_equals_fp32_adamw() -> Result<()> {
        let problem = LeastSquares::new(128, 64, 80, DType::F32)?;
        let (a, b) = (problem.params()?, problem.params()?);
        let mut eight = AdamW8bit::new(a.clone(), &Hyper::default())?;
        let mut full = AdamW::new(b.clone(), &Hyper::default())?;
        eight.step(&problem.loss_and_grads(&a)?.1, 1e-2)?;
        full.step(&problem.loss_and_grads(&b)?.1, 1e-2)?;
        for (x, y) in values(&a)?
            .iter()
            .flatten()
            .zip(values(&b)?.iter().flatten())
        {
            assert!((x - y).abs() <= 1e-7, "{x} vs {y}");
        }
        Ok(())
    }

    /// A non-finite gradient element zeroes that element's moments and leaves its parameter alone;
    /// the others update. Checked on both the f32-state path (16 elements) and the 8-bit one.
    #[test]
    fn non_finite_gradients_are_skipped() -> Result<()> {
        for n in [16usize, 4096] {
            let var = Var::ones(n, DType::F32, &Device::Cpu)?;
            let mut g = vec![1f32; n];
            g[3] = f32::NAN;
            g[5] = f32::INFINITY;
            let grads = (var.as_tensor() * Tensor::new(g.as_slice(), &Device::Cpu)?)?
                .sum_all()?
                .backward()?;
            let params = vec![Param {
                name: "p".into(),
                var: var.clone(),
            }];
            let mut optimizer = AdamW8bit::new(params, &Hyper::default())?;
            optimizer.step(&grads, 0.1)?;
            let p = var.to_vec1::<f32>()?;
            assert_eq!((p[3], p[5]), (1.0, 1.0), "n {n}");
            assert!((p[0] - 0.9).abs() < 1e-6, "n {n}: {}", p[0]);
            let state: HashMap<String, Tensor> = optimizer.state_tensors()?.into_iter().collect();
            let (m, v) = (&state["p.state1"], &state["p.state2"]);
            let (m, v) = if n < MIN_8BIT_SIZE {
                (m.to_vec1::<f32>()?, v.to_vec1::<f32>()?)
            } else {
                let (s, u) = (QuantMap::dynamic(true), QuantMap::dynamic(false));
                let m =
                    dequantize_blockwise(&m.to_vec1::<u8>()?, &state["p.absmax1"].to_vec1()?, &s);
                let v =
                    dequantize_blockwise(&v.to_vec1::<u8>()?, &state["p.absmax2"].to_vec1()?, &u);
                (m, v)
            };
            assert_eq!((m[3], m[5], v[3], v[5]), (0.0, 0.0, 0.0, 0.0), "n {n}");
            // 0.1 and 0.001 as 1 − β in f32 (bitsandbytes' arithmetic), to 1e-4 relative.
            assert!(
                (m[0] - 0.1).abs() < 1e-5 && (v[0] - 0.001).abs() < 1e-7,
                "n {n}: {m:?} {v:?}"
            );
        }
        Ok(())
    }

    /// The path for parameters off the CPU (state as device tensors, copied to the host and back
    /// each step), forced on CPU tensors: it must take exactly the steps the host path takes, and
    /// its state must round-trip through `state_tensors` like the host path's.
    #[test]
    fn device_resident_state_steps_like_host_state() -> Result<()> {
        let problem = LeastSquares::new(128, 64, 80, DType::F32)?;
        let hyper = Hyper {
            weight_decay: 0.1,
            ..Hyper::default()
        };
        let (a, b) = (problem.params()?, problem.params()?);
        let mut host = AdamW8bit::new(a.clone(), &hyper)?;
        let mut device = AdamW8bit::with_residence(b.clone(), &hyper, |_| false)?;
        assert!(matches!(device.slots[0].stored, Stored::Device(_)));
        assert_eq!(device.state_bytes(), host.state_bytes());
        for _ in 0..3 {
            host.step(&problem.loss_and_grads(&a)?.1, 1e-2)?;
            device.step(&problem.loss_and_grads(&b)?.1, 1e-2)?;
        }
        assert!(values(&a)? == values(&b)?);
        let saved: HashMap<String, Tensor> = host.state_tensors()?.into_iter().collect();
        let from_device: HashMap<String, Tensor> = device.state_tensors()?.into_iter().collect();
        for (name, tensor) in &saved {
            let other = &from_device[name];
            assert_eq!(tensor.dims(), other.dims(), "{name}");
            let (x, y) = (
                tensor.flatten_all()?.to_dtype(DType::F64)?,
                other.flatten_all()?.to_dtype(DType::F64)?,
            );
            assert!(x.to_vec1::<f64>()? == y.to_vec1::<f64>()?, "{name}");
        }
        // Host-saved state loads into a device-resident optimizer and vice versa.
        device.load_state_tensors(&saved)?;
        host.load_state_tensors(&from_device)?;
        Ok(())
    }
}

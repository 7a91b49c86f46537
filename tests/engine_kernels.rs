//! The fused CPU kernels against candle's composite ops in f64: values and gradients, in every
//! dtype the kernels store, on shapes that cross their parallel chunk boundaries. And an fp32 model
//! (which runs the fused path) against the same model in f64 (which runs candle's ops).

use candle_core::{DType, Device, Tensor, Var};
use memtune::config::{Knobs, Method, Precision};
use memtune::data::random_batch;
use memtune::engine::kernels::{exp_in_place, exp_tensor, scaled_causal_softmax, swiglu};
use memtune::engine::model::{Dtypes, Model, RandomInit, causal_mask};
use memtune::engine::ops::swiglu as swiglu_any_device;
use memtune::engine::ops::{
    LossTargets, RowGrads, causal_attention, causal_softmax, chunked_cross_entropy, embedding,
    full_cross_entropy, rms_norm,
};
use memtune::engine::step::{Batch, NoObserver, forward_backward};
use memtune::spec::ModelSpec;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A fixed pseudo-random fill, so that failures reproduce.
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<f64> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 6.0 - 3.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The bits of `t`'s values widened to f32 (exact from f32, bf16 and f16), so that equal bits
/// mean equal values.
fn bits(t: &Tensor) -> Vec<u32> {
    let wide = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    wide.to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Largest |a − b| relative to the largest |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (to_vec(a), to_vec(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Value and input gradients of `Σ f(inputs) ⊙ w`, with the inputs cast to `dtype`.
fn value_and_grads(
    inputs: &[Tensor],
    w: &Tensor,
    dtype: DType,
    f: impl Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let loss = (out.to_dtype(DType::F64).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let gs = ts
        .iter()
        .map(|t| grads.get(t).expect("a gradient for every input").clone())
        .collect();
    (out, gs)
}

/// Tolerances per dtype: f32 rounding, and one bf16/f16 rounding of outputs and inputs.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

/// A kernel's output dtype, and its value and input gradients within [`tolerance`] of the reference.
fn assert_all_close(dtype: DType, got: (&Tensor, &[Tensor]), want: (&Tensor, &[Tensor])) {
    assert_eq!(got.0.dtype(), dtype);
    let tol = tolerance(dtype);
    let e = rel_err(got.0, want.0);
    assert!(e < tol, "{dtype:?} value: {e}");
    for (k, (g, w)) in got.1.iter().zip(want.1).enumerate() {
        let e = rel_err(g, w);
        assert!(e < tol, "{dtype:?} gradient of input {k}: {e}");
    }
}

/// The in-place exponential (the chunked loss's composite gradient) writes exactly the values
/// `exp_tensor` makes, across parallel chunks, and leaves what it cannot do in place alone.
#[test]
fn exp_in_place_equals_exp_tensor_bit_for_bit() {
    let x = (randn(&[37, 3001], 5).to_dtype(DType::F32).unwrap() * 20.0).unwrap();
    let want: Vec<f32> = exp_tensor(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let y = x.copy().unwrap();
    assert!(exp_in_place(&y).unwrap());
    let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        want.iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let bf = x.to_dtype(DType::BF16).unwrap();
    assert!(!exp_in_place(&bf).unwrap());
    let t = x.t().unwrap();
    assert!(!exp_in_place(&t).unwrap());
    assert_eq!(
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        x.t()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
}

#[test]
fn swiglu_matches_silu_times_up_in_value_and_gradients() {
    // 3 rows × 16,389 columns: crosses the 16 Ki-element chunk boundary at odd offsets.
    let shape = [3, 16_389];
    let (g, u, w) = (randn(&shape, 1), randn(&shape, 2), randn(&shape, 3));
    let (want, want_grads) = value_and_grads(&[g.clone(), u.clone()], &w, DType::F64, |t| {
        (t[0].silu().unwrap() * &t[1]).unwrap()
    });
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // The reference sees the same rounded inputs.
        let (gd, ud) = (
            g.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap(),
            u.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap(),
        );
        let (want, want_grads) = if dtype == DType::F32 {
            (want.clone(), want_grads.clone())
        } else {
            value_and_grads(&[gd.clone(), ud.clone()], &w, DType::F64, |t| {
                (t[0].silu().unwrap() * &t[1]).unwrap()
            })
        };
        let (got, got_grads) =
            value_and_grads(&[gd, ud], &w, dtype, |t| swiglu(&t[0], &t[1]).unwrap());
        assert_all_close(dtype, (&got, &got_grads), (&want, &want_grads));
    }
}

/// The paths a GPU takes (candle's ops inside one op with a hand-written backward, which keeps
/// fewer tensors than candle's autograd would) against candle's autograd of the plain formula, run
/// here on the CPU in f64 and f32.
#[test]
fn any_device_swiglu_and_softmax_match_candles_autograd() {
    let shape = [2, 3, 19, 19];
    let (g, u, w) = (randn(&shape, 31), randn(&shape, 32), randn(&shape, 33));
    let (want, want_grads) = value_and_grads(&[g.clone(), u.clone()], &w, DType::F64, |t| {
        (t[0].silu().unwrap() * &t[1]).unwrap()
    });
    let mask = causal_mask(19, &Device::Cpu).unwrap();
    let scale = 0.3;
    let plain_softmax = |t: &[Tensor]| {
        let m = mask.to_dtype(t[0].dtype()).unwrap();
        candle_nn::ops::softmax(
            &(&t[0] * scale).unwrap().broadcast_add(&m).unwrap(),
            candle_core::D::Minus1,
        )
        .unwrap()
    };
    let (want_p, want_p_grads) =
        value_and_grads(std::slice::from_ref(&g), &w, DType::F64, plain_softmax);
    for dtype in [DType::F64, DType::F32] {
        let (got, got_grads) = value_and_grads(&[g.clone(), u.clone()], &w, dtype, |t| {
            swiglu_any_device(&t[0], &t[1]).unwrap()
        });
        assert_all_close(dtype, (&got, &got_grads), (&want, &want_grads));
        let (got, got_grads) = value_and_grads(std::slice::from_ref(&g), &w, dtype, |t| {
            causal_softmax(&t[0], &mask.to_dtype(dtype).unwrap(), scale).unwrap()
        });
        assert_all_close(dtype, (&got, &got_grads), (&want_p, &want_p_grads));
    }
}

/// Attention that keeps only q, k and v (backward recomputes the probabilities) against candle's
/// autograd of the plain formula in f64: in f64 (candle's ops on any device) and in the dtypes the
/// CPU's fused softmax kernels store; on 19 and 70 positions and 2 × 3 heads. v
/// comes as the model gives it, `[b, s, h, d]` (the projection's output, heads side by side), and
/// the output is `[b, s, h, d]`, contiguous.
#[test]
fn causal_attention_matches_candles_autograd() {
    // 19 positions: one row block of the CPU's causal products; 70: two, the second partial.
    for s in [19, 70] {
        attention_against_autograd(s);
    }
}

fn attention_against_autograd(s: usize) {
    let (shape, scale) = ([2, 3, s, 8], 0.35);
    let (q, k, v) = (
        (randn(&shape, 41) * 0.5).unwrap(),
        (randn(&shape, 42) * 0.5).unwrap(),
        randn(&[2, s, 3, 8], 43),
    );
    let w = randn(&[2, s, 3, 8], 44);
    let mask = causal_mask(s, &Device::Cpu).unwrap();
    let plain = |t: &[Tensor]| {
        let m = mask.to_dtype(t[0].dtype()).unwrap();
        let scores = t[0].matmul(&t[1].t().unwrap()).unwrap();
        let p = candle_nn::ops::softmax(
            &(scores * scale).unwrap().broadcast_add(&m).unwrap(),
            candle_core::D::Minus1,
        )
        .unwrap();
        let v = t[2].transpose(1, 2).unwrap().contiguous().unwrap();
        p.matmul(&v).unwrap().transpose(1, 2).unwrap()
    };
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        // The reference sees the same rounded inputs.
        let rounded: Vec<Tensor> = [&q, &k, &v]
            .iter()
            .map(|t| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap())
            .collect();
        let (want, want_grads) = value_and_grads(&rounded, &w, DType::F64, plain);
        let (got, got_grads) = value_and_grads(&rounded, &w, dtype, |t| {
            let out = causal_attention(&t[0], &t[1], &t[2], &mask.to_dtype(dtype).unwrap(), scale)
                .unwrap();
            assert!(out.is_contiguous(), "{dtype:?}: the output is contiguous");
            out
        });
        assert_all_close(dtype, (&got, &got_grads), (&want, &want_grads));
    }
}

#[test]
fn embedding_gradient_matches_index_select() {
    // Repeated ids (their rows sum), rows no id selects (zero), in f64 (candle's index_add), f32
    // and bf16 (the one-buffer scatter), against candle's index_select in f64.
    let table = randn(&[11, 6], 51);
    let ids = Tensor::new(&[3u32, 0, 3, 10, 7, 3, 0], &Device::Cpu).unwrap();
    let w = randn(&[7, 6], 52);
    let (_, want_grads) = value_and_grads(std::slice::from_ref(&table), &w, DType::F64, |t| {
        t[0].index_select(&ids, 0).unwrap()
    });
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        let rounded = table.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
        let (got, got_grads) = value_and_grads(std::slice::from_ref(&rounded), &w, dtype, |t| {
            embedding(&t[0], &ids).unwrap()
        });
        let want_value = rounded.index_select(&ids, 0).unwrap();
        assert_all_close(dtype, (&got, &got_grads), (&want_value, &want_grads));
        assert_eq!(got_grads[0].dtype(), dtype);
    }
    // An id outside the table is an error, not a panic.
    let var = Var::from_tensor(&table.to_dtype(DType::F32).unwrap()).unwrap();
    let bad = Tensor::new(&[11u32], &Device::Cpu).unwrap();
    assert!(
        embedding(var.as_tensor(), &bad)
            .and_then(|e| e.sum_all()?.backward())
            .is_err()
    );
}

#[test]
fn embedding_gradient_blocks_are_the_whole_gradient_bit_for_bit() {
    // An update by blocks of rows (`--update-in-backward`) builds each block of the table's
    // gradient from the looked-up rows' gradients: blocks of 4 rows (the last one short, one
    // without any id) put together must be the whole gradient backward makes, in every dtype the
    // scatter stores. Repeated ids sum in the ids' order, rounded at each addition.
    let table = randn(&[11, 6], 61);
    let ids = Tensor::new(&[3u32, 0, 3, 10, 7, 3, 0, 9, 8], &Device::Cpu).unwrap();
    let upstream = randn(&[9, 6], 62);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let var = Var::from_tensor(&table.to_dtype(dtype).unwrap()).unwrap();
        let grad = upstream.to_dtype(dtype).unwrap();
        let whole = (embedding(var.as_tensor(), &ids).unwrap() * &grad)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .remove(var.as_tensor())
            .unwrap();
        let rows = RowGrads::new(11, &ids, &grad).unwrap();
        assert_eq!((rows.vocab(), rows.hidden()), (11, 6));
        let blocks: Vec<Tensor> = (0..11)
            .step_by(4)
            .map(|first| rows.block(first, 4.min(11 - first)).unwrap())
            .collect();
        let joined = Tensor::cat(&blocks, 0).unwrap();
        assert_eq!(joined.dtype(), dtype);
        let bits = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!(bits(&joined), bits(&whole), "{dtype:?}");
        // Rows 4..8 hold only id 7; rows 1, 2, 4, 5 and 6 are zero.
        assert_eq!(bits(&rows.block(1, 2).unwrap()), vec![vec![0.0; 6]; 2]);
    }
    // Ids outside the table, a count that does not match the rows and a block past the end are
    // errors, not panics.
    let grad = upstream.to_dtype(DType::F32).unwrap();
    assert!(RowGrads::new(10, &ids, &grad).is_err());
    assert!(RowGrads::new(11, &ids.narrow(0, 0, 8).unwrap(), &grad).is_err());
    assert!(RowGrads::new(11, &ids, &grad).unwrap().block(8, 4).is_err());
}

#[test]
fn rms_norm_input_gradient_matches_the_composite() {
    // A frozen weight takes the fused input gradient: 37 rows of 896 cross the 16 Ki-element
    // chunks at row boundaries that are not chunk boundaries. The weight stays f32 (a LoRA model's
    // norms are frozen in the compute dtype; an f32 weight checks the conversion inside).
    let (x, c) = (randn(&[37, 896], 21), randn(&[37, 896], 22));
    let w = (randn(&[896], 23) * 0.5).unwrap().affine(1.0, 1.0).unwrap();
    let eps = 1e-6;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let xd = x.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
        let reference = |wd: DType| {
            let w = w.to_dtype(wd).unwrap();
            move |t: &[Tensor]| rms_norm(&t[0], &w, eps, false).unwrap()
        };
        let (want, want_grads) = value_and_grads(
            std::slice::from_ref(&xd),
            &c,
            DType::F64,
            reference(DType::F64),
        );
        for wd in [DType::F32, dtype] {
            // The weight as the kernel sees it, rounded like the reference's.
            let w_seen = w.to_dtype(wd).unwrap();
            let (want, want_grads) = if wd == DType::F32 {
                (want.clone(), want_grads.clone())
            } else {
                let w64 = w_seen.to_dtype(DType::F64).unwrap();
                value_and_grads(std::slice::from_ref(&xd), &c, DType::F64, move |t| {
                    rms_norm(&t[0], &w64, eps, false).unwrap()
                })
            };
            let (got, got_grads) = value_and_grads(std::slice::from_ref(&xd), &c, dtype, |t| {
                rms_norm(&t[0], &w_seen, eps, false).unwrap()
            });
            assert_all_close(dtype, (&got, &got_grads), (&want, &want_grads));
        }
    }
    // The fused kernel is what ran: it gives the composite's gradient directly.
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let g = randn(&[37, 896], 24);
    let fused = memtune::engine::kernels::rms_norm_input_grad(&f32s(&x), &f32s(&w), &f32s(&g), eps)
        .unwrap()
        .expect("fusable");
    assert_eq!(fused.dims(), &[37, 896]);
    // f64 (the reference precision) keeps candle's composite.
    assert!(
        memtune::engine::kernels::rms_norm_input_grad(&x, &w, &g, eps)
            .unwrap()
            .is_none()
    );
}

#[test]
fn scaled_causal_softmax_matches_the_composite_in_value_and_gradients() {
    // Many rows per parallel task (each reusing one row of scratch), and rows of a few thousand.
    for (shape, dtypes) in [
        ([2, 3, 37, 37], &[DType::F32, DType::BF16, DType::F16][..]),
        ([1, 1, 2051, 2051], &[DType::F32][..]),
    ] {
        check_causal_softmax(shape, dtypes);
    }
}

fn check_causal_softmax(shape: [usize; 4], dtypes: &[DType]) {
    let (s, scale) = (shape[3], 0.3);
    let (x, w) = (randn(&shape, 4), randn(&shape, 5));
    let mask = causal_mask(s, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    for &dtype in dtypes {
        let xd = x.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
        let (want, want_grads) = value_and_grads(std::slice::from_ref(&xd), &w, DType::F64, |t| {
            causal_softmax(&t[0], &mask, scale).unwrap()
        });
        let (got, got_grads) = value_and_grads(&[xd], &w, dtype, |t| {
            scaled_causal_softmax(&t[0], &mask.to_dtype(dtype).unwrap(), scale).unwrap()
        });
        assert_all_close(dtype, (&got, &got_grads), (&want, &want_grads));
        // Masked positions: exactly zero probability and zero gradient.
        let p = to_vec(&got);
        let g = to_vec(&got_grads[0]);
        for (idx, (p, g)) in p.iter().zip(&g).enumerate() {
            let (row, col) = ((idx / s) % s, idx % s);
            if col > row {
                assert_eq!((*p, *g), (0.0, 0.0), "{dtype:?} masked ({row}, {col})");
            }
        }
    }
}

/// A head's input `[23, 12]` and vocabulary matrix `[301, 12]` drawn from `seed` (and `seed + 1`),
/// and targets whose rows `masked` do not count (the normalizer counts the others).
fn head_case(seed: u64, masked: &[usize]) -> (Tensor, Tensor, LossTargets) {
    let (rows, hidden, vocab) = (23, 12, 301);
    let (h, w) = (
        randn(&[rows, hidden], seed),
        randn(&[vocab, hidden], seed + 1),
    );
    let ids: Vec<u32> = (0..rows as u32)
        .map(|r| (r * 37 + 5) % vocab as u32)
        .collect();
    let mask: Vec<f32> = (0..rows)
        .map(|r| if masked.contains(&r) { 0.0 } else { 1.0 })
        .collect();
    let targets = LossTargets {
        ids: Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(),
        mask: Tensor::new(mask.as_slice(), &Device::Cpu).unwrap(),
        normalizer: (rows - masked.len()) as f64,
    };
    (h, w, targets)
}

/// A loss's value, and the gradients of `h` and `w` when `brought · loss` is differentiated.
fn value_and_head_grads(loss: &Tensor, h: &Var, w: &Var, brought: f64) -> (f64, Tensor, Tensor) {
    let grads = loss.affine(brought, 0.0).unwrap().backward().unwrap();
    let value = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let gh = grads.get(h.as_tensor()).unwrap().clone();
    let gw = grads.get(w.as_tensor()).unwrap().clone();
    (value, gh, gw)
}

#[test]
fn chunked_and_full_losses_on_fused_kernels_match_the_f64_full_loss() {
    // 23 rows in chunks of 5 (the last one short), a head of 301 tokens; rows 3 and 11 masked.
    let (h, w, targets) = head_case(6, &[3, 11]);
    let loss_and_grads = |dtype: DType, chunked: bool| {
        let (hv, wv) = (
            Var::from_tensor(&h.to_dtype(dtype).unwrap()).unwrap(),
            Var::from_tensor(&w.to_dtype(dtype).unwrap()).unwrap(),
        );
        let loss = if chunked {
            chunked_cross_entropy(
                hv.as_tensor(),
                wv.as_tensor(),
                &targets,
                5,
                true,
                None,
                None,
            )
            .unwrap()
        } else {
            let logits = hv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap();
            full_cross_entropy(&logits, &targets).unwrap()
        };
        value_and_head_grads(&loss, &hv, &wv, 1.0)
    };
    // f64 runs candle's composite full loss; f32 the fused kernels, chunked and full.
    let (want, want_h, want_w) = loss_and_grads(DType::F64, false);
    for chunked in [true, false] {
        let (got, got_h, got_w) = loss_and_grads(DType::F32, chunked);
        assert!(
            (got - want).abs() < 1e-5 * want.abs(),
            "chunked={chunked}: loss {got} vs {want}"
        );
        assert!(
            rel_err(&got_h, &want_h) < 1e-5,
            "chunked={chunked}: h gradient {}",
            rel_err(&got_h, &want_h)
        );
        assert!(
            rel_err(&got_w, &want_w) < 1e-5,
            "chunked={chunked}: w gradient {}",
            rel_err(&got_w, &want_w)
        );
    }
    // bf16 activations: the gradient of h comes back in bf16, one rounding away.
    let (_, got_h, _) = loss_and_grads(DType::BF16, true);
    let (_, got_h_full, _) = loss_and_grads(DType::BF16, false);
    assert_eq!(got_h.dtype(), DType::BF16);
    assert_eq!(got_h_full.dtype(), DType::BF16);
    let (_, want_h, _) = {
        let h = h
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let w = w
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let (hv, wv) = (Var::from_tensor(&h).unwrap(), Var::from_tensor(&w).unwrap());
        let logits = hv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap();
        let grads = full_cross_entropy(&logits, &targets)
            .unwrap()
            .backward()
            .unwrap();
        (0.0, grads.get(hv.as_tensor()).unwrap().clone(), ())
    };
    for (name, got_h) in [("chunked", &got_h), ("full", &got_h_full)] {
        assert!(
            rel_err(got_h, &want_h) < 3e-2,
            "bf16 h gradient, {name} loss: {}",
            rel_err(got_h, &want_h)
        );
    }
}

#[test]
fn fp32_model_on_fused_kernels_matches_the_f64_model() {
    let spec = ModelSpec {
        num_hidden_layers: 2,
        ..ModelSpec::tiny()
    };
    let knobs = Knobs {
        method: Method::Full,
        precision: Precision::Fp32,
        batch: 2,
        seq: 16,
        ..Knobs::default()
    };
    let build = |dtypes: Dtypes| {
        Model::build_with_dtypes(
            &spec,
            &knobs,
            dtypes,
            &Device::Cpu,
            &mut RandomInit::new(7),
            7,
        )
        .unwrap()
    };
    let f64s = Dtypes {
        compute: DType::F64,
        trainable: DType::F64,
        frozen: DType::F64,
    };
    let (m32, m64) = (build(Dtypes::of(Precision::Fp32)), build(f64s));
    let batch: Batch =
        random_batch(knobs.batch, knobs.seq, spec.vocab_size, 3, &Device::Cpu).unwrap();
    let run = |m: &Model| {
        forward_backward(
            m,
            &batch,
            batch.counted_tokens as f64,
            1.0,
            &mut NoObserver,
            0,
        )
        .unwrap()
    };
    let ((l32, g32), (l64, g64)) = (run(&m32), run(&m64));
    assert!((l32 - l64).abs() < 1e-5 * l64.abs(), "loss {l32} vs {l64}");
    let (p32, p64) = (m32.trainable(), m64.trainable());
    assert_eq!(p32.len(), p64.len());
    for (a, b) in p32.iter().zip(&p64) {
        let (ga, gb) = (g32.get(a.var.as_tensor()), g64.get(b.var.as_tensor()));
        let (ga, gb) = (ga.expect("fp32 gradient"), gb.expect("f64 gradient"));
        let e = rel_err(ga, gb);
        assert!(e < 1e-4, "{}: relative gradient error {e}", a.name);
    }
}

/// The chunked loss told the upstream gradient makes its gradients in the forward pass; backward
/// then rescales them to the gradient it brings. They must equal the ones backward recomputes when
/// forward was not told: told right (1 and 8, as a loss scale), and told wrong (1, then 8 brought).
#[test]
fn chunked_loss_gradients_made_in_forward_match_those_recomputed_in_backward() {
    let (h, w, targets) = head_case(16, &[7]);
    let run = |dtype: DType, told: Option<f64>, brought: f64| {
        let (hv, wv) = (
            Var::from_tensor(&h.to_dtype(dtype).unwrap()).unwrap(),
            Var::from_tensor(&w.to_dtype(dtype).unwrap()).unwrap(),
        );
        let loss = chunked_cross_entropy(
            hv.as_tensor(),
            wv.as_tensor(),
            &targets,
            5,
            true,
            told,
            None,
        )
        .unwrap();
        value_and_head_grads(&loss, &hv, &wv, brought)
    };
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        let tol = match dtype {
            DType::F64 => 1e-12,
            DType::F32 => 1e-6,
            _ => 1e-2,
        };
        for (told, brought) in [(1.0, 1.0), (8.0, 8.0), (1.0, 8.0)] {
            let (want, want_h, want_w) = run(dtype, None, brought);
            let (got, got_h, got_w) = run(dtype, Some(told), brought);
            let what = format!("{dtype:?}, told {told}, brought {brought}");
            assert_eq!(got, want, "{what}: loss");
            assert_eq!(got_h.dtype(), dtype, "{what}");
            assert!(rel_err(&got_h, &want_h) < tol, "{what}: h gradient");
            assert!(rel_err(&got_w, &want_w) < tol, "{what}: w gradient");
        }
    }
}

/// candle's bf16 addition (patched in vendor/candle-core: 16 lanes with AVX512-BF16 where the CPU
/// has it) rounds every element's f32 sum to nearest even, exactly as `half` does one at a time:
/// whole tensors, a row broadcast and a single-element broadcast, with lengths that leave tails.
#[test]
fn bf16_addition_rounds_every_f32_sum_to_nearest() {
    for n in [5usize, 53, 40_003] {
        let a = randn(&[n], 11).to_dtype(DType::BF16).unwrap();
        let b = (randn(&[n], 12) * 1e-2)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let want = |x: &[half::bf16], y: &dyn Fn(usize) -> half::bf16| -> Vec<half::bf16> {
            x.iter()
                .enumerate()
                .map(|(i, &v)| half::bf16::from_f32(v.to_f32() + y(i).to_f32()))
                .collect()
        };
        let (av, bv) = (
            a.to_vec1::<half::bf16>().unwrap(),
            b.to_vec1::<half::bf16>().unwrap(),
        );
        let sum = (&a + &b).unwrap().to_vec1::<half::bf16>().unwrap();
        assert_eq!(sum, want(&av, &|i| bv[i]), "a + b, {n} elements");
        let one = b.narrow(0, 0, 1).unwrap();
        let scalar = a
            .broadcast_add(&one)
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap();
        assert_eq!(scalar, want(&av, &|_| bv[0]), "a + b[0], {n} elements");
        let rows = a.reshape((1, n)).unwrap().repeat((3, 1)).unwrap();
        let row = b.reshape((1, n)).unwrap();
        let broadcast = rows.broadcast_add(&row).unwrap().flatten_all().unwrap();
        let expected: Vec<_> = (0..3).flat_map(|_| want(&av, &|i| bv[i])).collect();
        assert_eq!(
            broadcast.to_vec1::<half::bf16>().unwrap(),
            expected,
            "rows + row, {n} columns"
        );
    }
}

/// The kernels' vectorisable `exp` against f64's: within 2 ulp over f32's normal range (every
/// 997th bit pattern from −87.3 to 88.3), 0 below it, +∞ above it, NaN kept.
#[test]
fn kernel_exp_is_within_two_ulp_of_the_rounded_exponential() {
    use memtune::engine::kernels::exp;
    let (lo, hi) = ((-87.3f32).to_bits(), 88.3f32.to_bits());
    let mut checked = 0;
    // Negative floats' bit patterns grow away from zero; walk both halves.
    for (from, to) in [(0x8000_0000u32, lo), (0, hi)] {
        for bits in (from..=to).step_by(997) {
            let x = f32::from_bits(bits);
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x:e}) = {got:e}, want {want:e} ({ulp} ulp)");
            checked += 1;
        }
    }
    assert!(checked > 2_000_000, "{checked} points");
    assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp(-100.0), 0.0);
    assert_eq!(exp(100.0), f32::INFINITY);
    assert!(exp(f32::NAN).is_nan());
    assert_eq!(exp(0.0), 1.0);
}

/// The fused RoPE against candle-nn's kernel in f64, in f32, bf16 and f16, in each layout, and
/// its backward (the opposite rotation, heads transposed back) undoing it.
#[test]
fn fused_rope_matches_candle_nn_and_rotates_back() {
    use memtune::engine::kernels::{RopeLayout, rope};
    let (s, d) = (37, 16);
    let x = randn(&[2, 3, s, d], 21);
    // The same values laid out `[b, s, h, d]`, as a projection gives them.
    let x_seq = x.transpose(1, 2).unwrap().contiguous().unwrap();
    let angles = (randn(&[s, d / 2], 22) * 2.0).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let want = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let (cd, sd) = (cast(&cos), cast(&sin));
        let turn = |x: &Tensor, sign, layout| rope(&cast(x), &cd, &sd, sign, layout).unwrap();
        let got = turn(&x, 1.0, RopeLayout::Heads).expect("the fused path applies");
        let err = rel_err(&got, &want);
        assert!(err < tolerance(dtype), "{dtype:?}: relative error {err}");
        let back = turn(&got, -1.0, RopeLayout::Heads).unwrap();
        let err = rel_err(&back, &x);
        assert!(
            err < 2.0 * tolerance(dtype),
            "{dtype:?}: rotating back, {err}"
        );
        // From `[b, s, h, d]`: the same rotation, out as `[b, h, s, d]`, bit for bit; and back.
        let from_seq = turn(&x_seq, 1.0, RopeLayout::SeqToHeads).unwrap();
        assert_eq!(from_seq.dims(), got.dims());
        let diff = (&from_seq.to_dtype(DType::F64).unwrap() - &got.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(diff, 0.0, "{dtype:?}: SeqToHeads against Heads");
        let back_seq = turn(&from_seq, -1.0, RopeLayout::HeadsToSeq).unwrap();
        assert_eq!(back_seq.dims(), x_seq.dims());
        let err = rel_err(&back_seq, &x_seq);
        assert!(
            err < 2.0 * tolerance(dtype),
            "{dtype:?}: rotating back to [b, s, h, d], {err}"
        );
    }
    // f64 is the reference precision: candle-nn's kernel runs it.
    assert!(
        rope(&x, &cos, &sin, 1.0, RopeLayout::Heads)
            .unwrap()
            .is_none()
    );
}

/// A trainable weight (full fine-tuning) takes the fused pass for both gradients when the weight
/// has x's dtype: value, input gradient and weight gradient against the f64 composite.
#[test]
fn rms_norm_weight_gradient_matches_the_composite() {
    let (x, c) = (randn(&[37, 896], 31), randn(&[37, 896], 32));
    let w = (randn(&[896], 33) * 0.5).unwrap().affine(1.0, 1.0).unwrap();
    let eps = 1e-6;
    let norm = |t: &[Tensor]| rms_norm(&t[0], &t[1], eps, true).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // Inputs rounded to the dtype first, so both runs see the same values.
        let round = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
        let inputs = [round(&x), round(&w)];
        let (want, want_grads) = value_and_grads(&inputs, &c, DType::F64, norm);
        let (got, got_grads) = value_and_grads(&inputs, &c, dtype, norm);
        assert_eq!(got_grads.len(), 2);
        assert_all_close(dtype, (&got, &got_grads), (&want, &want_grads));
    }
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let g = randn(&[37, 896], 34);
    let (dx, dw) = memtune::engine::kernels::rms_norm_grads(&f32s(&x), &f32s(&w), &f32s(&g), eps)
        .unwrap()
        .expect("fusable");
    assert_eq!((dx.dims(), dw.dims()), (&[37, 896][..], &[896][..]));
    // An f32 weight of bf16 activations (mixed precision) fuses too, its gradient in f32; a bf16
    // weight of f32 activations keeps the composite.
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let (dx, dw) = memtune::engine::kernels::rms_norm_grads(&bf(&x), &f32s(&w), &bf(&g), eps)
        .unwrap()
        .expect("fusable");
    assert_eq!((dx.dtype(), dw.dtype()), (DType::BF16, DType::F32));
    assert!(
        memtune::engine::kernels::rms_norm_grads(&f32s(&x), &bf(&w), &f32s(&g), eps)
            .unwrap()
            .is_none()
    );
}

#[test]
fn scale_matches_candles_affine_bit_for_bit() {
    // Gradient clipping's scaling: widen, affine(factor, 0), round back, in one pass. Over a
    // parallel chunk boundary, with −0 (which the affine's + 0 turns into +0).
    let x = (randn(&[3, 40_000], 11) * 100.0).unwrap();
    let x = x
        .slice_assign(
            &[0..1, 0..1],
            &Tensor::new(&[[-0.0f64]], &Device::Cpu).unwrap(),
        )
        .unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = x.to_dtype(dtype).unwrap();
        for factor in [0.37, 1.0 / 3.0, 2.0] {
            let got = memtune::engine::kernels::scale(&x, factor)
                .unwrap()
                .expect("fused path");
            let want = x
                .to_dtype(DType::F32)
                .unwrap()
                .affine(factor, 0.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            assert_eq!(bits(&got), bits(&want), "{dtype:?} × {factor}");
        }
    }
}

/// The threaded conversions and per-row ops of the loss's 16-bit gradient give candle's own values,
/// bit for bit: f32 ↔ bf16 / f16 against `to_dtype`, and a row's value subtracted or multiplied
/// against `broadcast_sub` / `broadcast_mul`, over more rows than one task takes.
#[test]
fn threaded_conversions_and_row_ops_match_candle_bit_for_bit() {
    use memtune::engine::kernels::{RowOp, per_row, to_dtype};
    let x = (randn(&[301, 1000], 61) * 40.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let narrow = to_dtype(&x, dtype).unwrap();
        assert_eq!(narrow.dtype(), dtype);
        assert_eq!(
            bits(&narrow),
            bits(&x.to_dtype(dtype).unwrap()),
            "f32 → {dtype:?}"
        );
        let wide = to_dtype(&narrow, DType::F32).unwrap();
        assert_eq!(
            bits(&wide),
            bits(&narrow.to_dtype(DType::F32).unwrap()),
            "{dtype:?} → f32"
        );
    }
    let values = (randn(&[301, 1], 62) * 3.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let sub = per_row(&x, &values, RowOp::Sub).unwrap();
    assert_eq!(bits(&sub), bits(&x.broadcast_sub(&values).unwrap()));
    let mul = per_row(&x, &values, RowOp::Mul).unwrap();
    assert_eq!(bits(&mul), bits(&x.broadcast_mul(&values).unwrap()));
}

/// Mixed precision trains an f32 norm weight on 16-bit activations: the fused pass gives `dx` in
/// the activations' dtype and `dw` in f32, against the f64 composite of the same rounded inputs.
#[test]
fn rms_norm_f32_weight_on_16_bit_activations_matches_the_composite() {
    let (x, c) = (randn(&[37, 896], 34), randn(&[37, 896], 35));
    let w = (randn(&[896], 36) * 0.5).unwrap().affine(1.0, 1.0).unwrap();
    let eps = 1e-6;
    for dtype in [DType::BF16, DType::F16] {
        let xr = x.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
        let wr = w
            .to_dtype(DType::F32)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let norm = |t: &[Tensor]| rms_norm(&t[0], &t[1], eps, true).unwrap();
        let (want, want_grads) = value_and_grads(&[xr.clone(), wr.clone()], &c, DType::F64, norm);
        let xv = Var::from_tensor(&xr.to_dtype(dtype).unwrap()).unwrap();
        let wv = Var::from_tensor(&wr.to_dtype(DType::F32).unwrap()).unwrap();
        let got = rms_norm(xv.as_tensor(), wv.as_tensor(), eps, true).unwrap();
        let loss = (got.to_dtype(DType::F64).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let (dx, dw) = (
            grads.get(xv.as_tensor()).unwrap(),
            grads.get(wv.as_tensor()).unwrap(),
        );
        assert_eq!(
            (got.dtype(), dx.dtype(), dw.dtype()),
            (dtype, dtype, DType::F32)
        );
        assert_all_close(
            dtype,
            (&got, &[dx.clone(), dw.clone()]),
            (&want, &want_grads),
        );
    }
}

//! The engine's gradients: every trainable parameter gets one (candle's fused ops cut the graph
//! silently), they match finite differences of an f64 model, and checkpointing, accumulation and
//! the chunked loss change nothing but memory.

use candle_core::backprop::GradStore;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use memtune::config::Quant;
use memtune::config::{Checkpointing, Knobs, LossMode, Method, Precision, Target};
use memtune::data::random_batch;
use memtune::engine::model::{Dtypes, Model, RandomInit, WeightSource};
use memtune::engine::step::{Batch, NoObserver, forward_backward};
use memtune::spec::ModelSpec;

fn spec() -> ModelSpec {
    // Three layers so that every:2 mixes recomputed and kept layers; tied head to test sharing.
    ModelSpec {
        num_hidden_layers: 3,
        ..ModelSpec::tiny()
    }
}

fn knobs(method: Method, precision: Precision) -> Knobs {
    Knobs {
        method,
        precision,
        batch: 2,
        seq: 16,
        ..Knobs::default()
    }
}

fn build(spec: &ModelSpec, knobs: &Knobs, dtypes: Option<Dtypes>) -> Model {
    let dtypes = dtypes.unwrap_or(Dtypes::of(knobs.precision));
    Model::build_with_dtypes(
        spec,
        knobs,
        dtypes,
        &Device::Cpu,
        &mut RandomInit::new(7),
        7,
    )
    .unwrap()
}

fn grads(model: &Model, batch: &Batch) -> (f64, GradStore) {
    forward_backward(
        model,
        batch,
        batch.counted_tokens as f64,
        1.0,
        &mut NoObserver,
        0,
    )
    .unwrap()
}

fn grad_vec(model: &Model, grads: &GradStore, name: &str) -> Vec<f64> {
    let p = model
        .trainable()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap();
    let g = grads
        .get(p.var.as_tensor())
        .unwrap_or_else(|| panic!("{name} has no gradient"));
    g.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn batch(spec: &ModelSpec, knobs: &Knobs, seed: u64) -> Batch {
    random_batch(knobs.batch, knobs.seq, spec.vocab_size, seed, &Device::Cpu).unwrap()
}

#[test]
fn every_trainable_parameter_gets_a_nonzero_gradient() {
    let spec = spec();
    for method in [Method::Full, Method::Lora, Method::Qlora] {
        for precision in [
            Precision::Fp32,
            Precision::Bf16,
            Precision::Fp16,
            Precision::Bf16Pure,
        ] {
            let mut k = knobs(method, precision);
            // LoRA's B starts at zero, so A's gradient is zero on the first step by construction;
            // give B a value so the test sees A's gradient path too.
            let model = build(&spec, &k, None);
            if method != Method::Full {
                for layer in &model.layers {
                    for lin in layer.linears() {
                        let lora = lin.lora.as_ref().unwrap();
                        let ones = lora
                            .b
                            .as_tensor()
                            .ones_like()
                            .unwrap()
                            .affine(0.01, 0.0)
                            .unwrap();
                        lora.b.set(&ones).unwrap();
                    }
                }
            }
            k.seq = 16;
            let (loss, g) = grads(&model, &batch(&spec, &k, 1));
            assert!(
                loss.is_finite() && loss > 0.0,
                "{method} {precision}: loss {loss}"
            );
            let params = model.trainable();
            assert!(!params.is_empty());
            for p in params {
                let v = grad_vec(&model, &g, &p.name);
                let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                assert!(
                    norm > 0.0 && norm.is_finite(),
                    "{method} {precision}: {} gradient norm {norm}",
                    p.name
                );
            }
        }
    }
}

/// Loss of the f64 model as a function of one parameter entry.
fn loss_at(model: &Model, batch: &Batch, name: &str, index: usize, value: f64) -> f64 {
    let p = model
        .trainable()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap();
    let original = p.var.as_tensor().copy().unwrap();
    let mut data: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
    data[index] = value;
    p.var
        .set(&Tensor::from_vec(data, original.shape(), &Device::Cpu).unwrap())
        .unwrap();
    let (loss, _) = grads(model, batch);
    p.var.set(&original).unwrap();
    loss
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    let spec = ModelSpec {
        num_hidden_layers: 2,
        tie_word_embeddings: true,
        ..ModelSpec::tiny()
    };
    let f64s = Dtypes {
        compute: DType::F64,
        trainable: DType::F64,
        frozen: DType::F64,
    };
    // Adapters on q and v only leave the other products frozen with no adapter, so the forward
    // pass releases their inputs (`ops::release`): the gradients must not notice.
    for (method, loss_mode, targets) in [
        (Method::Full, LossMode::Chunked, None),
        (Method::Full, LossMode::Full, None),
        (Method::Lora, LossMode::Chunked, None),
        (
            Method::Lora,
            LossMode::Chunked,
            Some(vec![Target::QProj, Target::VProj]),
        ),
    ] {
        let mut k = Knobs {
            loss: loss_mode,
            seq: 8,
            ..knobs(method, Precision::Fp32)
        };
        if let Some(targets) = targets {
            k.lora.targets = targets;
        }
        let model = build(&spec, &k, Some(f64s));
        if method == Method::Lora {
            for layer in &model.layers {
                for lora in layer.linears().iter().filter_map(|l| l.lora.as_ref()) {
                    let v =
                        Tensor::randn(0.0, 0.05, lora.b.as_tensor().shape(), &Device::Cpu).unwrap();
                    lora.b.set(&v).unwrap();
                }
            }
        }
        let b = batch(&spec, &k, 3);
        let (_, g) = grads(&model, &b);
        let names: Vec<String> = model.trainable().iter().map(|p| p.name.clone()).collect();
        let mut checked = 0;
        for name in names
            .iter()
            .filter(|n| n.contains("layers.1") || n.contains("embed") || n.contains("model.norm"))
        {
            let analytic = grad_vec(&model, &g, name);
            // The entry with the largest gradient, where the relative check is most meaningful.
            let (index, _) = analytic
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let p = model
                .trainable()
                .into_iter()
                .find(|p| &p.name == name)
                .unwrap();
            let w: Vec<f64> = p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let eps = 1e-5;
            let numeric = (loss_at(&model, &b, name, index, w[index] + eps)
                - loss_at(&model, &b, name, index, w[index] - eps))
                / (2.0 * eps);
            let rel = (numeric - analytic[index]).abs() / analytic[index].abs().max(1e-12);
            assert!(
                rel < 1e-5,
                "{method} {loss_mode}: {name}[{index}] analytic {} numeric {numeric} rel {rel}",
                analytic[index]
            );
            checked += 1;
        }
        assert!(checked >= 3, "{method}: only {checked} parameters checked");
    }
}

#[test]
fn checkpointing_changes_neither_loss_nor_gradients() {
    // A recomputed layer's down projection does not multiply (its output is never read): every
    // kind of product, f32 and bf16, must still give the same gradients.
    let spec = spec();
    for (method, precision) in [
        (Method::Full, Precision::Fp32),
        (Method::Lora, Precision::Fp32),
        (Method::Qlora, Precision::Fp32),
        (Method::Full, Precision::Bf16Pure),
        (Method::Lora, Precision::Bf16Pure),
    ] {
        // LoRA's default targets include the down projection.
        let base = knobs(method, precision);
        let model = build(&spec, &base, None);
        let b = batch(&spec, &base, 5);
        let (loss0, g0) = grads(&model, &b);
        for policy in [Checkpointing::Full, Checkpointing::Every(2)] {
            let k = Knobs {
                checkpointing: policy,
                ..base.clone()
            };
            let m = build(&spec, &k, None);
            let (loss1, g1) = grads(&m, &b);
            assert!(
                (loss0 - loss1).abs() < 1e-6,
                "{method} {precision} {policy}: loss {loss0} vs {loss1}"
            );
            for p in model.trainable() {
                let d = max_abs_diff(&grad_vec(&model, &g0, &p.name), &grad_vec(&m, &g1, &p.name));
                assert!(
                    d < 1e-6,
                    "{method} {precision} {policy}: {} differs by {d}",
                    p.name
                );
            }
        }
    }
}

#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    let spec = spec();
    let k = knobs(Method::Full, Precision::Fp32);
    let model = build(&spec, &k, None);
    let big = random_batch(4, k.seq, spec.vocab_size, 9, &Device::Cpu).unwrap();
    let (loss_big, g_big) = grads(&model, &big);
    // The same 4 sequences as two micro-batches of 2.
    let half = |start: usize| Batch {
        ids: big.ids.narrow(0, start, 2).unwrap(),
        targets: big.targets.narrow(0, start * k.seq, 2 * k.seq).unwrap(),
        mask: big.mask.narrow(0, start * k.seq, 2 * k.seq).unwrap(),
        counted_tokens: 2 * k.seq,
    };
    let normalizer = big.counted_tokens as f64;
    let (l1, g1) = forward_backward(&model, &half(0), normalizer, 1.0, &mut NoObserver, 0).unwrap();
    let (l2, g2) = forward_backward(&model, &half(2), normalizer, 1.0, &mut NoObserver, 1).unwrap();
    assert!(
        (loss_big - (l1 + l2)).abs() < 1e-5,
        "{loss_big} vs {}",
        l1 + l2
    );
    for p in model.trainable() {
        let a = grad_vec(&model, &g_big, &p.name);
        let b: Vec<f64> = grad_vec(&model, &g1, &p.name)
            .iter()
            .zip(grad_vec(&model, &g2, &p.name))
            .map(|(x, y)| x + y)
            .collect();
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(
            max_abs_diff(&a, &b) <= 1e-4 * scale.max(1e-3),
            "{} differs",
            p.name
        );
    }
}

#[test]
fn chunked_loss_equals_full_loss_and_gradients() {
    let spec = ModelSpec {
        tie_word_embeddings: true,
        ..spec()
    };
    for method in [Method::Full, Method::Lora] {
        // seq·batch = 600 rows: more than two 256-row chunks, the last one partial.
        let base = Knobs {
            batch: 3,
            seq: 200,
            ..knobs(method, Precision::Fp32)
        };
        let b = batch(&spec, &base, 11);
        let full = build(
            &spec,
            &Knobs {
                loss: LossMode::Full,
                ..base.clone()
            },
            None,
        );
        let chunked = build(
            &spec,
            &Knobs {
                loss: LossMode::Chunked,
                ..base.clone()
            },
            None,
        );
        let (lf, gf) = grads(&full, &b);
        let (lc, gc) = grads(&chunked, &b);
        assert!((lf - lc).abs() < 1e-5, "{lf} vs {lc}");
        for p in full.trainable() {
            let d = max_abs_diff(
                &grad_vec(&full, &gf, &p.name),
                &grad_vec(&chunked, &gc, &p.name),
            );
            assert!(d < 1e-6, "{method}: {} differs by {d}", p.name);
        }
    }
}

#[test]
fn lora_with_zero_b_starts_exactly_at_the_base_model() {
    let spec = spec();
    let full = build(&spec, &knobs(Method::Full, Precision::Fp32), None);
    let lora = build(&spec, &knobs(Method::Lora, Precision::Fp32), None);
    let ids = Tensor::new(&[[1u32, 5, 9, 200, 3, 7]], &Device::Cpu).unwrap();
    let a: Vec<f32> = full
        .logits(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = lora
        .logits(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
}

/// Hands out the random weights after a round trip through ggml quantization, so that a dense model
/// built from it is exactly the dequantized model.
struct Dequantized {
    inner: RandomInit,
    dtype: GgmlDType,
}

impl WeightSource for Dequantized {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        let t = self.inner.tensor(name, shape)?;
        if name.contains("_proj.weight") {
            QTensor::quantize(&t, self.dtype)?.dequantize(&Device::Cpu)
        } else {
            Ok(t)
        }
    }
}

#[test]
fn quantized_base_stays_close_to_the_dequantized_model() {
    let spec = spec();
    let ids = Tensor::new(&[[1u32, 5, 9, 200, 3, 7, 11, 13]], &Device::Cpu).unwrap();
    // ggml's kernels also quantize the activations (to 8 bits), hence a tolerance rather than
    // equality; CANDLE_NOTES measured ~1e-2.
    for (quant, dtype, tolerance) in [
        (Quant::Q8, GgmlDType::Q8_0, 0.02),
        (Quant::Q4, GgmlDType::Q4_0, 0.02),
    ] {
        let lora = knobs(Method::Lora, Precision::Fp32);
        let mut source = Dequantized {
            inner: RandomInit::new(7),
            dtype,
        };
        let dense = Model::build(&spec, &lora, &Device::Cpu, &mut source, 7).unwrap();
        let reference: Vec<f32> = dense
            .logits(&ids)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let k = Knobs {
            quant,
            ..knobs(Method::Qlora, Precision::Fp32)
        };
        let q = build(&spec, &k, None);
        let got: Vec<f32> = q
            .logits(&ids)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = reference
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= tolerance * scale,
            "{quant}: max diff {diff} vs logit scale {scale}"
        );
        assert!(
            diff > 0.0,
            "{quant}: ggml's activation quantization should change something"
        );
    }
}

/// The f32 engine (its CPU kernels: RoPE transposing the heads, attention's causal products with
/// the heads side by side, weight gradients in the weights' layout) against the f64 engine (candle's
/// ops) on the same weights and batch, with grouped-query heads (4 query heads on 2 kv heads):
/// every gradient of a full fine-tune within f32 rounding of the f64 one.
#[test]
fn f32_gradients_match_the_f64_engine() {
    let spec = ModelSpec::tiny();
    assert!(spec.num_key_value_heads < spec.num_attention_heads);
    let k = Knobs {
        seq: 70,
        ..knobs(Method::Full, Precision::Fp32)
    };
    let f64s = Dtypes {
        compute: DType::F64,
        trainable: DType::F64,
        frozen: DType::F64,
    };
    let (wide, narrow) = (build(&spec, &k, Some(f64s)), build(&spec, &k, None));
    for (p, q) in wide.trainable().iter().zip(narrow.trainable()) {
        assert_eq!(p.name, q.name);
        q.var
            .set(&p.var.as_tensor().to_dtype(DType::F32).unwrap())
            .unwrap();
        // The f64 model runs on the f32 model's (rounded) weights.
        p.var
            .set(&q.var.as_tensor().to_dtype(DType::F64).unwrap())
            .unwrap();
    }
    let b = batch(&spec, &k, 5);
    let ((loss64, g64), (loss32, g32)) = (grads(&wide, &b), grads(&narrow, &b));
    assert!(
        (loss64 - loss32).abs() < 1e-5 * loss64.abs(),
        "{loss64} vs {loss32}"
    );
    for p in wide.trainable() {
        let (want, got) = (
            grad_vec(&wide, &g64, &p.name),
            grad_vec(&narrow, &g32, &p.name),
        );
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = max_abs_diff(&want, &got) / scale.max(1e-30);
        assert!(err < 1e-4, "{}: relative error {err}", p.name);
    }
}

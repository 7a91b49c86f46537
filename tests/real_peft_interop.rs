//! Interop with Hugging Face: an adapter written by memtune, loaded by PEFT onto SmolLM2 as
//! transformers loads it from the same GGUF file, gives the logits memtune computes. Needs the GGUF
//! file (scripts/fetch-smollm2.sh) and a Python with torch, transformers, peft and gguf
//! (`MEMTUNE_PYTHON`, default /work/peer-venv/bin/python); skips with a message otherwise. It takes
//! a minute or two (Python loads torch and transformers), so it runs only when asked:
//! `cargo test --test real_peft_interop -- --ignored`.

use candle_core::{DType, Device, Tensor};
use memtune::config::{Knobs, LoraSettings, Method, Target};
use memtune::engine::Model;
use memtune::engine::weights::{WeightFiles, write_safetensors};
use memtune::train::export::write_peft_adapter;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

fn gguf() -> Option<PathBuf> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    path.is_file().then_some(path)
}

fn python() -> Option<PathBuf> {
    let python = std::env::var_os("MEMTUNE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/peer-venv/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import torch, transformers, peft, gguf, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

const SCRIPT: &str = r#"
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
gguf, adapter, ours_path = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter).eval()
ours = load_file(ours_path)
# Every adapter tensor PEFT holds is the one memtune wrote, under the same name.
written = load_file(str(Path(adapter) / "adapter_model.safetensors"))
held = get_peft_model_state_dict(model)
assert set(held) == set(written), (sorted(set(held) ^ set(written)))[:5]
adapter_diff = max((held[k].float() - written[k]).abs().max().item() for k in written)
with torch.no_grad():
    logits = model(ours["ids"].long()).logits[0]
diff = (logits - ours["logits"]).abs().max().item()
print(json.dumps({"logit_diff": diff, "adapter_diff": adapter_diff, "tensors": len(written)}))
"#;

#[test]
#[ignore = "slow: starts Python with torch and transformers; run with --ignored"]
fn peft_applies_our_adapter_to_transformers_smollm2_with_the_same_logits() {
    let (Some(path), Some(python)) = (gguf(), python()) else {
        eprintln!(
            "skipping: needs models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-smollm2.sh) and a \
             Python with torch, transformers, peft and gguf (MEMTUNE_PYTHON)"
        );
        return;
    };
    let arg = path.display().to_string();
    let spec = memtune::spec::resolve_model(&arg).unwrap();
    let knobs = Knobs {
        method: Method::Lora,
        lora: LoraSettings {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
        },
        ..Knobs::default()
    };
    let files = WeightFiles::locate(&arg).unwrap();
    let model = Model::build(
        &spec,
        &knobs,
        &Device::Cpu,
        &mut *files.open(&spec).unwrap(),
        7,
    )
    .unwrap();
    // B starts at zero, which would hide a wrong layout; give every B seeded values. A row
    // permutation of q/k (GGUF's interleaved RoPE layout) would now change the logits.
    for (i, layer) in model.layers.iter().enumerate() {
        for (j, lin) in layer.linears().iter().enumerate() {
            let lora = lin.lora.as_ref().unwrap();
            let b = Tensor::randn(0f32, 0.02, lora.b.dims(), &Device::Cpu)
                .unwrap()
                .affine(1.0, (i * 7 + j) as f64 * 1e-4)
                .unwrap();
            lora.b.set(&b).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    write_peft_adapter(&adapter, &model, &arg).unwrap();

    let ids: Vec<u32> = vec![
        1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
    ];
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.logits(&input).unwrap().get(0).unwrap();
    let ours = dir.path().join("ours.safetensors");
    write_safetensors(
        &ours,
        &[
            ("ids".into(), input.to_dtype(DType::I64).unwrap()),
            ("logits".into(), logits),
        ],
        &BTreeMap::new(),
    )
    .unwrap();

    let out = Command::new(python)
        .args([
            "-c",
            SCRIPT,
            &arg,
            adapter.to_str().unwrap(),
            ours.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    eprintln!("PEFT/transformers vs memtune: {result}");
    // 30 layers × 7 projections × (A, B).
    assert_eq!(result["tensors"], 420);
    assert_eq!(result["adapter_diff"], 0.0);
    let diff = result["logit_diff"].as_f64().unwrap();
    assert!(diff < 1e-3, "largest logit difference {diff}");
}

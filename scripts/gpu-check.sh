#!/usr/bin/env bash
# The GPU check for an H100/H200 test machine (issue 8, part 4), in two halves.
#
#   scripts/gpu-check.sh prepare   HERE, on a machine without a GPU (~10-20 min on 2 cores, most of
#                                  it the CUDA build; warm: a few minutes). It
#                                  1. builds the CUDA binary for sm_90 (scripts/check-cuda.sh
#                                     --release-build) and strips its debug info,
#                                  2. plans every configuration checked below for the H100 and the
#                                     H200 from CPU probes (memtune predict --target-gpu, the normal
#                                     CPU build), and the tuner's pick for a 24 GiB card, which the
#                                     GPU half then holds against what the card measures,
#                                  3. stages all that, and the PyTorch + peft harness
#                                     (../shared/peer/train_step.py) if present, in .gpu-carry/
#                                     (git-ignored), checking it is under the 64 MiB a device call
#                                     carries.
#   scripts/gpu-check.sh run       THERE, on the GPU machine, from the repo root, with .gpu-carry
#                                  carried. At most 9 min (see below); after a smoke step (one
#                                  short CUDA step; if it fails, the run stops there) every step
#                                  has its own timeout and a failed step is logged, not fatal. It
#                                  writes under $OUT (8 files at most, which is what a device call
#                                  brings back):
#                                    profiles.jsonl        memtune profile --device cuda, full depth,
#                                                          one line per configuration
#                                    peer.jsonl            PyTorch + peft on the same configurations,
#                                                          each run right after memtune's profile
#                                    predictions.jsonl     memtune predict --device cuda (calibrated
#                                                          on GPU probes at reduced depth: the full-
#                                                          depth configuration is held out)
#                                    gpu-probes.tar.gz     those GPU probes (one calibration cache
#                                                          per configuration), to study the fits here
#                                    tune.json             memtune tune --device cuda --verify for a
#                                                          24 GiB budget (the no-OOM check)
#                                    plan-measured.json    the CPU-made plan for a 24 GiB card
#                                                          (prepare), profiled on the card
#                                    summary.txt           the card; measured vs predicted vs
#                                                          planned; tokens/s vs PyTorch
#                                    log.txt               every command and its stderr tail, and
#                                                          the GPU tests (tests/meter_cuda.rs and
#                                                          tests/engine_cuda.rs)
#
# With the device tool (one call, nothing else needed):
#   run(command="bash scripts/gpu-check.sh run", carry=[".gpu-carry"], timeout_s=540)
#
# Settings (environment, both halves): GPU_CHECK_MODEL (catalog name, default
# HuggingFaceTB/SmolLM2-135M) with GPU_CHECK_MODEL_CONFIG (its config.json, for the PyTorch side),
# GPU_CHECK_SEQ (512), GPU_CHECK_TUNE_MODEL (HuggingFaceTB/SmolLM2-360M), GPU_CHECK_TUNE_SEQ
# (1024), GPU_CHECK_TUNE_BATCH (effective batch, 16), GPU_CHECK_TUNE_BUDGET (24G); run only:
# GPU_CHECK_CONFIGS (how many of the configurations below, in order, default all 8) and
# GPU_CHECK_PEER=0 (skip PyTorch). On an H200 the whole run took 80 s without PyTorch and 190 s
# with it (eighth session), 176-228 s with it and the GPU tests (twenty-fifth session, whose three
# runs are in reports/BENCHMARKS.md, "GPU"); the caps keep it under 9 minutes whatever happens:
# 60 s per profile, 45 s per PyTorch run, 75 s per prediction, no new configuration after 210 s,
# 130 s for the tuner, 60 s for the plan's profile.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
carry_dir="$repo/.gpu-carry"
model="${GPU_CHECK_MODEL:-HuggingFaceTB/SmolLM2-135M}"
model_config="${GPU_CHECK_MODEL_CONFIG:-profiles/models/smollm2-135m.json}"
seq="${GPU_CHECK_SEQ:-512}"
tune_model="${GPU_CHECK_TUNE_MODEL:-HuggingFaceTB/SmolLM2-360M}"
tune_seq="${GPU_CHECK_TUNE_SEQ:-1024}"
tune_batch="${GPU_CHECK_TUNE_BATCH:-16}"
tune_budget="${GPU_CHECK_TUNE_BUDGET:-24G}"

# The configurations checked: label | memtune knob flags | the PyTorch harness's flags for the same
# configuration ("-": no PyTorch counterpart). memtune's bf16 is mixed precision (fp32 trainable
# weights, bf16 compute) = the harness's amp-bf16; bf16-pure = its bf16. LoRA on every linear layer.
combos=(
    "lora-bf16|--method lora --precision bf16 --batch 8|--method lora --lora-targets all-linear --dtype amp-bf16 --batch 8"
    "full-bf16|--method full --precision bf16 --batch 8|--method full --dtype amp-bf16 --batch 8"
    "lora-fp32|--method lora --precision fp32 --batch 8|--method lora --lora-targets all-linear --dtype fp32 --batch 8"
    "qlora-q4-bf16|--method qlora --quant q4 --precision bf16 --batch 8|-"
    "lora-bf16-ckpt|--method lora --precision bf16 --batch 8 --checkpointing full|--method lora --lora-targets all-linear --dtype amp-bf16 --batch 8 --checkpointing on"
    "full-bf16pure|--method full --precision bf16-pure --batch 8|--method full --dtype bf16 --batch 8"
    "lora-fp16|--method lora --precision fp16 --batch 8|-"
    "lora-bf16-adamw8bit|--method lora --precision bf16 --batch 8 --optimizer adamw8bit|-"
)

# ------------------------------------------------------------------------------------------------
prepare() {
    echo "== 1/3 the CUDA binary (sm_90)" >&2
    CUDA_COMPUTE_CAP=90 "$repo/scripts/check-cuda.sh" --release-build
    local target_dir="${CUDA_TARGET_DIR:-$repo/target/cuda}"
    mkdir -p "$carry_dir/peer"
    # 148 MB as built, 63 MB without debug info (candle's PTX is most of it): too much to carry as
    # it is, ~8 MB xz-compressed. Symbols stay for backtraces.
    objcopy --strip-debug "$target_dir/release/memtune" "$carry_dir/memtune"
    xz -6 -f -T1 "$carry_dir/memtune"
    # The GPU tests, which skip on machines without one: the CUDA meter's (tests/meter_cuda.rs)
    # and the engine's, CPU against GPU (tests/engine_cuda.rs).
    local test_name test_binary
    for test_name in meter_cuda engine_cuda; do
        test_binary="$(eval "$("$repo/scripts/check-cuda.sh" --env --link)" && cd "$repo" \
            && cargo test --release --no-default-features --features cuda --test "$test_name" \
                --no-run --message-format=json 2>/dev/null \
            | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m.get("target", {}).get("name") == sys.argv[1]][-1])' "$test_name")"
        objcopy --strip-debug "$test_binary" "$carry_dir/$test_name"
        xz -6 -f -T1 "$carry_dir/$test_name"
    done

    echo "== 2/3 plans from CPU probes (memtune predict --target-gpu h100 / h200)" >&2
    # The CPU build, in the normal target dir, so the CUDA build's feature set does not rebuild it.
    (cd "$repo" && cargo build --release --bin memtune)
    local cpu_target="${CARGO_TARGET_DIR:-$repo/target}"
    local cpu_bin="$cpu_target/release/memtune"
    : > "$carry_dir/plans.jsonl"
    local entry label knobs
    for entry in "${combos[@]}"; do
        IFS='|' read -r label knobs _ <<< "$entry"
        for card in h100 h200; do
            echo "   $label on $card" >&2
            # One cache per configuration, shared by the two cards only: a cache that accumulates
            # the probes of several configurations has been seen to extrapolate wildly (SmolLM2-135M,
            # LoRA bf16 with checkpointing at seq 512: 1.2 GiB fitted on its own probes, 53 GiB
            # fitted on the 44 probes of all eight configurations).
            # shellcheck disable=SC2086
            if line="$("$cpu_bin" predict --model "$model" --seq "$seq" $knobs --target-gpu "$card" \
                --cache "$carry_dir/cpu-cache/$label" --json)"; then
                printf '{"label":"%s","card":"%s","plan":%s}\n' "$label" "$card" "$line" \
                    >> "$carry_dir/plans.jsonl"
            else
                echo "   (no plan for $label on $card)" >&2
            fi
        done
    done
    echo "   the tuner's plan for a ${tune_budget} card (h200) at seq $tune_seq × $tune_batch" >&2
    if ! "$cpu_bin" tune --model "$tune_model" --gpu-mem "$tune_budget" --seq "$tune_seq" \
        --effective-batch "$tune_batch" --target-gpu h200 --cache "$carry_dir/cpu-cache/tune" \
        --json > "$carry_dir/tune-plan.json"; then
        echo "   (no tune plan)" >&2
        rm -f "$carry_dir/tune-plan.json"
    fi
    rm -rf "$carry_dir/cpu-cache"

    echo "== 3/3 the PyTorch + peft harness" >&2
    local peer="$repo/../shared/peer/train_step.py"
    [[ -f "$peer" ]] || peer="/work/shared/peer/train_step.py"
    if [[ -f "$peer" ]]; then
        cp "$peer" "$carry_dir/peer/train_step.py"
    else
        echo "   ../shared/peer/train_step.py not found: the run will skip the PyTorch comparison" >&2
    fi

    local bytes
    bytes="$(du -sb "$carry_dir" | cut -f1)"
    echo "== .gpu-carry: $((bytes / 1048576)) MiB (limit 64 MiB with the working tree)" >&2
    du -ah "$carry_dir" >&2
    if (( bytes > 60 * 1048576 )); then
        echo "gpu-check.sh: .gpu-carry is over 60 MiB; it will not travel" >&2
        exit 1
    fi
    cat >&2 <<EOF
== ready. With the device tool:
   run(command="bash scripts/gpu-check.sh run", carry=[".gpu-carry"], timeout_s=540)
EOF
}

# ------------------------------------------------------------------------------------------------
run_there() {
    set +e
    local out="${OUT:-/tmp/gpu-check-out}"
    mkdir -p "$out"
    local bin=/tmp/memtune-cuda
    local log="$out/log.txt"
    local configs="${GPU_CHECK_CONFIGS:-${#combos[@]}}"
    SECONDS=0
    say() { echo "[$(date +%T)] $*" | tee -a "$log" >&2; }
    # Runs one step under a timeout; stdout to $1, stderr's tail to the log.
    step() {
        local dest="$1" limit="$2"
        shift 2
        say "\$ $*"
        local err
        err="$(mktemp)"
        timeout "$limit" "$@" >> "$dest" 2> "$err"
        local rc=$?
        tail -n 15 "$err" >> "$log"
        rm -f "$err"
        (( rc == 0 )) || say "   exit $rc$( ((rc == 124)) && echo ' (timed out)')"
        return $rc
    }
    if [[ ! -f "$carry_dir/memtune.xz" ]]; then
        say "no .gpu-carry/memtune.xz: run 'scripts/gpu-check.sh prepare' first and carry .gpu-carry"
        exit 1
    fi
    xz -dc "$carry_dir/memtune.xz" > "$bin" 2>> "$log" \
        || python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' \
            "$carry_dir/memtune.xz" > "$bin"
    chmod +x "$bin"

    # The binary links libcuda.so.1 (the driver's) and CUDA 13's cuBLAS (with cuBLASLt), cuRAND and
    # the runtime (readelf -d: NEEDED libcuda.so.1 libcurand.so.10 libcublas.so.13 libcudart.so.13).
    # PyTorch's cu130 wheels and the image's toolkit carry those; find them, never a stub.
    local dirs
    dirs="$(python3 - <<'EOF'
import glob, os, site, sys
want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13",
        "libcuda.so.1"]
roots = site.getsitepackages() + [site.getusersitepackages(), "/usr/local/cuda/lib64",
         "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/local/nvidia/lib64", "/usr/local/nvidia/lib",
         "/usr/lib/x86_64-linux-gnu", "/usr/lib64"]
found = []
for name in want:
    for root in roots:
        hits = [h for h in glob.glob(os.path.join(root, "**", name), recursive=True) if "stubs" not in h]
        if hits:
            d = os.path.dirname(hits[0])
            if d not in found:
                found.append(d)
            break
print(":".join(found))
EOF
)"
    export LD_LIBRARY_PATH="${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc|not found' | tee -a "$log" >&2
    if ldd "$bin" | grep -q 'not found'; then
        say "the CUDA binary is missing libraries (above); stopping"
        exit 1
    fi

    # 1. The card, as the driver and PyTorch see it: fills in the catalog's usable_bytes.
    local card=/tmp/gpu-check-card.json
    python3 - > "$card" 2>> "$log" <<'EOF'
import json, subprocess
q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                    "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout.strip()
name, total_mib, driver, cc = [x.strip() for x in q.splitlines()[0].split(",")]
card = {"name": name, "nvidia_smi_total_bytes": int(total_mib) << 20, "driver": driver,
        "compute_capability": cc}
try:
    import torch
    free, total = torch.cuda.mem_get_info()
    card.update({"cuda_total_bytes": total, "cuda_free_bytes_at_start": free,
                 "torch": torch.__version__})
except Exception as e:  # the check goes on without PyTorch
    card["torch_error"] = str(e)
print(json.dumps(card))
EOF
    say "card: $(cat "$card")"
    local card_key
    card_key="$(python3 -c 'import json,sys; n=json.load(open(sys.argv[1]))["name"].lower(); print("h200" if "h200" in n else "h100" if "h100" in n else "other")' "$card")"

    # The GPU tests on this card: the CUDA meter's (exact pool counters: a 256 MiB block reads as
    # 256 MiB) and the engine's (a step's loss and gradients, and a few optimizer steps' losses,
    # on the GPU against the CPU, for every knob whose code differs by device).
    local test_name
    for test_name in meter_cuda engine_cuda; do
        if [[ -f "$carry_dir/$test_name.xz" ]]; then
            xz -dc "$carry_dir/$test_name.xz" > "/tmp/$test_name" && chmod +x "/tmp/$test_name"
            step "$log" 90 "/tmp/$test_name" --nocapture --test-threads 1
        fi
    done

    # 2. A smoke step: one short CUDA step of two layers. If the CUDA binary cannot train at all,
    #    stop here, so the rest of the lease is not spent on steps that all fail the same way.
    local smoke
    smoke="$(mktemp)"
    if ! step "$smoke" 120 "$bin" profile --device cuda --model "$model" --layers 2 --seq 128 \
        --batch 2 --steps 1 --warmup 0 --json; then
        say "the CUDA binary failed its first step; stopping"
        exit 1
    fi
    say "smoke: $(tail -n 1 "$smoke")"
    rm -f "$smoke"

    # The PyTorch + peft harness (the CPU harness's flags, run on the GPU), for step 3.
    local peer="$carry_dir/peer/train_step.py" arch="" wrapper=""
    if [[ -f "$peer" ]]; then
        arch="$(python3 - "$repo/$model_config" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
print(f"--layers {c['num_hidden_layers']} --hidden {c['hidden_size']} --heads {c['num_attention_heads']} "
      f"--kv-heads {c.get('num_key_value_heads', c['num_attention_heads'])} "
      f"--intermediate {c['intermediate_size']} --vocab {c['vocab_size']} "
      f"--tie-embeddings {'on' if c.get('tie_word_embeddings') else 'off'}")
EOF
)"
        wrapper="$(mktemp --suffix=.py)"
        write_peer_wrapper "$wrapper"
    else
        say "no $peer: PyTorch comparison skipped"
    fi

    # 3. Per configuration, side by side: memtune's full-depth profile, PyTorch + peft on the
    #    same configuration, and memtune's prediction calibrated on GPU probes (a fresh calibration
    #    each: a cache shared across configurations extrapolates badly, see prepare).
    local n=0 entry label knobs peer_flags tmp
    for entry in "${combos[@]}"; do
        n=$((n + 1))
        if (( n > configs )); then break; fi
        if (( SECONDS > 210 )); then say "time: no more configurations after $((n - 1))"; break; fi
        IFS='|' read -r label knobs peer_flags <<< "$entry"
        tmp="$(mktemp)"
        # shellcheck disable=SC2086
        if step "$tmp" 60 "$bin" profile --device cuda --model "$model" --seq "$seq" $knobs \
            --steps 3 --warmup 1 --json; then
            printf '{"label":"%s","result":%s}\n' "$label" "$(tail -n 1 "$tmp")" >> "$out/profiles.jsonl"
        fi
        : > "$tmp"
        if [[ -n "$wrapper" && "$peer_flags" != "-" && "${GPU_CHECK_PEER:-1}" != 0 ]]; then
            # shellcheck disable=SC2086
            if step "$tmp" 45 python3 "$wrapper" "$peer" $arch --seq "$seq" $peer_flags \
                --optim adamw --steps 3 --warmup 1 --profile-mem off; then
                printf '{"label":"%s","result":%s}\n' "$label" "$(tail -n 1 "$tmp")" >> "$out/peer.jsonl"
            fi
            : > "$tmp"
        fi
        # shellcheck disable=SC2086
        if step "$tmp" 75 "$bin" predict --device cuda --cache "/tmp/gpu-cache/$label" \
            --model "$model" --seq "$seq" $knobs --json; then
            printf '{"label":"%s","result":%s}\n' "$label" "$(tail -n 1 "$tmp")" >> "$out/predictions.jsonl"
        fi
        rm -f "$tmp"
    done

    # The GPU probes behind those predictions (one calibration cache per configuration), to study
    # the fits away from the card.
    tar -czf "$out/gpu-probes.tar.gz" -C /tmp gpu-cache 2>> "$log"

    # 4. The tuner for a 24 GiB budget (a common card's size; the H200 has far more, so the
    #    measured peak is checked against the budget, not against the card), verified for real at
    #    full depth: the no-OOM check.
    step "$out/tune.json" 130 "$bin" tune --device cuda --no-cache --model "$tune_model" \
        --gpu-mem "$tune_budget" --seq "$tune_seq" --effective-batch "$tune_batch" --verify --json

    # 5. The pick the CPU-only machine planned for a card of the tune's budget (prepare), run on
    #    this card at full depth: its planned peak against what the card measures.
    if [[ -s "$carry_dir/tune-plan.json" ]]; then
        local plan_flags
        plan_flags="$(python3 - "$carry_dir/tune-plan.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))["chosen"]
flags = [f"--method {c['method']}", f"--precision {c['precision']}", f"--batch {c['batch']}",
         f"--accum {c['accum']}", f"--seq {c['seq']}", f"--optimizer {c['optimizer']}",
         f"--loss {c['loss']}", f"--checkpointing {c['checkpointing']}"]
if c["method"] != "full":
    flags.append(f"--rank {c['lora']['rank']}")
if c["method"] == "qlora":
    flags.append(f"--quant {c['quant']}")
print(" ".join(flags))
EOF
)"
        # shellcheck disable=SC2086
        step "$out/plan-measured.json" 60 "$bin" profile --device cuda --model "$tune_model" \
            $plan_flags --steps 2 --warmup 1 --json
    fi

    # 6. The summary.
    python3 - "$out" "$carry_dir/plans.jsonl" "$card_key" > "$out/summary.txt" 2>> "$log" <<'EOF'
import json, os, sys
out, plans_path, card_key = sys.argv[1:4]
carry = os.path.dirname(plans_path)
def rows(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return {}
    return {r["label"]: r["result"] for r in map(json.loads, open(path)) if r.get("result")}
measured, predicted, peer = rows("profiles.jsonl"), rows("predictions.jsonl"), rows("peer.jsonl")
plans = {}
if os.path.exists(plans_path):
    for r in map(json.loads, open(plans_path)):
        if r["card"] == card_key:
            plans[r["label"]] = r["plan"]
def err(pred, meas):
    return f"{100.0 * (pred - meas) / meas:+.1f}%" if pred and meas else "-"
gib = lambda b: f"{b / 2**30:.2f}" if b else "-"
print(f"card: {open('/tmp/gpu-check-card.json').read().strip()}")
print("GPU peak (GiB): measured by memtune's CUDA meter (memory pool + runtime); predicted from GPU probes;")
print("planned from CPU probes (--target-gpu, made before the run). tokens/s: memtune measured, roofline")
print("estimate, PyTorch + peft measured (pt-peak = torch max reserved; its context not counted).")
head = ["config", "measured", "gpu-pred", "err", "cpu-plan", "err", "tok/s", "roofline", "pytorch", "pt-peak"]
print(" ".join(f"{h:>12}" for h in head))
for label in dict.fromkeys(list(measured) + list(predicted) + list(plans)):
    m, p, pl, pe = measured.get(label), predicted.get(label), plans.get(label), peer.get(label)
    mp = m and m.get("peak_bytes"); pp = p and p.get("peak_bytes"); plp = pl and pl.get("peak_bytes")
    roof = pl and pl.get("gpu_plan", {}).get("estimated", {}).get("tokens_per_s")
    cells = [label, gib(mp), gib(pp), err(pp, mp), gib(plp), err(plp, mp),
             f"{m['tokens_per_s']:.0f}" if m else "-", f"{roof:.0f}" if roof else "-",
             f"{pe['tokens_per_s']:.0f}" if pe else "-",
             gib(pe.get("cuda_max_reserved_bytes")) if pe else "-"]
    print(" ".join(f"{c:>12}" for c in cells))
tune_path = os.path.join(out, "tune.json")
if os.path.exists(tune_path) and os.path.getsize(tune_path):
    try:
        t = json.loads(open(tune_path).read().strip().splitlines()[-1])
        v = t.get("verified") or {}
        print(f"tune: budget {gib(t.get('budget_bytes'))} GiB, chosen {json.dumps(t.get('chosen'))}")
        print(f"      predicted peak {gib(t['predicted']['peak_bytes'])} GiB, measured {gib(v.get('peak_bytes'))} GiB "
              f"(error {v.get('peak_error')}), within budget: {v.get('within_budget')}, "
              f"tokens/s measured {v.get('tokens_per_s')} vs predicted {t['predicted'].get('tokens_per_s')}")
    except Exception as e:
        print(f"tune: unreadable output ({e})")
else:
    print("tune: no output (see log.txt)")
plan_path = os.path.join(carry, "tune-plan.json")
measured_path = os.path.join(out, "plan-measured.json")
if os.path.exists(plan_path) and os.path.exists(measured_path) and os.path.getsize(measured_path):
    try:
        plan = json.load(open(plan_path))
        m = json.loads(open(measured_path).read().strip().splitlines()[-1])
        pp, mp = plan["predicted"]["peak_bytes"], m.get("peak_bytes")
        print(f"CPU-made plan for a {gib(plan.get('budget_bytes'))} GiB card: {json.dumps(plan.get('chosen'))}")
        print(f"      planned peak {gib(pp)} GiB, measured on this card {gib(mp)} GiB (error {err(pp, mp)}); "
              f"tokens/s estimated {plan['predicted'].get('tokens_per_s'):.0f}, measured {m.get('tokens_per_s')}")
    except Exception as e:
        print(f"plan: unreadable output ({e})")
EOF
    cat "$out/summary.txt" >&2
}

# The PyTorch side: the CPU harness's own argument parser (so the flags mean the same), with the
# model, batch and optimizer on the GPU, timed with synchronization, memory from PyTorch's
# allocator. Under LoRA with amp-bf16 the frozen base is stored in bf16, as memtune's mixed bf16
# stores it; full fine-tuning keeps fp32 weights under autocast.
write_peer_wrapper() {
    cat > "$1" <<'EOF'
import importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("train_step", sys.argv[1])
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)
args = harness.parse_args(sys.argv[2:])
import contextlib, torch, transformers, peft
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(args.seed)
# PEER_DEVICE=cpu runs the same code without a GPU (to check the wrapper itself).
dev = torch.device(os.environ.get("PEER_DEVICE", "cuda"))
cuda = dev.type == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 128),
                  tie_word_embeddings=(args.tie_embeddings == "on"), use_cache=False)
cfg._attn_implementation = args.attn
frozen_bf16 = args.dtype == "bf16" or (args.dtype == "amp-bf16" and args.method == "lora")
with dev:
    model = LlamaForCausalLM(cfg).to(torch.bfloat16 if frozen_bf16 else torch.float32)
if args.checkpointing == "on":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if args.method == "lora":
    from peft import LoraConfig, get_peft_model
    targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                             lora_dropout=args.lora_dropout, target_modules=targets,
                                             bias="none", task_type="CAUSAL_LM"))
    for prm in model.parameters():
        if prm.requires_grad:
            prm.data = prm.data.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
model.train()
trainable = [p for p in model.parameters() if p.requires_grad]
opt = (torch.optim.AdamW(trainable, lr=args.lr) if args.optim == "adamw"
       else torch.optim.SGD(trainable, lr=args.lr))
ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
auto = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if args.dtype == "amp-bf16" \
    else contextlib.nullcontext
sync()
if cuda:
    torch.cuda.reset_peak_memory_stats()
times, losses = [], []
for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    with auto():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
    sync()
    if i >= args.warmup:
        times.append(time.perf_counter() - t0)
times.sort()
step = times[len(times) // 2]
free, total = torch.cuda.mem_get_info() if cuda else (0, 0)
print(json.dumps({"tool": f"pytorch-peft-{dev.type}", "torch": torch.__version__,
                  "transformers": transformers.__version__, "peft": peft.__version__,
                  "method": args.method, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
                  "params_trainable": sum(p.numel() for p in trainable),
                  "tokens_per_s": args.batch * args.seq / step, "step_s_median": step,
                  "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                  "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
                  "device_used_bytes_end": total - free,
                  "loss_first": losses[0], "loss_last": losses[-1]}))
EOF
}

case "${1:-}" in
    prepare) prepare ;;
    run) run_there ;;
    *)
        sed -n '2,45p' "$0" >&2
        exit 2
        ;;
esac

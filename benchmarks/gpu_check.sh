#!/usr/bin/env bash
# One command for a GPU check of latentlm on one H100 / H200, in under 8 minutes, writing one markdown
# table (docs/BENCHMARKS.md, "GPU check"):
#
#   1. the CUDA tests (pytest -m cuda: tests/test_cuda.py);
#   2. training throughput and peak memory of every method at GPT-2 124M, bf16, torch.compile, seq 1024
#      (benchmarks/train_throughput.py, in two runs of 4 methods, each against its own NTP);
#   3. decode throughput: the compiled static-shape decode step vs eager at 124M (benchmarks/peer_decode.py),
#      and the KV cache vs recomputation for NTP / CoCoMix / PonderLM-2 (benchmarks/generate_throughput.py);
#   4. a short bf16 `latentlm train` with FSDP2 on one rank (torchrun --nproc_per_node 1) on byte tokens of
#      the repository's own text (nothing to download).
#
# Run from a source checkout:  bash benchmarks/gpu_check.sh   (table: $GPU_CHECK_OUT/gpu_check.md)
# Environment:
#   GPU_CHECK_OUT        output folder (default: $OUT if set, else gpu-check)
#   GPU_CHECK_DRY=1      CPU dry run at tiny shapes (what the test suite runs; a few minutes on 2 cores)
#   GPU_CHECK_PYTHONPATH extra import path, e.g. a carried `pip install --target` folder with the
#                        dependencies the machine lacks (stage "environment" lists them)
#   GPU_CHECK_BUDGET     seconds for the whole check (default 470); each stage stops at its own budget
#   PYTHON               interpreter (default python3)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
OUTDIR=${GPU_CHECK_OUT:-${OUT:-gpu-check}}
BUDGET=${GPU_CHECK_BUDGET:-470}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONPATH="$ROOT/src${GPU_CHECK_PYTHONPATH:+:$GPU_CHECK_PYTHONPATH}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
: > "$OUTDIR/stages.tsv"

# stage NAME SECONDS CMD...: run CMD with its log in $OUTDIR/NAME.log, stopped at SECONDS or at the
# check's overall budget, whichever comes first; its exit code and time go to stages.tsv.
stage() {
    local name=$1 budget=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    ((left < budget)) && budget=$left
    if ((budget < 5)); then
        printf '%s\tskipped\t0\n' "$name" >> "$OUTDIR/stages.tsv"
        return
    fi
    local t0=$(date +%s)
    echo "== $name (at most ${budget}s)"
    timeout --signal=INT --kill-after=20 "$budget" "$@" > "$OUTDIR/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$OUTDIR/stages.tsv"
    tail -n 3 "$OUTDIR/$name.log"
}

if [[ $DRY == 1 ]]; then
    DEVICE=cpu
    export OMP_NUM_THREADS=1
    cat > "$WORK/tiny.yaml" <<'EOF'
model: {arch: gpt2, vocab_size: 300, block_size: 32, n_layer: 2, n_head: 2, n_embd: 32}
train: {batch_size: 2}
data: {seq_len: 32}
concepts: {layer: 0}
cocomix: {insert_layer: 1, n_concepts: 64, k_concepts: 4}
EOF
    TRAIN=(--config "$WORK/tiny.yaml" --device cpu --steps 1 --warmup 0)
    DECODE=(--model random --arch gpt2 --n-layer 2 --n-embd 32 --n-head 2 --vocab 300 --no-peer --compile
            --compile-backend aot_eager --batch-sizes 1,2 --prompt 4 --new-tokens 4 --reps 1 --device cpu)
    GEN=(--config "$WORK/tiny.yaml" --device cpu --contexts 8 --batch-sizes 1 --new-tokens 2)
    FSDP_MODEL=(--model.n_layer 2 --model.n_embd 32 --model.n_head 2 --model.block_size 32 --data.seq_len 32)
    FSDP_TRAIN=(--train.device cpu --train.dtype float32 --train.batch_size 2 --train.max_steps 3)
else
    DEVICE=cuda
    TRAIN=(--config gpt2-124m --device cuda --batch-size 16 --seq-len 1024 --dtype bfloat16 --compile
           --steps 10 --warmup 3)
    DECODE=(--model random --arch gpt2 --n-layer 12 --n-embd 768 --n-head 12 --vocab 50257 --no-peer --compile
            --batch-sizes 1,8 --prompt 128 --new-tokens 64 --reps 3 --device cuda --dtype bfloat16)
    GEN=(--config gpt2-124m --device cuda --contexts 128,1024 --batch-sizes 1,8 --new-tokens 16 --reps 2)
    FSDP_MODEL=(--data.seq_len 1024)
    FSDP_TRAIN=(--train.device cuda --train.dtype bfloat16 --train.batch_size 8 --train.max_steps 40)
fi

# 0. what the machine has (a missing dependency fails every later stage: this row says which)
stage environment 30 "$PY" - <<'EOF'
import importlib.util, json, platform, sys
mods = ["torch", "numpy", "yaml", "safetensors", "tqdm", "tokenizers", "tiktoken", "pytest"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
info = {"python": platform.python_version(), "missing": missing}
if "torch" not in missing:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
print(json.dumps(info))
sys.exit(1 if missing else 0)
EOF

# 1. the CUDA tests
stage cuda_tests 100 "$PY" -m pytest -m cuda -rs -p no:cacheprovider tests/test_cuda.py

# 2. training throughput and memory, every method, 124M bf16 compiled (two runs, each with its own NTP)
stage throughput_a 150 "$PY" benchmarks/train_throughput.py "${TRAIN[@]}" --methods ntp,cocomix-cached,kd,pause \
    --json "$OUTDIR/throughput_a.json"
stage throughput_b 150 "$PY" benchmarks/train_throughput.py "${TRAIN[@]}" --methods ntp,ponder1,loop,ponderlm \
    --json "$OUTDIR/throughput_b.json"

# 3. decode: compiled static-shape step vs eager, and cache vs recompute per method
stage decode 60 "$PY" benchmarks/peer_decode.py "${DECODE[@]}" --json "$OUTDIR/decode.json"
stage generate 60 "$PY" benchmarks/generate_throughput.py "${GEN[@]}" --methods ntp,cocomix,ponder1 \
    --json "$OUTDIR/generate.json"

# 4. FSDP2 on one rank: byte tokens of the repository's text, bf16, GPT-2 124M shape
export PY WORK OUTDIR
cat > "$WORK/fsdp.sh" <<'EOF'
set -e
mkdir -p "$WORK/corpus"
for f in docs/*.md README.md src/latentlm/*.py src/latentlm/*/*.py tests/*.py; do
    if [[ -f $f ]]; then cp "$f" "$WORK/corpus/$(echo "$f" | tr / _).txt"; fi
done
"$PY" -m latentlm prepare --source "$WORK/corpus" --tokenizer byte --out "$WORK/data" --val-fraction 0.05 --quiet
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m latentlm train --config gpt2-124m \
    --data.path "$WORK/data" --model.vocab_size 257 --train.dist fsdp2 --train.out_dir "$WORK/fsdp" \
    --train.grad_accum 1 --train.warmup_steps 2 --train.log_every 1 --train.eval_every 0 \
    --train.eval_batches 2 --train.ckpt_every 0 --train.progress false "$@"
cp "$WORK/fsdp/metrics.jsonl" "$OUTDIR/fsdp_metrics.jsonl"
EOF
stage fsdp_train 90 bash "$WORK/fsdp.sh" "${FSDP_MODEL[@]}" "${FSDP_TRAIN[@]}"

"$PY" benchmarks/gpu_check_report.py "$OUTDIR" --dry "$DRY" --elapsed $(($(date +%s) - START)) \
    > "$OUTDIR/gpu_check.md"
cat "$OUTDIR/gpu_check.md"

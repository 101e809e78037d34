#!/usr/bin/env bash
# GPU smoke test: the CUDA / NCCL path that the CPU test suite cannot reach, on a machine with NVIDIA GPUs
# (offline is fine: the model is the tiny Llama, built here). About 5-10 minutes.
#
#   scripts/gpu-smoke.sh                 learner checks, then 3 steps of `duet train run.device=cuda`
#   scripts/gpu-smoke.sh --learner-only  learner checks only (torch, DeepSpeed, transformers; no vLLM, no Ray)
#
# Checks (each prints PASS / FAIL / SKIP):
#   0. a GPU is visible: `nvidia-smi -L` lists one and torch sees it (exit 2 at once otherwise)
#   1. learner (scripts/gpu_smoke_learner.py): DeepSpeed ZeRO-2 engine on cuda:0 with the NCCL backend;
#      3 steps of duet-rl's policy loss on completion-only log-probs (finite loss and gradient norm,
#      every tensor updated); with >= 2 GPUs the weights go over NCCL to a second process on cuda:1
#      after every step and every tensor's sha256 must match at both ends
#   2. end to end (not with --learner-only; needs vLLM and Ray): `duet train run.device=cuda`, 3 steps,
#      `sync/checksum_match` true on every step. With >= 2 GPUs a vLLM engine on one GPU, the learner on
#      another, vLLM's NCCL weight transfer; with one GPU both share it (cluster.colocate=true: half of it
#      each in Ray's accounting, vLLM takes 30% of its memory, the weights go through host memory by gloo)
# Environment: PYTHON (default: .venv/bin/python if present, else python), GPU_SMOKE_DIR (work folder,
# default a new temp folder), GPU_SMOKE_TIMEOUT_S (the end-to-end run's limit, default 600).
set -euo pipefail
cd "$(dirname "$0")/.."

learner_only=0
for arg in "$@"; do
  case "$arg" in
    --learner-only) learner_only=1 ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-smoke: unknown argument '$arg' (use --learner-only or --help)" >&2; exit 2 ;;
  esac
done

if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python
fi

fail() { echo "gpu-smoke: FAIL  $*" >&2; exit "${code:-1}"; }

# 0. A GPU, before anything slow: no GPU, no point building models.
code=2
command -v nvidia-smi >/dev/null 2>&1 \
  || fail "no NVIDIA driver here (nvidia-smi not found): this script checks the CUDA/NCCL path and needs a machine with NVIDIA GPUs"
gpu_list="$(nvidia-smi -L 2>&1)" || fail "nvidia-smi failed: $gpu_list"
[[ "$gpu_list" == *GPU* ]] || fail "nvidia-smi lists no GPU: $gpu_list"
command -v "$py" >/dev/null 2>&1 || fail "no Python '$py' (set PYTHON to the interpreter with duet-rl installed)"
n_gpus="$("$py" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>&1 | tail -1)" \
  || fail "'$py' cannot import torch: $n_gpus"
[[ "$n_gpus" =~ ^[0-9]+$ && "$n_gpus" -gt 0 ]] \
  || fail "torch (in '$py') sees no CUDA GPU although nvidia-smi lists: ${gpu_list//$'\n'/; } (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-unset}'; a CPU-only torch build?)"
echo "PASS  GPU visible: $n_gpus to torch; ${gpu_list//$'\n'/; }"
code=1

# 1. The learner on CUDA with DeepSpeed, and the NCCL broadcast.
"$py" scripts/gpu_smoke_learner.py --steps 3 || fail "learner checks (above)"
if [[ $learner_only == 1 ]]; then
  echo "gpu-smoke: --learner-only: all learner checks passed"
  exit 0
fi

# 2. End to end: vLLM on CUDA, DeepSpeed on CUDA, vLLM's NCCL weight transfer between them.
"$py" -c 'import ray, vllm' 2>/dev/null \
  || fail "the end-to-end check needs vLLM and Ray in '$py' (install duet-rl's GPU extra); --learner-only runs without them"
shape=()
layout="engine on one GPU, learner on another, NCCL"
if [[ "$n_gpus" -lt 2 ]]; then
  shape=(cluster.colocate=true rollout.gpu_memory_utilization=0.3)
  layout="engine and learner sharing the one GPU (cluster.colocate), gloo through host memory"
fi
work="${GPU_SMOKE_DIR:-$(mktemp -d -t duet-gpu-smoke-XXXXXX)}"
echo "gpu-smoke: end-to-end run in $work/run: $layout"
timeout "${GPU_SMOKE_TIMEOUT_S:-600}" "$py" -m cluster.cli train --run-dir "$work/run" \
  run.device=cuda train.steps=3 train.check_weights_every_steps=1 rollout.num_engines=1 \
  learner.num_ranks=1 rollout.prompts_per_step=8 checkpoint.final=false run.progress=false \
  run.dashboard=false control.enabled=false model.cache_dir="$work/model" "${shape[@]}" \
  || fail "duet train run.device=cuda, $layout (its output is above; the run folder is $work/run)"
"$py" - "$work/run" "$layout" <<'EOF' || fail "the end-to-end run's metrics (above)"
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
steps = [r["step"] for r in rows]
sync = [r.get("sync/checksum_match") for r in rows]
ok = steps == [1, 2, 3] and all(s is True for s in sync)
print(f"{'PASS' if ok else 'FAIL'}  duet train on CUDA ({sys.argv[2]}): steps {steps}, sync/checksum_match {sync}, "
      f"reward {[round(r.get('reward/mean', float('nan')), 3) for r in rows]}")
sys.exit(0 if ok else 1)
EOF
echo "gpu-smoke: all checks passed"

#!/usr/bin/env bash
# Everything only a GPU shows, in one run of about 8 minutes (issue 12 item 3; benchmarks/RESULTS.md):
#   1. the Triton kernels compiled for the card and checked against the torch references
#      (tests/test_kernels_*.py with TRITON_INTERPRET=0, bf16 included);
#   2. combine / project / gram / orth_quantize bandwidth against the card's copy bandwidth
#      (benchmarks/kernel_ops.py; goal: combine and project >= 75% of copy);
#   3. a fit end to end on CUDA with the Triton kernels, checked against the CPU fit, and in bf16
#      (benchmarks/gpu_fit_check.py);
#   4. the fit with the model sharded (--shard-model on) against one process: on 2 GPUs when the machine
#      has them, else over a world of one (benchmarks/distributed.py --check).
# Run from the repository root on the GPU machine; logs go to $1 (default: $OUT, else ./gpu_check_out):
#   bash benchmarks/gpu_check.sh "$OUT"
# The device image has torch, triton, safetensors, typer, rich, scikit-learn and pytest; nothing here
# needs `datasets`. Each step has its own time limit so one hang cannot eat the others' time.
set -uo pipefail
LOG=${1:-${OUT:-gpu_check_out}}
mkdir -p "$LOG"
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$LOG/card.txt"

echo "== 1. compiled kernels vs references" | tee "$LOG/kernel_tests.txt"
timeout 240 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels_*.py 2>&1 | tail -30 | tee -a "$LOG/kernel_tests.txt" || status=1

echo "== 2. bandwidth against copy" | tee "$LOG/kernels_bench.txt"
timeout 150 $PY benchmarks/kernel_ops.py --K 8 16 32 --D 1e7 1e8 --bits 4 8 2>&1 | tee -a "$LOG/kernels_bench.txt" || status=1

echo "== 3. fit end to end on CUDA (Triton) vs CPU, and bf16" | tee "$LOG/fit.txt"
timeout 90 $PY benchmarks/gpu_fit_check.py --out /tmp/gpu_fit_check 2>&1 | tee -a "$LOG/fit.txt" || status=1

echo "== 4. the model sharded over the ranks (--shard-model on, FSDP2 over NCCL) vs one process" | tee "$LOG/shard.txt"
gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "${gpus:-0}" -ge 2 ]; then
  timeout 150 $PY benchmarks/distributed.py --check --device cuda --ranks 2 --sizes 6e6,0 2>&1 | tail -5 | tee -a "$LOG/shard.txt" || status=1
else
  echo "2 ranks skipped: this machine has ${gpus:-0} GPU (NCCL needs a GPU per rank); a world of one instead" | tee -a "$LOG/shard.txt"
  timeout 150 $PY benchmarks/distributed.py --check --device cuda --ranks 1 --sizes 6e6,0 2>&1 | tail -5 | tee -a "$LOG/shard.txt" || status=1
fi

echo "gpu_check: exit $status (logs in $LOG)"
exit $status

#!/usr/bin/env bash
# Every GPU check of the FP8/MXFP8 issue in one call, for a session that is lent a GPU:
#
#   device run: bash benchmarks/gpu_check.sh            (results under $OUT, else benchmarks/results/gpu)
#
# 1. versions and the device; 2. the kernel tests on the GPU (the same checks CI runs interpreted:
# bit-identical quantize, GEMMs and the fused MX layer against the emulated path); 3. every speed
# goal and the training comparison (benchmarks/kernels.py, JSON); 4. the exact-MX GEMM designs
# timed against each other (benchmarks/mx_gemm_designs.py). Each step is time-bounded and
# logs on its own, so one failing step still leaves the others' results.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import zmq, msgpack, numpy; print('zmq', zmq.__version__, 'msgpack', msgpack.version, 'numpy', numpy.__version__)"
} > "$OUT/env.txt" 2>&1
timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -x tests/test_kernels.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/env.txt"
timeout "${BENCH_TIMEOUT:-420}" python benchmarks/kernels.py --train-steps "${TRAIN_STEPS:-200}" \
  --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "benchmark rc=$?" >> "$OUT/env.txt"
timeout "${DESIGNS_TIMEOUT:-150}" python benchmarks/mx_gemm_designs.py --json "$OUT/mx_gemm_designs.json" \
  > "$OUT/mx_gemm_designs.log" 2>&1
echo "designs rc=$?" >> "$OUT/env.txt"
cat "$OUT/env.txt"
tail -5 "$OUT/tests.txt"

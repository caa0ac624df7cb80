#!/usr/bin/env bash
# The checks that need a CUDA device, in one run (CI and the development machine have none):
#   1. tests/distributed/test_cuda.py: compressors, GradientSync and the DDP hook on CUDA tensors,
#      a CPU state resumed on CUDA, every sparse collective on CUDA tensors over gloo (two ranks
#      on one GPU) and over NCCL (needs two GPUs; skipped with a reason on one); and
#      tests/distributed/test_amp.py: float16 with a GradScaler, an overflow on one rank skipped
#      on every rank (its CUDA cases: two ranks sharing the GPU over gloo); and
#      tests/unit/test_sync_placement.py: the exchange inside a float16 autocast region on CUDA;
#   2. the compressors timed on the GPU: threshold selection against torch.topk on the same
#      tensors, and every compressor's throughput (bench_compressors.py --device cuda).
# Uses the python that holds a CUDA build of torch (PYTHON, default python3) and this checkout's
# source (PYTHONPATH=src), so nothing is installed. Results go to OUT (default
# benchmarks/results): device_tests.log, compressors_cuda.json.
#
#   OUT=/tmp/out benchmarks/device_check.sh          # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi -L || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'devices', torch.cuda.device_count())" || exit 1
"$py" -m pytest -q -rs -p no:cacheprovider tests/distributed/test_cuda.py \
    tests/distributed/test_amp.py tests/unit/test_sync_placement.py 2>&1 \
    | tee "$out/device_tests.log" || status=1
"$py" benchmarks/bench_compressors.py --device cuda --out "$out/compressors_cuda.json" || status=1
exit $status

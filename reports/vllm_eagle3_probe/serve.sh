#!/bin/bash
# usage: [LD_PRELOAD=/work/vllm-venv/lib/libiomp5.so] serve.sh NAME PORT [extra vllm serve args...]; logs to /work/vllm-work/NAME.log
name=$1; port=$2; shift 2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
cd /work/vllm-work
exec /work/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server --model /work/vllm-work/target --host 127.0.0.1 --port $port \
  --dtype bfloat16 --max-model-len 1024 --max-num-seqs 4 --enforce-eager --served-model-name target "$@" \
  > /work/vllm-work/$name.log 2>&1

# shellcheck shell=bash
# The ONE list of `vllm serve` flags for a converted DeepSeek-V4 checkpoint (CONTRACT.md section 5).
# Sourced by launch.sh, which docker-compose.yml runs as its entrypoint: both paths pass these flags.
# Every flag name was checked against vLLM's own `vllm serve` parser (tests/test_serve.py).
#
# Environment (all optional):
#   PORT                  port vLLM listens on                      (default 8000)
#   CUDA_VISIBLE_DEVICES  GPUs to use                                (default 0,1,2,3,4,5,6,7)
#   TP_SIZE               tensor-parallel size                      (default: the number of GPUs above)
#   MAX_MODEL_LEN         context length                            (default: the model's own)
#   SERVED_NAME           model name in the API                     (default deepseek-v4)
#   MOE_BACKEND           --moe-backend value                       (default: vLLM picks)
#   SPECULATIVE           `mtp`: speculative decoding with the checkpoint's own MTP block
#                         (--speculative-config, method "mtp" as vLLM 0.32 names it)  (default off)
#   SPEC_TOKENS           num_speculative_tokens with SPECULATIVE    (default 1)
#   EXTRA_ARGS            more `vllm serve` flags, split on spaces  (default none)

: "${CUDA_VISIBLE_DEVICES:=0,1,2,3,4,5,6,7}"
export CUDA_VISIBLE_DEVICES

# vllm_args MODEL_DIR [MORE_ARGS...]: fill the array VLLM_ARGS with the arguments of `vllm serve`
# (and VLLM_TP_SIZE, VLLM_GPU_COUNT), for the script that sources this file.
# shellcheck disable=SC2034
vllm_args() {
    local model=$1
    shift
    local gpus=() extra=()
    IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
    VLLM_TP_SIZE=${TP_SIZE:-${#gpus[@]}}
    VLLM_GPU_COUNT=${#gpus[@]}
    VLLM_ARGS=(
        "$model"
        --served-model-name "${SERVED_NAME:-deepseek-v4}"
        --port "${PORT:-8000}"
        --tensor-parallel-size "$VLLM_TP_SIZE"
        --enable-expert-parallel
        --kv-cache-dtype fp8
        --block-size 256
        --tokenizer-mode deepseek_v4
        --tool-call-parser deepseek_v4
        --enable-auto-tool-choice
        --reasoning-parser deepseek_v4
    )
    if [ -n "${MAX_MODEL_LEN:-}" ]; then
        VLLM_ARGS+=(--max-model-len "$MAX_MODEL_LEN")
    fi
    if [ -n "${MOE_BACKEND:-}" ]; then
        VLLM_ARGS+=(--moe-backend "$MOE_BACKEND")
    fi
    if [ -n "${SPECULATIVE:-}" ]; then
        VLLM_ARGS+=(--speculative-config "{\"method\": \"$SPECULATIVE\", \"num_speculative_tokens\": ${SPEC_TOKENS:-1}}")
    fi
    if [ -n "${EXTRA_ARGS:-}" ]; then
        read -r -a extra <<<"$EXTRA_ARGS"
        VLLM_ARGS+=("${extra[@]}")
    fi
    VLLM_ARGS+=("$@")
}

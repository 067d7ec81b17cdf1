#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Serve a finished nvfp4-convert conversion with stock vLLM: TP 8 with expert parallelism on one
# 8-GPU node, FP8 KV cache, block size 256, DeepSeek-V4 tokenizer/tool/reasoning parsers.
#
#   serve/launch.sh DST [more vllm serve flags...]
#
# The flags live in vllm-args.sh (shared with docker-compose.yml); the environment variables that
# change them are listed there (PORT, CUDA_VISIBLE_DEVICES, TP_SIZE, MAX_MODEL_LEN, SERVED_NAME,
# MOE_BACKEND, SPECULATIVE, SPEC_TOKENS, EXTRA_ARGS). Also: VLLM (the vllm executable, default `vllm`), PYTHON (default
# python3, reads the report), DRY_RUN=1 (check, then print the arguments one per line instead of
# starting vLLM).
#
# Refuses to start, with one message and exit code 1, when DST is not a finished conversion (no
# report, index or config.json, or a .nvfp4-convert/ state directory left by an unfinished run),
# when the installed vLLM is older than the report's min_vllm, or when the MegaMoE backend
# (deep_gemm_mega_moe, MXFP4 only) is asked for with NVFP4 experts, or SPECULATIVE=mtp for a DST without an MTP
# block (no mtp.* tensors in its index, or num_nextn_predict_layers 0 or absent in its config.json).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=vllm-args.sh
. "$HERE/vllm-args.sh"

VLLM=${VLLM:-vllm}
PYTHON=${PYTHON:-python3}

die() {
    printf 'launch.sh: refusing to start: %s\n' "$*" >&2
    exit 1
}

# version_lt A B: true when version A is older than B (numeric major.minor.patch; suffixes ignored).
version_lt() {
    local a b i x y
    IFS=. read -r -a a <<<"$1"
    IFS=. read -r -a b <<<"$2"
    for i in 0 1 2; do
        x=${a[i]:-0}
        y=${b[i]:-0}
        x=${x%%[!0-9]*}
        y=${y%%[!0-9]*}
        x=$((10#${x:-0}))
        y=$((10#${y:-0}))
        if ((x != y)); then
            ((x < y))
            return
        fi
    done
    return 1
}

# The installed vLLM's version: `vllm --version`, else the python of vllm's own shebang, else $PYTHON.
vllm_version() {
    local v py
    v=$("$VLLM" --version 2>/dev/null | grep -Eo '^[0-9]+\.[0-9]+(\.[0-9]+)?' | tail -n 1 || true)
    if [ -z "$v" ]; then
        py=$(head -n 1 "$(command -v "$VLLM")" 2>/dev/null | sed -n 's/^#![[:space:]]*\([^[:space:]]*python[^[:space:]]*\).*/\1/p' || true)
        for py in $py "$PYTHON"; do
            v=$("$py" -c 'import vllm; print(vllm.__version__)' 2>/dev/null |
                grep -Eo '^[0-9]+\.[0-9]+(\.[0-9]+)?' | tail -n 1 || true)
            [ -n "$v" ] && break
        done
    fi
    printf '%s' "$v"
}

[ $# -ge 1 ] || {
    printf 'usage: %s DST [more vllm serve flags...]\n' "$0" >&2
    exit 2
}
DST=$1
shift

[ -d "$DST" ] || die "$DST is not a directory"
DST=$(cd "$DST" && pwd)
[ ! -e "$DST/.nvfp4-convert" ] ||
    die "$DST is an UNFINISHED conversion ($DST/.nvfp4-convert/ is there): finish it with \`nvfp4-convert run SRC $DST --resume\`"
[ -f "$DST/nvfp4-convert-report.json" ] ||
    die "$DST is not a finished nvfp4-convert conversion: no nvfp4-convert-report.json"
[ -f "$DST/model.safetensors.index.json" ] || die "$DST has no model.safetensors.index.json"
[ -f "$DST/config.json" ] || die "$DST has no config.json"

# policy name, experts and min_vllm, from the report the conversion wrote last.
POLICY=$("$PYTHON" -c '
import json, sys
p = json.load(open(sys.argv[1]))["policy"]
print(p["name"], p["experts"], p["min_vllm"])
' "$DST/nvfp4-convert-report.json" 2>/dev/null) || die "cannot read policy {name, experts, min_vllm} from $DST/nvfp4-convert-report.json"
read -r POLICY_NAME EXPERTS MIN_VLLM <<<"$POLICY"

command -v "$VLLM" >/dev/null || die "no vllm executable ($VLLM) on PATH"
VERSION=$(vllm_version)
[ -n "$VERSION" ] || die "cannot tell the version of $VLLM (neither \`$VLLM --version\` nor \`import vllm\` answered)"
if version_lt "$VERSION" "$MIN_VLLM"; then
    die "vLLM $VERSION is older than $MIN_VLLM, which this conversion needs (policy $POLICY_NAME, experts $EXPERTS)"
fi

# Speculative decoding drafts with the checkpoint's own MTP layers: refuse before vLLM loads ~900 GB to find none.
if [ -n "${SPECULATIVE:-}" ]; then
    [ "$SPECULATIVE" = mtp ] || die "SPECULATIVE must be 'mtp' (or unset), got '$SPECULATIVE'"
    [[ "${SPEC_TOKENS:-1}" =~ ^[1-9][0-9]*$ ]] || die "SPEC_TOKENS must be a positive integer, got '$SPEC_TOKENS'"
    MTP=$("$PYTHON" -c '
import json, sys
cfg = json.load(open(sys.argv[1] + "/config.json"))
index = json.load(open(sys.argv[1] + "/model.safetensors.index.json"))["weight_map"]
print(int(cfg.get("num_nextn_predict_layers") or 0), sum(k.startswith("mtp.") for k in index))
' "$DST" 2>/dev/null) || die "cannot read num_nextn_predict_layers and the tensor names from $DST/config.json and model.safetensors.index.json"
    read -r MTP_LAYERS MTP_TENSORS <<<"$MTP"
    ((MTP_LAYERS > 0)) ||
        die "SPECULATIVE=mtp needs an MTP block, but $DST/config.json has no num_nextn_predict_layers (or 0)"
    ((MTP_TENSORS > 0)) ||
        die "SPECULATIVE=mtp needs an MTP block, but $DST/model.safetensors.index.json has no mtp.* tensors"
fi

vllm_args "$DST" "$@"

[[ "$VLLM_TP_SIZE" =~ ^[1-9][0-9]*$ ]] || die "TP_SIZE must be a positive integer, got '$VLLM_TP_SIZE'"
if ((VLLM_TP_SIZE > VLLM_GPU_COUNT)); then
    die "TP_SIZE $VLLM_TP_SIZE is more than the $VLLM_GPU_COUNT GPU(s) in CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
fi

# MegaMoE (DeepGEMM) runs MXFP4 experts only; with NVFP4 experts it must never be chosen, however it
# is spelled (--moe-backend X, --moe-backend=X, dashes, upper case, inside --kernel-config JSON).
ALL_ARGS=$(printf '%s ' "${VLLM_ARGS[@]}" | tr '[:upper:]-' '[:lower:]_')
if [ "$EXPERTS" = nvfp4 ] && [[ "$ALL_ARGS" == *deep_gemm_mega_moe* ]]; then
    die "the MegaMoE backend (deep_gemm_mega_moe) takes MXFP4 experts only; this conversion's experts are NVFP4: drop it from MOE_BACKEND/EXTRA_ARGS"
fi

printf 'launch.sh: vLLM %s, policy %s, experts %s (needs vLLM >= %s), GPUs %s, TP %s%s\n' \
    "$VERSION" "$POLICY_NAME" "$EXPERTS" "$MIN_VLLM" "$CUDA_VISIBLE_DEVICES" "$VLLM_TP_SIZE" \
    "${SPECULATIVE:+, speculative $SPECULATIVE x${SPEC_TOKENS:-1}}" >&2
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%s\n' "${VLLM_ARGS[@]}"
    exit 0
fi
printf 'launch.sh: %s serve' "$VLLM" >&2
printf ' %q' "${VLLM_ARGS[@]}" >&2
printf '\n' >&2
exec "$VLLM" serve "${VLLM_ARGS[@]}"

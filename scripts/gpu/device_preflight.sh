#!/usr/bin/env bash
# On the device machine, after every chunk is in /root/stash: unpack the bundle once, then run
#   nvfp4-convert preflight --device cuda --policy P --experts E [--planted-fault F] [more options]
# for each RUN argument, written NAME=POLICY:EXPERTS[:FAULT][:OPTIONS] (FAULT "-" for none; OPTIONS words joined
# by "+", so values may hold commas), e.g.
#   bash scripts/gpu/device_preflight.sh default-nvfp4=default:nvfp4 fault-swap=default:nvfp4:compressor_wkv_wgate_swapped \
#        short=default:nvfp4:-:--prompt-lengths+1,4,16 mtp-nvfp4=default:nvfp4:-:--mtp
# Everything comes back in $OUT/<first run name>.tgz: per run its JSON, console output and vLLM's log (every
# run of this machine so far). Runs go one after another: four at once (each process builds the source with a torch
# thread per core) spent a whole 600 s call without reaching vLLM.
set -uo pipefail
if [ ! -d /root/site/vllm ]; then  # unpacked into a temporary folder and renamed: a cut-short unpack is redone
  t0=$(date +%s)
  rm -rf /root/unpack && mkdir /root/unpack
  cat /root/stash/site.tar.xz.part* | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/root/unpack')" \
    || { echo "bundle incomplete"; exit 3; }
  for w in /root/stash/*.whl; do [ -e "$w" ] && python3 -m zipfile -e "$w" /root/unpack/site; done  # transformers 5.19
  rm -rf /root/site && mv /root/unpack/site /root/site
  echo "bundle unpacked in $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH=/root/site:/root/site/nvidia_cutlass_dsl/dsl_packages:$PWD
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
RES=/root/preflight-results
mkdir -p "$RES"
first=${1%%=*}
pack() { tar -czf "$OUT/${first:-results}.tgz" -C "$RES" .; }  # a call cut short keeps what finished

run_one() {  # one NAME=POLICY:EXPERTS[:FAULT][:OPTIONS] spec
  local name=${1%%=*} rest=${1#*=} policy experts fault extra t0 rc
  IFS=: read -r policy experts fault extra <<<"$rest"
  local args=(--device cuda --policy "$policy" --experts "$experts" --workdir "/root/pf/$name" --json "$RES/$name.json")
  [ -n "${fault:-}" ] && [ "$fault" != "-" ] && args+=(--planted-fault "$fault")
  [ -n "${extra:-}" ] && IFS=+ read -r -a more <<<"$extra" && args+=("${more[@]}")
  t0=$(date +%s)
  python3 -m nvfp4_convert preflight "${args[@]}" >"$RES/$name.console.txt" 2>&1
  rc=$?
  cp "/root/pf/$name/vllm.log" "$RES/$name.vllm.log" 2>/dev/null
  cp "/root/pf/$name/vllm-mtp.log" "$RES/$name.vllm-mtp.log" 2>/dev/null  # --mtp: the speculative-decoding run
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s: $(grep -E 'verdict|cannot run|error' "$RES/$name.console.txt" | tail -1)"
  grep -E '^│ (decode|prefill|mtp)' "$RES/$name.console.txt"
}

for spec in "$@"; do run_one "$spec"; pack; done

#!/usr/bin/env bash
# On the device machine: keep what this call carried (the folder given, default .gpu) outside the checkout, in
# /root/stash (a carried folder is replaced at every call; files outside the checkout stay while the machine is
# warm, ~30 s after a call returns: make the calls back to back).
#   bash scripts/gpu/device_stash.sh .gpu3
set -euo pipefail
mkdir -p /root/stash
cp "${1:-.gpu}"/* /root/stash/
du -h /root/stash/*

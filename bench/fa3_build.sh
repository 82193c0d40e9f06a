#!/usr/bin/env bash
# Build FlashAttention-3 (Dao-AILab/flash-attention, hopper/) on a Hopper machine with nvcc, keeping only
# what CogVideoX's attention needs: head dimension 64, bf16 forward and backward, float8 (e4m3) forward,
# sm90, no split-KV, paged KV, softcap, local windows, varlen or GQA packing. Offline: nothing is downloaded.
#
#   bench/fa3_build.sh SOURCE.tar.gz OUT_DIR [JOBS]
#
# SOURCE.tar.gz holds flash-attention/hopper and flash-attention/csrc/cutlass/include (the cutlass commit the
# flash-attention checkout pins as its submodule). OUT_DIR receives flash_attn_3.tar.gz: the package
# flash_attn_3 (its compiled _C) and the module flash_attn_interface, to unpack into a folder on PYTHONPATH.
set -euo pipefail
source_tar=$(realpath "$1"); out=$(realpath -m "$2"); jobs=${3:-8}
work=$(mktemp -d)
tar xzf "$source_tar" -C "$work"
cd "$work/flash-attention/hopper"
export FLASH_ATTENTION_OFFLINE_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=$jobs NVCC_THREADS=2
for part in HDIM96 HDIM128 HDIM192 HDIM256 HDIMDIFF64 HDIMDIFF192 FP16 SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP \
    PACKGQA VARLEN CLUSTER SM80; do
    export "FLASH_ATTENTION_DISABLE_$part=TRUE"
done
mkdir -p "$out"
python3 setup.py build_ext --inplace 2>&1 | grep -v "^\(ptxas info\|    \)" | tail -60
tar czf "$out/flash_attn_3.tar.gz" flash_attn_3 flash_attn_interface.py
ls -la "$out" flash_attn_3

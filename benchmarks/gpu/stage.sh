#!/usr/bin/env bash
# Lays out, here (a machine with network), everything the GPU run carries to a GPU machine that
# has none: the wheels of wheels.txt and extra-wheels.txt, and Debian's Slurm packages, split into
# batches that each fit one device call (at most 58 MiB; a call carries 64 MiB with the tree).
#
#   benchmarks/gpu/stage.sh [OUT]        (default OUT: .gpu-stage, ignored by git)
#
# Then, on the GPU machine, one call per batch, back to back (the machine is given back after
# ~30 s idle; /tmp survives between calls while it stays warm):
#   benchmarks/gpu/remote.sh receive .gpu-stage/batches/NN      (carry .gpu-stage/batches/NN)
# and then `benchmarks/gpu/remote.sh install` (docs/gpu.md has the whole sequence).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../.gpu-stage}
mkdir -p "$out/wheels" "$out/slurm-debs"
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$out/wheels" "$@"
}
pip_download -r <(grep -v '^#' "$here/wheels.txt")
pip_download $(grep -v '^#' "$here/extra-wheels.txt" | awk '{print $2}')
"$here/slurm_debs.sh" "$out/slurm-debs"

# Batches: files over 56 MiB in pieces (joined again by `remote.sh install`), packed largest first.
piece=$((56 * 1024 * 1024)); batch_max=$((58 * 1024 * 1024))
rm -rf "$out/batches" "$out/.pieces"; mkdir -p "$out/.pieces"
tar -C "$out" -cf "$out/.pieces/slurm-debs.tar" slurm-debs
for f in "$out"/wheels/*.whl; do
  if [ "$(stat -c %s "$f")" -gt "$piece" ]; then
    split -b "$piece" -d -a 2 "$f" "$out/.pieces/$(basename "$f").part"
  else
    cp "$f" "$out/.pieces/"
  fi
done
n=1; used=0; mkdir -p "$out/batches/01"
for p in $(ls -S "$out/.pieces"); do
  size=$(stat -c %s "$out/.pieces/$p")
  if [ $((used + size)) -gt $batch_max ]; then
    n=$((n + 1)); used=0; mkdir -p "$out/batches/$(printf %02d $n)"
  fi
  mv "$out/.pieces/$p" "$out/batches/$(printf %02d $n)/"; used=$((used + size))
done
rmdir "$out/.pieces"
for d in "$out"/batches/*/; do printf '%s %s\n' "$(du -sm "$d" | cut -f1)MiB" "$d"; done

#!/usr/bin/env bash
# Runs on the GPU machine (no network; /tmp survives between calls while the machine is warm),
# from the repository root of the copy each call lays out:
#
#   benchmarks/gpu/remote.sh receive .gpu-stage/batches/NN   one call per batch (stage.sh made them)
#   benchmarks/gpu/remote.sh install                         wheels, Slurm, checks; writes $ENV_FILE
#   benchmarks/gpu/remote.sh run CMD...                      CMD with that environment, e.g.
#       benchmarks/gpu/remote.sh run python3 -m pytest -m gpu tests/integration
#       benchmarks/gpu/remote.sh run python3 -m benchmarks.gpu_serving setup
#   benchmarks/gpu/remote.sh collect DIR [WORK]              the benchmark's results and logs
#                                                            into DIR (the call's $OUT); WORK:
#                                                            its work folder (/tmp/gpu-serving)
#
# Everything goes under /tmp: the wheels in /tmp/site (pip --target, PYTHONPATH), Slurm unpacked
# in /tmp/slurm (never into /), the benchmark's work in /tmp/gpu-serving.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
stage=/tmp/stage
site=/tmp/site
ENV_FILE=/tmp/appliance-gpu-env.sh

receive() {
  mkdir -p "$stage"
  cp "$1"/* "$stage"/
  echo "received $(ls "$1" | wc -l) files; $(du -sm "$stage" | cut -f1) MiB staged"
}

install() {
  cd "$stage"
  for p in *.part00; do
    [ -e "$p" ] || continue
    f=${p%.part00}
    cat "$f".part* >"$f" && rm "$f".part*
  done
  mkdir -p "$site"
  # CUDA vLLM and its pure-Python needs: --no-deps, exactly the pinned set.
  local wheels=()
  while read -r req; do
    name=$(echo "${req%%==*}" | tr '-' '_' | tr 'A-Z' 'a-z')
    wheels+=($(ls "$stage" | grep -i "^${name}-${req##*==}-" | sed "s|^|$stage/|"))
  done < <(grep -v '^#' "$repo/benchmarks/gpu/wheels.txt")
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${wheels[@]}"
  # The appliance's own needs, each only where the image lacks it.
  while read -r module req; do
    if ! python3 -c "import $module" 2>/dev/null; then
      name=$(echo "${req%%==*}" | tr '-' '_' | tr 'A-Z' 'a-z')
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" $(ls "$stage"/*.whl | grep -i "/${name}-${req##*==}-")
      echo "installed $req (the image has no $module)"
    fi
  done < <(grep -v '^#' "$repo/benchmarks/gpu/extra-wheels.txt")
  subpackages
  # vLLM finds the store's loader through this entry point (pyproject.toml), as an installed
  # appliance provides it.
  mkdir -p "$site/appliance-0.1.0.dist-info"
  printf 'Metadata-Version: 2.1\nName: appliance\nVersion: 0.1.0\n' \
    >"$site/appliance-0.1.0.dist-info/METADATA"
  printf '[vllm.general_plugins]\nappliance_store = appliance.store.vllm_plugin:register\n' \
    >"$site/appliance-0.1.0.dist-info/entry_points.txt"
  # The store's load policies bind models to a host fingerprint made from the machine id; a
  # container image may have none (systemd-machine-id-setup would make one).
  [ -s /etc/machine-id ] || python3 -c 'import uuid; print(uuid.uuid4().hex)' >/etc/machine-id
  tar -C "$stage" -xf "$stage/slurm-debs.tar"
  "$repo/benchmarks/gpu/slurm_unpack.sh" "$stage/slurm-debs" /tmp/slurm
  cat >"$ENV_FILE" <<ENV
. /tmp/slurm/env.sh
export APPLIANCE_GPU_SLURM_PLUGIN_DIR=\$SLURM_PLUGIN_DIR
export PYTHONPATH=$site:\${APPLIANCE_SRC:-$repo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1
ENV
  check
}

check() {
  . "$ENV_FILE"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'PY'
import importlib.metadata as md
import torch, vllm
import appliance.gateway.app, appliance.store.vllm_plugin, cryptography
plugins = [e.name for e in md.entry_points(group="vllm.general_plugins")]
assert "appliance_store" in plugins, plugins
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}, vllm {vllm.__version__}, "
      f"cryptography {cryptography.__version__}, plugins {plugins}")
PY
  for p in slurmctld slurmd sbatch squeue; do command -v "$p" >/dev/null || { echo "no $p"; exit 1; }; done
  echo "ready: . $ENV_FILE"
}

subpackages() {
  # The checkout is not installed here: rag, security, monitoring and installer sit beside
  # appliance/ and are appliance.* subpackages only through pyproject's package-dir (an install
  # maps them). At interpreter start, sitecustomize (a .pth would not be read from a PYTHONPATH
  # folder) adds a folder of links to them to appliance's path.
  local extra=/tmp/appliance-subpackages
  mkdir -p "$extra" "$site"
  for p in rag security monitoring installer; do ln -sfn "$repo/$p" "$extra/$p"; done
  echo "import appliance; appliance.__path__.append('$extra')" >"$site/sitecustomize.py"
}

collect() {
  # After every part: the lease can end before the next call, and /tmp goes with it.
  local work=${2:-/tmp/gpu-serving} r
  mkdir -p "$1"
  for r in results setup; do [ -f "$work/$r.json" ] && cp "$work/$r.json" "$1/"; done
  for r in gpu_serving multi_gpu; do
    [ -f "$repo/benchmarks/results/$r.json" ] && cp "$repo/benchmarks/results/$r.json" "$1/"
  done
  (cd "$work" && tar -czf "$1/logs.tar.gz" --ignore-failed-read logs state/logs state/*.log) || true
  ls -la "$1"
}

case "${1:-}" in
  receive) receive "$2" ;;
  install) install ;;
  subpackages) subpackages ;;
  check) check ;;
  collect) collect "$2" "${3:-}" ;;
  run) shift; . "$ENV_FILE"; cd "$repo"; exec "$@" ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

#!/usr/bin/env bash
# The appliance installer: new hardware to a working appliance in one command.
#   sudo ./installer/install.sh --dry-run     print the plan for this machine, change nothing
#   sudo ./installer/install.sh               install (safe to run again: it says what changed)
#   sudo ./installer/install.sh --help        every option (role, models, ports, prefix)
# It needs only the system's Python 3 (installed with apt-get when missing); the rest runs in
# installer/ (python3 -m appliance.installer) and then in the appliance's own environment.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

# Debian's own Python: the services' environment is built on it, and every account can read it
# (a Python under a user's home, such as pyenv's, is not readable by the service account).
PY=/usr/bin/python3
if [ ! -x "$PY" ] || ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  case " $* " in
    *" --dry-run "*)
      echo "python3 (with venv) is missing: the installer would first run"
      echo "  apt-get install -y python3 python3-venv"
      echo "and then print the full plan. Dry run: nothing was changed."
      exit 0 ;;
  esac
  echo "==> installing python3 and python3-venv (the installer runs on them)"
  as_root=""; [ "$(id -u)" = 0 ] || as_root=sudo
  $as_root apt-get update -q
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -q python3 python3-venv
fi
# The first stage runs from this checkout, laid out as the installed package is: rag/,
# security/, monitoring/ and installer/ are subpackages of appliance (pyproject.toml).
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir "$shim/appliance"
ln -s "$ROOT"/appliance/* "$shim/appliance/"
for p in rag security monitoring installer; do ln -s "$ROOT/$p" "$shim/appliance/$p"; done
# -P: the current folder (a checkout's own appliance/, say) must not come before the shim.
PYTHONPATH="$shim" "$PY" -P -m appliance.installer install "$@"

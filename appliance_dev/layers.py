"""Checks the import layers (pyproject.toml, [tool.importlinter]) on the package as it is
installed: rag/, security/, monitoring/ and installer/ copied in as appliance's subpackages (the
import graph is read from the files of a package's folder, which a checkout does not have)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("rag", "security", "monitoring", "installer")


def main() -> int:
    ignore = shutil.ignore_patterns("__pycache__")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        for package in ("appliance", "appliance_dev"):
            shutil.copytree(ROOT / package, staged / package, ignore=ignore)
        for package in SUBPACKAGES:
            shutil.copytree(ROOT / package, staged / "appliance" / package, ignore=ignore)
        lint = Path(sys.executable).with_name("lint-imports")
        env = {**os.environ, "PYTHONPATH": str(staged)}
        argv = [str(lint), str(ROOT / "pyproject.toml"), "--no-cache"]
        return subprocess.run(argv, cwd=staged, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())

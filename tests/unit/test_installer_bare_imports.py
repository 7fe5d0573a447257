"""The installer plans with the system's Python, before the stack's packages are installed: its
planning modules import nothing beyond the standard library (an import of appliance.slurm.conf
once pulled in pydantic and broke every install)."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import sys
STDLIB = sys.stdlib_module_names
class Blocker:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top not in STDLIB and top != "appliance":
            raise ImportError("not in a bare Python: " + name)
sys.meta_path.insert(0, Blocker())
import appliance.installer.cli, appliance.installer.files, appliance.installer.plan
"""


def test_planning_needs_only_the_standard_library():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]

"""Golden files of everything the appliance writes for other programs (slurm.conf, gres.conf,
sbatch scripts, health checks). Regenerate with: APPLIANCE_UPDATE_GOLDEN=1 pytest tests/unit"""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "unit" / "golden"
UPDATE = os.environ.get("APPLIANCE_UPDATE_GOLDEN") == "1"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with APPLIANCE_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from the golden file; if intended, regenerate"

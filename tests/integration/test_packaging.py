"""The wheel installs one top-level package, `appliance`, with rag, security, monitoring and
installer inside it: installed beside PyPA's `installer` (and any other `rag` or `security`),
both import as themselves."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Each source folder and where its files are in the wheel.
FOLDERS = {
    "appliance": "appliance",
    "rag": "appliance/rag",
    "security": "appliance/security",
    "monitoring": "appliance/monitoring",
    "installer": "appliance/installer",
}
DATA = [
    "appliance/models/presets.json",
    "appliance/store/gcm_kernels.cu",
    "appliance/model_builders/data/facts.yaml",
    "appliance/monitoring/prometheus/appliance-rules.yaml",
]


def run(*argv: str, cwd: Path | None = None, timeout: float = 300) -> str:
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )
    assert out.returncode == 0, f"{argv}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # From a copy of the sources: a build folder left in the checkout would be packed too.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in (*FOLDERS, "appliance_dev"):
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    run(*pip, "-w", str(out), str(source))
    [path] = out.glob("appliance-*.whl")
    return path


def test_the_wheel_holds_one_top_level_package_with_every_subpackage_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"appliance"}
    # Every package folder of the checkout is in the wheel (pyproject.toml lists them).
    for folder, installed in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            inside = init.parent.relative_to(ROOT / folder)
            assert f"{installed}/{inside}/__init__.py".replace("/./", "/") in names, inside
    for path in DATA:
        assert path in names, path
    assert not any(n.startswith("appliance_dev/") for n in names)  # dev tooling is not shipped


def test_installed_beside_pypa_installer_both_import(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    # PyPA's installer from the package registry; the appliance without its dependencies (the
    # check imports only what needs the standard library).
    run(python, "-m", "pip", "install", "-q", "installer")
    run(python, "-m", "pip", "install", "-q", "--no-deps", str(wheel))
    out = run(
        python,
        "-c",
        """
import importlib.util as u
import installer, installer.destinations, installer.sources  # PyPA's, whole
from appliance.installer.profile import load_presets  # the appliance's, with its data
assert installer.destinations.SchemeDictionaryDestination
assert load_presets()
for name in ("rag", "security", "monitoring"):
    assert u.find_spec(name) is None, name
print(installer.__file__)
print(u.find_spec("appliance.installer").origin)
""",
        cwd=tmp_path,  # outside the checkout, whose folders would come first
    )
    pypa, ours = out.split()
    assert pypa.endswith("site-packages/installer/__init__.py")
    assert ours.endswith("site-packages/appliance/installer/__init__.py")

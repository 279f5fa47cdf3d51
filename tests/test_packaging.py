"""The wheel a user installs holds every package (kernels/ as sagfast.kernels), the shipped weights and
the licence. Built from a copy of the tree without the C++ extension (SAGFAST_BUILD_EXT=0 would
remove the extension built in this tree)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_package_the_weights_and_the_licence(tmp_path):
    src = tmp_path / "src"
    keep = ["sagfast", "kernels", "csrc", "setup.py", "pyproject.toml", "README.md", "LICENSE"]
    for name in keep:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "*.egg-info"))
        else:
            shutil.copy(path, src / name)
    env = dict(os.environ, SAGFAST_BUILD_EXT="0")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(src), "-w", str(tmp_path / "wheel")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("sagfast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("sagfast", "sagfast/digits", "sagfast/families", "sagfast/ops", "sagfast/kernels"):
        assert f"{package}/__init__.py" in names, package
    assert "sagfast/kernels/attention_mass.py" in names
    assert "sagfast/weights/digits_unet.safetensors" in names and "sagfast/weights/digits_dit.json" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "sagfast/cli.py" in names

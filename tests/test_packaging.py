"""The wheel installs `bloomconv`, `bloomconv.converters` and `bloomconv.runtime`, nothing bare."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_maps_top_level_folders_into_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("bloomconv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"bloomconv", next(n.split("/")[0] for n in names if ".dist-info/" in n)}, top_level
    for module in ("bloomconv/converters/convert.py", "bloomconv/converters/source.py",
                   "bloomconv/runtime/__init__.py", "bloomconv/cli.py", "bloomconv/format.py"):
        assert module in names
    assert "bloomconv/py.typed" in names  # PEP 561: type checkers use the package's annotations
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "bloomconv = bloomconv.cli:main" in entry_points

"""A normal (non-editable) install works, also when Python runs from the checkout's root.

The import paths map onto the top-level folders (engine/ -> lmbatch.engine, ...); the top
package lives in src/ so that the checkout's root never shadows the installed one.
"""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports_from_the_checkout_root(tmp_path):
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "checkout"
    _copy_tracked_files(source)   # setuptools builds in the source tree: not in this checkout
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("lmbatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmbatch/engine/csrc/paged_decode_attention.cpp" in names   # the kernel sources ship
    assert "lmbatch/testing.py" in names and not any(n.startswith("lmbatch/tests/") for n in names)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)

    # -S: no site hooks, so the checkout's editable install (a .pth finder) is not seen; the
    # dependencies come from this interpreter's site-packages on PYTHONPATH, behind the install.
    code = ("import lmbatch, lmbatch.engine, lmbatch.io, lmbatch.flows.config, lmbatch.testing; "
            "print(lmbatch.engine.__file__); print(lmbatch.flows.config.__file__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *site.getsitepackages()])}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in out), out


def _copy_tracked_files(dest: Path) -> None:
    # The working tree's version of what git tracks or would (untracked, not ignored).
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)

"""The README's layout section names every top-level folder of the repository, and only those."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_layout_matches_the_tree():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    folders = {line.split("/")[0] + "/" for line in files.splitlines() if "/" in line}
    section = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    listed = set(re.findall(r"^(\S+/)", section, re.M))
    assert listed == folders

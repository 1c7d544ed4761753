"""The repository stands alone: nothing a user runs or reads points outside it."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# a relative path that climbs (`../x`), not an ellipsis (`.../x`)
CLIMB = re.compile(r"(?<![\w.])(?:\.\./)+[\w./-]*")


def tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                                check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    files = []
    for name in filter(None, listed):
        if name.split("/")[0] in ("tests", ".ci") or not (REPO / name).is_file():
            continue
        raw = (REPO / name).read_bytes()
        if b"\0" not in raw[:8192]:
            files.append(REPO / name)
    return files


def escapes(path: Path, root: Path = REPO) -> list[str]:
    """`../` paths in ``path`` that do not name something inside ``root``, read from the file's
    own folder (a link from docs/ to ../README.md is fine; ../shared/... is not)."""
    found = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for match in CLIMB.finditer(line):
            target = (path.parent / match.group(0).rstrip(".")).resolve()
            if not (target.is_relative_to(root) and target.exists()):
                found.append(f"{path.relative_to(root)}:{number}: {match.group(0)}")
    return found


def test_no_tracked_file_points_outside_the_repository():
    files = tracked_text_files()
    assert any(f.name == "README.md" for f in files) and any(f.suffix == ".py" for f in files)
    bad = [hit for f in files for hit in escapes(f)]
    assert not bad, "paths outside the repository:\n" + "\n".join(bad)


def test_the_check_sees_an_escape(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("see docs/a.md\n")
    planted = tmp_path / "docs" / "a.md"
    planted.write_text("see ../README.md, .../ellipsis and\n[x](../../shared/DESIGN.md)\n")
    assert escapes(planted, tmp_path) == ["docs/a.md:2: ../../shared/DESIGN.md"]
    planted.write_text("see ../README.md\n")
    assert not escapes(planted, tmp_path)

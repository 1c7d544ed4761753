"""What pyproject.toml declares: every package the code imports, the version, the Python floor."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

import pytest

import collafuse
from collafuse.cli import main

from conftest import REPO

# imported at run time, but installed beside the package by hand (pyproject.toml says why)
INSTALLED_APART = {"cleanfid": "clean-fid"}


def third_party_imports() -> set[str]:
    """Top-level names of the modules src/collafuse imports that are neither its own nor stdlib."""
    names = set()
    for path in (REPO / "src" / "collafuse").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "collafuse"}


def test_every_import_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[=<>~! ]", d)[0].lower().replace("_", "-")
                for d in project["dependencies"]}
    dists = packages_distributions()
    imports = third_party_imports()
    assert {"torch", "diffusers", "flwr", "numpy"} <= imports  # the scan sees imports
    missing = {}
    for name in imports - set(INSTALLED_APART):
        owners = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
        if not owners & declared:
            missing[name] = sorted(owners)
    assert not missing, f"imported but not in pyproject.toml dependencies: {missing}"
    assert "tensorboard" in declared  # torch.utils.tensorboard needs it (collafuse.tracking)
    text = (REPO / "pyproject.toml").read_text()
    for name, dist in INSTALLED_APART.items():  # documented with its install command instead
        assert f"pip install --no-deps {dist}==" in text


def test_version_and_python_floor(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"collafuse {collafuse.__version__}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == collafuse.__version__
    floor = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"]).groups()
    assert sys.version_info[:2] >= tuple(map(int, floor))
    assert f"Programming Language :: Python :: {'.'.join(floor)}" in project["classifiers"]


def test_missing_clean_fid_is_one_line_naming_the_install(monkeypatch, capsys):
    """KID without clean-fid: one line with the command that installs it, as the CLI shows it."""
    import numpy as np

    from collafuse.cli import _one_line
    from collafuse.evaluation import kid

    monkeypatch.setitem(sys.modules, "cleanfid", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "cleanfid.resize", None)
    kid._clean_resizer.cache_clear()
    try:
        with pytest.raises(ImportError) as err:
            kid._resize_clean(np.zeros((3, 8, 8), np.uint8))
    finally:
        kid._clean_resizer.cache_clear()
    assert "\n" not in str(err.value)
    assert "pip install --no-deps clean-fid==0.1.35" in _one_line(err.value)

"""The layering rule of docs/design.md section 4, checked: no module imports from a layer above
its own. The layers are read from that section's numbered list (the one place they are
written), so the docs and this test cannot drift apart."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "collafuse"
DESIGN = ROOT / "docs" / "design.md"
ITEM = re.compile(r"^(\d+)\. (\w[\w ]*?) \(", re.M)  # "6. engines (`factory.py`, ..."
PLACE = re.compile(r"`([\w/.]+(?:\.py|/))`")  # a backticked file or folder of src/collafuse/


def read_layers(design_text: str) -> dict[str, tuple[int, str]]:
    """{file or folder under src/collafuse/: (layer number, layer name)} from the numbered list
    that follows "Layers, bottom up." and ends at the next code block."""
    section = design_text[design_text.index("Layers, bottom up."):]
    section = section[:section.index("```")]
    items = list(ITEM.finditer(section))
    places = {}
    for item, after in zip(items, items[1:] + [None]):
        text = section[item.start():after.start() if after else len(section)]
        for place in PLACE.findall(text):
            places[place] = (int(item.group(1)), item.group(2))
    return places


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module of the package, line) for every import in the file, at any depth: ``import
    collafuse.x``, ``from collafuse.x import y``, ``from .x import y``, ``from .. import x``
    (x a module where it is one)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names
                      if alias.name.split(".")[0] == "collafuse"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(path).split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "collafuse":
                continue
            for alias in node.names:  # `from . import attacks` imports the module attacks
                sub = f"{target}.{alias.name}"
                found.append((sub if module_file(sub) else target, node.lineno))
    return sorted(set(found), key=found.index)  # `from x import a, b` is one import of x


def module_file(name: str) -> Path | None:
    """The file of module ``name`` of the package; None for a name that is not a module."""
    parts = name.split(".")[1:]
    if not parts:
        return PACKAGE / "__init__.py"
    for candidate in (PACKAGE.joinpath(*parts[:-1], parts[-1] + ".py"),
                      PACKAGE.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def imports_nothing(path: Path) -> bool:
    return not imported_modules(path)


def layer_of(path: Path, places: dict) -> tuple[int, str] | None:
    """The layer of the longest place (file or folder) that holds ``path``."""
    rel = path.relative_to(PACKAGE).as_posix()
    holding = [p for p in places if rel == p or (p.endswith("/") and rel.startswith(p))]
    return places[max(holding, key=len)] if holding else None


def upward_imports(places: dict) -> list[str]:
    """One line per import of a module from a layer above the importer's."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer_of(path, places)
        if own is None:
            if not (path.name == "__init__.py" and imports_nothing(path)):
                problems.append(f"{module_name(path)}: in no layer of docs/design.md section 4")
            continue
        for name, line in imported_modules(path):
            target = module_file(name)
            if target is None or (target.name == "__init__.py" and imports_nothing(target)):
                continue  # not a module of ours, or a package that runs nothing when imported
            theirs = layer_of(target, places)  # None: reported above as a module in no layer
            if theirs is not None and theirs[0] > own[0]:
                problems.append(f"{module_name(path)}:{line} imports {name}: layer {own[0]} "
                                f"({own[1]}) imports from layer {theirs[0]} ({theirs[1]})")
    return problems


@pytest.fixture(scope="module")
def places():
    return read_layers(DESIGN.read_text())


def test_design_lists_ten_layers_bottom_up(places):
    layers = sorted(set(places.values()))
    assert [number for number, _ in layers] == list(range(1, 11))
    assert places["diffusion.py"][0] < places["client.py"][0] < places["engines/"][0] \
        < places["evaluation/sweep.py"][0] < places["cli.py"][0]


def test_every_place_the_design_names_exists(places):
    missing = [p for p in places if not (PACKAGE / p).exists()]
    assert not missing, f"docs/design.md section 4 names what src/collafuse/ lacks: {missing}"


def test_no_module_imports_from_a_layer_above_it(places):
    problems = upward_imports(places)
    assert not problems, "\n".join(problems)


def test_an_upward_import_is_caught_with_both_layers(places, tmp_path, monkeypatch):
    """The walk sees an import inside a function, written as ``from .. import x``: a copy of
    the package whose diffusion math imports the engine inside a function fails, naming the
    module, the import and both layers."""
    import shutil

    copy = tmp_path / "collafuse"
    shutil.copytree(PACKAGE, copy)
    with (copy / "diffusion.py").open("a") as f:
        f.write("\n\ndef _upward():\n    from .engines import local\n    return local\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    problems = upward_imports(places)
    assert len(problems) == 1
    assert re.fullmatch(r"collafuse\.diffusion:\d+ imports collafuse\.engines\.local: layer 2 "
                        r"\(diffusion math\) imports from layer 6 \(engines\)", problems[0])

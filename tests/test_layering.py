"""The folders of ``src/cryosip`` import only downwards (issue 16):

    sip -> cryoem -> conformations -> data -> pipeline -> analysis -> experiments -> cli

``sip`` is the generic engine (nothing from cryo-EM), ``cryoem`` the forward physics (pose, CTF,
projection, image model, noise), ``conformations`` maps a CV to atoms, ``data`` reads and writes
formats, ``pipeline`` joins them into problems, operators and
methods, ``analysis`` turns results into files and pages, ``experiments`` and ``cli`` are on
top. The check reads every module's imports with ``ast`` (function-local imports included).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ORDER = ("sip", "cryoem", "conformations", "data", "pipeline", "analysis", "experiments", "cli")
# modules at the package root belong to a layer too
ROOT_MODULES = {"_atomic": "sip", "__init__": None}
SRC = Path(__file__).resolve().parents[1] / "src" / "cryosip"


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "cryosip" or len(parts) < 2:
        return None
    return ROOT_MODULES.get(parts[1], parts[1]) if parts[1] not in ORDER else parts[1]


def upward_imports(module: str, source: str) -> list[str]:
    """'module:line imports target' for each import of a higher layer."""
    me = layer_of(module)
    if me not in ORDER:
        return []
    bad = []
    pkg = module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                targets = [".".join(base + ([node.module] if node.module else []))]
            else:
                targets = [node.module or ""]
            if not node.module:  # from . import a, b
                targets = [f"{targets[0]}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            tl = layer_of(t)
            if tl in ORDER and ORDER.index(tl) > ORDER.index(me):
                bad.append(f"{module}:{node.lineno} imports {t}")
    return bad


def _modules():
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC.parent).with_suffix("")
        yield ".".join(rel.parts), f.read_text()


def test_no_folder_imports_a_higher_one():
    bad = [b for mod, src in _modules() for b in upward_imports(mod, src)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "module, source",
    [
        ("cryosip.sip.flow", "from ..cryoem.ctf import compute_ctf\n"),
        ("cryosip.cryoem.ctf", "def f():\n    from cryosip.data.star import read_star\n"),
        ("cryosip.data.star", "from ..pipeline.problem import prepare\n"),
    ],
)
def test_the_check_catches_a_deliberate_upward_import(module, source):
    assert len(upward_imports(module, source)) == 1

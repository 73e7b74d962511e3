"""The product ships the services only; the benchmarks are a second distribution.

``pip install virtman`` must not install the benchmarks or the simulator (issue 9 §4):
they live in tools/bench as ``virtman-bench`` and plug ``virtman bench`` in through the
``virtman.commands`` entry point. Without them, ``virtman bench`` says how to get them.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
TOOLS_SRC = ROOT / "tools" / "bench" / "src"
TOOLS = "virtman_bench"
INSTALL_HINT = "pip install ./tools/bench"


def product_wheel_names(root: Path, work: Path) -> list[str]:
    """Build the product's wheel from a copy of ``root`` (offline, with the installed
    backend) and list the files inside it."""
    tree = work / "tree"
    shutil.copytree(root / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tree / name)
    out = work / "wheel"
    build = subprocess.run(
        [sys.executable, "-c",
         "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))",
         str(out)],
        cwd=tree, capture_output=True, text=True, timeout=120, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = out / build.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_the_product_wheel_has_no_benchmarks_or_simulator(tmp_path: Path) -> None:
    names = product_wheel_names(ROOT, tmp_path)
    # The wheel holds the product: without these the checks below would pass on nothing.
    assert "virtman/cli/main.py" in names and "virtman/py.typed" in names, names[:20]
    tools = [n for n in names
             if n.startswith(("virtman/bench/", "virtman/sim/", f"{TOOLS}/"))
             or n in ("virtman/results.py", "virtman/cli/bench.py")]
    assert tools == [], f"the product wheel carries the tools: {tools}"
    entry_points_txt = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert len(entry_points_txt) == 1


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, or names as a string (``import_module("x")``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value == TOOLS or node.value.startswith(f"{TOOLS}."):
                found.add(node.value)
    return found


def test_no_product_module_imports_the_tools() -> None:
    modules = sorted(SRC.joinpath("virtman").rglob("*.py"))
    assert len(modules) > 50
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imports_of(path)
                                            if m == TOOLS or m.startswith(f"{TOOLS}."))
        for path in modules
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    # The scan does see such imports: the tools' own command module has them.
    assert "virtman_bench.nbd" in imports_of(TOOLS_SRC / TOOLS / "cli.py")


def test_the_bench_entry_point_resolves_to_the_tools() -> None:
    found = list(entry_points(group="virtman.commands", name="bench"))
    assert [ep.value for ep in found] == [f"{TOOLS}.cli"], found
    command = found[0].load()
    assert callable(command.add_parser) and callable(command.run_unparsed)
    run = subprocess.run([sys.executable, "-m", "virtman", "bench", "--help"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    for kind in ("nbd", "scale", "simulate", "calibrate", "guests", "report"):
        assert kind in run.stdout


def _hidden_path(work: Path) -> list[str]:
    """This interpreter's import path with the tools' distribution taken out: every
    directory that holds a tools package, metadata or editable hook is replaced by a
    mirror of symlinks to everything else in it."""
    path = [str(SRC)]
    for i, entry in enumerate(sys.path):
        where = Path(entry or ".")
        if not where.is_dir():
            path.append(entry)
            continue
        children = list(where.iterdir())
        kept = [c for c in children
                if TOOLS not in c.name.lower().replace("-", "_").replace(".", "_")]
        if len(kept) == len(children):
            path.append(str(where))
            continue
        mirror = work / f"path{i}"
        mirror.mkdir()
        for child in kept:
            (mirror / child.name).symlink_to(child)
        path.append(str(mirror))
    return path


def _virtman(path: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``virtman ARGS`` in a fresh interpreter that imports from ``path`` only (``-S``: no
    site hooks, so no editable install can put the tools back)."""
    code = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
            "from virtman.cli.main import main; sys.exit(main(sys.argv[2:]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-S", "-c", code, json.dumps(path), *args],
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def test_virtman_bench_without_the_tools_says_how_to_install_them(tmp_path: Path) -> None:
    hidden = _hidden_path(tmp_path)
    # The launcher itself works: with the whole path the tools are there.
    seen = _virtman([str(SRC), *sys.path], "bench", "--help")
    assert seen.returncode == 0 and "simulate" in seen.stdout, seen.stderr

    for args in (["bench"], ["bench", "nbd", "--size", "16M"],
                 ["--log-level", "debug", "bench", "scale", "--hosts", "2,3", "--help"]):
        run = _virtman(hidden, *args)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        lines = run.stderr.splitlines()
        assert len(lines) == 1, (args, run.stderr)
        assert lines[0].startswith("virtman bench: not installed")
        assert INSTALL_HINT in lines[0] and "scripts/install.sh" in lines[0]
        assert run.stdout == ""

    # The services do not need the tools: the rest of the command works and says so.
    usage = _virtman(hidden, "--help")
    assert usage.returncode == 0, usage.stderr
    assert "not installed" in usage.stdout

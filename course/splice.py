"""The exercise functions of a tree, read and rewritten by their syntax tree (ast line spans), so a rewritten file is
byte-identical to the original outside the function touched. make_student.py blanks them, grade.py splices a
student's into a fresh reference copy, check_bugs.py plants bugs; all three copy trees and run pytest through here."""

import ast
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the reference: the tree this course/ folder belongs to
SKIP_DIRS = {".git", "out", "__pycache__", ".venv", ".pytest_cache"}
# What an exercise function may import: the runtime dependencies (requirements.txt), the standard library and the
# project's own modules (the top-level .py files of the reference).
RUNTIME_DEPS = {"torch", "numpy", "PIL", "tqdm", "safetensors", "tokenizers"}
PROJECT = {p.stem for p in ROOT.glob("*.py")}


# ----------------------------------------------------------------------------------------------------------------------
# Trees


def tree_files(root: Path) -> list[str]:
    """A tree's files, relative: in a git checkout the tracked files and the untracked ones git does not ignore; in a
    plain folder (a student's copy) every file but .git, out/ and caches."""
    root = Path(root)
    if (root / ".git").exists():
        git = ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        listed = subprocess.run(git, capture_output=True, check=True).stdout.decode().split("\0")
        return sorted(f for f in listed if f and (root / f).is_file())
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts))


def tracked_inside(path: Path) -> bool:
    """Would tree_files(ROOT) list files written at path (inside this git checkout, not ignored)?"""
    path = path.resolve()
    if not (ROOT / ".git").exists() or not path.is_relative_to(ROOT):
        return False
    return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(path)]).returncode != 0


def copy_tree(src: Path, dest: Path, files: list[str]):
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, dest / f)


# ----------------------------------------------------------------------------------------------------------------------
# Functions by qualified name ("name" or "Class.method")


DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def find(module: ast.Module, qualname: str):
    """The function (or class) node of qualname, the last definition as Python keeps it, or None."""
    node = module
    for part in qualname.split("."):
        defs = [n for n in getattr(node, "body", []) if isinstance(n, DEFS) and n.name == part]
        if not defs:
            return None
        node = defs[-1]
    return node


def span(node) -> tuple[int, int]:
    """0-based [start, end) line slice of a statement, a definition's decorators included."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1, node.end_lineno


def has_docstring(node) -> bool:
    first = node.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


@functools.cache
def reference_file(file: str) -> tuple:
    """(syntax tree, lines with their ends) of a file of the reference, parsed once."""
    src = (ROOT / file).read_text()
    return ast.parse(src), src.splitlines(keepends=True)


def function_text(src: str, qualname: str) -> str | None:
    """The source of a definition, decorators included, or None where the file does not define it."""
    node = find(ast.parse(src), qualname)
    if node is None:
        return None
    start, end = span(node)
    return "".join(src.splitlines(keepends=True)[start:end])


def replace(src: str, qualname: str, text: str) -> str:
    """src with the definition of qualname replaced by `text` (re-indented to the definition's column if it sits at
    another), every other byte as it was."""
    node = find(ast.parse(src), qualname)
    lines = src.splitlines(keepends=True)
    start, end = span(node)
    column = len(text) - len(text.lstrip(" "))
    if column != node.col_offset:  # a method written at module level, say: re-indent it
        text = textwrap.indent(textwrap.dedent(text), " " * node.col_offset)
    return "".join(lines[:start]) + text.rstrip("\n") + "\n" + "".join(lines[end:])


def blank(src: str, qualname: str, message: str) -> tuple[str, list[str]]:
    """src with the body of qualname after its docstring replaced by `raise NotImplementedError(message)`; and the
    lines removed. Signature, decorators and docstring stay: they are the student's specification."""
    node = find(ast.parse(src), qualname)
    if node is None or not has_docstring(node):
        raise ValueError(f"{qualname}: an exercise function must exist and have a docstring (the student's spec)")
    lines = src.splitlines(keepends=True)
    start, end = node.body[0].end_lineno, node.end_lineno
    indent = " " * node.body[0].col_offset
    return "".join(lines[:start]) + f'{indent}raise NotImplementedError("{message}")\n' + "".join(lines[end:]), \
        lines[start:end]


def is_stub(node) -> bool:
    """A function whose body (after its docstring) is one `raise NotImplementedError...`: an exercise not attempted."""
    body = node.body[1:] if has_docstring(node) else node.body
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def imported(node) -> set[str]:
    """Top-level package names a piece of code imports (import x.y, from x import y; relative imports as '.')."""
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            names.add("." if n.level else n.module.split(".")[0])
        elif isinstance(n, ast.Call) and getattr(n.func, "id", None) == "__import__":
            names.add("__import__")
    return names


def disallowed(names: set[str]) -> list[str]:
    return sorted(n for n in names if n not in RUNTIME_DEPS | PROJECT and n not in sys.stdlib_module_names)


# ----------------------------------------------------------------------------------------------------------------------
# Solution lines (what make_student.py removes, and checks no file of a student tree still holds)

COMMENT = re.compile(r"""\s+#[^'"]*$""")  # a trailing comment after code, when no quote follows the '#'


def normal_line(line: str) -> str:
    """A line as compared for leaks: without surrounding whitespace or a trailing comment, inner spaces collapsed."""
    line = line.strip()
    if line.startswith("#"):
        return ""
    return " ".join(COMMENT.sub("", line).split())


# ----------------------------------------------------------------------------------------------------------------------
# pytest in a subprocess


def run_pytest(tree: Path, args: list[str], xml: Path, timeout: float) -> tuple[int | None, str]:
    """pytest on `args` in `tree`, results to junit `xml`; (exit code, or None when killed at `timeout` seconds; the
    output's tail). The whole process group is killed on timeout, so an endless loop in a student's code cannot hang
    the caller."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(xml), *args]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out[-4000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out[-4000:]


def junit_results(xml: Path) -> dict[str, tuple[str, str]]:
    """{node id: (passed | failed | skipped, first line of the failure)} from a junit file of a run in a tree whose
    tests are module-level functions (classname tests.test_x -> tests/test_x.py)."""
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        node = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            first = (bad.get("message") or bad.text or "").strip().splitlines()
            results[node] = ("failed", first[0][:200] if first else "")
        else:
            results[node] = ("skipped" if case.find("skipped") is not None else "passed", "")
    return results


def cases_of(test: str, results: dict) -> list[str]:
    """The collected cases of a listed test: itself, or its parametrized cases when listed without parameters."""
    return [n for n in results if n == test or ("[" not in test and n.startswith(test + "["))]

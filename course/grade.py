"""Grade one assignment of a student tree, exercise by exercise.

    python course/grade.py STUDENT_DIR --assignment A3 --results results.json

Each exercise is graded alone: only the student's versions of ITS functions (with the imports and helper functions the
student added to those files) are copied into a fresh copy of the reference tree, and its tests (course/manifest.py)
run there in their own pytest process, killed after --timeout seconds. So a mistake in one exercise costs only that
exercise's points, and a student stuck on an earlier assignment loses nothing here.

Points: an exercise's points are split evenly over its listed tests; a test earns its share when all of its cases pass
(partial credit per test). A submission that cannot run costs the exercise its points with a one-line reason, and never
stops the grader: a file that does not parse, a missing function, an import outside the standard library, the runtime
dependencies (requirements.txt) and the project's own modules, a timeout (an endless loop), tests that cannot start.
An exercise whose functions all still raise NotImplementedError is "not attempted" (0 points, no tests run). When the
student's functions are the reference's, their exercises share one pytest run in the unmodified reference copy.

--results writes Gradescope's autograder format: {"score", "execution_time", "output", "tests": [{"name", "number",
"score", "max_score", "output", "visibility"}, ...]}, one entry per exercise. The goldens (pytest -m golden: recorded
numbers of the reference on one machine) are never graded.
"""

import argparse
import ast
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import manifest as MF
import splice as S

TIMEOUT = 60  # seconds per exercise: its tests take at most 10 s on 2 cores, plus pytest's start


@dataclass
class Submission:
    """What one exercise becomes in the grading tree: the rewritten files, or why it cannot be graded."""
    exercise: dict
    files: dict = field(default_factory=dict)  # relative path -> new source
    reason: str | None = None  # set: 0 points, no run
    same_as_reference: bool = False


# ----------------------------------------------------------------------------------------------------------------------
# Splicing a student's functions into the reference


def student_file(student: Path, rel: str) -> Path | None:
    """The student's copy of a reference file: at the same path, else (an upload of loose files) the shallowest file
    of that name."""
    if (student / rel).is_file():
        return student / rel
    found = sorted(student.rglob(Path(rel).name), key=lambda p: len(p.parts))
    return found[0] if found else None


def defined(node) -> set[str]:
    """The names a top-level statement defines (functions, classes, assigned constants)."""
    if isinstance(node, S.DEFS):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def additions(student: ast.Module, reference: ast.Module, qualnames: list[str]) -> tuple[list, list, dict]:
    """What a student added to a file for their exercise functions to use: new top-level imports, new top-level
    functions, classes and constants, and new methods of the classes that hold exercise methods ({class: [nodes]})."""
    known_imports = {ast.dump(n) for n in reference.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    known = set().union(*(defined(n) for n in reference.body))
    imports = [n for n in student.body
               if isinstance(n, (ast.Import, ast.ImportFrom)) and ast.dump(n) not in known_imports]
    tops = [n for n in student.body if defined(n) and not defined(n) & known]
    methods = {}
    for cls in {q.split(".")[0] for q in qualnames if "." in q}:
        ours, theirs = S.find(reference, cls), S.find(student, cls)
        names = {n.name for n in ours.body if isinstance(n, S.DEFS)}
        methods[cls] = [n for n in theirs.body if isinstance(n, S.DEFS) and n.name not in names]
    return imports, tops, methods


def splice_file(rel: str, qualnames: list[str], student: Path) -> tuple[str | None, str | None, bool]:
    """(new source of the reference file rel with the student's qualnames and what they added for them, or None; the
    reason when None; whether every one of them is still the stub)."""
    path = student_file(student, rel)
    if path is None:
        return None, f"the submission has no {rel}", False
    src = path.read_text(errors="replace")
    try:
        module = ast.parse(src)
    except SyntaxError as e:
        return None, f"{rel} does not parse (line {e.lineno}: {e.msg})", False
    reference_src = (S.ROOT / rel).read_text()
    reference = ast.parse(reference_src)
    nodes = {q: S.find(module, q) for q in qualnames}
    missing = [q for q, n in nodes.items() if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if missing:
        return None, f"{rel} has no {missing[0]}", False
    imports, tops, methods = additions(module, reference, qualnames)
    added = [*nodes.values(), *imports, *tops, *(m for ms in methods.values() for m in ms)]
    bad = S.disallowed(set().union(*(S.imported(n) for n in added)))
    if bad:
        return None, (f"{rel} imports {', '.join(bad)}: only the standard library, {', '.join(sorted(S.RUNTIME_DEPS))} "
                      "and the project's modules are allowed"), False
    lines = src.splitlines(keepends=True)

    def text(node) -> str:
        return "".join(lines[slice(*S.span(node))]).rstrip("\n") + "\n"
    new = reference_src
    for q in qualnames:
        new = S.replace(new, q, text(nodes[q]))
    for cls, extra in methods.items():  # at the end of the reference's class body
        end = S.find(ast.parse(new), cls).end_lineno
        new_lines = new.splitlines(keepends=True)
        new = "".join(new_lines[:end]) + "".join("\n" + text(m) for m in extra) + "".join(new_lines[end:])
    if imports:  # after the reference's last top-level import, so the module's own names stay as they were
        last = max(n.end_lineno for n in reference.body if isinstance(n, (ast.Import, ast.ImportFrom)))
        new_lines = new.splitlines(keepends=True)
        new = "".join(new_lines[:last]) + "".join(text(n) for n in imports) + "".join(new_lines[last:])
    if tops:  # at the end: the functions use them when called, after the module has run
        new = new.rstrip("\n") + "\n\n\n" + "\n\n".join(text(n) for n in tops)
    return new, None, all(S.is_stub(n) for n in nodes.values())


def splice(ex: dict, student: Path) -> Submission:
    by_file = {}
    for fn in ex["functions"]:
        rel, qualname = fn.split(":")
        by_file.setdefault(rel, []).append(qualname)
    sub, stubs = Submission(ex), []
    for rel, qualnames in by_file.items():
        new, reason, stub = splice_file(rel, qualnames, student)
        if reason:
            sub.reason = reason
            return sub
        sub.files[rel] = new
        stubs.append(stub)
    if all(stubs):
        sub.reason = "not attempted: its functions still raise NotImplementedError"
    sub.same_as_reference = all(new == (S.ROOT / rel).read_text() for rel, new in sub.files.items())
    return sub


# ----------------------------------------------------------------------------------------------------------------------
# Running and scoring


def score(ex: dict, results: dict) -> tuple[float, int, list[str]]:
    """(points, tests passed, one line per test) of an exercise from its run's results."""
    passed, lines = 0, []
    for test in ex["tests"]:
        cases = S.cases_of(test, results)
        bad = [c for c in cases if results[c][0] != "passed"]
        if cases and not bad:
            passed += 1
            lines.append(f"PASS {test}")
        else:
            why = f"{results[bad[0]][0]}: {results[bad[0]][1]}" if bad else "not run"
            lines.append(f"FAIL {test} ({why})")
    return round(ex["points"] * passed / len(ex["tests"]), 2), passed, lines


def run(tree: Path, exercises: list[dict], xml: Path, timeout: float) -> tuple[dict | None, str]:
    """The exercises' tests in one pytest run in tree: (results by node id, or None; the reason when None)."""
    tests = sorted({t for ex in exercises for t in ex["tests"]})
    code, out = S.run_pytest(tree, ["-m", MF.NOT_GOLDEN, *tests], xml, timeout)
    if code is None:
        return None, f"timed out after {timeout:.0f} s (an endless loop?)"
    if code not in (0, 1) or not xml.exists():
        tail = [line for line in out.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return None, f"the tests could not run (pytest exit {code}): {tail[0][:200]}"
    return S.junit_results(xml), ""


def grade(student: Path, exercises: list[dict], work: Path, timeout: float = TIMEOUT) -> list[dict]:
    """One Gradescope test entry per exercise."""
    reference = work / "reference"
    S.copy_tree(S.ROOT, reference, [f for f in S.tree_files(S.ROOT) if f not in MF.STAFF_ONLY])
    subs = [splice(ex, student) for ex in exercises]
    outcome = {}  # exercise id -> (results or None, reason)
    same = [s.exercise for s in subs if s.reason is None and s.same_as_reference]
    if same:
        results, reason = run(reference, same, work / "reference.xml", timeout * len(same))
        outcome.update({ex["id"]: (results, reason) for ex in same})
    for sub in subs:
        ex = sub.exercise
        if sub.reason is not None:
            outcome[ex["id"]] = (None, sub.reason)
        elif not sub.same_as_reference:
            tree = work / ex["id"]
            shutil.copytree(reference, tree)
            for rel, src in sub.files.items():
                (tree / rel).write_text(src)
            outcome[ex["id"]] = run(tree, [ex], work / f"{ex['id']}.xml", timeout)
            shutil.rmtree(tree)
    entries = []
    for ex in exercises:
        results, reason = outcome[ex["id"]]
        points, passed, lines = score(ex, results) if results is not None else (0.0, 0, [])
        entries.append({"name": f"{ex['id']} {ex['title']} ({ex['section']})", "number": ex["id"], "score": points,
                        "max_score": ex["points"], "output": "\n".join([reason] if reason else lines),
                        "visibility": "visible", "passed": passed, "reason": reason})
    return entries


def table(entries: list[dict], exercises: list[dict]) -> str:
    rows = ["| exercise | tests passed | points | note |", "|---|---|---|---|"]
    for e, ex in zip(entries, exercises):
        rows.append(f"| {e['number']} {ex['title']} | {e['passed']}/{len(ex['tests'])} | {e['score']:g}/"
                    f"{e['max_score']} | {e['reason'] or ''} |")
    total, most = sum(e["score"] for e in entries), sum(e["max_score"] for e in entries)
    rows.append(f"| total | | {total:g}/{most} | |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="grade.py", description="Grade one assignment of a student tree, exercise by "
                                 "exercise, each in its own fresh copy of the reference.")
    ap.add_argument("student", type=Path, help="the student's tree (or a folder holding the files they changed)")
    ap.add_argument("--assignment", required=True, choices=list(MF.ASSIGNMENTS), help="the assignment to grade")
    ap.add_argument("--results", type=Path, help="write Gradescope's results.json here")
    ap.add_argument("--timeout", type=float, default=TIMEOUT,
                    help=f"seconds each exercise's tests may take before they are killed (default {TIMEOUT})")
    args = ap.parse_args(argv)
    if not args.student.is_dir():
        ap.exit(2, f"{ap.prog}: error: {args.student} is not a folder: pass the student's tree\n")
    if args.timeout <= 0:
        ap.exit(2, f"{ap.prog}: error: --timeout {args.timeout:g}: must be above 0\n")
    if args.results is not None and not args.results.parent.is_dir():
        ap.exit(2, f"{ap.prog}: error: --results {args.results}: the folder {args.results.parent} does not exist\n")
    exercises = [ex for ex in MF.EXERCISES if ex["id"].split(".")[0] == args.assignment]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="grade-") as work:
        entries = grade(args.student.resolve(), exercises, Path(work), args.timeout)
    print(table(entries, exercises))
    if args.results is not None:
        total = round(sum(e["score"] for e in entries), 2)
        keep = ("name", "number", "score", "max_score", "output", "visibility")
        results = {"score": total, "execution_time": round(time.time() - t0),
                   "output": f"{args.assignment}: {total:g} of {sum(e['max_score'] for e in entries)} points",
                   "tests": [{k: e[k] for k in keep} for e in entries]}
        args.results.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

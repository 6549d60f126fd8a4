"""Build the student version of one assignment (course/README.md says how to hand it out).

    python course/make_student.py --assignment A3 --out student_A3 --checkpoints out
    python course/make_student.py --list                      # the exercise table

The student tree is this repository without its history (git's files, course/manifest.py's STAFF_ONLY left out): the
assignment's exercises and every later one blanked (signature and docstring kept, the body raises NotImplementedError
naming the exercise and its handout), every earlier one kept as staff code, and the instructor's checkpoints of the
stages before it in out/ (out/base for every assignment; out/sft from A4 on, out/bridge for A5), where the toy commands
look for them. It is written beside --out and renamed into place only after these checks pass (a few minutes; CI
builds with --no-check): every module imports; every test is collected; each blanked exercise's tests fail there and
pass on the reference; nothing else fails but the `breaks` the manifest declares; the assignment's tests pass once its
exercises are written, later assignments still blank; no removed solution line (16 characters or more, comments aside,
not also used by the project's own code elsewhere) appears in any file of the student tree, tests and handouts
included. --out must lie outside this repository or in a folder git ignores (out/), so that no copy of the reference
picks the student tree up.
"""

import argparse
import fnmatch
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import manifest as MF
import splice as S

CHECKPOINT_FILES = ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "tokenizer.json",
                    "nanoclear.json")
STAGE_COMMAND = {"base": "python pretrain.py", "sft": "python sft.py", "bridge": "python bridge.py"}
MIN_SOLUTION_LINE = 16  # shorter removed lines (`return out`, `else:`) are not solutions anyone could copy
TEXT_SUFFIXES = {".py", ".md", ".txt", ".json", ".ini", ".toml", ".cfg", ".sh", ".yml", ".yaml", ""}
SUITE_TIMEOUT = 1800  # seconds for the whole suite in a student tree


class Refused(Exception):
    """A check failed or an input is unusable: the one-line message says which and what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# The manifest, read


def assignment_of(ex: dict) -> str:
    return ex["id"].split(".")[0]


def blanked_exercises(assignment: str) -> list[dict]:
    """The assignment's exercises and every later one."""
    order = list(MF.ASSIGNMENTS)
    return [ex for ex in MF.EXERCISES if order.index(assignment_of(ex)) >= order.index(assignment)]


def stub_message(ex: dict, qualname: str) -> str:
    return f"{ex['id']}: write {qualname} ({ex['section']}, course/{assignment_of(ex)}.md)"


def lines_to_write(ex: dict) -> int:
    """Code lines of the reference's bodies (after the docstrings), blank and comment lines aside."""
    n = 0
    for fn in ex["functions"]:
        file, qualname = fn.split(":")
        module, lines = S.reference_file(file)
        node = S.find(module, qualname)
        n += sum(1 for line in lines[node.body[0].end_lineno:node.end_lineno] if S.normal_line(line))
    return n


def exercise_table(assignment: str | None = None) -> str:
    """The exercises (of one assignment, or all) as a markdown table; the handouts hold their assignment's, checked."""
    rows = ["| exercise | paper | you write | lines | tests | points | minutes | depends on |",
            "|---|---|---|---|---|---|---|---|"]
    for ex in MF.EXERCISES:
        if assignment in (None, assignment_of(ex)):
            names = ", ".join(f"`{f.replace('.py:', '.')}`" for f in ex["functions"])
            rows.append(f"| {ex['id']} {ex['title']} | {ex['section']} | {names} | {lines_to_write(ex)} | "
                        f"{len(ex['tests'])} | {ex['points']} | {ex['minutes']} | {', '.join(ex['depends']) or '-'} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------------
# Building


def check_checkpoints(folder: Path, stages: tuple):
    """Each stage the assignment starts from must be a complete BAGEL-format folder under --checkpoints."""
    sys.path.insert(0, str(S.ROOT))
    import checkpoint as CK
    for stage in stages:
        path = folder / stage
        lacking = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        if lacking:
            raise Refused(f"--checkpoints {folder}: {path} is not a complete checkpoint (no {', '.join(lacking)}); "
                          f"run `{STAGE_COMMAND[stage]}` in the reference first (course/README.md)")
        try:
            CK.config_from_folder(path)
        except (CK.InputError, ValueError) as e:
            raise Refused(f"--checkpoints {folder}: {path} is not a usable checkpoint ({e})") from None


def build(assignment: str, dest: Path, checkpoints: Path) -> dict:
    """Write the student tree into dest (which must not exist); returns {exercise id: its removed solution lines}."""
    files = [f for f in S.tree_files(S.ROOT) if f not in MF.STAFF_ONLY]
    S.copy_tree(S.ROOT, dest, files)
    removed = {}
    for ex in blanked_exercises(assignment):
        removed[ex["id"]] = []
        for fn in ex["functions"]:
            file, qualname = fn.split(":")
            src, lines = S.blank((dest / file).read_text(), qualname, stub_message(ex, qualname))
            (dest / file).write_text(src)
            removed[ex["id"]] += [(file, line) for line in lines]
    for stage in MF.ASSIGNMENTS[assignment]["checkpoints"]:  # the checkpoints only: no resume state, no logs
        shutil.copytree(checkpoints / stage, dest / "out" / stage, ignore=shutil.ignore_patterns("train_state"))
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# Checks


def check_leaks(dest: Path, removed: dict):
    """No removed solution line in any text file of the student tree. A removed line that the project's own code uses
    outside the exercises too (`out = img.copy()`) is an idiom the student sees anyway, not a solution; one that only
    a test or a handout repeats is a leak."""
    idioms = {S.normal_line(line) for p in dest.glob("*.py") for line in p.read_text().splitlines()}
    solutions = {}
    for ex_id, lines in removed.items():
        for file, line in lines:
            norm = S.normal_line(line)
            if len(norm) >= MIN_SOLUTION_LINE and norm not in idioms:
                solutions.setdefault(norm, f"{ex_id} ({file})")
    hits = []
    for f in S.tree_files(dest):
        if Path(f).suffix not in TEXT_SUFFIXES:
            continue
        for i, line in enumerate((dest / f).read_text(errors="replace").splitlines(), 1):
            if S.normal_line(line) in solutions:
                hits.append(f"{f}:{i} holds a solution line of {solutions[S.normal_line(line)]}: {line.strip()!r}")
    if hits:
        raise Refused(f"{len(hits)} solution line(s) left in the student tree, first: {hits[0]}")


def check_imports(dest: Path):
    modules = sorted({p.stem for p in dest.glob("*.py")} | {p.stem for p in (dest / "course").glob("*.py")})
    code = f"import importlib, sys; sys.path[:0] = ['.', 'course']; [importlib.import_module(m) for m in {modules}]"
    proc = subprocess.run([sys.executable, "-c", code], cwd=dest, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise Refused(f"a module of the student tree does not import: {proc.stderr.strip().splitlines()[-1]}")


def collected(tree: Path) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=tree,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise Refused(f"pytest cannot collect the tests of {tree}: {proc.stdout.strip().splitlines()[-1]}")
    return {line for line in proc.stdout.splitlines() if "::" in line}


def check_collection(dest: Path):
    staff = tuple(f + "::" for f in MF.STAFF_ONLY)
    missing = {n for n in collected(S.ROOT) if not n.startswith(staff)} - collected(dest)
    if missing:
        raise Refused(f"{len(missing)} test(s) of the reference are not collected in the student tree, e.g. "
                      f"{sorted(missing)[0]}")


def check_suite(dest: Path, assignment: str, work: Path):
    """The whole suite (goldens aside) in the student tree: every case of a blanked exercise's tests fails, and
    nothing fails that no blanked exercise declares (its tests or its `breaks`)."""
    exercises = blanked_exercises(assignment)
    code, out = S.run_pytest(dest, ["-m", MF.NOT_GOLDEN], work / "student.xml", SUITE_TIMEOUT)
    if code is None or not (work / "student.xml").exists():
        raise Refused(f"the student tree's test suite did not finish: {out.strip().splitlines()[-1:]}")
    results = S.junit_results(work / "student.xml")
    failed = {n for n, (status, _) in results.items() if status == "failed"}
    for ex in exercises:
        for test in ex["tests"]:
            cases = S.cases_of(test, results)
            passing = [c for c in cases if c not in failed]
            if not cases or passing:
                raise Refused(f"{ex['id']}'s test {(passing or [test])[0]} "
                              f"{'passes' if cases else 'is not collected'} in the student tree (blank)")
    allowed = [t for ex in exercises for t in ex["tests"]] + [b for ex in exercises for b in ex.get("breaks", ())]
    unexpected = sorted(n for n in failed if not any(n == a or S.cases_of(a, {n: 0}) or fnmatch.fnmatch(n, a)
                                                     for a in allowed))
    if unexpected:
        raise Refused(f"{len(unexpected)} test(s) fail in the student tree that no blanked exercise declares, first: "
                      f"{unexpected[0]} ({results[unexpected[0]][1]}); add them to a `breaks` in course/manifest.py")


def check_done(assignment: str, work: Path):
    """The assignment's tests pass once its own exercises are done, later assignments still blank: no test needs a
    function the student cannot have yet."""
    order = list(MF.ASSIGNMENTS)
    later = order[order.index(assignment) + 1:]
    tree = work / "done"
    S.copy_tree(S.ROOT, tree, [f for f in S.tree_files(S.ROOT) if f not in MF.STAFF_ONLY])
    if later:
        for ex in blanked_exercises(later[0]):
            for fn in ex["functions"]:
                file, qualname = fn.split(":")
                (tree / file).write_text(S.blank((tree / file).read_text(), qualname, stub_message(ex, qualname))[0])
    tests = sorted({t for ex in MF.EXERCISES if assignment_of(ex) == assignment for t in ex["tests"]})
    code, out = S.run_pytest(tree, ["-m", MF.NOT_GOLDEN, *tests], work / "done.xml", SUITE_TIMEOUT)
    if code != 0:
        raise Refused(f"{assignment}'s tests fail with its exercises done and later assignments blank (a test needs a "
                      f"later exercise): {out.strip().splitlines()[-1]}")


def check_reference(assignment: str, work: Path):
    """The blanked exercises' tests pass on the reference."""
    tests = sorted({t for ex in blanked_exercises(assignment) for t in ex["tests"]})
    code, out = S.run_pytest(S.ROOT, tests, work / "reference.xml", SUITE_TIMEOUT)
    if code != 0:
        raise Refused(f"the exercises' tests fail on the reference itself: {out.strip().splitlines()[-1]}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="make_student.py", description="Build the student version of one assignment.")
    ap.add_argument("--assignment", choices=list(MF.ASSIGNMENTS), help="the assignment to hand out")
    ap.add_argument("--out", type=Path, help="the student tree to write (must not exist)")
    ap.add_argument("--checkpoints", type=Path, default=Path("out"),
                    help="the instructor's out/ folder of the four toy commands (default: out): base, sft, bridge")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="run the checks before renaming the tree into place (a few minutes; CI skips them)")
    ap.add_argument("--list", nargs="?", const="all", choices=["all", *MF.ASSIGNMENTS],
                    help="print the exercise table (of one assignment) and stop")
    args = ap.parse_args(argv)
    if args.list:
        print(exercise_table(None if args.list == "all" else args.list))
        return
    if args.assignment is None or args.out is None:
        ap.exit(2, f"{ap.prog}: error: --assignment and --out are needed (or --list)\n")
    if args.out.exists():
        ap.exit(2, f"{ap.prog}: error: --out {args.out} exists: remove it or choose another folder\n")
    if not args.out.parent.is_dir():
        ap.exit(2, f"{ap.prog}: error: --out {args.out}: the folder {args.out.parent} does not exist\n")
    if S.tracked_inside(args.out):
        ap.exit(2, f"{ap.prog}: error: --out {args.out} is inside the repository: write it outside, or under out/ "
                   "(git ignores it), so that no copy of the reference picks it up\n")
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier run's leftover
    try:
        check_checkpoints(args.checkpoints, MF.ASSIGNMENTS[args.assignment]["checkpoints"])
        removed = build(args.assignment, tmp, args.checkpoints)
        check_leaks(tmp, removed)
        if args.check:
            with tempfile.TemporaryDirectory() as work:
                check_imports(tmp)
                check_collection(tmp)
                check_suite(tmp, args.assignment, Path(work))
                check_reference(args.assignment, Path(work))
                check_done(args.assignment, Path(work))
        tmp.rename(args.out)
    except Refused as e:
        shutil.rmtree(tmp, ignore_errors=True)
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    blank = [ex["id"] for ex in blanked_exercises(args.assignment)]
    print(f"wrote {args.out}: {args.assignment} ({', '.join(blank)} blank), checkpoints "
          f"{', '.join(MF.ASSIGNMENTS[args.assignment]['checkpoints'])}" + (", checks passed" if args.check else ""))


if __name__ == "__main__":
    main()

"""Show the grader catching the planted bugs of course/bugs.py, and time each exercise's tests on the reference.

    python course/check_bugs.py                   # every bug: its exercise's score and the tests that caught it
    python course/check_bugs.py --exercise A3.2   # one exercise's bugs
    python course/check_bugs.py --times           # each exercise's tests on the reference: pytest's time and wall time

Each bug is planted alone (the reference's function with one substitution) in an otherwise empty submission folder
and graded as a student's would be (grade.grade: a fresh reference copy, its own pytest process). Exits with status 1
when a bug gets full marks. About 10 s per bug on 2 cores.
"""

import argparse
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import bugs as B
import grade as G
import manifest as MF
import splice as S


def buggy(file: str, qualname: str, old: str, new: str) -> str:
    """The reference function with the bug planted: `old` (which must occur once in it) replaced by `new`."""
    module, lines = S.reference_file(file)
    node = S.find(module, qualname)
    text = None if node is None else "".join(lines[slice(*S.span(node))])
    if text is None or text.count(old) != 1:
        raise ValueError(f"bug in {file}:{qualname}: {old!r} must occur exactly once in the reference function")
    return text.replace(old, new)


def plant(file: str, qualname: str, old: str, new: str) -> str:
    """The reference file with the bug planted in qualname."""
    return S.replace((S.ROOT / file).read_text(), qualname, buggy(file, qualname, old, new))


def check_bug(ex: dict, bug: tuple, work: Path) -> dict:
    description, target, old, new = bug
    file, qualname = target.split(":")
    student = work / "submission"
    for rel in {fn.split(":")[0] for fn in ex["functions"]}:  # the exercise's other files as the reference has them
        (student / rel).parent.mkdir(parents=True, exist_ok=True)
        (student / rel).write_text((S.ROOT / rel).read_text())
    (student / file).write_text(plant(file, qualname, old, new))
    entry = G.grade(student, [ex], work / "grading")[0]
    caught = [line.split()[1].split("::")[1] for line in entry["output"].splitlines() if line.startswith("FAIL")]
    return {"bug": description, "function": target, "score": entry["score"], "max": entry["max_score"],
            "caught_by": caught or [entry["reason"] or "-"]}


def exercise_times(exercises: list[dict], work: Path) -> list[str]:
    rows = ["| exercise | tests | pytest's time (s) | wall time with pytest's start (s) |", "|---|---|---|---|"]
    for ex in exercises:
        xml = work / f"{ex['id']}.xml"
        t0 = time.time()
        code, out = S.run_pytest(S.ROOT, ["-m", MF.NOT_GOLDEN, *ex["tests"]], xml, G.TIMEOUT)
        wall = time.time() - t0
        inner = float(ET.parse(xml).getroot().find("testsuite").get("time")) if code is not None else float("nan")
        rows.append(f"| {ex['id']} | {len(ex['tests'])} | {inner:.1f} | {wall:.1f} |")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="check_bugs.py", description="Plant each bug of course/bugs.py and grade it; or "
                                 "time the exercises' tests.")
    ap.add_argument("--exercise", nargs="*", default=None, help="exercise ids (default: all)")
    ap.add_argument("--times", action="store_true", help="time each exercise's tests on the reference instead")
    args = ap.parse_args(argv)
    known = {ex["id"]: ex for ex in MF.EXERCISES}
    unknown = [e for e in args.exercise or () if e not in known]
    if unknown:
        ap.exit(2, f"{ap.prog}: error: unknown exercise {unknown[0]}; choose from {', '.join(known)}\n")
    exercises = [known[e] for e in args.exercise] if args.exercise else list(MF.EXERCISES)
    with tempfile.TemporaryDirectory(prefix="bugs-") as work:
        if args.times:
            print("\n".join(exercise_times(exercises, Path(work))))
            return 0
        print("| exercise | bug | function | score | caught by |\n|---|---|---|---|---|")
        missed = 0
        for ex in exercises:
            for i, bug in enumerate(B.BUGS.get(ex["id"], ())):
                with tempfile.TemporaryDirectory(dir=work) as one:
                    r = check_bug(ex, bug, Path(one))
                missed += r["score"] >= r["max"]
                print(f"| {ex['id']} | {r['bug']} | {r['function'].replace('.py:', '.')} | {r['score']:g}/{r['max']} | "
                      f"{', '.join(r['caught_by'])} |", flush=True)
    if missed:
        print(f"{missed} bug(s) got full marks", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The course pack (course/): the manifest names what exists, every assignment's student tree builds, its blanks grade
zero and the reference grades full marks, the grader survives bad submissions, the handouts hold the manifest's
tables. Staff only: a student tree leaves this file out (course/manifest.py STAFF_ONLY)."""

import ast
import re
import shutil
import sys
import textwrap
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "course"))
import bugs as B  # noqa: E402
import check_bugs  # noqa: E402
import grade as G  # noqa: E402
import make_student as MS  # noqa: E402
import manifest as MF  # noqa: E402
import splice as S  # noqa: E402


def test_manifest_names_what_exists():
    """Every exercise function exists with a docstring, every listed test exists, points and times are positive, an
    exercise depends only on earlier ones, ids follow the assignments' order, and each exercise has at least three
    planted bugs that apply to its own functions."""
    order = [ex["id"] for ex in MF.EXERCISES]
    assert [i.split(".")[0] for i in order] == sorted(i.split(".")[0] for i in order)
    assert {i.split(".")[0] for i in order} == set(MF.ASSIGNMENTS) and 12 <= len(order) <= 16
    parsed = {}

    def module(file):
        return parsed.setdefault(file, ast.parse((ROOT / file).read_text()))
    for ex in MF.EXERCISES:
        for fn in ex["functions"]:
            file, qualname = fn.split(":")
            node = S.find(module(file), qualname)
            assert node is not None and S.has_docstring(node), fn
        for test in ex["tests"]:
            file, name = test.split("::")
            assert name.split("[")[0] in {n.name for n in module(file).body if isinstance(n, ast.FunctionDef)}, test
        assert ex["points"] > 0 and ex["minutes"] > 0 and ex["tests"]
        assert all(order.index(d) < order.index(ex["id"]) for d in ex["depends"]), ex["id"]
        bugs = B.BUGS[ex["id"]]
        assert len(bugs) >= 3 and all(target in ex["functions"] for _, target, _, _ in bugs), ex["id"]
        for _, target, old, new in bugs:  # each applies once and leaves a function that parses
            ast.parse(textwrap.dedent(check_bugs.buggy(*target.split(":"), old, new)))
    assert set(B.BUGS) == set(order) and all((ROOT / f).is_file() for f in MF.STAFF_ONLY)


def test_handouts_hold_the_manifest_tables_and_measured_bands():
    """Each handout's exercise table is the manifest's (make_student.py --list A*), the README's is the whole one, and
    no placeholder is left: every band is a measured number (course/README.md says how each was measured)."""
    readme = (ROOT / "course" / "README.md").read_text()
    assert MS.exercise_table() in readme
    for a in MF.ASSIGNMENTS:
        text = (ROOT / "course" / f"{a}.md").read_text()
        assert MS.exercise_table(a) in text, a
        assert not re.findall(r"\{\{[^}]*\}\}", text), (a, re.findall(r"\{\{[^}]*\}\}", text))


@pytest.fixture(scope="module")
def checkpoints(toy_ckpt, tmp_path_factory):
    """An instructor's out/ stand-in: the tiny fixture checkpoint as base, sft and bridge."""
    out = tmp_path_factory.mktemp("instructor") / "out"
    for stage in ("base", "sft", "bridge"):
        shutil.copytree(toy_ckpt, out / stage)
    return out


def test_every_assignment_builds_its_blanks_grade_zero_and_the_reference_full_marks(checkpoints, tmp_path):
    """For each assignment: the student tree blanks its exercises and every later one (each stub names its exercise
    and handout), keeps earlier ones and the rest of every file byte for byte, ships the checkpoints it starts from,
    leaves the staff files out and holds no removed solution line; grading it gives 0 (not attempted). The reference
    grades full marks (one pytest run for all exercises: its functions are the reference's; it runs in a thread while
    the trees are built, its pytest on the other core). The full checks (make_student.py --check: the whole suite in
    each tree) take minutes and run by hand."""
    graded = []
    reference = threading.Thread(target=lambda: graded.append(G.grade(ROOT, list(MF.EXERCISES), tmp_path / "ref")))
    reference.start()
    MS.check_checkpoints(checkpoints, ("base", "sft", "bridge"))
    for a in MF.ASSIGNMENTS:
        tree = tmp_path / a
        removed = MS.build(a, tree, checkpoints)
        MS.check_leaks(tree, removed)
        blank = {ex["id"] for ex in MS.blanked_exercises(a)}
        for ex in MF.EXERCISES:
            for fn in ex["functions"]:
                file, qualname = fn.split(":")
                node = S.find(ast.parse((tree / file).read_text()), qualname)
                assert S.is_stub(node) == (ex["id"] in blank), (a, fn)
        stub = S.function_text((tree / "sft.py").read_text(), "clear_sample")
        assert ('raise NotImplementedError("A3.2: write clear_sample (CLEAR §3.1, course/A3.md)")' in stub) == (
            "A3.2" in blank)
        assert sorted(p.name for p in (tree / "out").iterdir()) == sorted(MF.ASSIGNMENTS[a]["checkpoints"])
        assert not any((tree / f).exists() for f in MF.STAFF_ONLY)
        assert (tree / "README.md").read_bytes() == (ROOT / "README.md").read_bytes()
        exercises = [ex for ex in MF.EXERCISES if ex["id"].split(".")[0] == a]
        entries = G.grade(tree, exercises, tmp_path / f"grade_{a}")
        assert all(e["score"] == 0 and e["reason"].startswith("not attempted") for e in entries), a
    reference.join()
    (entries,) = graded
    assert [(e["number"], e["score"]) for e in entries] == [(ex["id"], ex["points"]) for ex in MF.EXERCISES], \
        [e["output"] for e in entries if e["score"] < e["max_score"]]


def test_the_grader_survives_bad_submissions(tmp_path):
    """Each bad submission costs its exercise with a one-line reason and never stops or hangs the grader: an endless
    loop (killed at the time limit), an import outside the allowed ones, a file that does not parse, a missing file or
    function; a planted bug loses points exercise by exercise, the others untouched."""
    sub = tmp_path / "submission"
    sub.mkdir()
    model = (ROOT / "model.py").read_text()
    (sub / "model.py").write_text(S.replace(model, "sde_step_mean", S.function_text(model, "sde_step_mean").replace(
        "s = ((x_t", "while True:\n        pass\n    s = ((x_t")))
    rl = check_bugs.plant("rl.py", "kl_k3", "d = ref_logp - logp", "d = logp - ref_logp")
    importing = S.function_text(rl, "format_reward").replace('s = " "', 'import scipy\n    s = " "')
    rl = S.replace(rl, "format_reward", importing)
    (sub / "rl.py").write_text(rl)
    a5 = [ex for ex in MF.EXERCISES if ex["id"].startswith("A5")]
    (e1,) = G.grade(sub, a5[:1], tmp_path / "g0", timeout=3)
    assert e1["score"] == 0 and e1["reason"].startswith("timed out after 3 s")
    e2, e3 = G.grade(sub, a5[1:], tmp_path / "g1")
    assert e2["score"] == 0 and "imports scipy" in e2["reason"]
    assert 0 < e3["score"] < e3["max_score"] and "test_kl_k3_direction_by_hand" in e3["output"]
    (sub / "sft.py").write_text("def split_response(response:\n")
    (sub / "data.py").write_text("def detail_kept(clean, degraded, box, colour):\n    return 1.0\n")
    reasons = [e["reason"] for e in G.grade(sub, MF.EXERCISES[:3] + MF.EXERCISES[7:11], tmp_path / "g2")]
    assert reasons[:3] == ["the submission has no degrade.py", "the submission has no degrade.py",
                           "data.py has no needs_restore"]
    assert all(r.startswith("sft.py does not parse (line 1") for r in reasons[3:6])
    assert reasons[6] == "the submission has no engine.py"


def test_the_tools_refuse_bad_input_in_one_line(checkpoints, tmp_path, capsys):
    """make_student.py without a complete checkpoint of the stages the assignment starts from, or with an --out that
    exists; grade.py on a folder that does not exist: one line on stderr, exit status 2, nothing written."""
    partial = tmp_path / "partial"
    shutil.copytree(checkpoints / "base", partial / "base")
    (tmp_path / "taken").mkdir()
    for argv, words in ((["--assignment", "A4", "--out", str(tmp_path / "s"), "--checkpoints", str(partial)],
                         "sft is not a complete checkpoint (no ema.safetensors"),
                        (["--assignment", "A1", "--out", str(tmp_path / "taken")], "exists")):
        with pytest.raises(SystemExit) as e:
            MS.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial", "taken"]
    with pytest.raises(SystemExit) as e:
        G.main([str(tmp_path / "nowhere"), "--assignment", "A1"])
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err


def test_restore_check_runs(toy_ckpt, tmp_path, capsys):
    """A2's toy run restores pictures with the base and prints the PSNRs and the flow-matching check."""
    import restore_check
    restore_check.main(["--init", str(toy_ckpt), "--n", "2", "--denoise-steps", "3", "--out", str(tmp_path / "r.png")])
    line = capsys.readouterr().out
    assert "2 hard pictures" in line and "restored" in line and "mean latent" in line and (tmp_path / "r.png").exists()


def test_a_submission_carries_its_helpers(tmp_path):
    """What a student adds beside an exercise function goes with it into the grading copy: a top-level helper function
    and constant, a new import, a new method of the exercise's class; functions of other exercises stay the
    reference's, and the result compiles."""
    rl = (ROOT / "rl.py").read_text()
    body = S.function_text(rl, "kl_k3").replace("    d = ref_logp - logp\n    return torch.exp(d) - d - 1",
                                                "    return _k3(ref_logp - logp)")
    helper = "\n\nEPS = 0.0\n\n\ndef _k3(d):\n    return d.exp() - d - 1 + EPS\n"
    rl = "import statistics\n" + S.replace(rl, "kl_k3", body) + helper
    model = (ROOT / "model.py").read_text()
    call = S.function_text(model, "Route.to_tokens").replace("x.index_select(0, self.unsort)", "self._back(x)")
    model = S.replace(model, "Route.to_tokens", call + "\n    def _back(self, y):\n        return y[self.unsort]\n")
    (tmp_path / "rl.py").write_text(rl.replace("r = rewards.view(-1, group)", "r = rewards.view(-1, group)  # mine"))
    (tmp_path / "model.py").write_text(model)
    by_id = {ex["id"]: ex for ex in MF.EXERCISES}
    grpo, route = G.splice(by_id["A5.3"], tmp_path), G.splice(by_id["A2.3"], tmp_path)
    assert grpo.reason is None and route.reason is None and not grpo.same_as_reference
    new_rl, new_model = grpo.files["rl.py"], route.files["model.py"]
    assert "import statistics" in new_rl and "def _k3(d):" in new_rl and "EPS = 0.0" in new_rl and "# mine" in new_rl
    assert S.function_text(new_rl, "format_reward") == S.function_text((ROOT / "rl.py").read_text(), "format_reward")
    assert "def _back(self, y):" in S.function_text(new_model, "Route")
    compile(new_rl, "rl.py", "exec")
    compile(new_model, "model.py", "exec")

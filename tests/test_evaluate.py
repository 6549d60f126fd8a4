"""evaluate.py: VLMEvalKit TSV scoring with malformed rows, judges, and the toy report's pieces."""

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as CK
import data as D
import engine as E
import evaluate


def b64_image(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path):
    """A small benchmark file in exactly VLMEvalKit's layout (index, image, question, A-D, answer, category, hint)."""
    header = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category"]
    rows = [["0", b64_image(0), "What colour is it?", "", "red", "blue", "green", "pink", "B", "colour"],
            ["1", b64_image(1), "How many?", "Look closely.", "1", "2", "3", "4", "D", "count"],
            ["2", "bm90IGFuIGltYWdl" * 8, "Broken picture?", "", "a", "b", "", "", "A", "colour"],
            ["3", b64_image(3), "Gap in options?", "", "x", "", "z", "", "C", "count"],
            ["4", "1", "Same picture as row 1, open question", "", "", "", "", "", "two", "open"]]
    path.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n")
    return path


def score_tsv(model, tok, path, mode="direct", judge=None):
    return evaluate.evaluate_tsv(model, tok, path, mode, D.TOY_SIZES, "toy", 0, icfg(), judge)


def icfg():
    return E.InferenceConfig(max_text_tokens=4, num_timesteps=3, cfg_text_scale=1.0)


def test_tsv_malformed_rows_counted_not_scored(toy_ckpt, tmp_path):
    """Undecodable images and option gaps are reported by index; good MC rows are scored; the run completes."""
    model, tok = CK.load_pretrained(toy_ckpt), D.Tokenizer.from_folder(toy_ckpt)
    res = score_tsv(model, tok, write_tsv(tmp_path / "bench.tsv"))
    assert res["rows"] == 3 and {p["index"] for p in res["problems"]} == {"2", "3"}
    assert res["scored"] == 2 and res["unscored"] == ["4"]  # the open row waits for a judge
    assert len(res["predictions"]) == 3 and res["accuracy"] in (0.0, 0.5, 1.0)


def test_tsv_judge_scores_open_rows_and_interleave_mode_runs(toy_ckpt, tmp_path):
    """A pluggable judge scores open-ended rows (no network); the CLEAR interleaved mode runs on TSV rows too."""
    model, tok = CK.load_pretrained(toy_ckpt), D.Tokenizer.from_folder(toy_ckpt)
    judge = lambda q, pred, truth: 1.0  # noqa: E731
    res = score_tsv(model, tok, write_tsv(tmp_path / "b.tsv"), "interleave", judge)
    assert res["scored"] == 3 and res["unscored"] == [] and res["by_category"]["open"] == 1.0


def test_tsv_file_errors(tmp_path):
    """A missing file or a file without VLMEvalKit's columns stops with a message naming the fix."""
    with pytest.raises(FileNotFoundError, match="VLMEvalKit TSV"):
        D.read_tsv(tmp_path / "none.tsv")
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        D.read_tsv(tmp_path / "bad.tsv")


def test_judge_spec_and_psnr():
    """--judge takes module:function; PSNR is infinite-capped for identical pictures and drops with noise."""
    assert evaluate.load_judge(None) is None
    assert evaluate.load_judge("math:sqrt")(4.0) == 2.0
    with pytest.raises(CK.InputError, match="give module:function"):
        evaluate.load_judge("math")
    a = np.zeros((8, 8, 3), np.uint8)
    assert evaluate.psnr(a, a) == 99.0 and evaluate.psnr(a, a + 10) < 30


def test_per_corruption_split_shares_questions():
    """The 16 hard sets ask the same questions of the same scenes, each with its own corruption."""
    sets = evaluate.per_corruption_split(D.ToyWorld(0), 3, seed=0)
    assert len(sets) == 16
    qs = {k: [ex.question for ex in v] for k, v in sets.items()}
    assert len({tuple(v) for v in qs.values()}) == 1
    assert all(ex.corruption == k and ex.severity == D.SEVERITIES["hard"] for k, v in sets.items() for ex in v)


def test_toy_report_end_to_end(toy_ckpt, tmp_path):
    """`python evaluate.py` on a tiny out/ folder writes the markdown, JSON and both pictures."""
    out_root = tmp_path / "out"
    (out_root).mkdir()
    import shutil
    shutil.copytree(toy_ckpt, out_root / "sft")
    evaluate.main(["--out-root", str(out_root), "--n", "2", "--batch", "1", "--n-corruption", "1",
                   "--max-text-tokens", "3", "--denoise-steps", "3", "--probe-n", "20", "--probe-steps", "5",
                   "--out", str(tmp_path / "eval"), "--threads", "1"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["main"]["sft"]) == set(evaluate.MODES)
    # official CFG on the toy too
    assert (report["args"]["cfg_text_scale"], report["args"]["cfg_img_scale"]) == (3.0, 1.5)
    assert len(report["main"]["sft"]["always restore"]["hard"]["restored"]) == 2
    assert sum(r["n"] for r in report["decision_split"]) == 2  # each hard question in one subset
    assert (tmp_path / "eval" / "examples.png").exists() and (tmp_path / "eval" / "accuracy.png").exists()
    assert "per corruption" in (tmp_path / "eval" / "report.md").read_text()


def test_a_sets_numbers_do_not_depend_on_the_other_sets(toy_ckpt):
    """Each set samples from its own (seed, name) generator: hard alone equals hard evaluated after mid."""
    model, tok = CK.load_pretrained(toy_ckpt), D.Tokenizer.from_folder(toy_ckpt)
    split = D.ToyWorld(0).eval_split(3, seed=0)
    cfg = E.InferenceConfig(max_text_tokens=4, num_timesteps=3, temperature=1.0)
    with torch.no_grad():
        both = E.benchmark(model, tok, {"mid": split["mid"], "hard": split["hard"]}, "always_restore", cfg,
                           model.encode_pixels)
        alone = E.benchmark(model, tok, {"hard": split["hard"]}, "always_restore", cfg, model.encode_pixels)
    for a, b in zip(both["hard"]["traces"], alone["hard"]["traces"]):
        assert a.texts == b.texts and all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))


def test_the_progress_bar_counts_every_question_and_changes_no_result(toy_ckpt):
    """benchmark with a bar: the same traces as without, and the bar advanced by each question of each set."""
    model, tok = CK.load_pretrained(toy_ckpt), D.Tokenizer.from_folder(toy_ckpt)
    split = {k: v for k, v in D.ToyWorld(0).eval_split(3, seed=0).items() if k in ("clean", "hard")}
    cfg = E.InferenceConfig(max_text_tokens=4, num_timesteps=3)
    bar = evaluate.tqdm(total=6, file=io.StringIO())
    with torch.no_grad():
        plain = E.benchmark(model, tok, split, "always_restore", cfg, model.encode_pixels, batch_size=2)
        shown = E.benchmark(model, tok, split, "always_restore", cfg, model.encode_pixels, batch_size=2, bar=bar)
    assert bar.n == 6
    for sev in split:
        assert plain[sev]["correct"] == shown[sev]["correct"]
        for a, b in zip(plain[sev]["traces"], shown[sev]["traces"]):
            assert a.texts == b.texts and all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))


def test_pictures_are_encoded_once_per_autoencoder(toy_ckpt):
    """Every mode of every checkpoint reads the same degraded latents: a second checkpoint with the same (frozen)
    autoencoder encodes nothing again and answers exactly as with its own encoder; another autoencoder encodes anew."""
    split = {"hard": D.ToyWorld(0).eval_split(3, seed=0)["hard"]}
    cfg = E.InferenceConfig(max_text_tokens=4, num_timesteps=3)
    first, second, other = (CK.load_pretrained(toy_ckpt) for _ in range(3))
    tok = D.Tokenizer.from_folder(toy_ckpt)
    with torch.no_grad():
        other.vae.encoder.conv_in.weight.mul_(1.01)
    calls, memo = [], {}
    for name, m in (("first", first), ("second", second), ("other", other)):
        m.encode_pixels = (lambda enc, name: lambda px: calls.append((name, len(px))) or enc(px))(m.encode_pixels, name)
    run = lambda m, encode: E.benchmark(m, tok, split, "always_restore", cfg, encode,  # noqa: E731
                                        batch_size=2)["hard"]["traces"]
    with torch.no_grad():
        run(first, evaluate.remembered_encoder(first, memo))
        shared = run(second, evaluate.remembered_encoder(second, memo))
        assert calls == [("first", 2), ("first", 1)]
        own = run(second, second.encode_pixels)
        run(other, evaluate.remembered_encoder(other, memo))
    assert calls[2:] == [("second", 2), ("second", 1), ("other", 2), ("other", 1)]
    for a, b in zip(shared, own):
        assert a.texts == b.texts and all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))


def test_generator_check_references_and_a_zero_velocity_head(toy_ckpt):
    """The copy and mean references are exact functions of the latents; the fixture's llm2vae is zero (BAGEL's init),
    so its error is E[(noise - x0)^2] = 1 + E[x0^2] at every t."""
    model, tok = CK.load_pretrained(toy_ckpt), D.Tokenizer.from_folder(toy_ckpt)
    examples = D.ToyWorld(0).eval_split(6, seed=3)["hard"]
    res = evaluate.flow_error_by_t(model, tok, examples, ts=(0.5, 1.0))
    x0 = torch.stack([model.encode_pixels(D.image_to_tensor(ex.clean)[None])[0][0] for ex in examples])
    d0 = torch.stack([model.encode_pixels(D.image_to_tensor(ex.degraded)[None])[0][0] for ex in examples])
    for t in (0.5, 1.0):
        assert res[t]["copy"] == pytest.approx(float((x0 - d0).pow(2).mean()), rel=1e-4)
        assert res[t]["mean"] == pytest.approx(float(x0.pow(2).mean()), rel=1e-4)
        assert res[t]["model"] == pytest.approx(1 + float(x0.pow(2).mean()), abs=0.05)
    assert "copy the degraded latent" in evaluate.flow_table({"sft": {t: res[1.0] for t in evaluate.FLOW_CHECK_T}})


def test_decision_split_compares_on_the_questions_each_decision_picked():
    """Interleaved vs text reasoning, on the questions the interleaved run restored and on the others, paired."""
    rows = {"interleaved, bridge": {"hard": {"restored": [True, True, False, False, False],
                                             "correct": [1, 1, 1, 0, 1]}},
            "text reasoning": {"hard": {"restored": [False] * 5, "correct": [0, 1, 1, 1, 1]}}}
    split = evaluate.decision_split({"base": {"direct": {}}, "sft": rows})  # the base has no such modes: skipped
    assert [(r["checkpoint"], r["subset"], r["n"]) for r in split] == [("sft", "restored", 2),
                                                                       ("sft", "not restored", 3)]
    assert split[0]["acc_interleaved"] == 1.0 and split[0]["acc_text"] == 0.5 and split[0]["diff"] == 50.0
    assert split[1]["diff"] == pytest.approx(-100 / 3)
    assert "| sft | restored | 2 | 100.0 | 50.0 | +50.0 |" in evaluate.decision_table(split)


def test_probe_answers_on_known_readings():
    """The probe answers count by its occupied quadrants and colour from the most surely occupied one."""
    class Fixed(torch.nn.Module):  # quadrant readings: occupied top left (red) and bottom right (blue, surer)
        def forward(self, quads):
            out = torch.full((4, 1 + len(D.SHAPES) + len(D.COLOURS)), -9.0)
            out[:, 0] = 9.0  # empty
            out[0, 0], out[0, 1], out[0, 1 + len(D.SHAPES)] = -9.0, 9.0, 9.0
            out[3, 0], out[3, 2], out[3, 1 + len(D.SHAPES) + 5] = -20.0, 9.0, 9.0
            return out
    picture = Image.new("RGB", (D.MODEL_SIZE, D.MODEL_SIZE))
    ask = lambda q: D.Example(picture, q, "",  # noqa: E731
                              qtype=q.split()[0].lower().replace("what", "colour").replace("how", "count"))
    answers = D.probe_answers(Fixed(), [picture] * 2,
                              [ask("How many shapes are there?"), ask("What colour are the shapes?")])
    assert answers == ["2", list(D.COLOURS)[5]]


def test_shipped_probe_serves_evaluate_defaults_and_reads_clean_pictures(tmp_path):
    """assets/toy_probe is the probe evaluate.py's defaults ask for in world 0 (no training, nothing written), it is
    not used for other settings, and it reads clean held-out pictures almost perfectly."""
    cfg = evaluate.EvalConfig()
    world = D.ToyWorld(0)
    probe = D.perception_probe(world, tmp_path / "probe", cfg.probe_n, cfg.probe_steps)
    assert not (tmp_path / "probe").exists()
    key = json.loads((D.SHIPPED_PROBE / "probe.json").read_text())
    assert D.shipped_probe({**key, "steps": key["steps"] + 1}) is None
    assert D.shipped_probe({**key, "world_seed": 1}) is None
    examples = world.eval_split(60, seed=5)["clean"]
    answers = D.probe_answers(probe, [ex.degraded for ex in examples], examples)
    assert np.mean([a == ex.answer for a, ex in zip(answers, examples)]) >= 0.95


def test_one_photo_demo(toy_ckpt, tmp_path, capsys):
    """`evaluate.py --init F --image photo --question Q --degrade kind:severity` prints the trace and writes one PNG;
    an odd-sized RGBA photo works; a bad --degrade is refused before any work."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 77, 4), dtype=np.uint8), "RGBA").save(photo)
    evaluate.main(["--init", str(toy_ckpt), "--image", str(photo), "--question", "What colour are the shapes?",
                   "--degrade", "motion_blur:hard", "--max-text-tokens", "4", "--denoise-steps", "3",
                   "--out", str(tmp_path / "demo"), "--threads", "1"])
    out = capsys.readouterr().out
    assert "restored:" in out and "answer:" in out and (tmp_path / "demo" / "demo.png").exists()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--init", str(toy_ckpt), "--image", str(photo), "--question", "Q", "--degrade", "blur:hard"])
    assert e.value.code == 2 and "KIND:SEVERITY" in capsys.readouterr().err


def test_pictures_say_what_they_show(tmp_path):
    """Text wraps between words within the width; a 64 px picture fills its panel pixel for pixel; the bars carry the
    mode of each checkpoint in the legend."""
    draw = evaluate.ImageDraw.Draw(Image.new("RGB", (1, 1)))
    face = evaluate.font(15)
    text = "How many shapes are there? What colour are the shapes in the picture, and where are they?"
    lines = evaluate.wrap(draw, text, face, 150)
    assert len(lines) > 1 and " ".join(lines) == text and all(draw.textlength(ln, font=face) <= 150 for ln in lines)
    sheet = Image.new("RGB", (300, 200), "white")
    pic = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    evaluate.fill_panel(sheet, pic, (10, 20, 200, 128))
    assert sheet.crop((46, 20, 174, 148)).tobytes() == pic.resize((128, 128), Image.NEAREST).tobytes()
    rows = {s: {"acc": a} for s, a in zip(evaluate.SEVERITIES, (1.0, 0.9, 0.8, 0.7))}
    evaluate.draw_bars({"base": {"direct": rows}, "sft": {"interleaved, bridge": rows, "direct": rows}},
                       tmp_path / "bars.png")
    assert Image.open(tmp_path / "bars.png").size == (860, 440)


def test_toy_demo_brings_its_picture_and_question(toy_ckpt, tmp_path, capsys):
    """--demo-toy N runs held-out toy question N at hard, saves its picture for --image, refuses what it replaces."""
    evaluate.main(["--init", str(toy_ckpt), "--demo-toy", "1", "--max-text-tokens", "4", "--denoise-steps", "3",
                   "--out", str(tmp_path / "demo"), "--threads", "1"])
    out = capsys.readouterr().out
    question = D.ToyWorld(0).eval_split(2, seed=0)["hard"][1].question
    assert f"question: {question}" in out and "truth:" in out
    assert (tmp_path / "demo" / "demo.png").exists() and Image.open(tmp_path / "demo" / "input.png").size == (64, 64)
    for extra, words in ((["--question", "Q?"], "--question has no effect with --demo-toy"),
                         (["--degrade", "motion_blur:hard"], "--degrade has no effect with --demo-toy"),
                         (["--n", "5"], "--n has no effect in the demo")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--init", str(toy_ckpt), "--demo-toy", "0", *extra])
        assert e.value.code == 2 and words in capsys.readouterr().err, extra


def test_evaluate_checks_every_input_before_any_work(toy_ckpt, tmp_path, capsys):
    """Each stops in one line before the model is loaded and writes nothing: a missing second TSV (the first was
    evaluated and written), --tsv without files (ran the toy benchmark), two files of one name (one result overwrote
    the other), an empty --cfg-interval, flags --mode text never uses, a --judge that cannot be imported (a traceback),
    an --out that is a file (a traceback after the run), a demo photo that is no picture (a traceback) or too small
    to --degrade, segments longer than the model's positions (a traceback mid-run). A judge must return a score in
    [0, 1] (5 made accuracy 500%)."""
    good = write_tsv(tmp_path / "bench.tsv")
    (tmp_path / "again").mkdir()
    write_tsv(tmp_path / "again" / "bench.tsv")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "photo.jpg").write_text("not a picture")
    Image.new("RGB", (8, 8)).save(tmp_path / "dot.png")
    base = ["--init", str(toy_ckpt), "--out", str(tmp_path / "res"), "--threads", "1", "--max-text-tokens", "4"]
    with pytest.raises(FileNotFoundError, match="nope.tsv does not exist"):
        evaluate.main([*base, "--tsv", str(good), str(tmp_path / "nope.tsv")])
    with pytest.raises(CK.InputError, match="cannot import it"):
        evaluate.main([*base, "--tsv", str(good), "--judge", "no_such_module:judge"])
    with pytest.raises(CK.InputError, match="photo.jpg is not a readable picture"):
        evaluate.main([*base, "--image", str(tmp_path / "photo.jpg"), "--question", "Q?"])
    with pytest.raises(CK.InputError, match="is a file"):
        evaluate.main([*base, "--tsv", str(good), "--out", str(tmp_path / "file")])
    with pytest.raises(CK.InputError, match="positions end at 2048"):
        evaluate.main([*base, "--tsv", str(good), "--max-text-tokens", "4096"])
    for argv, words in ((["--tsv"], "--tsv needs at least one file"),
                        (["--tsv", str(good), str(tmp_path / "again" / "bench.tsv")], "would overwrite each other"),
                        (["--tsv", str(good), "--cfg-interval", "0.9", "0.1"], "LO must be below HI"),
                        (["--tsv", str(good), "--mode", "text", "--reentry", "decode_reencode"],
                         "--reentry has no effect with --mode text"),
                        (["--tsv", str(good), "--batch", "8"], "--batch has no effect with --tsv"),
                        (["--image", str(tmp_path / "dot.png"), "--question", "Q?", "--degrade", "motion_blur:hard"],
                         "8x8 px")):
        with pytest.raises(SystemExit) as e:
            evaluate.main([*base, *argv])
        assert e.value.code == 2 and words in capsys.readouterr().err, argv
    assert not (tmp_path / "res").exists() and (tmp_path / "file").read_text() == "mine"
    assert evaluate.judge_score(lambda q, p, a: 1, "j:f", "q", "p", "a", 0) == 1.0
    for bad in (lambda q, p, a: 5, lambda q, p, a: "yes", lambda q, p, a: float("nan"), lambda q, p: 1.0):
        with pytest.raises(CK.InputError, match="--judge j:f"):
            evaluate.judge_score(bad, "j:f", "q", "p", "a", 0)


def test_toy_outputs_are_one_set_and_checkpoints_are_settled(toy_ckpt, tmp_path, capsys, monkeypatch):
    """The report, its JSON and both pictures are written as one set: a run killed while writing them leaves the
    earlier run's four files, not reports of two runs side by side. A checkpoint whose save was killed between its
    renames is put back and evaluated (it was left out of the report without a word)."""
    import shutil
    out_root = tmp_path / "out"
    out_root.mkdir()
    shutil.copytree(toy_ckpt, out_root / "sft")
    argv = ["--out-root", str(out_root), "--n", "2", "--batch", "2", "--n-corruption", "0", "--max-text-tokens", "3",
            "--denoise-steps", "3", "--probe-n", "20", "--probe-steps", "2", "--out", str(tmp_path / "eval"),
            "--threads", "1"]
    evaluate.main(argv)
    first = {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir()}
    assert set(first) == {CK.MARKER, "report.md", "report.json", "examples.png", "accuracy.png"}

    def killed(*_):
        raise KeyboardInterrupt("killed while writing the outputs")
    monkeypatch.setattr(evaluate, "draw_bars", killed)
    (out_root / "sft" / CK.MARKER).touch()  # as a save writes it: then killed between its two renames
    shutil.move(out_root / "sft", CK.sibling(out_root / "sft", "tmp"))
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        evaluate.main([*argv, "--seed", "1"])
    assert "recovered the newest complete copy" in capsys.readouterr().out and (out_root / "sft").is_dir()
    assert {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "out"]  # no temporary copy, no lock left


def test_eval_out_is_checked_before_any_work(toy_ckpt, tmp_path, monkeypatch):
    """The results replace --out as a whole, so before any work: it must have a name (--out . and --out "" were a
    traceback after 5-7 minutes), lie under folders, hold nothing evaluate.py did not write, and not be a checkpoint."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for out, words in ((".", "no name of its own"), ("", "no name of its own"), ("file/eval", "which is a file"),
                       ("notes", "holds 'mine.txt', which evaluate.py did not write"), (str(toy_ckpt), "a checkpoint")):
        with pytest.raises(CK.InputError, match=words):
            evaluate.main(["--out-root", str(tmp_path / "none"), "--out", out, "--threads", "1"])
    assert (tmp_path / "notes" / "mine.txt").read_text() == "mine" and (toy_ckpt / "nanoclear.json").exists()


def test_named_checkpoints_are_evaluated_and_paired_with_rl(toy_ckpt, tmp_path):
    """--checkpoints NAME=FOLDER evaluates exactly those (an RL variant beside the RL stage), and pairs the variant with
    rl on the same hard questions, as well as taking rl's own comparisons."""
    evaluate.main(["--checkpoints", f"rl={toy_ckpt}", f"rl_release={toy_ckpt}", "--out-root", str(tmp_path),
                   "--n", "2", "--batch", "2", "--n-corruption", "0", "--max-text-tokens", "3", "--denoise-steps", "3",
                   "--probe-n", "20", "--probe-steps", "5", "--out", str(tmp_path / "eval"), "--threads", "1"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert list(report["main"]) == ["rl", "rl_release"] and set(report["main"]["rl_release"]) == set(evaluate.MODES)
    pairs = {(tuple(r["a"]), tuple(r["b"])): r for r in report["comparisons"]}
    same = pairs[("rl_release", "interleaved, bridge"), ("rl", "interleaved, bridge")]
    assert same["n"] == 2 and same["diff"] == 0.0  # one checkpoint under two names: the same answers
    assert (("rl_release", "always restore"), ("rl_release", "text reasoning")) in pairs
    assert "--checkpoints rl=" in (tmp_path / "eval" / "report.md").read_text()


def test_named_checkpoints_and_the_tsv_prompt_are_checked_before_any_work(toy_ckpt, tmp_path, capsys,
                                                                           monkeypatch):
    """--checkpoints: NAME=FOLDER, distinct names, real checkpoints, toy benchmark only. --tsv reads the prompt the
    checkpoint was trained with, and refuses the toy prompt for a checkpoint that was not."""
    for argv, words in ((["--checkpoints", "rl"], "give NAME=FOLDER"),
                        (["--checkpoints", f"a={toy_ckpt}", f"a={toy_ckpt}"], "the name a is given twice"),
                        (["--checkpoints", f"a={tmp_path}"], "holds no checkpoint"),
                        (["--checkpoints", f"a={toy_ckpt}", "--init", str(toy_ckpt), "--tsv", "x.tsv"],
                         "--checkpoints has no effect with --tsv")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err, argv
    real = tmp_path / "real"
    shutil.copytree(toy_ckpt, real)
    saved = json.loads((real / "nanoclear.json").read_text())
    (real / "nanoclear.json").write_text(json.dumps({**saved, "stage": "rl", "args": {"system": "official"}}))
    tsv = write_tsv(tmp_path / "bench.tsv")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--init", str(real), "--tsv", str(tsv), "--system", "toy", "--max-text-tokens", "4"])
    assert e.value.code == 2 and "the toy prompt describes the toy world's tags and rule" in capsys.readouterr().err
    seen, score = [], evaluate.evaluate_tsv
    monkeypatch.setattr(evaluate, "evaluate_tsv", lambda *a, **kw: seen.append(a[5]) or score(*a, **kw))
    for folder in (toy_ckpt, real):
        evaluate.main(["--init", str(folder), "--tsv", str(tsv), "--max-text-tokens", "2", "--denoise-steps", "2",
                       "--out", str(tmp_path / "res"), "--threads", "1"])
    assert seen == ["toy", "official"]  # the toy base, and a checkpoint trained under the official prompt

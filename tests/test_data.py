"""Behaviour of data.py: the toy world, the tokenizer, CLEAR's sample layout, answer parsing and the readers."""

import base64
import colorsys
import csv
import hashlib
import io
import json
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as RawTokenizer, models

import checkpoint as CK
import data as D
import model as M


@pytest.fixture(scope="module")
def tok():
    return D.train_toy_tokenizer(D.toy_corpus(400))


@pytest.fixture(scope="module")
def world():
    return D.ToyWorld(0)


def fake_encode(calls):
    """encode([N, 3, H, W]) -> zeros [N, (H/8)(W/8), 64]: the tiny model's latent grid without running a VAE."""
    def encode(px):
        calls.append(px.shape[0])
        N, _, H, W = px.shape
        return torch.zeros(N, (H // 8) * (W // 8), 64), (H // 8, W // 8)
    return encode


def image_hash(im):
    return hashlib.md5(im.tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# toy world


def test_world_stream_and_eval_split_are_deterministic(world):
    """Same seed, same samples: a run can be replayed and the held-out set never drifts."""
    a, b = list(islice(world.stream(3), 4)), list(islice(D.ToyWorld(0).stream(3), 4))
    key = lambda x: (image_hash(x.degraded), x.question, x.response)  # noqa: E731
    assert [key(x) for x in a] == [key(x) for x in b]
    assert len({image_hash(x.degraded) for x in a}) == 4  # and the stream moves on
    s1, s2 = world.eval_split(3, seed=1), D.ToyWorld(0).eval_split(3, seed=1)
    assert all(image_hash(x.degraded) == image_hash(y.degraded) for k in s1 for x, y in zip(s1[k], s2[k]))
    # a larger split starts with the smaller one (stage tables and evaluate ask 128, the README's tables 288)
    longer = world.eval_split(5, seed=1)
    assert all(image_hash(x.degraded) == image_hash(y.degraded) and x.question == y.question
               for k in s1 for x, y in zip(s1[k], longer[k][:3]))


def test_train_and_eval_scenes_are_disjoint(world):
    """No held-out layout is ever trained on: the split is a hash of the scene, checked by rejection."""
    rng = np.random.default_rng(0)
    assert not any(world.is_eval(world.scene(rng, held_out=False)[1]) for _ in range(300))
    assert all(world.is_eval(world.scene(rng, held_out=True)[1]) for _ in range(30))
    evals = {image_hash(e.clean) for e in world.eval_split(8)["clean"]}
    assert not evals & {image_hash(e.clean) for e in islice(world.stream(0), 40)}
    assert D.ToyWorld(1).is_eval != world.is_eval  # the seed salts the split


def test_eval_split_is_mmd_bench_shaped(world):
    """One corruption per item, the same at low / mid / hard, aligned across levels, clean level undegraded."""
    split = world.eval_split(6)
    assert list(split) == ["clean", "low", "mid", "hard"] and all(len(v) == 6 for v in split.values())
    for i in range(6):
        items = [split[k][i] for k in split]
        assert len({e.question for e in items}) == 1 and len({e.corruption for e in items[1:]}) == 1
        assert [e.severity for e in items] == [None, 0.23, 0.45, 0.9]
        assert items[0].corruption is None and image_hash(items[0].degraded) == image_hash(items[0].clean)
        assert all(e.degraded.size == (D.MODEL_SIZE, D.MODEL_SIZE) for e in items)


def test_every_question_type_is_answerable_from_the_fixed_vocabulary():
    """Answers stay inside the small fixed vocabulary; MC questions hold the answer among 4 distinct options."""
    seen = set()
    for ex in islice(D.ToyWorld(0, mc_rate=0.5, qtypes=tuple(D.QUESTIONS)).stream(1), 120):
        seen.add((ex.qtype, ex.options is not None))
        if ex.options:
            assert sorted(ex.options) == list("ABCD") and len(set(ex.options.values())) == 4
            assert ex.options[ex.answer] in D.ANSWERS[ex.qtype]
            assert ex.question.startswith("Question: ") and "Please select the correct answer" in ex.question
        else:
            assert ex.answer in D.ANSWERS[ex.qtype]
        assert D.extract_answer(ex.response) == ex.answer
    assert seen == {(q, mc) for q in D.ANSWERS for mc in (False, True)}
    assert {ex.qtype for ex in islice(D.ToyWorld(0).stream(1), 60)} == set(D.TOY_QTYPES)  # what the toy asks by default
    with pytest.raises(ValueError, match="qtypes"):
        D.ToyWorld(0, qtypes=("colour", "texture"))


def test_questions_match_the_scene():
    """The answer is what the scene shows: colour, shape, count and quadrant of a hand-made scene."""
    bg = ((120, 120, 120), (140, 140, 140), 0.0, 1)
    two = D.Scene(bg, objects=(("star", "blue", 3, 48.0, 48.0, 9.0, 0.0), ("star", "blue", 0, 16.0, 16.0, 9.0, 0.0)))
    one = D.Scene(bg, objects=(("circle", "red", 2, 16.0, 48.0, 9.0, 0.0),))
    rng = np.random.default_rng(0)
    for _ in range(10):
        q, a, _, _, fact, boxes = D.ask(two, "colour", rng, mc=False)
        assert a == "blue" and a in fact and len(boxes) == 2
        assert D.ask(two, "shape", rng, mc=False)[1] == "star"
        assert D.ask(one, "position", rng, mc=False)[1] == "bottom left"
    assert D.ask(two, "count", rng, mc=False)[1] == "2"
    assert D.caption(two) == "2 blue stars." and D.caption(one) == "One red circle in the bottom left."
    pixels = np.asarray(D.render(one, D.MODEL_SIZE)).astype(int)  # the renderer puts each object where it says
    assert np.abs(pixels[48, 16] - D.COLOURS["red"]).max() < 40 and np.abs(pixels[16, 48] - D.COLOURS["red"]).max() > 40


def test_needs_restore_rises_with_severity(world):
    """The restore rule fires more often as the same corruptions get stronger, and never on an intact image."""
    rng = np.random.default_rng(0)
    rates = {s: 0 for s in (0.23, 0.45, 0.9)}
    for i in range(24):
        _, scene = world.scene(rng, held_out=False)
        big = D.render(scene)
        clean = np.asarray(big.resize((64, 64), Image.BICUBIC))
        kind = ("gaussian_noise", "motion_blur", "block_exchange", "dark_illumination")[i % 4]
        assert not D.needs_restore(clean, clean, scene.boxes())
        for s in rates:
            deg = np.asarray(D.degrade(big, kind, s, i).resize((64, 64), Image.BICUBIC))
            rates[s] += D.needs_restore(clean, deg, scene.boxes())
    assert rates[0.23] <= rates[0.45] <= rates[0.9] and rates[0.9] > rates[0.23] + 4, rates


def test_detail_kept_ignores_gain_but_not_noise():
    """Darkening keeps the detail (gain-invariant up to the contrast cap); noise of the same energy destroys it."""
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)
    box = (0, 0, 16, 16)
    assert D.detail_kept(clean, clean, box, colour=False) == pytest.approx(1.0)
    assert D.detail_kept(clean, (clean * 0.8).astype(np.uint8), box, colour=False) == pytest.approx(0.8, abs=0.03)
    noisy = np.clip(clean + rng.normal(0, 80, clean.shape), 0, 255).astype(np.uint8)
    assert D.detail_kept(clean, noisy, box, colour=False) < 0.8



def grey(*values):
    """A one-row picture of grey pixels: its luminance is the values themselves (0.299 + 0.587 + 0.114 = 1)."""
    return np.array([[[v, v, v] for v in values]], np.uint8)


def test_detail_kept_by_hand():
    """cov(c, d) / (s_c max(s_c, s_d)) on centred channels. Luminance: clean 10, 30 (centred -10, 10); 20, 24 keeps
    40 / 200 = 0.2 of it; 0, 60 is the same pattern with more contrast: 1; reversed: -1; flat: 0; a flat clean box: 1.
    Colour (r - g and b - (r + g) / 2): red, blue against their grey luminance (88, 58) lost all of it (0) though the
    luminance kept all (1); (120, 80, 80), (80, 80, 200) keeps (2 * 80 * 20 + 2 * 120 * 70) / 41600 = 0.4808."""
    clean, box = grey(10, 30), (0, 0, 2, 1)
    for degraded, kept in (((20, 24), 0.2), ((0, 60), 1.0), ((30, 10), -1.0), ((40, 40), 0.0)):
        assert D.detail_kept(clean, grey(*degraded), box, colour=False) == pytest.approx(kept, abs=1e-9), degraded
    assert D.detail_kept(grey(50, 50), grey(0, 255), box, colour=False) == 1.0
    red_blue = np.array([[[200, 40, 40], [40, 40, 200]]], np.uint8)
    assert D.detail_kept(red_blue, grey(88, 58), box, colour=True) == pytest.approx(0.0, abs=1e-9)
    assert D.detail_kept(red_blue, grey(88, 58), box, colour=False) == pytest.approx(1.0)
    shifted = np.array([[[120, 80, 80], [80, 80, 200]]], np.uint8)
    assert D.detail_kept(red_blue, shifted, box, colour=True) == pytest.approx(20000 / 41600)
    wide = np.concatenate([grey(7, 7), grey(10, 30), grey(9, 9)], 1)  # only the box (columns 2-3) is read
    assert D.detail_kept(wide, np.concatenate([grey(90, 0), grey(20, 24), grey(0, 99)], 1), (2, 0, 4, 1),
                         colour=False) == pytest.approx(0.2)


def test_needs_restore_by_hand():
    """Restore when the worst box kept less than the threshold: boxes keeping 1 and 0.2 restore at 0.5 and 0.21, not at
    0.19; the box alone that kept everything does not; colour questions read the colour channels."""
    clean, degraded = grey(10, 30, 10, 30), grey(10, 30, 20, 24)
    boxes = [(0, 0, 2, 1), (2, 0, 4, 1)]
    assert D.needs_restore(clean, degraded, boxes) and D.needs_restore(clean, degraded, boxes, threshold=0.21)
    assert not D.needs_restore(clean, degraded, boxes, threshold=0.19)
    assert not D.needs_restore(clean, degraded, boxes[:1])
    red_blue = np.array([[[200, 40, 40], [40, 40, 200]]], np.uint8)
    assert D.needs_restore(red_blue, grey(88, 58), boxes[:1], colour=True)
    assert not D.needs_restore(red_blue, grey(88, 58), boxes[:1], colour=False)


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer


def test_toy_tokenizer_round_trips_and_keeps_specials_special(tok):
    """Text survives encode/decode; the 4 BAGEL specials are special tokens, the CLEAR tags ordinary single tokens."""
    text = "<think>Heavy noise hides the colour.</think>\n<image_restore>\nçà 🎉 1.5 < 2 </b>"
    assert tok.decode(tok.encode(text)) == text
    assert [tok.bos_id, tok.eos_id, tok.soi_id, tok.eoi_id] == [0, 1, 2, 3]
    special = {t.content for t in tok.tk.get_added_tokens_decoder().values() if t.special}
    assert special == set(CK.SPECIAL_TOKENS.values())
    for tag in D.CLEAR_TAGS:
        assert len(tok.encode(tag)) == 1 and tag not in special
    assert tok.encode("<|im_end|>") == [tok.eos_id]
    assert D.config_ids(tok) == dict(bos_token_id=0, eos_token_id=1, start_of_image_id=2, end_of_image_id=3,
                                     vocab_size=tok.vocab_size)


def test_toy_tokenizer_is_deterministic_and_short():
    """Same corpus, same tokenizer (a checkpoint's vocabulary can be rebuilt); think texts stay short."""
    corpus = D.toy_corpus(300)
    a, b = D.train_toy_tokenizer(corpus), D.train_toy_tokenizer(corpus)
    assert a.tk.to_str() == b.tk.to_str()
    rng = np.random.default_rng(0)
    for sev in (0.23, 0.45, 0.9):
        text = D.think_response(rng, True, "B", "the red star's colour", "the star is red, option B", "gaussian_noise",
                                sev)
        assert all(len(a.encode(part)) <= 30 for part in text.split("\n"))


def test_tokenizer_from_file_looks_specials_up_by_text(tmp_path):
    """A Qwen2-style tokenizer.json (specials anywhere in the vocab) loads; missing specials or files are clear
    errors."""
    vocab = {"hello": 0, "<unk>": 1, "<|im_start|>": 7, "<|im_end|>": 8, "<|vision_start|>": 9, "<|vision_end|>": 5}
    raw = RawTokenizer(models.WordLevel({k: v for k, v in vocab.items() if not k.startswith("<|")}, unk_token="<unk>"))
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    t = D.Tokenizer.from_folder(tmp_path)
    assert (t.bos_id, t.eos_id, t.soi_id, t.eoi_id) == tuple(raw.token_to_id(s) for s in CK.SPECIAL_TOKENS.values())
    assert M.ModelConfig(**{**D.config_ids(t), "vocab_size": 16}).eos_token_id == t.eos_id
    plain = RawTokenizer(models.WordLevel({"hello": 0, "<unk>": 1}, unk_token="<unk>"))
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match="lacks the special tokens"):
        D.Tokenizer.from_file(tmp_path / "plain.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        D.Tokenizer.from_folder(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------------------
# CLEAR's prefix (sft.py builds the rest of a sample; tests/test_sft.py)


def test_inference_prefix_has_no_loss(world, tok):
    """The test-time prefix is items 1-4 of a training sample, with no loss anywhere."""
    exs = world.eval_split(2)["hard"]
    prefixes = D.inference_prefix(exs, tok, fake_encode([]))
    assert [[type(s).__name__ for s in p] for p in prefixes] == [["Text", "VaeImage", "VitImage", "Text"]] * 2
    assert not any(s.loss for p in prefixes for s in p if isinstance(s, M.Text))
    assert all(s.t == 0 for p in prefixes for s in p if isinstance(s, M.VaeImage))


# ----------------------------------------------------------------------------------------------------------------------
# answers


@pytest.mark.parametrize("text,letter", [("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) blue", "B"),
                                         ("The answer is B", "B"), ("Answer: (C)", "C"), ("  d  ", None),
                                         ("A red circle", None), ("blue", "B"), ("I think it is B, not really", "B"),
                                         ("B or C", None), ("", None)])
def test_mc_letter(text, letter):
    """Reply forms seen in practice map to the right option letter, ambiguous ones to None."""
    assert D.mc_letter(text, {"A": "red", "B": "blue", "C": "green", "D": "pink"}) == letter


def test_answer_extraction_and_correctness():
    """<answer> content with DOTALL, whole reply without one, normalised open answers, MC by letter."""
    assert D.extract_answer("<think>x</think><answer> top\nleft </answer>") == "top\nleft"
    assert D.extract_answer("no tags") is None
    assert D.normalize_answer("The Top-Left.") == "top left" and D.normalize_answer("Three") == "3"
    open_ex = D.Example(Image.new("RGB", (8, 8)), "Where?", "top left")
    assert D.is_correct("<think>..</think><answer>Top left.</answer>", open_ex)
    assert D.is_correct("top-left", open_ex) and not D.is_correct("<answer>top right</answer>", open_ex)
    mc_ex = D.Example(Image.new("RGB", (8, 8)), "Q", "C", options={"A": "red", "B": "blue", "C": "green", "D": "pink"})
    assert D.is_correct("<answer>C</answer>", mc_ex) and D.is_correct("<answer>green</answer>", mc_ex)
    assert not D.is_correct("<answer>B</answer>", mc_ex)


def test_restore_detection_official_and_relaxed():
    """Official rule needs the token alone on a line; the rollout rule only needs it present."""
    assert D.has_image_restore_token("<think>a</think>\n<image_restore>")
    assert D.has_image_restore_token("<image_restore>\n<think>b</think>")
    assert not D.has_image_restore_token("<think>a</think> <image_restore> <think>")
    assert D.requests_restore("<think>a</think> <image_restore>") and not D.requests_restore("<answer>x</answer>")


# ----------------------------------------------------------------------------------------------------------------------
# readers


def test_jsonl_reader_skips_and_reports_malformed_rows(tmp_path):
    """Good rows of all three kinds load; malformed ones are counted with their line numbers, never fatal."""
    Image.new("RGB", (96, 80), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    clear = "<think>Blurred.</think>\n<image_restore>\n<think>Clear now.</think>\n<answer>red</answer>"
    lines = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                             {"from": "gpt", "value": "Red."}]},
        "{not json",
        {"image": "a.png", "question": "What colour?", "answer": "red"},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "Q"}]},
        {"image": "missing.png", "question": "Q", "answer": "A"},
        {"image": "broken.png", "question": "Q", "answer": "A"},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                             {"from": "gpt", "value": clear}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    rows, problems = D.read_jsonl(path, tmp_path)
    assert [r["line"] for r in rows] == [1, 3, 8] and [p[0] for p in problems] == [2, 4, 5, 6, 7]
    assert rows[0]["question"] == "What colour?"
    rng = np.random.default_rng(0)
    plain, official = D.jsonl_example(rows[0], rng), D.jsonl_example(rows[2], rng)
    assert plain.corruption in D.CORRUPTIONS and plain.severity in (0.23, 0.45, 0.9)
    assert D.extract_answer(plain.response) == "Red." and plain.degraded.size == (96, 80)
    assert official.response == clear and official.restore
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.read_jsonl(tmp_path / "nope.jsonl", tmp_path)
    (tmp_path / "bad.jsonl").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="LLaVA-style"):
        D.read_jsonl(tmp_path / "bad.jsonl", tmp_path)


def b64_png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tsv_reader_resolves_references_and_reports_bad_rows(tmp_path):
    """VLMEvalKit TSV: circular rows borrow an image by index; undecodable images and missing options are reported."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    table = [
        [10, "What colour is the box?", "Look closely.", "red", "blue", "green", "", "B", "colour",
         b64_png((0, 0, 255))],
        [11, "What colour is the box?", "", "blue", "red", "green", "", "A", "colour", "10"],
        [12, "Broken?", "", "x", "y", "", "", "A", "colour", "bm90IGFuIGltYWdl"],
        [13, "Which?", "", "x", "y", "z", "", "D", "colour", b64_png((9, 9, 9))],
        [14, "Gap?", "", "x", "", "z", "", "A", "colour", b64_png((9, 9, 9))],
    ]
    path = tmp_path / "MMBench_LOW_LEVEL_HIGH.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows([header, *table])
    rows, problems = D.read_tsv(path)
    assert [r["index"] for r in rows] == ["10", "11"] and [p[0] for p in problems] == ["12", "13", "14"]
    assert "undecodable" in problems[0][1] and "not among the options" in problems[1][1] and "missing" in problems[2][1]
    assert rows[1]["image"] == rows[0]["image"] and rows[0]["options"] == {"A": "red", "B": "blue", "C": "green"}
    assert D.mc_prompt(rows[0]) == ("Hint: Look closely.\nQuestion: What colour is the box?\nOptions:\nA. red\n"
                                    "B. blue\nC. green\nPlease select the correct answer from the options above. \n")
    ex = D.tsv_example(rows[1])
    assert ex.degraded.getpixel((0, 0)) == (0, 0, 255) and ex.answer == "A" and ex.question.startswith("Question:")
    with pytest.raises(ValueError, match="lacks the columns"):
        (tmp_path / "x.tsv").write_text("a\tb\n1\t2\n")
        D.read_tsv(tmp_path / "x.tsv")


def jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3),
                                                         dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_readers_reject_truncated_and_tiny_pictures_at_read_time(tmp_path):
    """A truncated JPEG passes Image.verify() (and crashed training at the step that drew it); it is refused at read
    time now, as is a picture under degrade.MIN_SIZE, in JSONL and TSV alike, with the reason. A file with no usable
    row is an error; a TSV with only its header says so (it has the columns)."""
    whole = jpeg_bytes()
    with Image.open(io.BytesIO(whole[:len(whole) // 2])) as im:
        im.verify()  # the check the readers used to make: it passes
    (tmp_path / "ok.jpg").write_bytes(whole)
    (tmp_path / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    Image.new("RGB", (40, 12)).save(tmp_path / "thin.png")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"image": f, "question": "Q", "answer": "A"}) + "\n"
                            for f in ("ok.jpg", "cut.jpg", "thin.png")))
    rows, problems = D.read_jsonl(path, tmp_path)
    assert [r["line"] for r in rows] == [1] and [n for n, _ in problems] == [2, 3]
    assert "truncated" in problems[0][1] and "40x12 pixels, under degrade's minimum side 16" in problems[1][1]
    assert D.skip_report(path, rows, problems, "line").startswith(f"{path}: 1 rows used, 2 skipped "
                                                                  "(first: line 2: unusable image")
    path.write_text(json.dumps({"image": "cut.jpg", "question": "Q", "answer": "A"}) + "\n")
    with pytest.raises(CK.InputError, match="none of its 1 rows is usable .*truncated"):
        D.read_jsonl(path, tmp_path)

    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    thin = io.BytesIO()
    Image.new("RGB", (12, 40)).save(thin, "PNG")
    header = ["index", "question", "A", "B", "answer", "image"]
    table = [["1", "Q?", "x", "y", "A", b64(whole)], ["2", "Q?", "x", "y", "A", b64(whole[:len(whole) // 2])],
             ["3", "Q?", "x", "y", "B", b64(thin.getvalue())], ["4", "Q?", "x", "y", "B", "2"]]
    tsv = tmp_path / "b.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in [header, *table]) + "\n")
    rows, problems = D.read_tsv(tsv)
    assert [r["index"] for r in rows] == ["1"] and [i for i, _ in problems] == ["2", "3", "4"]
    assert "truncated" in problems[0][1] and "12x40 pixels" in problems[1][1] and "truncated" in problems[2][1]
    tsv.write_text("\n".join("\t".join(r) for r in [header, *table[1:]]) + "\n")
    with pytest.raises(CK.InputError, match="none of its 3 rows is usable"):
        D.read_tsv(tsv)
    tsv.write_text("\t".join(header) + "\n")
    with pytest.raises(CK.InputError, match="has a header but no rows"):
        D.read_tsv(tsv)


def test_a_corrupt_tokenizer_json_is_named(tmp_path):
    """tokenizers' own message ("key must be a string ...") names no file; ours does, from either loader."""
    (tmp_path / "tokenizer.json").write_text('{1: "x"}')
    with pytest.raises(CK.InputError, match=f"{tmp_path / 'tokenizer.json'} is not a readable tokenizer.json"):
        D.Tokenizer.from_folder(tmp_path)
    with pytest.raises(CK.InputError, match="tokenizer.json is not a readable tokenizer.json"):
        CK.read_tokenizer(tmp_path / "tokenizer.json")


def test_image_helpers_odd_modes():
    """Any PIL mode becomes RGB (alpha on white, degrade.to_rgb's rule everywhere); fit_size keeps sides on the
    stride."""
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert D.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    for mode in ("L", "P", "CMYK", "I;16", "F", "LA"):
        assert D.to_rgb(Image.new(mode, (5, 5))).mode == "RGB"
    wide = Image.fromarray((np.arange(40 * 30) % 65536).reshape(30, 40).astype(np.uint16))  # I;16: one rule everywhere
    assert D.image_to_tensor(wide).shape == (3, 30, 40) and np.array_equal(np.asarray(D.to_rgb(wide))[..., 0],
                                                                           np.asarray(wide) >> 8)
    assert D.fit_size(1000, 300, 980, 224, 14) == (980, 294) and D.fit_size(100, 60, 980, 224, 14) == (378, 224)


def test_jsonl_reader_bom_encoding_and_paths(tmp_path):
    """A UTF-8 byte-order mark is read (it cost the first row); a line that is not UTF-8 stops the file with its line
    number (it trained on replacement characters); a folder, a missing --images folder, an empty file and a list of
    images are each named for what they are."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    row = {"image": "a.png", "question": "Q?", "answer": "A"}
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\ufeff" + json.dumps(row) + "\r\n" + json.dumps(row) + "\r\n").encode())
    rows, problems = D.read_jsonl(path, tmp_path)
    assert [r["line"] for r in rows] == [1, 2] and problems == []
    path.write_bytes(json.dumps(row).encode() + b"\n"
                     + json.dumps({**row, "question": "caf\u00e9?"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(CK.InputError, match="d.jsonl line 2 is not UTF-8 .*save the file as UTF-8"):
        D.read_jsonl(path, tmp_path)
    with pytest.raises(FileNotFoundError, match="is a folder"):
        D.read_jsonl(tmp_path, tmp_path)
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "image": ["a.png", "a.png"]}) + "\n")
    with pytest.raises(FileNotFoundError, match="--images .*nope is not a folder"):
        D.read_jsonl(path, tmp_path / "nope")
    rows, problems = D.read_jsonl(path, tmp_path)
    assert problems == [(2, "'image' is [\"a.png\", \"a.png\"], not one picture path")]
    path.write_text("")
    with pytest.raises(CK.InputError, match="d.jsonl is empty"):
        D.read_jsonl(path, tmp_path)


def test_tsv_reader_bom_encoding_duplicates_and_shifted_rows(tmp_path):
    """A TSV saved with a byte-order mark has its index column (pandas reads it so); a file that is not UTF-8 stops;
    a repeated index, a row with more cells than the header, a row without an image and a reference to a missing
    index are skipped with those reasons (they were scored twice, or reported as undecodable pictures)."""
    header = ["index", "question", "A", "B", "answer", "image"]
    good = b64_png((9, 9, 9))
    table = [["1", "Q?", "x", "y", "A", good], ["1", "Q?", "x", "y", "B", good],
             ["2", "Q?", "x", "y", "A", good, "extra"],
             ["3", "Q?", "x", "y", "A", ""], ["4", "Q?", "x", "y", "A", "9"], ["5", "Q?", "x", "y", "B", "1"]]
    tsv = tmp_path / "b.tsv"
    tsv.write_bytes(("\ufeff" + "\n".join("\t".join(r) for r in [header, *table]) + "\n").encode())
    rows, problems = D.read_tsv(tsv)
    assert [r["index"] for r in rows] == ["1", "5"] and rows[1]["image"] == good
    assert problems == [("1", "its index repeats an earlier row's"), ("2", "7 cells where the header has 6"),
                        ("3", "no image"), ("4", "undecodable image ('9' is no row's index, nor a picture in base64)")]
    tsv.write_bytes("\n".join("\t".join(r) for r in [header, table[0]]).encode("utf-8")
                    .replace(b"Q?", "Caf\u00e9?".encode("latin-1")))
    with pytest.raises(CK.InputError, match="b.tsv is not UTF-8 text"):
        D.read_tsv(tsv)
    with pytest.raises(FileNotFoundError, match="is a folder"):
        D.read_tsv(tmp_path)


def test_data_cli_refuses_bad_flags(monkeypatch, capsys, tmp_path):
    """python data.py: a negative --seed or --show, or an --out that is no picture file name, stops in one line."""
    for argv, words in ((["--show", "2", "--seed", "-1"], "--seed -1: must be an integer >= 0"),
                        (["--show", "-3"], "--show -3"),
                        (["--show", "2", "--out", str(tmp_path)], "must name a picture file")):
        monkeypatch.setattr("sys.argv", ["data.py", *argv])
        with pytest.raises(SystemExit) as e:
            D.main()
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_toy_colours_are_at_least_50_degrees_of_hue_apart():
    """The toy generator redraws hues only to within a few tens of degrees (data.COLOURS): closer colours turned its
    restorations of readable pictures into the neighbouring colour."""
    hues = sorted(360 * colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for rgb in D.COLOURS.values())
    gaps = [(b - a) % 360 for a, b in zip(hues, hues[1:] + hues[:1])]
    assert len(D.COLOURS) == 6 and min(gaps) >= 50


def test_tsv_columns_cells_and_quotes_are_named(tmp_path):
    """A header naming a column twice (one of the two was used silently), a row one cell short (reported as "no
    image"), and an unmatched quote (it took the following rows into one cell, and the row count was wrong) are each
    named."""
    header = "index\timage\tquestion\tanswer"
    image = base64.b64encode(jpeg_bytes()).decode()
    (tmp_path / "twice.tsv").write_text(f"{header}\tanswer\n0\t{image}\tQ?\tA\tB\n")
    with pytest.raises(CK.InputError, match=r"names the columns \['answer'\] more than once"):
        D.read_tsv(tmp_path / "twice.tsv")
    (tmp_path / "short.tsv").write_text(f"{header}\n0\t{image}\tQ?\tA\n1\t{image}\tQ?\n")
    rows, problems = D.read_tsv(tmp_path / "short.tsv")
    assert len(rows) == 1 and problems == [("1", "3 cells where the header has 4")]
    (tmp_path / "quote.tsv").write_text(f"{header}\n0\t{image}\t\"Q?\tA\n1\t{image}\tQ?\tA\n2\t{image}\tQ?\tA\n")
    with pytest.raises(CK.InputError, match=r"quote.tsv line 2: a quote .* runs on to line 4"):
        D.read_tsv(tmp_path / "quote.tsv")

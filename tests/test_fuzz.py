"""Fuzzing the readers of everything a user hands in (data files, tokenizer.json, checkpoint folders): random bytes,
truncated files, random rows and random JSON may only ever raise checkpoint.InputError or FileNotFoundError, with a
message naming the file; whatever a reader accepts must be usable (a row's picture decodes, a checkpoint loads). Fixed
seeds."""

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
import model as M
from conftest import tiny_cfg

DOCUMENTED = (CK.InputError, FileNotFoundError)


def random_json(rng, depth: int = 0):
    kind = rng.integers(8 if depth < 2 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(2))
    if kind == 2:
        return int(rng.choice([-1, 0, 1, 3, 7, 64, 255]))
    if kind == 3:
        return float(rng.choice([-0.5, 0.0, 1e-6, 2.5, np.inf, np.nan]))
    if kind == 4:
        return "".join(rng.choice(list("ab<>{}\"\\ é\t\n0")) for _ in range(rng.integers(6)))
    if kind in (5, 6):
        return [random_json(rng, depth + 1) for _ in range(rng.integers(4))]
    return {str(random_json(rng, 2)): random_json(rng, depth + 1) for _ in range(rng.integers(4))}


def flipped(data: bytes, rng) -> bytes:
    out = bytearray(data)
    for i in rng.integers(0, len(out), size=rng.integers(1, 6)):
        out[i] ^= int(rng.integers(1, 256))
    return bytes(out)


def cut(data: bytes, rng) -> bytes:
    return data[:int(rng.integers(0, len(data)))]


def picture_bytes(rng, fmt: str, side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side + 3, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def random_picture(rng) -> bytes:
    """A good picture (half the time), a tiny one, a truncated or bit-flipped one, or random bytes."""
    good = picture_bytes(rng, str(rng.choice(["PNG", "JPEG"])), int(rng.choice([20, 40])))
    bad = [picture_bytes(rng, "PNG", 8), cut(good, rng), flipped(good, rng), rng.bytes(int(rng.integers(0, 200)))]
    return good if rng.integers(2) else bad[rng.integers(4)]


def only_documented(call, path):
    """call() returns, or raises a documented error whose message names `path`."""
    try:
        return call()
    except DOCUMENTED as e:
        assert str(e) and str(path) in str(e), (type(e).__name__, str(e))
        return None


def test_jsonl_reader_fuzz(tmp_path):
    """Random bytes, truncated files and random rows (random JSON, real-looking rows over broken pictures): the reader
    returns rows whose pictures all load and degrade, or raises a documented error naming the file."""
    rng = np.random.default_rng(0)
    for i in range(12):
        (tmp_path / f"p{i}.img").write_bytes(random_picture(rng))
    good = "\n".join(json.dumps({"image": f"p{i}.img", "question": "Q?", "answer": "A"}) for i in range(12))
    for case in range(40):
        path = tmp_path / f"d{case}.jsonl"
        kind = case % 4
        if kind == 0:
            text = rng.bytes(int(rng.integers(0, 300)))
        elif kind == 1:
            text = cut(good.encode(), rng)
        elif kind == 2:
            text = "\n".join(json.dumps(random_json(rng)) for _ in range(5)).encode()
        else:
            rows = [{"image": str(rng.choice([f"p{i}.img" for i in range(12)] + ["nope.png", ""])),
                     "conversations": [{"from": "human", "value": "Q?" if rng.integers(3) else random_json(rng)},
                                       {"from": "gpt", "value": "A"}]}
                    if rng.integers(3) else random_json(rng) for _ in range(6)]
            text = "\n".join(json.dumps(r) for r in rows).encode()
        path.write_bytes(text)
        got = only_documented(lambda: D.read_jsonl(path, tmp_path), path)
        for row in (got or ([], []))[0]:
            D.jsonl_example(row, rng)  # what crashed training when a truncated picture passed the reader
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        D.read_jsonl(tmp_path / "nope.jsonl", tmp_path)


def test_tsv_reader_fuzz(tmp_path):
    """Random bytes, truncated tables and random cells: rows returned decode as benchmark examples, or a documented
    error names the file."""
    rng = np.random.default_rng(1)
    header = ["index", "image", "question", "A", "B", "answer", "category"]
    for case in range(40):
        path = tmp_path / f"t{case}.tsv"
        rows = [[str(i), base64.b64encode(random_picture(rng)).decode() if rng.integers(3) else str(rng.integers(5)),
                 str(random_json(rng)), "x", str(random_json(rng)), str(rng.choice(["A", "B", "A", "C", ""])), "c"]
                for i in range(4)]
        table = "\n".join("\t".join(r) for r in [header, *rows]).encode()
        text = [rng.bytes(int(rng.integers(0, 300))), cut(table, rng), flipped(table, rng), table][case % 4]
        path.write_bytes(text)
        got = only_documented(lambda: D.read_tsv(path), path)
        for row in (got or ([], []))[0]:
            D.tsv_example(row)


def test_tokenizer_fuzz(tmp_path, toy_tok):
    """A tokenizer.json of random bytes, random JSON, or a real one truncated or bit-flipped: a documented error naming
    the file, or a tokenizer with the four special tokens."""
    rng = np.random.default_rng(2)
    toy_tok.tk.save(str(tmp_path / "real.json"))
    real = (tmp_path / "real.json").read_bytes()
    for case in range(40):
        folder = tmp_path / f"k{case}"
        folder.mkdir()
        data = [rng.bytes(int(rng.integers(0, 200))), json.dumps(random_json(rng)).encode(), cut(real, rng),
                flipped(real, rng)][case % 4]
        (folder / "tokenizer.json").write_bytes(data)
        tok = only_documented(lambda: D.Tokenizer.from_folder(folder), folder / "tokenizer.json")
        assert tok is None or None not in (tok.bos_id, tok.eos_id, tok.soi_id, tok.eoi_id)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, toy_tok):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fuzz") / "ckpt"
    CK.save_pretrained(M.Bagel(tiny_cfg(**D.config_ids(toy_tok))), folder, tokenizer=toy_tok.tk)
    return folder


def test_checkpoint_fuzz(tiny_folder, tmp_path):
    """Each file of a saved tiny checkpoint replaced by random bytes, truncated, bit-flipped, bit-flipped in its header
    (safetensors: names, dtypes, shapes, offsets) or given values of random types (json files): load_pretrained loads,
    or raises a documented error naming the folder."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_folder, folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    loaded = 0
    for case in range(48):
        name = sorted(files)[case % len(files)]
        kind = case // len(files) % 4
        if kind == 3 and name.endswith(".safetensors"):
            end = 8 + int.from_bytes(files[name][:8], "little")
            data = flipped(files[name][:end], rng) + files[name][end:]
        elif kind == 3 and name.endswith(".json"):
            values = json.loads(files[name])
            target = values["model"] if name == "nanoclear.json" else values
            target[str(rng.choice(sorted(target)))] = random_json(rng)
            data = json.dumps(values).encode()
        else:  # merges.txt (the toy BPE's) takes the byte mutations only
            data = [rng.bytes(int(rng.integers(0, 300))), cut(files[name], rng),
                    flipped(files[name], rng)][min(kind, 2)]
        (folder / name).write_bytes(data)
        model = only_documented(lambda: CK.load_pretrained(folder), folder)
        loaded += model is not None
        (folder / name).write_bytes(files[name])
    assert 0 < loaded < 48  # some mutations are harmless (a flipped weight), most are not
    (folder / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        CK.load_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------------------
# Issue 31: every reader of user input takes regular files only and raises only the documented errors


@pytest.fixture
def no_hang():
    """Fail, instead of hanging the suite, if a reader blocks (a FIFO opened for reading waits for a writer)."""
    import signal

    def hung(*_):
        raise TimeoutError("a reader blocked")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_no_reader_opens_a_fifo(tmp_path, toy_tok, tiny_folder, no_hang):
    """A FIFO where a file is expected (a JSONL, a TSV, a picture, a picture named in a JSONL, tokenizer.json, a
    checkpoint's json and safetensors files, a log, a probe cache) is refused in words, never opened: reading one
    blocked for ever."""
    import os

    import common as C
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for call in (lambda: D.read_jsonl(fifo, tmp_path), lambda: D.read_tsv(fifo), lambda: D.open_image(fifo),
                 lambda: D.Tokenizer.from_file(fifo), lambda: C.read_log(fifo), lambda: CK.read_json(fifo),
                 lambda: CK.read_tensors(fifo)):
        with pytest.raises(CK.InputError, match=r"pipe is a FIFO \(named pipe\), not a regular file"):
            call()
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "pipe", "question": "Q?", "answer": "A"}) + "\n")
    with pytest.raises(CK.InputError, match=r"pipe \(is a FIFO"):
        D.read_jsonl(tmp_path / "d.jsonl", tmp_path)
    for name in ("llm_config.json", "nanoclear.json", "tokenizer.json", "ema.safetensors"):
        folder = tmp_path / name.replace(".", "_")
        shutil.copytree(tiny_folder, folder)
        (folder / name).unlink()
        os.mkfifo(folder / name)
        with pytest.raises(CK.InputError, match=f"{name} is a FIFO"):
            CK.load_pretrained(folder)
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / CK.MARKER).touch()
    os.mkfifo(probe / "probe.json")
    assert D.cached_probe(probe, {}) is None  # unusable: trained again, with a line


def test_json_that_python_cannot_hold_is_an_input_error(tmp_path, tiny_folder, capsys):
    """JSON nested deeper than Python recurses (RecursionError) or with an integer of 5000 digits (ValueError) is a
    bad row (JSONL), or an InputError naming the file (configs, state.json, logs), never a traceback."""
    import common as C
    deep, long_int = "[" * 100_000 + "]" * 100_000, "1" * 5000
    Image.new("RGB", (32, 32)).save(tmp_path / "p.png")
    good = json.dumps({"image": "p.png", "question": "Q?", "answer": "A"})
    (tmp_path / "d.jsonl").write_text(f"{deep}\n{{\"image\": {long_int}}}\n{good}\n")
    rows, problems = D.read_jsonl(tmp_path / "d.jsonl", tmp_path)
    assert len(rows) == 1 and [n for n, _ in problems] == [1, 2] and all("not JSON" in why for _, why in problems)
    for text in (deep, f'{{"a": {long_int}}}'):
        folder = tmp_path / f"c{len(text)}"
        shutil.copytree(tiny_folder, folder)
        (folder / "vit_config.json").write_text(text)
        with pytest.raises(CK.InputError, match="vit_config.json is not valid JSON"):
            CK.load_pretrained(folder)
        (tmp_path / "log.jsonl").write_text(f"{text}\n" + json.dumps({"step": 1}) + "\n")
        with pytest.raises(CK.InputError, match="log.jsonl line 1 is not a log record"):
            C.read_log(tmp_path / "log.jsonl")


def test_configs_too_large_to_build_stop_before_allocating(tiny_folder, tmp_path):
    """A config asking for an absurd model (one tried to allocate 74.5 GiB before failing) stops at once, naming the
    sizes and the limits; a tokenizer with ids beyond the vocabulary (an IndexError at the first forward) stops too."""
    for key, value, words in (("max_latent_size", 10 ** 6, "max_latent_size 1000000 .at most 262,144"),
                              ("hidden_size", 10 ** 9, "hidden_size 1000000000"),
                              ("num_hidden_layers", 10 ** 6, "num_hidden_layers 1000000 .at most 1,024")):
        folder = tmp_path / key
        shutil.copytree(tiny_folder, folder)
        file = folder / ("nanoclear.json" if key == "max_latent_size" else "llm_config.json")
        values = json.loads(file.read_text())
        (values["model"] if key == "max_latent_size" else values)[key] = value
        file.write_text(json.dumps(values))
        with pytest.raises(CK.InputError, match=f"too large to build .*{words}"):
            CK.config_from_folder(folder)
    folder = tmp_path / "table"
    shutil.copytree(tiny_folder, folder)
    values = json.loads((folder / "nanoclear.json").read_text())
    values["model"]["max_latent_size"] = 20_000  # each side within the limit, the table (hidden x side^2) not
    (folder / "nanoclear.json").write_text(json.dumps(values))
    with pytest.raises(CK.InputError, match=r"hidden_size x max_latent_size\^2"):
        CK.config_from_folder(folder)
    folder = tmp_path / "vocab"
    shutil.copytree(tiny_folder, folder)
    values = json.loads((folder / "llm_config.json").read_text())
    values["vocab_size"] = 700  # the toy tokenizer has more ids than that
    (folder / "llm_config.json").write_text(json.dumps(values))
    with pytest.raises(CK.InputError, match="tokenizer.json has token ids up to .* vocabulary .* has 700 rows"):
        CK.config_from_folder(folder)


def test_train_state_fuzz(tmp_path):
    """Each corruption of train_state/ that --resume used to accept or crash on is an InputError naming it, before
    anything is restored: weights of shape (1,) or (rows, 1) (copy_ broadcast them: training went on from a constant),
    another dtype, an unknown or missing name, a mis-shaped or missing optimizer moment, a step that is no count, a
    step other than nanoclear.json's, missing or non-numeric scalars, random bytes."""
    from safetensors.torch import load_file, save_file

    from test_checkpoint import tiny_training
    out = tmp_path / "run"
    tiny_training(out)
    d = out / "train_state"
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    weights, moments = load_file(str(d / "model.safetensors")), load_file(str(d / "optimizer.safetensors"))
    name = "vae2llm.weight"
    rows = weights[name].shape[0]

    def tensors(file, change):
        def apply():
            values = dict(weights if file == "model" else moments)
            change(values)
            save_file(values, str(d / f"{file}.safetensors"))
        return apply

    def state(change):
        def apply():
            values = json.loads(files["state.json"])
            change(values)
            (d / "state.json").write_text(json.dumps(values))
        return apply

    cases = [
        (tensors("model", lambda w: w.update({name: torch.ones(1)})), f"{name} \\(1,\\)"),
        (tensors("model", lambda w: w.update({name: torch.ones(rows, 1)})), f"{name} \\({rows}, 1\\)"),
        (tensors("model", lambda w: w.update({name: w[name].double()})), "torch.float64"),
        (tensors("model", lambda w: w.pop(name)), f"lacks {name}"),
        (tensors("model", lambda w: w.update(extra=torch.ones(1))), "extra is not a parameter"),
        (tensors("optimizer", lambda m: m.update({f"{name}::exp_avg": torch.ones(3)})), "exp_avg \\(3,\\)"),
        (tensors("optimizer", lambda m: m.pop(f"{name}::exp_avg_sq")), "not \\['exp_avg_sq'\\]"),
        (tensors("optimizer", lambda m: m.update({"nope::exp_avg": torch.ones(1)})), "no parameter 'nope'"),
        (tensors("optimizer", lambda m: m.update({f"{name}::velocity": torch.ones(1)})), "not an optimizer entry"),
        (tensors("optimizer", lambda m: m.update({f"{name}::step": torch.ones(2)})), "not a step count"),
        (state(lambda s: s.update(step="4")), "step is \"4\""),
        (state(lambda s: s.update(step=-1)), "step is -1"),
        (state(lambda s: s.update(step=True)), "step is true"),
        (state(lambda s: s.update(step=3)), "step 3, but nanoclear.json records step 4"),
        (state(lambda s: s.pop("optimizer_scalars")), "optimizer_scalars is null"),
        (state(lambda s: s.update(optimizer_scalars={f"{name}::lr_scale": "x"})), "not a finite number"),
        (lambda: (d / "optimizer.safetensors").write_bytes(files["optimizer.safetensors"][:300]), "not a readable"),
    ]
    for corrupt, words in cases:
        corrupt()
        with pytest.raises(CK.InputError, match=words):
            tiny_training(out, resume=True)
        for file, data in files.items():
            (d / file).write_bytes(data)
    tiny_training(out, resume=True)  # the intact copy still resumes


def test_log_fuzz(tmp_path, capsys):
    """A log whose last line a crash cut short (a full disk) is read without it, with a warning (the next --resume
    raised JSONDecodeError); random bytes or a bad line before the last are an InputError naming the line."""
    import common as C
    rng = np.random.default_rng(4)
    lines = [json.dumps({"step": i, "loss": 1.0 / i}) for i in range(1, 6)]
    full = ("\n".join(lines) + "\n").encode()
    for cut_at in range(len(full) - len(lines[-1]), len(full) - 1):
        (tmp_path / "log.jsonl").write_bytes(full[:cut_at])
        got = C.read_log(tmp_path / "log.jsonl")
        assert [r["step"] for _, r in got] in ([1, 2, 3, 4], [1, 2, 3, 4, 5])
    assert "cut short" in capsys.readouterr().err
    C.Log(tmp_path / "log.jsonl", 3)  # a resumed run keeps steps 1-3, the cut line dropped
    assert [r["step"] for _, r in C.read_log(tmp_path / "log.jsonl")] == [1, 2, 3]
    for case in range(30):
        data = [rng.bytes(int(rng.integers(0, 200))), flipped(full, rng), cut(full, rng)][case % 3]
        (tmp_path / "log.jsonl").write_bytes(data)
        only_documented(lambda: C.read_log(tmp_path / "log.jsonl"), tmp_path / "log.jsonl")


def test_probe_cache_fuzz(tmp_path, capsys):
    """A probe cache with random, truncated or bit-flipped files, or weights from other settings, is trained again
    with one line, never loaded wrongly and never a traceback; a cache of weights written before its settings (the old
    order) is not a set, and is not read."""
    rng = np.random.default_rng(5)
    world = D.ToyWorld(0)
    folder = tmp_path / "probe"
    D.perception_probe(world, folder, n_train=8, steps=1)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert D.cached_probe(folder, json.loads(files["probe.json"])) is not None
    for case in range(12):
        name = ["probe.json", "probe.safetensors"][case % 2]
        (folder / name).write_bytes([rng.bytes(int(rng.integers(0, 200))), cut(files[name], rng),
                                     flipped(files[name], rng)][case % 3])
        net = D.cached_probe(folder, json.loads(files["probe.json"]))
        assert net is None or isinstance(net, torch.nn.Module)
        (folder / name).write_bytes(files[name])
    (folder / CK.MARKER).unlink()  # an old cache, or a kill between its two files: not a set
    assert D.cached_probe(folder, json.loads(files["probe.json"])) is None


def test_pictures_and_image_paths_that_are_refused(tmp_path):
    """A picture over degrade.MAX_PIXELS is refused before it is decoded, with the limit in the message (one of 100 MP
    was read with a warning and took a minute a draw); JSONL image paths that leave --images (absolute, ../) are skipped
    unless asked for (anywhere=True, --images-anywhere), as degrade.py refuses them."""
    from degrade import MAX_PIXELS
    Image.new("1", (8001, 8001)).save(tmp_path / "huge.png")  # 64,016,001 pixels, a few kB
    with pytest.raises(CK.InputError, match=f"huge.png is 8001x8001 = 64,016,001 pixels, over the limit of "
                                            f"{MAX_PIXELS:,}"):
        D.open_image(tmp_path / "huge.png")
    assert "over the limit of 64,000,000" in D.image_problem(tmp_path / "huge.png")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "out.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "ok.png")
    rows = [{"image": p, "question": "Q?", "answer": "A"} for p in ("ok.png", "../out.png", str(tmp_path / "out.png"))]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, problems = D.read_jsonl(tmp_path / "d.jsonl", tmp_path / "in")
    assert [r["line"] for r in got] == [1] and [n for n, _ in problems] == [2, 3]
    assert "absolute or has '..'" in problems[0][1] and "--images-anywhere" in problems[0][1]
    assert len(D.read_jsonl(tmp_path / "d.jsonl", tmp_path / "in", anywhere=True)[0]) == 3


def test_picture_reader_fuzz(tmp_path):
    """open_image (the demo's photo) and image_problem (every JSONL and TSV picture) on good, tiny, truncated,
    bit-flipped and random files: a documented error naming the file or a decoded RGB picture; image_problem gives a
    reason or None, and a picture it passes decodes."""
    rng = np.random.default_rng(6)
    for case in range(40):
        path = tmp_path / f"p{case}.img"
        path.write_bytes(random_picture(rng))
        image = only_documented(lambda: D.open_image(path), path)
        assert image is None or image.mode == "RGB"
        if D.image_problem(path) is None:
            assert D.open_image(path).size

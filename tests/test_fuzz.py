"""Fuzzing the readers of everything a user hands in (data files, tokenizer.json, checkpoint folders): random bytes,
truncated files, random rows and random JSON may only ever raise model.InputError or FileNotFoundError, with a message
naming the file; whatever a reader accepts must be usable (a row's picture decodes, a checkpoint loads). Fixed seeds."""

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

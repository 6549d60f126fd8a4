"""checkpoint.py: BAGEL-format folders written and read strictly (the official key names, every tensor checked, the
official loader's one quirk), and atomic checkpoint folders that survive a kill at any instant, with --resume."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint as CK
import common as C
import model as M
from conftest import tiny_cfg


def test_save_load_roundtrip_bit_identical(net, tmp_path):
    """A saved folder has the official key names and loads back bit-identically."""
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(60)}
                                     | {t: 60 + i for i, t in enumerate(CK.SPECIAL_TOKENS.values())}, unk_token="w0"))
    CK.save_pretrained(net, tmp_path / "ckpt", tokenizer=tok, meta={"stage": "test"})
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["ae.safetensors", "ema.safetensors", "llm_config.json", "nanoclear.json", "tokenizer.json",
                     "vit_config.json"]
    back = CK.load_pretrained(tmp_path / "ckpt")
    assert back.cfg == net.cfg
    a, b = net.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ckpt" / "ema.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("language_model.model.layers.1.self_attn.q_proj_moe_gen.weight" in keys and
            "latent_pos_embed.pos_embed" in keys)
    assert (json.loads((tmp_path / "ckpt" / "vit_config.json").read_text())["num_hidden_layers"]
            == net.cfg.vit_num_hidden_layers + 1)


def test_bad_checkpoints_are_refused_clearly(net, tmp_path):
    """Wrong folder, missing file, corrupt safetensors and config/weight mismatch give messages naming the problem."""
    with pytest.raises(FileNotFoundError, match="not a folder"):
        CK.load_pretrained(tmp_path / "nope")
    CK.save_pretrained(net, tmp_path / "c")
    (tmp_path / "c" / "ae.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        CK.load_pretrained(tmp_path / "c")
    CK.save_pretrained(net, tmp_path / "c")
    (tmp_path / "c" / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema.safetensors is missing"):
        CK.load_pretrained(tmp_path / "c")
    CK.save_pretrained(net, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "llm_config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "c" / "llm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mis-shaped .*mlp"):
        CK.load_pretrained(tmp_path / "c")


def rewrite(path, change):
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def test_the_vit_layer_the_official_loader_drops_and_no_other(net, tmp_path, capsys):
    """BAGEL builds vit_config.json's num_hidden_layers - 1 ViT layers and loads non-strictly: a BAGEL-format folder
    (no nanoclear.json) whose file holds all num_hidden_layers loses the last one, with one printed line. A nanoCLEAR
    folder whose vit_config.json says one layer too few (the old loader dropped a trained layer without a word), or
    an extra layer that is not one complete last layer, is an error naming the tensors."""
    from safetensors.torch import load_file, save_file
    CK.save_pretrained(net, tmp_path / "ours")
    rewrite(tmp_path / "ours" / "vit_config.json", lambda c: c.update(num_hidden_layers=2))
    with pytest.raises(CK.InputError, match=r"unexpected ema.safetensors:vit_model.vision_model.encoder.layers.1."
                                           r"mlp.fc1.weight .*holds more ViT layers than the 1 .*must say one more"):
        CK.load_pretrained(tmp_path / "ours")

    official = tmp_path / "official"  # SigLIP's whole tower in the file, as the json counts it
    CK.save_pretrained(net, official)
    (official / "nanoclear.json").unlink()
    ema = load_file(str(official / "ema.safetensors"))
    last = {k.replace("layers.1.", "layers.2."): v + 1 for k, v in ema.items() if k.startswith(CK.VIT_LAYERS + "1.")}
    save_file({**ema, **last}, str(official / "ema.safetensors"))
    code = {k: getattr(net.cfg, k) for k in CK.CODE_KEYS}
    capsys.readouterr()
    back = CK.load_pretrained(official, overrides=code)
    assert capsys.readouterr().out.count("dropped ViT layer 2 (16 tensors)") == 1
    assert len(back.vit_model.vision_model.encoder.layers) == 2
    assert torch.equal(back.state_dict()[CK.VIT_LAYERS + "1.mlp.fc1.weight"],
                       net.state_dict()[CK.VIT_LAYERS + "1.mlp.fc1.weight"])
    save_file({**ema, **dict(list(last.items())[:-1])}, str(official / "ema.safetensors"))  # an incomplete extra layer
    with pytest.raises(CK.InputError, match="unexpected ema.safetensors:vit_model.vision_model.encoder.layers.2"):
        CK.load_pretrained(official, overrides=code)


def test_a_tensor_in_two_files_is_an_error(net, tmp_path):
    """A `vae.*` tensor in ema.safetensors that ae.safetensors holds too is named, not silently replaced."""
    from safetensors.torch import load_file, save_file
    CK.save_pretrained(net, tmp_path / "c")
    ema = load_file(str(tmp_path / "c" / "ema.safetensors"))
    save_file({**ema, "vae.decoder.conv_out.bias": torch.zeros(3)}, str(tmp_path / "c" / "ema.safetensors"))
    with pytest.raises(CK.InputError, match="duplicate vae.decoder.conv_out.bias: "
                                           "ema.safetensors:vae.decoder.conv_out.bias "
                                           "and ae.safetensors:decoder.conv_out.bias"):
        CK.load_pretrained(tmp_path / "c")


def test_a_folder_without_nanoclear_json_gets_bagel_7b_code_values_and_is_told(net, tmp_path):
    """Without nanoclear.json the values no json holds (latent size, AE shape, ...) are BAGEL-7B-MoT's: a folder of
    another geometry hears that, which file would fix it, and what it needs."""
    CK.save_pretrained(net, tmp_path / "c")
    (tmp_path / "c" / "nanoclear.json").unlink()
    with pytest.raises(CK.InputError) as e:
        CK.load_pretrained(tmp_path / "c")
    assert ("has no nanoclear.json" in str(e.value) and "max_latent_size" in str(e.value) and
            "BAGEL-7B-MoT" in str(e.value))
    assert "\n" not in str(e.value)


def test_wrong_json_values_are_named(net, tmp_path):
    """A json value of the wrong type or size stops at load naming the folder's files and the key, never a TypeError
    deep in the model; a corrupt tokenizer.json is named too."""
    CK.save_pretrained(net, tmp_path / "c")
    for file, key, value, words in (("llm_config.json", "hidden_size", "32", "hidden_size is '32'"),
                                    ("llm_config.json", "num_attention_heads", 0, "num_attention_heads is 0"),
                                    ("vit_config.json", "num_hidden_layers", [3], "num_hidden_layers is [3]"),
                                    ("nanoclear.json", "model", [], "nanoclear.json lacks our config's ['model']")):
        path = tmp_path / "c" / file
        saved = path.read_text()
        rewrite(path, lambda c: c.update({key: value}))
        with pytest.raises(CK.InputError, match=re.escape(words)):
            CK.load_pretrained(tmp_path / "c")
        path.write_text(saved)
    (tmp_path / "c" / "tokenizer.json").write_text('{1: "x"}')
    with pytest.raises(CK.InputError, match="tokenizer.json is not a readable tokenizer.json .*key must be a string"):
        CK.load_pretrained(tmp_path / "c")


def test_saved_folder_works_in_the_official_app(net, tmp_path):
    """Safetensors carry {"format": "pt"} as the official files do; the tokenizer files of the source folder are kept,
    and a BPE tokenizer without them gets the vocab.json + merges.txt that Qwen2Tokenizer.from_pretrained reads."""
    from safetensors import safe_open
    from tokenizers import Tokenizer, models, trainers
    bpe = Tokenizer(models.BPE())
    bpe.train_from_iterator(["a b c ab bc abc"] * 10,
                            trainers.BpeTrainer(special_tokens=list(CK.SPECIAL_TOKENS.values())))
    CK.save_pretrained(net, tmp_path / "toy", tokenizer=bpe)
    with safe_open(str(tmp_path / "toy" / "ema.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "toy" / "vocab.json").read_text()) == bpe.get_vocab(with_added_tokens=False)
    assert (tmp_path / "toy" / "merges.txt").exists()
    (tmp_path / "toy" / "tokenizer_config.json").write_text('{"model_max_length": 32768}')
    CK.save_pretrained(net, tmp_path / "tuned", tokenizer=bpe, tokenizer_source=tmp_path / "toy")
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (tmp_path / "tuned" / name).read_bytes() == (tmp_path / "toy" / name).read_bytes()


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints that survive a kill at any instant


def test_failed_folder_write_leaves_nothing(tmp_path):
    """An exception while writing a checkpoint leaves neither a half-written folder nor temporary files."""
    def boom(tmp):
        CK.save_pretrained(M.Bagel(M.ModelConfig(num_hidden_layers=1, vit_num_hidden_layers=1)), tmp)
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        CK.atomic_write_folder(tmp_path / "c", boom)
    assert list(tmp_path.iterdir()) == []


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the program may catch it and clean up."""


RUN = C.Run(torch.device("cpu"), torch.float32)


def tiny_training(out: Path, resume: bool = False):
    """4 deterministic steps of a tiny model, saved every 2 (the calls a stage's loop makes: check_resume,
    load_resume_state, then per step common.save every save_every steps)."""
    torch.manual_seed(0)
    model = M.Bagel(tiny_cfg())
    ema, opt = C.EMA(model, 0.9), C.make_optimizer(model, 1e-2)
    start = 0
    if resume:
        CK.check_resume(out, "t", {"lr": 1e-2}, (), False)
        start = CK.load_resume_state(out, model, opt, ema.shadow)
    for step in range(start, 4):
        C.set_lr(opt, C.lr_at(step, 4, 1e-2, 1, 1e-3))
        _, gen = C.step_rngs(0, step)
        (model.vae2llm(torch.randn(3, 64, generator=gen)) ** 2).mean().backward()
        C.clip_and_step(model, opt, 1.0)
        ema.update(model)
        if (step + 1) % 2 == 0:
            C.save(out, RUN, model, opt, None, step + 1, {"args": {"lr": 1e-2}, "stage": "t"}, ema)


def saved(out: Path) -> dict:
    return {f"{f}:{k}": v
            for f in ("ema.safetensors", "train_state/model.safetensors", "train_state/optimizer.safetensors")
            for k, v in load_file(str(out / f)).items()}


def leftovers(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def faulty(monkeypatch, k: int, calls: list):
    """os.fsync, os.replace and shutil.rmtree count their calls; call k kills the program instead. (fsync itself is
    skipped: a kill, unlike a power cut, loses nothing the program wrote, and the test runs 10x faster.)"""
    def wrap(name, fn):
        def call(*a, **kw):
            calls.append(name)
            if len(calls) == k:
                raise Killed(f"killed at call {k}, {name}")
            return fn(*a, **kw)
        return call
    monkeypatch.setattr(os, "fsync", wrap("fsync", lambda fd: None))
    monkeypatch.setattr(os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(shutil, "rmtree", wrap("rmtree", shutil.rmtree))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_at_every_step_of_a_save_leaves_a_complete_checkpoint_for_resume(tmp_path, monkeypatch):
    """Kill the run at each step of the save that replaces its step-2 checkpoint by the step-4 one (every file and
    folder flushed, the marker, both renames, removing the old copy): --resume then finds a complete checkpoint, leaves
    no temporary folder, and ends with the weights of an uninterrupted run. Killed in its first save, a run has no
    checkpoint yet, and --resume says to start without it."""
    calls, after_save = [], []
    real_save = CK.save_checkpoint
    with monkeypatch.context() as m:
        faulty(m, 0, calls)
        m.setattr(CK, "save_checkpoint", lambda *a, **kw: (real_save(*a, **kw), after_save.append(len(calls))))
        tiny_training(tmp_path / "straight")
    straight = saved(tmp_path / "straight")
    assert after_save == [after_save[0], len(calls)] and calls.count("replace") == 3  # step 2 (no old copy), step 4
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    for k in [1, *range(after_save[0] + 1, len(calls) + 1)]:
        out = tmp_path / str(k) / "out"
        with monkeypatch.context() as m:
            faulty(m, k, [])
            with pytest.raises(Killed):
                tiny_training(out)
        try:
            tiny_training(out, resume=True)
        except FileNotFoundError as e:  # nothing complete yet: start again, as the message says
            assert k <= after_save[0] and "start without --resume" in str(e), (k, e)
            tiny_training(out)
        assert same(saved(out), straight) and leftovers(out) == [] and (out / CK.MARKER).exists(), k


def test_stale_temporaries_go_and_folders_get_the_umask(tmp_path, monkeypatch):
    """What killed writes left (a copy without its marker, an old copy) is removed by the next save; every file is
    flushed before the swap; the folder's permissions follow the umask like any folder (mkdtemp made them 0700)."""
    out = tmp_path / "ckpt"
    (tmp_path / ".ckpt.tmp-0123abcd").mkdir()
    (tmp_path / ".ckpt.old-0123abcd").mkdir()
    (tmp_path / ".ckpt.tmp-not-ours").mkdir()  # not a name atomic_write_folder makes: left alone
    flushed, real = [], CK.fsync_path
    monkeypatch.setattr(CK, "fsync_path", lambda p: (flushed.append(Path(p)), real(p)))
    CK.atomic_write_folder(out, lambda tmp: ((tmp / "a.txt").write_text("a"), (tmp / "sub").mkdir(),
                                             (tmp / "sub" / "b").write_text("b")))
    assert leftovers(out) == [".ckpt.tmp-not-ours"]
    assert {p.name for p in flushed} >= {"a.txt", "b", "sub", CK.MARKER, tmp_path.name}
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask and (out / "a.txt").read_text() == "a"


def test_resume_recovers_a_save_killed_between_its_renames(tmp_path, capsys, monkeypatch):
    """The kill the old code lost a checkpoint to: --out moved aside, the new copy not yet in place. settle_folder
    puts the new complete copy in place and says so in one line."""
    out = tmp_path / "ckpt"
    CK.atomic_write_folder(out, lambda tmp: (tmp / "v").write_text("1"))
    real = os.replace

    def second_rename_killed(src, dst):
        if ".tmp-" in str(src):
            raise Killed("between the renames")
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", second_rename_killed)
        with pytest.raises(Killed):
            CK.atomic_write_folder(out, lambda tmp: (tmp / "v").write_text("2"))
    assert not out.exists()
    capsys.readouterr()
    CK.settle_folder(out)
    assert (out / "v").read_text() == "2" and leftovers(out) == []
    assert capsys.readouterr().out.count("recovered") == 1


def test_check_out_protects_what_a_save_would_replace(tmp_path):
    """A save replaces --out as a whole, so before any work it must be new, empty or a checkpoint: a file, a folder of
    other things (a save deleted them) and the --init itself (a run overwrote its own start) are refused."""
    CK.check_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    CK.check_out(tmp_path / "empty")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "nanoclear.json").write_text("{}")
    CK.check_out(tmp_path / "ckpt", init=tmp_path / "other")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CK.InputError, match="file is a file"):
        CK.check_out(tmp_path / "file")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_text("mine")
    with pytest.raises(CK.InputError, match="photos is a folder that holds no checkpoint"):
        CK.check_out(tmp_path / "photos")
    with pytest.raises(CK.InputError, match="is --init"):
        CK.check_out(tmp_path / "ckpt", init=str(tmp_path / "ckpt") + "/")
    assert (tmp_path / "photos" / "a.jpg").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------------------
# One writer per output folder; every reader settles; permissions (issue 31)

class Holder:
    """Another process in the middle of a save to `out` (forked: no second start of Python and torch): it holds the
    folder's lock and its temporary copy until go(), then finishes the save; kill() stops it as SIGKILL does."""

    def __init__(self, out: Path):
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        self.started, self.resume, self.saved = ctx.Event(), ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=self.run, args=(out,), daemon=True)
        self.proc.start()
        assert self.started.wait(30)
        self.pid = self.proc.pid

    def run(self, out: Path):
        def write(tmp):
            (tmp / "v").write_text("theirs")
            self.started.set()
            self.resume.wait(60)
        CK.atomic_write_folder(out, write)
        self.saved.set()

    def go(self):
        self.resume.set()
        assert self.saved.wait(30)
        self.proc.join(30)

    def kill(self):
        self.proc.kill()
        self.proc.join(30)


def test_two_writers_on_one_folder(tmp_path, capsys):
    """While one process saves to a folder, a second writer stops at once with one message naming the first process
    (two runs used to delete each other's temporary folders: 8 to 11 of 25 saves failed), a reader neither removes the
    writer's temporary copy nor waits (the folder is there), and once the first has saved the second can. A writer
    killed with SIGKILL leaves its lock file, which blocks no one."""
    out = tmp_path / "ckpt"
    CK.atomic_write_folder(out, lambda tmp: (tmp / "v").write_text("first"))
    other = Holder(out)
    with pytest.raises(CK.FolderInUse, match=f"ckpt is in use by process {other.pid}, another run"):
        CK.atomic_write_folder(out, lambda tmp: (tmp / "v").write_text("mine"))
    theirs = [p for p in leftovers(out) if ".tmp-" in p]
    assert len(theirs) == 1  # the other writer's copy is still there
    CK.settle_folder(out)  # a reader: touches nothing of a live writer's
    assert [p for p in leftovers(out) if ".tmp-" in p] == theirs and (out / "v").read_text() == "first"
    other.go()
    assert (out / "v").read_text() == "theirs" and leftovers(out) == []
    CK.atomic_write_folder(out, lambda tmp: (tmp / "v").write_text("mine"))
    assert (out / "v").read_text() == "mine"
    other = Holder(out)
    other.kill()  # SIGKILL mid-save: its lock file and temporary copy stay behind
    assert (tmp_path / ".ckpt.lock").read_text().strip() == str(other.pid)
    CK.atomic_write_folder(out, lambda tmp: (tmp / "v").write_text("after"))
    assert (out / "v").read_text() == "after" and leftovers(out) == []


def test_nested_locks_and_the_scripts_lock(tmp_path, capsys):
    import sft
    """folder_lock nests within a process (a run's saves inside its own lock); a stage's main takes its --out's lock
    before any work, so a second run stops at once, in one line naming the first."""
    out = tmp_path / "run"
    with CK.folder_lock(out):
        assert (tmp_path / ".run.lock").read_text().strip() == str(os.getpid())
        CK.atomic_write_folder(out, lambda tmp: (tmp / "v").write_text("1"))
    assert not (tmp_path / ".run.lock").exists()
    other = Holder(out)
    try:
        with pytest.raises(SystemExit) as e:
            C.run_cli(lambda: sft.main(["--out", str(out), "--init", str(tmp_path / "none"), "--threads", "1"]))
    finally:
        other.kill()
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"{os.path.basename(sys.argv[0])}: error: {out} is in use by process {other.pid}, another run writing there: "
        "wait for it to end, or pass another output folder"]


def test_every_reader_settles_an_interrupted_swap(net, tmp_path, capsys):
    """A kill between the two renames of a save leaves no folder, only its complete copy beside it: a reader
    (config_from_folder, the tokenizer, has_checkpoint: rl.py's choice of its start, evaluate.py's list) puts it
    back and says so; only saves and --resume did, and the readers went on without the checkpoint."""
    from tokenizers import Tokenizer, models

    import data as D
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(60)}
                                     | {t: 60 + i for i, t in enumerate(CK.SPECIAL_TOKENS.values())}, unk_token="w0"))
    for reader in (CK.config_from_folder, D.Tokenizer.from_folder, CK.has_checkpoint):
        out = tmp_path / reader.__name__
        CK.atomic_write_folder(out, lambda tmp: CK.save_pretrained(net, tmp, tokenizer=tok))
        tmp = CK.sibling(out, "tmp")
        shutil.copytree(out, tmp)
        os.replace(out, CK.sibling(out, "old"))  # killed here, before the second rename
        capsys.readouterr()
        assert reader(out)
        assert capsys.readouterr().out.count("recovered the newest complete copy") == 1 and leftovers(out) == []


def test_weights_get_the_umask_permissions(net, tmp_path):
    """safetensors writes its files owner-only (0600) beside JSON files of 0644: every saved file gets the umask's."""
    umask = os.umask(0o022)
    try:
        CK.save_pretrained(net, tmp_path / "c")
    finally:
        os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "c").iterdir()} == {
        "ae.safetensors": "0o644", "ema.safetensors": "0o644", "llm_config.json": "0o644",
        "vit_config.json": "0o644", "nanoclear.json": "0o644"}


def test_out_is_checked_before_any_work(tmp_path, monkeypatch):
    """--out without a name of its own (".", "", ".."), under a file, or on a file system that cannot be written is
    refused by taking its lock, before any work (each was a traceback after the run)."""
    (tmp_path / "file").write_text("mine")
    for out, words in (("", "no name of its own"), (".", "no name of its own"), ("..", "no name of its own"),
                       (str(tmp_path / "file" / "run"), "is inside .*file, which is a file")):
        with pytest.raises(CK.InputError, match=words):
            with CK.folder_lock(out):
                pass
        with pytest.raises(CK.InputError, match=words):
            CK.check_out(out)
    real = os.open

    def read_only(path, *a, **kw):
        if str(path).endswith(".lock"):
            raise OSError(30, "Read-only file system", str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(CK.InputError, match="run cannot be written .Read-only file system"):
        with CK.folder_lock(tmp_path / "run"):
            pass


def test_resume_compares_init_as_the_folder_it_names(tmp_path, monkeypatch):
    """--init ../x and its absolute form are one folder, not a changed setting."""
    (tmp_path / "x").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    out = tmp_path / "run"
    CK.atomic_write_folder(out, lambda tmp: ((tmp / "train_state").mkdir(),
                                             (tmp / "train_state" / "state.json").write_text('{"stage": "t"}'),
                                             (tmp / "nanoclear.json").write_text('{"init": "../x", "args": {}}')))
    CK.check_resume(out, "t", {"init": str(tmp_path / "x")}, (), False)
    with pytest.raises(CK.InputError, match="--init '../x' -> "):
        CK.check_resume(out, "t", {"init": str(tmp_path / "y")}, (), False)

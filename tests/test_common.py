"""common.py: flags checked before any work, the optimiser schedule, the EMA, atomic folders that survive a kill at any
instant, --resume, and the scripts' one-line errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common as C
import model as M
from common import flag
from test_model import tiny_cfg

ROOT = Path(__file__).resolve().parent.parent


def test_lr_schedule_by_hand():
    """Linear warmup to the peak, then cosine down to the floor."""
    assert C.lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert C.lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert C.lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.1 + 0.45)  # half way through the cosine
    assert C.lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_ema_by_hand():
    """shadow <- decay * shadow + (1 - decay) * weight, on trainable weights only."""
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = C.EMA(net, 0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)
    assert float(ema.shadow["weight"]) == pytest.approx(0.1)
    net.weight.requires_grad_(False)
    ema.update(net)
    assert float(ema.shadow["weight"]) == pytest.approx(0.1)


def test_foreach_optimizer_and_ema_equal_the_per_tensor_updates():
    """make_optimizer's foreach AdamW and EMA's one-call lerp give, to the bit, what one update per tensor gives."""
    torch.manual_seed(0)
    nets = [M.Bagel(tiny_cfg()) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    loop = [{"params": g["params"], "weight_decay": g["weight_decay"]}
            for g in C.make_optimizer(nets[1], 1e-3, weight_decay=0.1).param_groups]
    opts = [C.make_optimizer(nets[0], 1e-3, weight_decay=0.1),
            torch.optim.AdamW(loop, lr=1e-3, betas=(0.9, 0.95), eps=1e-15, foreach=False)]
    assert opts[0].param_groups[0]["foreach"] and not opts[1].param_groups[0]["foreach"]
    emas = [C.EMA(net, 0.9) for net in nets]
    for step in range(3):
        grads = {n: torch.randn_like(p) for n, p in nets[0].named_parameters()}
        for net, opt in zip(nets, opts):
            for n, p in net.named_parameters():
                p.grad = grads[n].clone()
            opt.step()
        emas[0].update(nets[0])
        with torch.no_grad():
            for n, p in nets[1].named_parameters():
                emas[1].shadow[n].lerp_(p, 1 - 0.9)
    for (n, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.equal(a, b) and torch.equal(emas[0].shadow[n], emas[1].shadow[n]), n


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_keep_freed_memory_applies_on_linux():
    assert C.keep_freed_memory() in (True, False)  # False only with another C library than glibc
    if os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") or os.path.exists("/lib/aarch64-linux-gnu/libc.so.6"):
        assert C.keep_freed_memory()


def test_failed_folder_write_leaves_nothing(tmp_path):
    """An exception while writing a checkpoint leaves neither a half-written folder nor temporary files."""
    def boom(tmp):
        M.save_pretrained(M.Bagel(M.ModelConfig(num_hidden_layers=1, vit_num_hidden_layers=1)), tmp)
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        C.atomic_write_folder(tmp_path / "c", boom)
    assert list(tmp_path.iterdir()) == []


def test_flags_are_checked_before_any_work(capsys):
    """An out-of-range value stops with exit status 2 and one line naming the flag, the value and what is allowed."""
    from dataclasses import dataclass

    @dataclass
    class Demo:
        steps: int = flag(3, "steps", "[1, inf)")
        ema: float = flag(0.9, "decay", "[0, 1)")
        scale: tuple = flag((0.4, 1.0), "interval", "[0, 1]")
        resume: bool = flag(False, "resume")

    cfg, _, given = C.parse_flags(Demo, "", ["--steps", "5", "--no-resume"])
    assert cfg == Demo(steps=5) and given == {"steps", "resume"}
    for argv, words in ((["--steps", "0"], "--steps 0: must be an integer >= 1"),
                        (["--ema", "1.5"], "--ema 1.5: must be a number in [0, 1)"),
                        (["--scale", "0.4", "2"], "--scale 2.0: must be a number in [0, 1]")):
        with pytest.raises(SystemExit) as e:
            C.parse_flags(Demo, "", argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints that survive a kill at any instant


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the program may catch it and clean up."""


RUN = C.Run(torch.device("cpu"), torch.float32)


def tiny_training(out: Path, resume: bool = False):
    """4 deterministic steps of a tiny model, saved every 2 (the same calls sft.py makes: check_resume,
    load_resume_state, train_loop, save_checkpoint)."""
    torch.manual_seed(0)
    model = M.Bagel(tiny_cfg())
    ema, opt = C.EMA(model, 0.9), C.make_optimizer(model, 1e-2)
    start = 0
    if resume:
        C.check_resume(out, "t", {"lr": 1e-2}, (), False, RUN)
        start = C.load_resume_state(out, model, ema, opt)
    loop = C.LoopConfig(steps=4, lr=1e-2, warmup=1, min_lr=1e-3, ema=0.9, grad_clip=1.0, seed=0, save_every=2, log_every=1)
    C.train_loop(RUN, model, model, opt, ema, loop, out, "t", lambda step, rng, gen: torch.randn(3, 64, generator=gen),
                 lambda m, x: ((m.vae2llm(x) ** 2).mean(), {}), None, {"args": {"lr": 1e-2}}, start_step=start)


def saved(out: Path) -> dict:
    return {f"{f}:{k}": v for f in ("ema.safetensors", "train_state/model.safetensors", "train_state/optimizer.safetensors")
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
    real_save = C.save_checkpoint
    with monkeypatch.context() as m:
        faulty(m, 0, calls)
        m.setattr(C, "save_checkpoint", lambda *a, **kw: (real_save(*a, **kw), after_save.append(len(calls))))
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
        assert same(saved(out), straight) and leftovers(out) == [] and (out / C.MARKER).exists(), k


def test_stale_temporaries_go_and_folders_get_the_umask(tmp_path, monkeypatch):
    """What killed writes left (a copy without its marker, an old copy) is removed by the next save; every file is
    flushed before the swap; the folder's permissions follow the umask like any folder (mkdtemp made them 0700)."""
    out = tmp_path / "ckpt"
    (tmp_path / ".ckpt.tmp-0123abcd").mkdir()
    (tmp_path / ".ckpt.old-0123abcd").mkdir()
    (tmp_path / ".ckpt.tmp-not-ours").mkdir()  # not a name atomic_write_folder makes: left alone
    flushed, real = [], C.fsync_path
    monkeypatch.setattr(C, "fsync_path", lambda p: (flushed.append(Path(p)), real(p)))
    C.atomic_write_folder(out, lambda tmp: ((tmp / "a.txt").write_text("a"), (tmp / "sub").mkdir(), (tmp / "sub" / "b").write_text("b")))
    assert leftovers(out) == [".ckpt.tmp-not-ours"]
    assert {p.name for p in flushed} >= {"a.txt", "b", "sub", C.MARKER, tmp_path.name}
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask and (out / "a.txt").read_text() == "a"


def test_resume_recovers_a_save_killed_between_its_renames(tmp_path, capsys, monkeypatch):
    """The kill the old code lost a checkpoint to: --out moved aside, the new copy not yet in place. settle_folder
    puts the new complete copy in place and says so in one line."""
    out = tmp_path / "ckpt"
    C.atomic_write_folder(out, lambda tmp: (tmp / "v").write_text("1"))
    real = os.replace

    def second_rename_killed(src, dst):
        if ".tmp-" in str(src):
            raise Killed("between the renames")
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", second_rename_killed)
        with pytest.raises(Killed):
            C.atomic_write_folder(out, lambda tmp: (tmp / "v").write_text("2"))
    assert not out.exists()
    capsys.readouterr()
    C.settle_folder(out)
    assert (out / "v").read_text() == "2" and leftovers(out) == []
    assert capsys.readouterr().out.count("recovered") == 1


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: one line on stderr and exit status 2 from every script


def test_scripts_turn_input_errors_into_one_line(capsys, monkeypatch):
    """InputError and FileNotFoundError end as "<prog>: error: <message>" (one line, status 2); other errors keep their
    traceback; every script's entry point goes through run_cli."""
    monkeypatch.setattr(sys, "argv", ["sft.py"])

    def main():
        raise error

    for error in (M.InputError("x.json is not valid JSON\nrestore it"), FileNotFoundError("no such file")):
        with pytest.raises(SystemExit) as e:
            C.run_cli(main)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("sft.py: error: ") and err.count("\n") == 1
    error = RuntimeError("a bug")
    with pytest.raises(RuntimeError):
        C.run_cli(main)
    for script in ("sft.py", "bridge.py", "rl.py", "evaluate.py", "pretrain.py", "bench.py"):
        assert "run_cli(main)" in (ROOT / script).read_text().split('if __name__ == "__main__":')[1], script


def test_a_corrupt_checkpoint_is_one_line_from_the_command_line(toy_ckpt, tmp_path):
    """End to end: sft.py on a checkpoint whose tokenizer.json is corrupt says so in one line naming the file."""
    bad = tmp_path / "bad"
    shutil.copytree(toy_ckpt, bad)
    (bad / "tokenizer.json").write_text('{1: "x"}')
    proc = subprocess.run([sys.executable, "sft.py", "--init", str(bad), "--out", str(tmp_path / "o"), "--eval-n", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("sft.py: error: ") and str(bad / "tokenizer.json") in proc.stderr


def test_paired_bootstrap_on_known_inputs():
    """The difference is the mean of a - b in points; the interval is the spread of resampled means (about +-1.96 SE)."""
    ones, zeros = [1] * 100, [0] * 100
    assert C.paired_bootstrap(ones, zeros) == {"diff": 100.0, "lo": 100.0, "hi": 100.0, "n": 100}
    assert C.paired_bootstrap(ones, ones)["hi"] == 0.0
    half = C.paired_bootstrap([1] * 50 + [0] * 50, zeros)  # SE of a 0.5 mean over 100 items: 5 points
    assert half["diff"] == 50.0 and half["lo"] == pytest.approx(40.2, abs=1.5) and half["hi"] == pytest.approx(59.8, abs=1.5)
    paired = C.paired_bootstrap([1, 0] * 50, [1, 0] * 50)  # identical per question: no spread at all
    assert paired["lo"] == paired["hi"] == 0.0


def test_check_out_protects_what_a_save_would_replace(tmp_path):
    """A save replaces --out as a whole, so before any work it must be new, empty or a checkpoint: a file, a folder of
    other things (a save deleted them) and the --init itself (a run overwrote its own start) are refused."""
    C.check_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    C.check_out(tmp_path / "empty")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "nanoclear.json").write_text("{}")
    C.check_out(tmp_path / "ckpt", init=tmp_path / "other")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(M.InputError, match="file is a file"):
        C.check_out(tmp_path / "file")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_text("mine")
    with pytest.raises(M.InputError, match="photos is a folder that holds no checkpoint"):
        C.check_out(tmp_path / "photos")
    with pytest.raises(M.InputError, match="is --init"):
        C.check_out(tmp_path / "ckpt", init=str(tmp_path / "ckpt") + "/")
    assert (tmp_path / "photos" / "a.jpg").read_text() == "mine"


def test_device_and_seed_flags_are_checked_before_any_work():
    """--device names a device this machine has (a typo or an absent GPU was a traceback); seeds are non-negative
    32-bit integers (-1 was a traceback from numpy after the run had started)."""
    for name in ("foo", "meta", "cuda:64"):
        with pytest.raises(M.InputError, match=f"--device {name}: "):
            C.pick_device(name)
    assert C.pick_device("cpu") == (torch.device("cpu"), "asked for")
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        seed: int = flag(0, "seed", C.SEED)
    for bad in ("-1", str(2**70)):
        with pytest.raises(SystemExit):
            C.parse_flags(Cfg, "", ["--seed", bad])
    assert C.parse_flags(Cfg, "", ["--seed", "4294967295"])[0].seed == 4294967295

"""Stage 1 (sft.py via common.finetune): objective, packing budget, resume, DDP on gloo."""

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common as C
import model as M

ROOT = Path(__file__).resolve().parent.parent


def finetune_args(init, out, *extra):
    p = argparse.ArgumentParser()
    C.add_finetune_args(p, steps=4, lr=1e-3, distill_weight=0.0, init=str(init), out=str(out))
    return p.parse_args(["--tokens-per-step", "400", "--eval-n", "0", "--save-every", "2", "--warmup", "1", "--threads", "1", *extra])


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.with_name(out.name + ".log.jsonl").read_text().splitlines()]


def test_sft_loss_normalisation():
    """CE and MSE are sums over tokens divided by global counts; weights scale each term."""
    out = M.TrainOutput(ce=torch.tensor([1.0, 3.0]), mse=torch.tensor([2.0]), v=torch.zeros(0), hidden=torch.zeros(0))
    loss, ce, mse = C.sft_loss(out, 4.0, 2.0, ce_weight=1.0, mse_weight=0.5)
    assert float(ce) == 1.0 and float(mse) == 1.0 and float(loss) == 1.5


def test_resume_reproduces_the_loss_curve(toy_ckpt, tmp_path, monkeypatch):
    """Killed after its step-2 checkpoint and resumed, a run logs exactly the losses of an uninterrupted run."""
    C.finetune(finetune_args(toy_ckpt, tmp_path / "a"), "sft")
    straight = [r["loss"] for r in log_of(tmp_path / "a")]

    real = C.make_batch_fn

    def dying(*a, **k):
        fn = real(*a, **k)

        def batch(step, rng, gen):
            if step == 3:
                raise KeyboardInterrupt("simulated kill")
            return fn(step, rng, gen)
        return batch

    monkeypatch.setattr(C, "make_batch_fn", dying)
    with pytest.raises(KeyboardInterrupt):
        C.finetune(finetune_args(toy_ckpt, tmp_path / "b"), "sft")
    monkeypatch.setattr(C, "make_batch_fn", real)
    assert json.loads((tmp_path / "b" / "train_state" / "state.json").read_text())["step"] == 2
    C.finetune(finetune_args(toy_ckpt, tmp_path / "b", "--resume"), "sft")
    resumed = [r["loss"] for r in log_of(tmp_path / "b")]
    assert resumed == straight and len(straight) == 4, (resumed, straight)
    a, b = M.load_pretrained(tmp_path / "a"), M.load_pretrained(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_refuses_wrong_checkpoints(toy_ckpt, tmp_path):
    """--resume on a folder without train_state, or written by another stage, stops with a clear message."""
    with pytest.raises(FileNotFoundError, match="train_state"):
        C.finetune(finetune_args(toy_ckpt, toy_ckpt, "--resume"), "sft")
    C.finetune(finetune_args(toy_ckpt, tmp_path / "a", "--steps", "2"), "sft")
    with pytest.raises(ValueError, match="stage 'sft'"):
        C.finetune(finetune_args(toy_ckpt, tmp_path / "a", "--resume"), "bridge")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, ckpt, out, cwd) -> subprocess.CompletedProcess:
    """Launch tests/<script> on 2 CPU processes (gloo) the way torchrun does; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / script), str(ckpt), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_ddp_two_processes_on_gloo(toy_ckpt, tmp_path):
    """torchrun-style launch of 2 CPU processes (gloo): both ranks train on their own data and stay in sync."""
    proc = torchrun("ddp_check.py", toy_ckpt, tmp_path / "ddp", tmp_path)
    assert "ranks in sync" in proc.stdout
    assert (tmp_path / "ddp" / "ema.safetensors").exists()


def test_fsdp_two_processes_on_gloo(toy_ckpt, tmp_path):
    """--fsdp: meta-device build, sharded load from rank 0, FSDP2 steps with distillation, gathered atomic save."""
    proc = torchrun("fsdp_check.py", toy_ckpt, tmp_path / "fsdp", tmp_path)
    assert "fsdp saved and reloaded" in proc.stdout

"""
Shared plumbing of the training stages (pretrain.py, sft.py, bridge.py, rl.py), written once.

Run setup (device, dtype, seeds, torchrun/DDP), AdamW + cosine schedule with warmup to a floor, EMA, one log line per
step plus a JSONL log, and checkpoints: a BAGEL-format folder (ema.safetensors = the EMA weights, as BAGEL/CLEAR
save them) with the resume state beside it in train_state/ (raw weights, optimizer, step), written atomically.

Every step draws its data and noise from generators seeded by (seed, step, rank), so a run resumed from a checkpoint
replays exactly the steps an uninterrupted run would take: the same loss curve.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M

# ----------------------------------------------------------------------------------------------------------------------
# Run setup


@dataclass
class Run:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0


def setup_run(device: str = "auto", dtype: str = "auto", seed: int = 0, threads: int = 0, quiet: bool = False) -> Run:
    """Pick device/dtype (printed with the reason), join torchrun's process group if launched by it, seed everything."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev, why_dev = M.pick_device(device)
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    dt, why_dt = M.pick_dtype(dtype, dev)
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed + rank)
    if rank == 0 and not quiet:
        print(f"device {dev} ({why_dev}) | dtype {str(dt).replace('torch.', '')} ({why_dt}) | processes {world} | torch {torch.__version__}")
    return Run(dev, dt, rank, world)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_rngs(seed: int, step: int, rank: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """The data (numpy) and noise/dropout (torch) generators of one training step."""
    return np.random.default_rng([seed, step, rank]), torch.Generator().manual_seed(hash((seed, step, rank)) % 2**63)


def all_reduce_sum(x: float, run: Run) -> float:
    if run.world == 1:
        return x
    t = torch.tensor([float(x)], device=run.device if run.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t)


# ----------------------------------------------------------------------------------------------------------------------
# Optimisation


def trainable(model: torch.nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model, lr: float, betas=(0.9, 0.95), eps: float = 1e-15, weight_decay: float = 0.0):
    """AdamW as BAGEL/CLEAR train: beta (0.9, 0.95), eps 1e-15; decay on matrices only."""
    params = trainable(model)
    groups = [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warmup, then cosine from peak down to the floor (CLEAR SFT: cosine, min_lr 1e-7)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


class EMA:
    """Exponential moving average of the trainable weights (BAGEL fsdp_ema_update; CLEAR SFT decay 0.995)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for (_, e), (_, p) in zip(self.model.named_parameters(), model.named_parameters()):
            if p.requires_grad:
                e.lerp_(p.detach(), 1 - self.decay)


def clip_and_step(model, optimizer, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable(model)], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: BAGEL-format folder + train_state/ for --resume


def save_checkpoint(folder, raw: M.Bagel, ema: EMA | None, optimizer, tokenizer, step: int, meta: dict):
    """Write folder atomically: ema.safetensors holds the EMA weights (or the raw ones without EMA)."""
    from safetensors.torch import save_file

    def train_state(tmp: Path):
        d = tmp / "train_state"
        d.mkdir()
        save_file({n: p.detach().contiguous().cpu() for n, p in raw.named_parameters()}, str(d / "model.safetensors"))
        names = {id(p): n for n, p in raw.named_parameters()}
        tensors, scalars = {}, {}
        for p, state in optimizer.state.items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    tensors[f"{names[id(p)]}::{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars[f"{names[id(p)]}::{k}"] = v
        save_file(tensors, str(d / "optimizer.safetensors"))
        (d / "state.json").write_text(json.dumps({"step": step, "optimizer_scalars": scalars, "stage": meta.get("stage")}))

    M.save_pretrained(ema.model if ema is not None else raw, folder, tokenizer=tokenizer,
                      meta={**meta, "step": step}, extra=train_state)


def load_resume_state(folder, raw: M.Bagel, ema: EMA | None, optimizer, stage: str) -> int:
    """Restore raw weights, EMA and optimizer from a checkpoint folder; returns the step to continue from."""
    from safetensors.torch import load_file
    folder = Path(folder)
    d = folder / "train_state"
    if not (d / "state.json").exists():
        raise FileNotFoundError(f"{folder} has no train_state/: it is not a resumable {stage} checkpoint (start without --resume)")
    state = M.read_json(d / "state.json")
    if state.get("stage") != stage:
        raise ValueError(f"{folder} was written by stage {state.get('stage')!r}, not {stage!r}: resume it with that stage")
    saved_cfg = M.read_json(folder / "nanoclear.json")["model"]
    if saved_cfg != json.loads(json.dumps(M.asdict(raw.cfg))):
        raise ValueError(f"{folder} holds a model of another shape than this run's; use matching flags or a fresh --out")
    try:
        weights = load_file(str(d / "model.safetensors"))
        opt_tensors = load_file(str(d / "optimizer.safetensors"))
    except Exception as e:
        raise ValueError(f"{d} is corrupt ({e}); delete it or resume from an earlier copy") from None
    missing = set(n for n, _ in raw.named_parameters()) ^ set(weights)
    if missing:
        raise ValueError(f"{d}/model.safetensors does not match the model: {sorted(missing)[:5]}")
    with torch.no_grad():
        for n, p in raw.named_parameters():
            p.copy_(weights[n])
        if ema is not None:
            e = M.load_pretrained(folder, device=raw.device, dtype=raw.dtype)
            for (_, pe), (_, pl) in zip(ema.model.named_parameters(), e.named_parameters()):
                pe.copy_(pl)
    by_name = dict(raw.named_parameters())
    for key, v in opt_tensors.items():
        n, k = key.split("::")
        optimizer.state[by_name[n]][k] = v.to(by_name[n].device)
    for key, v in state["optimizer_scalars"].items():
        n, k = key.split("::")
        optimizer.state[by_name[n]][k] = v
    return int(state["step"])


# ----------------------------------------------------------------------------------------------------------------------
# Logging


class Log:
    """One line per step with fixed fields on stdout (via tqdm) and the same record in a JSONL file."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if resume_step is not None and self.path.exists():  # drop what the killed run logged after its checkpoint
            keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def __call__(self, record: dict, bar: tqdm | None = None):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        line = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        (bar.write if bar is not None else print)(line)


# ----------------------------------------------------------------------------------------------------------------------
# The training loop shared by Stage 0, 1 and 2


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup: int
    min_lr: float
    ema: float
    grad_clip: float
    seed: int
    save_every: int
    log_every: int


def train_loop(run: Run, raw: M.Bagel, model: torch.nn.Module, optimizer, ema: EMA | None, loop: LoopConfig, out: Path,
               stage: str, batch_fn: Callable, loss_fn: Callable, tokenizer, meta: dict, start_step: int = 0,
               log: Log | None = None):
    """Run steps start_step..loop.steps-1: batch_fn(step, np_rng, torch_gen) -> batch; loss_fn(model, batch) ->
    (loss, metrics). `model` is `raw` or its DDP wrapper. Saves to `out` every save_every steps and at the end."""
    log = log or Log(out.with_name(out.name + ".log.jsonl"), start_step if start_step else None, run.main)
    bar = tqdm(range(start_step, loop.steps), initial=start_step, total=loop.steps, desc=stage, disable=not run.main,
               dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, loop.steps, loop.lr, loop.warmup, loop.min_lr)
        rng, gen = step_rngs(loop.seed, step, run.rank)
        model.train()
        loss, metrics = loss_fn(model, batch_fn(step, rng, gen))
        loss.backward()
        gnorm = clip_and_step(raw, optimizer, loop.grad_clip)
        if ema is not None:
            ema.update(raw)
        if run.main and (step % loop.log_every == 0 or step == loop.steps - 1):
            log({"step": step + 1, "loss": float(loss), **metrics, "lr": optimizer.param_groups[0]["lr"],
                 "gnorm": gnorm, "ms": round(1000 * (time.time() - t0))}, bar)
        if (step + 1) % loop.save_every == 0 or step + 1 == loop.steps:
            if run.main:
                save_checkpoint(out, raw, ema, optimizer, tokenizer, step + 1, {**meta, "stage": stage})
            if run.world > 1:
                dist.barrier()
    bar.close()

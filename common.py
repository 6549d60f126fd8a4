"""
Shared plumbing of the training stages (pretrain.py, sft.py, bridge.py, rl.py), written once, and the fine-tuning loop
of Stages 1 and 2 (Stage 2 is Stage 1's objective plus the bridge distillation, CLEAR §3.2-3.3).

Run setup (device, dtype, seeds, torchrun/DDP), AdamW + cosine schedule with warmup to a floor, EMA, one log line per
step plus a JSONL log, and checkpoints: a BAGEL-format folder (ema.safetensors = the EMA weights, as BAGEL/CLEAR
save them) with the resume state beside it in train_state/ (raw weights, optimizer, step), written atomically.

Every step draws its data and noise from generators seeded by (seed, step, rank), so a run resumed from a checkpoint
replays exactly the steps an uninterrupted run would take: the same loss curve.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
import engine as E
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
    """Exponential moving average of the trainable weights (BAGEL fsdp_ema_update; CLEAR SFT decay 0.995).

    The shadow copies keep their parameters' own layout, so the same code serves plain and FSDP-sharded models.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for n, p in model.named_parameters():
            if p.requires_grad:
                self.shadow[n].lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module):
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n])


def full_state(tensors: dict) -> dict:
    """Whole tensors on the CPU from plain or FSDP-sharded ones (a collective call when sharded: every rank calls)."""
    from torch.distributed.tensor import DTensor
    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for n, t in tensors.items()}


def shard(model: M.Bagel, dtype: torch.dtype):
    """FSDP2: each decoder layer and then the rest sharded across ranks (the frozen autoencoder stays whole, as the
    data pipeline calls it), compute in `dtype`, gradients reduced in float32, layers recomputed in the backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.language_model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp, ignored_params=set(model.vae.parameters()))
    model.gradient_checkpointing = True


def clip_and_step(model, optimizer, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable(model)], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: BAGEL-format folder + train_state/ for --resume


def save_checkpoint(folder, raw: M.Bagel, ema: EMA | None, optimizer, tokenizer, step: int, meta: dict, run: "Run"):
    """Write folder atomically: ema.safetensors holds the EMA weights (or the raw ones without EMA). With --fsdp every
    rank takes part in gathering the shards and rank 0 writes; the resume state is written without FSDP only."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    sharded = any(isinstance(p, DTensor) for p in raw.parameters())  # FSDP: gathering is a collective
    if not (run.main or sharded):
        return
    saved = full_state(ema.shadow if ema is not None else dict(raw.named_parameters()))
    if not run.main:
        return

    def train_state(tmp: Path):
        if sharded:
            return
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

    M.save_pretrained(raw, folder, tokenizer=tokenizer, meta={**meta, "step": step}, extra=train_state,
                      state=saved)


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
            for n, t in M.read_weights(folder, raw.cfg, raw.device, raw.dtype).items():
                ema.shadow[n].copy_(t)
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
    save_every: int  # 0 = never save (a phase whose result the caller keeps)
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
            log({"step": step + 1, "loss": float(loss.detach()), **metrics, "lr": optimizer.param_groups[0]["lr"],
                 "gnorm": gnorm, "ms": round(1000 * (time.time() - t0))}, bar)
        if loop.save_every and ((step + 1) % loop.save_every == 0 or step + 1 == loop.steps):
            save_checkpoint(out, raw, ema, optimizer, tokenizer, step + 1, {**meta, "stage": stage}, run)
            if run.world > 1:
                dist.barrier()
    bar.close()


# ----------------------------------------------------------------------------------------------------------------------
# Losses


def sft_loss(out: M.TrainOutput, n_ce: float, n_mse: float, ce_weight: float, mse_weight: float):
    """CE summed over assistant tokens / global token count + MSE summed over target tokens / global count (BAGEL)."""
    ce = out.ce.sum() / max(n_ce, 1.0)
    mse = out.mse.sum() / max(n_mse, 1.0)
    return ce_weight * ce + mse_weight * mse, ce, mse


def distill_loss(model: M.Bagel, packed: M.Packed, mode: str, stride: int):
    """Returns (hidden_hook, finish): collect per-layer KL during the forward, or the final-state MSE after it."""
    pairs = packed.pairs
    terms = []
    if mode == "per_layer_kl":
        weights = M.distill_layer_weights(model.cfg.num_hidden_layers, stride)

        def hook(layer, h):  # CLEAR §3.3: after every decoder layer, ViT tokens teach VAE tokens of the same picture
            if layer in weights:
                terms.append(weights[layer] * sum(M.distill_kl(h[v], h[a]) for v, a in pairs))

        return hook, lambda out: sum(terms)
    if mode == "final_mse":
        return None, lambda out: sum(M.distill_final_mse(out.hidden[v], out.hidden[a]) for v, a in pairs)
    raise ValueError(f"distill mode must be per_layer_kl or final_mse, not {mode!r}")


def step_loss(model, packed: M.Packed, args, run: Run, raw: M.Bagel):
    """The Stage 1 (and Stage 2) objective for one packed batch, normalised by global token / pair counts."""
    n_ce = all_reduce_sum(packed.ce_idx.numel(), run)
    n_mse = all_reduce_sum(int(packed.mse_mask.sum()), run)
    n_pairs = all_reduce_sum(len(packed.pairs), run) if args.distill_weight > 0 else 0  # every rank joins the sum
    hook, finish = (None, None)
    if args.distill_weight > 0 and packed.pairs:
        hook, finish = distill_loss(raw, packed, args.distill_mode, args.distill_stride)
    out = model(packed, hidden_hook=hook) if hook else model(packed)
    loss, ce, mse = sft_loss(out, n_ce, n_mse, args.ce_weight, args.mse_weight)
    metrics = {"ce": float(ce.detach()) * run.world, "mse": float(mse.detach()) * run.world}
    if finish is not None:
        distill = finish(out) / max(n_pairs, 1.0)  # CLEAR: normalised by the global number of pairs
        loss = loss + args.distill_weight * distill
        metrics["distill"] = float(distill.detach()) * run.world
    elif args.distill_weight > 0:
        loss = loss + 0 * out.hidden.sum()
    return loss * run.world, metrics  # DDP averages gradients over ranks; the counts above are global


def sample_tokens(sample: list, patch: int) -> int:
    """Tokens a sample will take when packed (text blocks + 2 markers per image)."""
    n = 0
    for s in sample:
        if isinstance(s, M.Text):
            n += len(s.ids) + 2
        elif isinstance(s, M.VitImage):
            n += (s.pixels.shape[1] // patch) * (s.pixels.shape[2] // patch) + 2
        else:
            n += s.tokens.shape[0] + 2
    return n


def make_batch_fn(args, cfg: M.ModelConfig, tok, encode, stream_fn, device):
    """Samples until the step's token budget is reached, packed into rows (BAGEL: expected_num_tokens per rank)."""
    def batch_fn(step, rng, gen):
        stream = stream_fn(rng)
        samples, tokens = [], 0
        while tokens < args.tokens_per_step:
            examples = [next(stream) for _ in range(4)]
            text_only = [rng.random() < args.text_reason_rate for _ in examples]
            built = D.build_batch([ex for ex, t in zip(examples, text_only) if not t], tok, encode, gen, args.system,
                                  shift=cfg.timestep_shift)
            built += [D.text_reason_sample(ex, tok) for ex, t in zip(examples, text_only) if t]
            samples += built
            tokens += sum(sample_tokens(s, cfg.vit_patch_size) for s in built)
        dropout = (args.text_dropout, args.vit_dropout, args.vae_dropout)
        return M.pack(samples, cfg, dropout, gen, row_tokens=args.row_tokens).to(device)
    return batch_fn


# ----------------------------------------------------------------------------------------------------------------------


def add_finetune_args(p: argparse.ArgumentParser, steps: int, lr: float, distill_weight: float, init: str | None, out: str):
    """Flags shared by sft.py and bridge.py (Stage 2 is Stage 1's objective plus the distillation term)."""
    g = p.add_argument_group("data")
    g.add_argument("--init", default=init, help="BAGEL-format folder to start from (default: the toy base, built if missing)")
    g.add_argument("--data", default=None, help="LLaVA-style JSONL for real data (default: the toy world)")
    g.add_argument("--images", default=None, help="image folder of --data")
    g.add_argument("--system", default="toy", choices=sorted(D.SYSTEM_PROMPTS), help="system prompt (official: 'official')")
    g.add_argument("--text-reason-rate", type=float, default=0.15, help="fraction of text-only reasoning samples")
    g.add_argument("--world-seed", type=int, default=0, help="toy world seed")
    g = p.add_argument_group("objective")
    g.add_argument("--ce-weight", type=float, default=1.0, help="CE weight (official 1.0)")
    g.add_argument("--mse-weight", type=float, default=1.0, help="flow-matching MSE weight (official 1.0)")
    g.add_argument("--distill-weight", type=float, default=distill_weight, help="ViT->VAE distillation weight (official 0.4, release 0.1)")
    g.add_argument("--distill-mode", default="per_layer_kl", choices=["per_layer_kl", "final_mse"], help="distillation variant (official HEAD / release)")
    g.add_argument("--distill-stride", type=int, default=1, help="per_layer_kl: every stride-th layer plus the last")
    g.add_argument("--text-dropout", type=float, default=0.1, help="text condition dropout (official 0.1)")
    g.add_argument("--vit-dropout", type=float, default=0.4, help="ViT condition dropout (official 0.4)")
    g.add_argument("--vae-dropout", type=float, default=0.0, help="VAE condition dropout (official 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help="optimiser steps (official 8000)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (official 1e-5)")
    g.add_argument("--min-lr", type=float, default=lr / 10, help="cosine floor (official 1e-7)")
    g.add_argument("--warmup", type=int, default=30, help="warmup steps (official 500)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (official 0.01)")
    g.add_argument("--ema", type=float, default=0.99, help="EMA decay of the saved weights (official 0.995)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (official 1.0)")
    g.add_argument("--tokens-per-step", type=int, default=4096, help="token budget per step and process (official 30000)")
    g.add_argument("--row-tokens", type=int, default=512, help="pack samples into rows of at most this many tokens")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=out, help="output checkpoint folder")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False, help="continue from --out's train_state")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (atomic)")
    g.add_argument("--seed", type=int, default=0, help="training seed")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    g.add_argument("--dtype", default="auto", help="auto | fp32 | bf16")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = its default)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False, help="FSDP2 + activation checkpointing (multi-GPU, real weights)")
    g.add_argument("--flex-attention", action=argparse.BooleanOptionalAction, default=False, help="FlexAttention block masks instead of dense masks (long rows on GPU; no CPU backward)")
    g = p.add_argument_group("summary table")
    g.add_argument("--eval-n", type=int, default=192, help="held-out toy questions per severity (0 = skip the table)")
    g.add_argument("--eval-seed", type=int, default=0, help="held-out split seed")
    g.add_argument("--eval-steps", type=int, default=10, help="denoising steps when restoring (official 50)")
    g.add_argument("--reentry", default="bridge", choices=E.REENTRY, help="how the restored image re-enters the context")
    g.add_argument("--max-text-tokens", type=int, default=48, help="tokens per decoded segment (official 4096)")
    g.add_argument("--cfg-text-scale", type=float, default=1.0, help="text CFG when restoring (official 3.0)")
    g.add_argument("--cfg-img-scale", type=float, default=1.0, help="image CFG when restoring (official 1.5)")
    g.add_argument("--base-steps", type=int, default=700, help="Stage 0 steps when the toy base must be built (pretrain.py --steps)")


def load_for_training(init, run: Run, fsdp: bool) -> M.Bagel:
    """The checkpoint as a trainable model: whole on every process, or (--fsdp) built on the meta device, sharded,
    and filled from rank 0's copy of the weights, so no process ever holds more than its shard plus one file read."""
    if not fsdp:
        return M.load_pretrained(init, run.device, run.dtype)
    if run.world < 2:
        raise SystemExit("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N > 1)")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    cfg = M.config_from_folder(init)
    with torch.device("meta"):
        model = M.Bagel(cfg)
    shard(model, run.dtype)
    model.to_empty(device=run.device)
    weights = M.read_weights(init, cfg, "cpu", torch.float32) if run.main else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def load_start(args, run: Run) -> tuple[M.Bagel, D.Tokenizer, str]:
    """The model to fine-tune: --init, or the toy base (built by pretrain.py if out/base/ is missing)."""
    init = args.init
    if init is None:
        init = "out/base"
        if not (Path(init) / "ema.safetensors").exists():
            if run.world > 1:
                raise SystemExit("build the toy base first (python pretrain.py), then launch torchrun")
            print("No --init and no out/base/: building the toy base model first (python pretrain.py, Stage 0).")
            cmd = [sys.executable, "pretrain.py", "--out", init, "--steps", str(args.base_steps), "--seed", str(args.seed),
                   "--world-seed", str(args.world_seed), "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
            subprocess.run(cmd, check=True)
    return load_for_training(init, run, args.fsdp), D.Tokenizer.from_folder(init), init


def finetune(args, stage: str) -> tuple[M.Bagel, M.Bagel, D.Tokenizer]:
    """Fine-tune with CE + MSE (+ distillation); returns (start model, fine-tuned EMA model, tokenizer)."""
    run = setup_run(args.device, args.dtype, args.seed, args.threads)
    t0 = time.time()
    model, tok, init = load_start(args, run)
    start = M.load_pretrained(init, run.device, run.dtype) if run.main and args.eval_n and not args.fsdp else None
    model.requires_grad_(True)
    for frozen in (model.vit_model, model.vae, model.vit_pos_embed, model.latent_pos_embed):  # official: frozen ViT/VAE
        frozen.requires_grad_(False)
    model.flex_attention = args.flex_attention
    encode = model.encode_pixels
    if args.data:
        rows, problems = D.read_jsonl(args.data, args.images)
        if run.main:
            print(f"{args.data}: {len(rows)} rows, {len(problems)} skipped" + (f" (first: {problems[:5]})" if problems else ""))
        stream_fn = lambda rng: (D.jsonl_example(rows[int(i)], rng) for i in iter(lambda: rng.integers(len(rows)), None))  # noqa: E731
    else:
        world = D.ToyWorld(args.world_seed)
        stream_fn = world.stream
    opt = make_optimizer(model, args.lr, weight_decay=args.weight_decay)
    ema = EMA(model, args.ema)
    out = Path(args.out)
    if args.resume and args.fsdp:
        raise SystemExit("--resume is implemented for single-process and DDP runs; an FSDP run restarts from its last --init")
    start_step = load_resume_state(out, model, ema, opt, stage) if args.resume else 0
    wrapped = model
    if run.world > 1 and not args.fsdp:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if args.compile:
        wrapped = torch.compile(wrapped)
    loop = LoopConfig(args.steps, args.lr, args.warmup, args.min_lr, args.ema, args.grad_clip, args.seed,
                      args.save_every, 1)
    batch_fn = make_batch_fn(args, model.cfg, tok, encode, stream_fn, run.device)
    train_loop(run, model, wrapped, opt, ema, loop, out, stage, batch_fn,
               lambda m, packed: step_loss(m, packed, args, run, model), tok.tk, {"args": vars(args), "init": init},
               start_step=start_step)
    if run.main:
        print(f"{stage} finished in {time.time() - t0:.0f} s -> {out}")
    ema.copy_to(model)
    if run.world > 1:
        dist.destroy_process_group()
    return start, model.eval(), tok


def summary_table(args, tok, models: dict, modes: dict) -> str:
    """The held-out toy table printed at the end of a stage."""
    split = D.ToyWorld(args.world_seed).eval_split(args.eval_n, seed=args.eval_seed)
    icfg = E.InferenceConfig(reentry=args.reentry, max_text_tokens=args.max_text_tokens, num_timesteps=args.eval_steps,
                             cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale)
    return E.toy_table(models, modes, tok, split, icfg, args.eval_seed, args.system)

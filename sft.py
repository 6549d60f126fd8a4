"""
Stage 1 of CLEAR (§3.2): supervised fine-tuning on degradation-aware data teaches generate-then-answer.

Each sample shows a degraded picture (as VAE and ViT tokens) and a question. When the answer-relevant detail did not
survive the corruption, the target is `<think>...</think> <image_restore>`, then the CLEAN picture as the generation
target (flow matching), the clean picture again as context (VAE and ViT tokens), then `<think>...</think><answer>`;
otherwise it is a direct `<think>...</think><answer>...</answer>` (`clear_sample`, exactly the official layout).

    loss = ce_weight * CE(assistant text) + mse_weight * MSE(velocity of the restore target)

with CE and MSE summed over tokens and divided by their global counts (`sft_loss`, `step_loss`) and text / ViT / VAE
condition dropout in the packing (`batches`). The loop is `train`, top to bottom; Stage 2 (bridge.py) runs the same
loop with the distillation term added to this objective.

CPU (toy, no flags; when out/base/ is missing it copies the shipped toy base, assets/toy_base, or builds another with
pretrain.py for other --seed / --world-seed / --base-steps):
    python sft.py                       # -> out/base/ (if needed), out/sft/, then a table on the held-out toy benchmark
    python bridge.py --init out/base --steps 600 --lr 5e-4   # the official "one job": Stage 1 + the distillation
GPU:
    python sft.py --device cuda --dtype bf16 --compile
    torchrun --nproc_per_node 8 sft.py --init path/to/BAGEL-7B-MoT --data sft.jsonl --images DIR --fsdp ...

Differences from the official recipe (numbered):
  1. Toy-sized defaults (steps, lr, token budget, EMA window) on the toy world; with --data every default is the
     official value of --recipe (RECIPES: HEAD or the release) and the prompt is the official one.
  2. The restore decision is a rule (data.needs_restore: did the answer-relevant detail survive?), not GPT-4.1. On the
     toy the samples restore at the rate the rule gives for the training severities, not half of the time as the
     official mix draws its tool group (--tool-share, which real data keeps at 0.5): the toy world has no separate
     tool set to oversample, and the restore decision should follow what the picture shows.
  3. ViT and VAE are frozen as officially, but in the toy they come from our Stage 0 instead of SigLIP/FLUX.
  4. On the toy world the data mix adds text-only reasoning samples (the official pure-text set, not in its main mix,
     which --data follows unless --text-reason-rate is given) so the evaluation can compare text-only reasoning with
     interleaved reasoning on the same model; they carry the prompt the official evaluation's text reasoning uses
     (VLM_THINK_SYSTEM_PROMPT) instead of the official pure-text set's TEXT_REASON_SYSTEM_PROMPT, so that comparison
     does not measure a prompt the model never saw.
  5. On the toy world, the examples are made and encoded once (--examples, as Stage 0 does) and drawn several times
     each, each time with its own flow time, noise and condition dropout: rendering, degrading and encoding fresh
     pictures were a large part of every CPU step (docs/toy_design.md gives the measurement).
  6. On the toy world, --replay 0.2 of the samples replay Stage 0's restore edit (pretrain.restore_edit: the degraded
     picture, "Restore this picture.", its clean picture as one noised target), so the tiny generator keeps drawing
     what its context shows. CLEAR's samples restore only pictures that lost the answer's detail, and without replay
     the toy's short Stage 1 taught the generator to invent: its restorations of readable pictures got worse than the
     base's (docs/toy_design.md gives the measurement). BAGEL-7B brings far more generation training than a short SFT
     can wear down.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint as CK
import common as C
import data as D
import engine as E
import model as M
import pretrain
from common import flag

# ----------------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class SFTConfig(C.TrainingFlags, C.DataFlags, C.PictureSizeFlags, E.InferenceFlags, E.ToyTableFlags):
    # data
    text_reason_rate: float = flag(0.15, "fraction of text-only reasoning samples (toy 0.15, difference 4; official 0: "
                                   "its main mix corruption_mix.yaml has no pure-text set, the default with --data)",
                                   "[0, 1]", group="data")
    tool_share: float = flag(0.5, "--data: share of samples drawn from the rows that restore (official "
                             "corruption_mix.yaml 0.5 / 0.5 tool / no-tool)", "[0, 1]", group="data")
    replay: float = flag(0.2, "toy world: share of samples that replay Stage 0's restore edit (difference 6)", "[0, 1]",
                         group="data")
    examples: int = flag(6000, "toy training examples made and encoded once; a step draws about 36 of them (default "
                         "--tokens-per-step), each with its own flow time, noise and dropout", "[1, inf)", group="data")
    base_steps: int = flag(1300, "Stage 0 steps when the toy base must be built (pretrain.py --steps)", "[1, inf)",
                           group="data")
    # objective
    ce_weight: float = flag(1.0, "CE weight (official 1.0)", "[0, inf)", group="objective")
    mse_weight: float = flag(1.0, "flow-matching MSE weight (official 1.0)", "[0, inf)", group="objective")
    text_dropout: float = flag(0.1, "text condition dropout (official 0.1)", "[0, 1]", group="objective")
    vit_dropout: float = flag(0.4, "ViT condition dropout (official 0.4)", "[0, 1]", group="objective")
    vae_dropout: float = flag(0.0, "VAE condition dropout (official 0)", "[0, 1]", group="objective")
    # optimisation (with --data, every default is the official value of --recipe: RECIPES)
    recipe: str = flag("head", "--data: the official run whose values are the defaults, head (scripts/train_mix.sh at "
                       "HEAD 411d6bd) or release (at a65d61f); the toy world keeps its own",
                       choices=["head", "release"], group="optimisation")
    steps: int = flag(600, "optimiser steps (toy %(default)s; official 8000 at HEAD, 600 at the release; with --data "
                      "the recipe's)", "[1, inf)", group="optimisation")
    lr: float = flag(5e-4, "peak learning rate (toy %(default)s; official 1e-5)", "(0, inf)", group="optimisation")
    min_lr: float | None = flag(None, "cosine floor (toy lr / 10; official 1e-7)", "[0, inf)", group="optimisation",
                                type=float)
    warmup: int = flag(30, "warmup steps (toy 30; official 500 at HEAD, 50 at the release)", "[0, inf)",
                       group="optimisation")
    weight_decay: float = flag(0.0, "AdamW weight decay, on every trainable parameter (toy 0; official 0.01 at HEAD, "
                               "0 at the release)", "[0, inf)", group="optimisation")
    ema: float = flag(0.99, "EMA decay of the saved weights (toy 0.99; official 0.995)", "[0, 1)", group="optimisation")
    grad_clip: float = flag(1.0, "gradient-norm clip (official 1.0)", "(0, inf)", group="optimisation")
    tokens_per_step: int = flag(4096, "token budget per step and process (toy 4096; official 30000, "
                                "expected_num_tokens)", "[1, inf)", group="optimisation")
    row_tokens: int = flag(512, "pack samples into rows of at most this many tokens", "[1, inf)", group="optimisation")
    compile: bool = flag(False, "torch.compile the model")
    fsdp: bool = flag(False, "FSDP2 + activation checkpointing (multi-GPU, real weights)")
    flex_attention: bool = flag(False, "FlexAttention block masks instead of dense masks (long rows on GPU; no CPU "
                                "backward)")


# The official SFT runs: with --data, the defaults of the flags not given (the toy world keeps SFTConfig's)
OFFICIAL = dict(lr=1e-5,  # scripts/train_mix.sh:49 @411d6bd, :38 @a65d61f
                min_lr=1e-7,  # the trainer's default: train/pretrain_unified_corruption.py:307-308 @411d6bd, :292-293
                ema=0.995,  # train_mix.sh:50 @411d6bd, :39 @a65d61f
                tokens_per_step=30000,  # --expected_num_tokens per process: train_mix.sh:57 @411d6bd, :45 @a65d61f
                text_reason_rate=0.0)  # the mix both run (train_mix.sh:23 / :15, corruption_mix.yaml) has no pure text
RECIPES = {
    "head": dict(OFFICIAL, steps=8000, warmup=500, weight_decay=0.01),  # train_mix.sh:54, :55, :51 @411d6bd
    "release": dict(OFFICIAL, steps=600, warmup=50,  # train_mix.sh:42, :43 @a65d61f
                    weight_decay=0.0),  # AdamW(..., weight_decay=0): pretrain_unified_corruption.py:617 @a65d61f
}
TABLE_FLAGS = ("eval_n", "eval_seed", *E.INFERENCE_FLAGS)
# what --resume may change besides where and how it runs (common.RESUME_MAY_CHANGE): more --steps (extends the run),
# the compiler and attention kernels, the summary table
RESUME_MAY_CHANGE = ("steps", "compile", "flex_attention", *TABLE_FLAGS)
BASE = "out/base"  # the toy base model (Stage 0) when there is no --init
SFT_DEFAULTS = dict(out="out/sft", save_every=100)


def parse_config(argv=None) -> SFTConfig:
    """Flags -> SFTConfig, refusing values out of range and flags without effect."""
    cfg, prog, given = C.parse_flags(SFTConfig, __doc__, argv, SFT_DEFAULTS)
    if cfg.data is None:
        C.refuse_given(prog, given, ("recipe",), "on the toy world (its defaults are toy-sized; with --data, --recipe "
                       "picks the official values)")
    return check_config(cfg, prog, given)


def check_config(cfg: SFTConfig, prog: str, given: set) -> SFTConfig:
    """Stage 1's refusals of flags that have no effect or contradict each other (bridge.py's too), and the derived
    defaults: with --data the official values of --recipe (RECIPES) and prompt, for the flags not given."""
    cfg = C.check_data_flags(prog, cfg, given, toy_only=("examples", "replay"))
    if cfg.data is not None:  # no toy replay
        cfg = replace(cfg, replay=0.0, **{k: v for k, v in RECIPES[cfg.recipe].items() if k not in given})
    else:
        C.refuse_given(prog, given, ("tool_share",), "on the toy world (it restores where its rule says, difference 2)")
    C.check_training_flags(prog, cfg, given)
    E.check_inference_flags(prog, cfg)
    if cfg.init is not None:
        C.refuse_given(prog, given, ("base_steps",), "with --init (it sizes the toy base built when there is none)")
    no_table = ("with --data (the toy world is not used)" if cfg.data is not None else  # the table runs on the toy
                "with --fsdp (no summary table)" if cfg.fsdp else None)  # world, in one process
    cfg = E.check_table_flags(prog, cfg, given, TABLE_FLAGS, no_table)
    if cfg.text_reason_rate + cfg.replay > 1:
        C.refuse(prog, f"--text-reason-rate {cfg.text_reason_rate} + --replay {cfg.replay} is above 1: they are shares "
                       "of the same samples")
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        C.refuse(prog, "--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N > 1)")
    if cfg.flex_attention and C.pick_device(cfg.device)[0].type == "cpu":
        C.refuse(prog, "--flex-attention has no CPU backward (FlexAttention trains on GPUs): leave it out on the CPU")
    cxx = os.environ.get("CXX") or "g++"  # what torch.compile's CPU backend (Inductor) builds its kernels with
    if cfg.compile and C.pick_device(cfg.device)[0].type == "cpu" and shutil.which(cxx) is None:
        C.refuse(prog, f"--compile on the CPU builds C++ kernels with {cxx}, which is not on PATH: install a C++ "
                       "compiler (or set CXX), or leave --compile out")
    if cfg.fsdp and cfg.resume:
        C.refuse(prog, "--resume is implemented for single-process and DDP runs; an FSDP run restarts from its last "
                       "--init")
    cfg = replace(cfg, min_lr=cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr)
    if cfg.min_lr > cfg.lr:
        C.refuse(prog, f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}: the cosine goes from the peak down to the floor")
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Samples (official interleave_reason.py parse_row)


def split_response(response: str) -> tuple[str, str] | None:
    """Official parse_row: parts[0] + <image_restore> is trained before the image, parts[1] after it; later
    occurrences are dropped. None when the response does not restore."""
    if D.RESTORE_TOKEN not in response:
        return None
    parts = response.split(D.RESTORE_TOKEN)
    return parts[0] + D.RESTORE_TOKEN, parts[1]


def clear_sample(ex: D.Example, tok: D.Tokenizer, degraded_latent: tuple, clean_latent: tuple | None,
                 generator: torch.Generator, system: str = "toy", sizes: D.ImageSizes = D.TOY_SIZES, shift: float = 1.0,
                 distill: bool = False) -> list:
    """One CLEAR SFT sample (CLEAR §3.1-3.3, official parse_row), the items numbered as in data.py's docstring:
    the prefix (1-4), then a direct answer, or the restore turn (5), the clean picture as the noised restore target (6),
    as clean context (7 VAE latent, 8 ViT; with distill the pair that teaches the bridge) and the final answer (9)."""
    if not ex.response:
        raise ValueError(f"example {ex.id or ex.question[:40]!r} has no response to train on")
    seq = D.clear_prefix(ex, tok, degraded_latent, system, sizes)
    turn = split_response(ex.response)
    if turn is None:  # pattern A: one CE text
        return seq + [M.Text(tok.encode(ex.response), loss=True)]
    if ex.clean is None or clean_latent is None:
        raise ValueError(f"example {ex.id or ex.question[:40]!r} restores but has no clean image to restore to")
    first, rest = turn
    x0, grid = clean_latent
    t = float(M.sample_flow_time(1, shift, generator))  # BAGEL: logit-normal t, once per image
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
    x_t, v = M.flow_interpolate(x0, noise, t)
    seq += [M.Text(tok.encode(first), loss=True),
            M.VaeImage(x_t, grid, t=t, target=v, droppable=False)]  # official: the noised image has enable_cfg=0
    if distill:  # official enable_distill: the ViT copy is resized so its patch grid equals the latent grid
        seq += distill_pair(ex.clean, x0, grid, sizes.vit[2])  # the ViT stride is the model's patch
    else:
        seq += [M.VaeImage(x0, grid), M.VitImage(D.image_to_tensor(D.resize_image(ex.clean, *sizes.vit)))]
    if rest.strip():  # official: parts[1] is added only when it is not blank
        seq.append(M.Text(tok.encode(rest), loss=True))
    return seq


def teacher_size(grid: tuple, vit_patch: int) -> tuple[int, int]:
    """(w, h) in pixels of the teacher ViT image whose patch grid equals the VAE token grid
    (official enable_distill)."""
    return grid[1] * vit_patch, grid[0] * vit_patch


def distill_pair(clean, x0: torch.Tensor, grid: tuple, vit_patch: int) -> list:
    """The restored picture as the student and teacher Stage 2 distils (bridge.py; official _add_image with
    distill_pair_id): its clean latent at t = 0 (gen expert) and its ViT patches on the same grid (und expert), so
    token n of both covers one picture cell."""
    teacher = D.image_to_tensor(clean, teacher_size(grid, vit_patch))
    return [M.VaeImage(x0, grid, pair=0),  # CLEAR §3.3 distillation student: the clean latent at t=0
            M.VitImage(teacher, pair=0)]  # teacher, ViT grid == VAE grid


def text_reason_sample(ex: D.Example, tok: D.Tokenizer, sizes: D.ImageSizes = D.TOY_SIZES) -> list:
    """Text-only reasoning sample (official TextReasonIterableDataset): a system prompt, the degraded image as ViT
    only, the question, then a CoT with CE. The official CoT was written from the clean picture; here it is the direct
    response, or for a restore response what follows <image_restore> (the reasoning on the clean picture). The prompt
    is the one the official evaluation's text reasoning uses (VLM_THINK_SYSTEM_PROMPT; difference 4)."""
    turn = split_response(ex.response)
    cot = ex.response if turn is None else turn[1].strip()
    return [M.Text(tok.encode(D.VLM_THINK_SYSTEM_PROMPT)),
            M.VitImage(D.image_to_tensor(D.resize_image(ex.degraded, *sizes.vit))),
            M.Text(tok.encode(ex.question.replace("<image>", "").strip())), M.Text(tok.encode(cot), loss=True)]


def build_batch(examples: list[D.Example], tok: D.Tokenizer, encode: Callable, generator: torch.Generator,
                system: str = "toy", sizes: D.ImageSizes = D.TOY_SIZES, shift: float = 1.0, distill: bool = False,
                latents: list[tuple] | None = None) -> list[list]:
    """CLEAR samples for a batch. latents: each example's (degraded, clean) VAE latents when they were encoded before
    (the toy's example pool); without them all latents come from one encode call per picture size."""
    latents = encode_examples(examples, encode, sizes) if latents is None else latents
    return [clear_sample(ex, tok, degraded, clean, generator, system, sizes, shift, distill)
            for ex, (degraded, clean) in zip(examples, latents)]


def encode_examples(examples: list[D.Example], encode: Callable, sizes: D.ImageSizes = D.TOY_SIZES,
                    every_clean: bool = False) -> list[tuple]:
    """Each example's (degraded latent, clean latent or None): the clean picture is encoded only where the sample
    restores to it, or wherever there is one with every_clean (replay); one encode call per picture size."""
    restoring = [i for i, ex in enumerate(examples) if (ex.restore or every_clean) and ex.clean is not None]
    pixels = ([D.vae_pixels(ex.degraded, sizes) for ex in examples]
              + [D.vae_pixels(examples[i].clean, sizes) for i in restoring])
    encoded = D.encode_images(pixels, encode)
    clean = dict(zip(restoring, encoded[len(examples):]))
    return [(encoded[i], clean.get(i)) for i in range(len(examples))]


def replay_sample(ex: D.Example, latents: tuple, tok: D.Tokenizer, generator: torch.Generator, shift: float) -> list:
    """Stage 0's restore edit of this example (difference 6): its degraded picture and the instruction, then its clean
    picture as one noised flow-matching target, as in CLEAR's restore turn."""
    degraded, (x0, grid) = latents
    return pretrain.restore_edit(degraded, ex.degraded, tok) + pretrain.noised_targets(x0, grid, generator, shift, 1)


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


def mixed_draw(rows: list[dict], tool_share: float) -> Callable:
    """draw(rng) -> (example, None): a JSONL row that restores (<image_restore> in its answer) with probability
    tool_share and another row otherwise (official corruption_mix.yaml: the tool and no-tool groups, weight 0.5 each);
    when one group is empty, every draw comes from the other. None: its latents are encoded when the batch is built."""
    tool = [r for r in rows if D.RESTORE_TOKEN in r["response"]]
    other = [r for r in rows if D.RESTORE_TOKEN not in r["response"]]

    def draw(rng):
        group = tool if not other or (tool and rng.random() < tool_share) else other
        return D.jsonl_example(group[int(rng.integers(len(group)))], rng), None
    return draw


def toy_pool(world: D.ToyWorld, rng, n: int, encode: Callable, every_clean: bool = False, chunk: int = 256) -> list:
    """n toy training examples with their latents, made and encoded once, as Stage 0 does
    (pretrain.example_pool): rendering, degrading and encoding fresh pictures would be over a third of every CPU step
    (difference 5); each draw still gets its own flow time, noise and condition dropout. every_clean: encode every
    clean picture (replay restores all of them), not only those of restoring samples."""
    def encoded(part):  # each latent its own tensor: a view into the chunk's batch would keep (and pickle) all of it
        return [(ex, tuple(None if lat is None else (lat[0].clone(), lat[1]) for lat in latents))
                for ex, latents in zip(part, encode_examples(part, encode, every_clean=every_clean))]
    stream, pool, pending = world.stream(rng), [], None
    with ThreadPoolExecutor(1) as encoder, tqdm(total=n, desc="toy training examples", leave=False,
                                                dynamic_ncols=True) as bar:
        for i in range(0, n, chunk):
            part = [next(stream) for _ in range(min(chunk, n - i))]
            bar.update(len(part))
            pool += pending.result() if pending else []
            pending = encoder.submit(encoded, part)  # encoded while the next chunk is drawn: both release the GIL
        pool += pending.result() if pending else []
    return pool


def pool_draw(pool: list) -> Callable:
    """draw(rng) -> one (example, its latents) of the pool."""
    return lambda rng: pool[int(rng.integers(len(pool)))]


def pool_key(model: M.Bagel, world_seed: int, seed: int, n: int, every_clean: bool) -> str:
    """What a toy pool depends on: its settings, the frozen autoencoder that encodes it, and the code that makes it."""
    code = [Path(__file__).with_name(name).read_bytes() for name in ("data.py", "degrade.py", "sft.py")]
    return C.digest(world_seed, seed, n, every_clean, *code, *model.vae.state_dict().values())


def batches(cfg: SFTConfig, model_cfg: M.ModelConfig, tok: D.Tokenizer, encode: Callable, draw: Callable, device,
            distill: bool = False):
    """batch(np_rng, torch_gen): samples until the step's token budget (counted before dropout) is reached, packed
    into rows with the condition dropouts (BAGEL: expected_num_tokens per rank; pack_sequence's text / ViT / VAE cfg
    dropout). draw(rng) -> (example, its (degraded, clean) latents or None). Each drawn example becomes a text-only
    reasoning sample (cfg.text_reason_rate), a replayed restore edit (cfg.replay, the toy's pool only) or a CLEAR
    sample (with the distillation pair when `distill`, Stage 2)."""
    sizes = cfg.sizes(model_cfg, toy=cfg.data is None)

    def batch(rng, gen):
        samples, tokens = [], 0
        while tokens < cfg.tokens_per_step:
            drawn = [draw(rng) for _ in range(4)]
            u = [rng.random() for _ in drawn]  # one draw decides the kind: text-only | replay | CLEAR
            kept = [d for d, x in zip(drawn, u) if x >= cfg.text_reason_rate + cfg.replay]
            latents = [lat for _, lat in kept]
            built = build_batch([ex for ex, _ in kept], tok, encode, gen, cfg.system, sizes, model_cfg.timestep_shift,
                                distill, None if any(lat is None for lat in latents) else latents)
            built += [text_reason_sample(ex, tok, sizes) for (ex, _), x in zip(drawn, u) if x < cfg.text_reason_rate]
            built += [replay_sample(ex, lat, tok, gen, model_cfg.timestep_shift) for (ex, lat), x in zip(drawn, u)
                      if cfg.text_reason_rate <= x < cfg.text_reason_rate + cfg.replay]
            samples += built
            tokens += sum(sample_tokens(s, model_cfg.vit_patch_size) for s in built)
        dropout = (cfg.text_dropout, cfg.vit_dropout, cfg.vae_dropout)
        return M.pack(samples, model_cfg, dropout, gen, row_tokens=cfg.row_tokens).to(device)
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# The objective


def sft_loss(out: M.TrainOutput, n_ce: float, n_mse: float, ce_weight: float, mse_weight: float):
    """CE summed over assistant tokens / global token count + MSE summed over target tokens / global count (BAGEL)."""
    ce = out.ce.sum() / max(n_ce, 1.0)
    mse = out.mse.sum() / max(n_mse, 1.0)
    return ce_weight * ce + mse_weight * mse, ce, mse


def step_loss(model, packed: M.Packed, run: C.Run, cfg: SFTConfig, hidden_hook: Callable | None = None):
    """The Stage 1 objective of one packed batch, normalised by global token counts: (loss, metrics, model output).
    hidden_hook(layer, hidden) is called after every decoder layer (Stage 2's distillation reads it)."""
    n_ce = C.all_reduce_sum(packed.ce_idx.numel(), run)
    n_mse = C.all_reduce_sum(int(packed.mse_mask.sum()), run)
    out = model(packed, hidden_hook=hidden_hook, flex=cfg.flex_attention, recompute=cfg.fsdp)
    loss, ce, mse = sft_loss(out, n_ce, n_mse, cfg.ce_weight, cfg.mse_weight)
    return loss, {"ce": float(ce.detach()) * run.world, "mse": float(mse.detach()) * run.world}, out


# ----------------------------------------------------------------------------------------------------------------------
# The trainer (Stage 1, and Stage 2 through bridge.py)


def load_start(cfg: SFTConfig, run: C.Run) -> tuple[M.Bagel, D.Tokenizer, str]:
    """The model to fine-tune: --init, or the toy base in out/base (if missing: the shipped one when these settings
    would build it, else Stage 0 run in this process)."""
    init = cfg.init
    if init is None:
        init = BASE
        if CK.has_checkpoint(init):  # Stage 0 is cached in out/base, keyed by its settings
            built = CK.read_json(Path(init) / "nanoclear.json").get("args")  # pretrain.py's settings
            built = built if isinstance(built, dict) else {}
            asked = {"seed": cfg.seed, "world_seed": cfg.world_seed, "steps": cfg.base_steps}
            if any(built.get(k) != v for k, v in asked.items()):
                def flags(a):
                    return f"--seed {a.get('seed')} --world-seed {a.get('world_seed')} --base-steps {a.get('steps')}"
                raise CK.InputError(f"{init} holds a toy base built with {flags(built)}, this run asks for "
                                    f"{flags(asked)}: remove {init}, run in another folder, or pass --init {init}")
        else:
            if run.world > 1:
                raise SystemExit("build the toy base first (python pretrain.py), then launch torchrun")
            shipped = pretrain.shipped_base(cfg.seed, cfg.world_seed, cfg.base_steps)
            with C.output_lock(init):
                if shipped is not None:  # Stage 0 is BAGEL's pretraining: CLEAR starts from its released weights
                    print(f"No --init and no out/base/: starting from the shipped toy base "
                          f"({shipped.relative_to(shipped.parents[1])}, what `python pretrain.py` builds).")
                    pretrain.copy_shipped_base(init)
                else:
                    print("No --init and no out/base/: building the toy base model first (pretrain.py, Stage 0).")
                    C.seed_everything(cfg.seed)  # as `python pretrain.py --seed S` would
                    pretrain.build_base(pretrain.PretrainConfig(steps=cfg.base_steps, seed=cfg.seed,
                                                                world_seed=cfg.world_seed, out=init), run)
                    C.seed_everything(cfg.seed)
    return C.load_for_training(init, run, cfg.fsdp), D.Tokenizer.from_folder(init), init


def train(cfg: SFTConfig, stage: str = "sft", objective: Callable = step_loss,
          distill: bool = False) -> tuple[M.Bagel | None, M.Bagel, D.Tokenizer]:
    """Fine-tune on CLEAR's samples with `objective` (Stage 1's step_loss, or bridge.py's, which adds the distillation;
    `distill` adds its pairs to the samples); returns (the start model for the table or None, the EMA model, the
    tokenizer). `stage` is recorded in the checkpoint ("sft" or "bridge"), and --resume checks it."""
    run = C.setup_run(cfg.device, cfg.dtype, cfg.seed, cfg.threads)
    t0 = time.time()
    C.prepare_out(cfg, stage, cfg.init or BASE, RESUME_MAY_CHANGE, run.main)
    if cfg.init is not None:
        CK.config_from_folder(cfg.init)  # a wrong --init stops here, before the data is read
    if cfg.data:
        rows, problems = D.read_jsonl(cfg.data, cfg.images, cfg.images_anywhere)
        if run.main:
            print(D.skip_report(cfg.data, rows, problems, "line"))
        draw = mixed_draw(rows, cfg.tool_share)
    model, tok, init = load_start(cfg, run)
    if cfg.eval_n:  # the summary table's rows, before any training
        E.check_positions(E.inference_config(cfg, toy=True), model.cfg, tok, D.toy_questions(), cfg.system,
                          "the toy world")
    if not cfg.data:
        t = time.time()
        world, every_clean = D.ToyWorld(cfg.world_seed), cfg.replay > 0
        rng = np.random.default_rng([cfg.world_seed, cfg.seed, 6])
        cache = Path(cfg.out).parent / "cache" / "toy_pool.pkl"  # Stage 2 draws the same pool as Stage 1
        pool, kept = C.cached(cache, pool_key(model, cfg.world_seed, cfg.seed, cfg.examples, every_clean),
                              lambda: toy_pool(world, rng, cfg.examples, model.encode_pixels, every_clean))
        draw = pool_draw(pool)
        if run.main:
            how = f"read from {cache} (an earlier run made them)" if kept else "made and encoded"
            print(f"{cfg.examples} toy training examples {how} in {time.time() - t:.0f} s")
    start = CK.load_pretrained(init, run.device, run.dtype) if run.main and cfg.eval_n and not cfg.fsdp else None
    C.freeze_encoders(model)
    opt = C.make_optimizer(model, cfg.lr, weight_decay=cfg.weight_decay)
    ema = C.EMA(model, cfg.ema)
    out = Path(cfg.out)
    start_step = CK.load_resume_state(out, model, opt, ema.shadow) if cfg.resume else 0
    wrapped = model
    if run.world > 1 and not cfg.fsdp:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    batch = batches(cfg, model.cfg, tok, model.encode_pixels, draw, run.device, distill)
    log = C.Log(out.with_name(out.name + ".log.jsonl"), start_step if start_step else None, run.main)
    meta = {"args": vars(cfg), "init": init, "stage": stage}
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=stage, disable=not run.main,
               dynamic_ncols=True)
    for step in bar:
        t = time.time()
        C.set_lr(opt, C.lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr))
        rng, gen = C.step_rngs(cfg.seed, step, run.rank)
        wrapped.train()
        loss, metrics = objective(wrapped, batch(rng, gen), run, cfg)[:2]
        loss = loss * run.world  # DDP averages gradients over ranks; the objective divides by global counts
        loss.backward()
        gnorm = C.clip_and_step(model, opt, cfg.grad_clip)
        ema.update(model)
        if run.main:
            log({"step": step + 1, "loss": float(loss.detach()), **metrics, "lr": opt.param_groups[0]["lr"],
                 "gnorm": gnorm, "ms": round(1000 * (time.time() - t))}, bar)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            C.save(out, run, model, opt, tok.tk, step + 1, meta, ema)
    bar.close()
    if run.main:
        print(f"{stage} finished in {time.time() - t0:.0f} s -> {out}")
    ema.copy_to(model)
    if run.world > 1:
        dist.destroy_process_group()
    return start, model.eval(), tok


def summary_table(cfg: SFTConfig, tok: D.Tokenizer, models: dict, modes: dict) -> str:
    """The held-out toy table printed at the end of the stage."""
    split = D.ToyWorld(cfg.world_seed).eval_split(cfg.eval_n, seed=cfg.eval_seed)
    return E.toy_table(models, modes, tok, split, E.inference_config(cfg, toy=True), cfg.eval_seed, cfg.system)


def main(argv=None):
    cfg = parse_config(argv)
    with C.output_lock(cfg.out):  # before any work: one run per --out
        start, tuned, tok = train(cfg)
    if start is not None:
        modes = {"base": "direct" if cfg.init is None else "interleave", "sft": "interleave"}
        print(summary_table(cfg, tok, {"base": start, "sft": tuned}, modes))


if __name__ == "__main__":
    C.run_cli(main)

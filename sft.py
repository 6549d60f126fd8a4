"""
Stage 1 of CLEAR (§3.2): supervised fine-tuning on degradation-aware data teaches generate-then-answer.

Each sample shows a degraded picture (as VAE and ViT tokens) and a question. When the answer-relevant detail did not
survive the corruption, the target is `<think>...</think> <image_restore>`, then the CLEAN picture as the generation
target (flow matching), the clean picture again as context (VAE and ViT tokens), then `<think>...</think><answer>`;
otherwise it is a direct `<think>...</think><answer>...</answer>` (`clear_sample`, exactly the official layout).

    loss = ce_weight * CE(assistant text) + mse_weight * MSE(velocity of the restore target) [+ distill_weight * distill]

with CE and MSE summed over tokens and divided by their global counts (`sft_loss`), text / ViT / VAE condition dropout
in the packing, and the distillation term of bridge.py when --distill-weight > 0 (`step_loss`).

CPU (toy, no flags; runs Stage 0 first when out/base/ is missing):
    python sft.py                      # -> out/base/ (if needed), out/sft/, then a table on the held-out toy benchmark
    python sft.py --distill-weight 0.4 # the official "one job" form: Stage 1 and the bridge distillation together
GPU:
    python sft.py --device cuda --dtype bf16 --compile
    torchrun --nproc_per_node 8 sft.py --init path/to/BAGEL-7B-MoT --data sft.jsonl --images DIR --fsdp ...

Differences from the official recipe (numbered):
  1. Toy-sized defaults (steps, lr, token budget, EMA window); the official values are in each flag's help.
  2. The restore decision is a rule (data.needs_restore: did the answer-relevant detail survive?), not GPT-4.1. On the
     toy the samples restore at the rate the rule gives for the training severities, not half of the time as the
     official mix draws its tool group (--tool-share, which real data keeps at 0.5): the toy world has no separate
     tool set to oversample, and the restore decision should follow what the picture shows.
  3. ViT and VAE are frozen as officially, but in the toy they come from our Stage 0 instead of SigLIP/FLUX.
  4. The data mix adds text-only reasoning samples (the official pure-text set, not in its main mix) so the evaluation
     can compare text-only reasoning with interleaved reasoning on the same model; they carry the prompt the official
     evaluation's text reasoning uses (VLM_THINK_SYSTEM_PROMPT) instead of the official pure-text set's
     TEXT_REASON_SYSTEM_PROMPT, so that comparison does not measure a prompt the model never saw.
  5. On the toy world, the examples are made and encoded once (--examples, as Stage 0 does) and drawn about 3.6 times
     each over the 600 steps, each time with its own flow time, noise and condition dropout: rendering, degrading and
     encoding fresh pictures took 0.31 of every 0.84-second CPU step.
  6. On the toy world, --replay 0.2 of the samples replay Stage 0's restore edit (pretrain.restore_edit: the degraded
     picture, "Restore this picture.", its clean picture as one noised target), so the tiny generator keeps drawing
     what its context shows. CLEAR's samples restore only pictures that lost the answer's detail, and without replay
     the toy's 600 steps of them taught the generator to invent: a clean-trained probe read its restorations of 384 hard
     held-out pictures (same edit prompt) at 64.3% after Stage 1 against 72.4% for the base, the inputs 66.7%, losing
     most where noise, JPEG or blur had left the picture readable; with replay, 70.8% (seed 0, world 0, eight colours).
     BAGEL-7B brings far more generation training than a short SFT can wear down.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import bridge
import common as C
import data as D
import engine as E
import model as M
import pretrain
from common import flag

# ----------------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class SFTConfig:
    # data
    init: str | None = flag(None, "BAGEL-format folder to start from (default: the toy base, built if missing)", group="data")
    data: str | None = flag(None, "LLaVA-style JSONL for real data (default: the toy world)", group="data")
    images: str | None = flag(None, "image folder of --data (its image paths are relative to it)", group="data")
    system: str = flag("toy", "system prompt (official: 'official')", choices=sorted(D.SYSTEM_PROMPTS), group="data")
    text_reason_rate: float = flag(0.15, "fraction of text-only reasoning samples", "[0, 1]", group="data")
    tool_share: float = flag(0.5, "--data: share of samples drawn from the rows that restore (official corruption_mix.yaml "
                             "0.5 / 0.5 tool / no-tool)", "[0, 1]", group="data")
    world_seed: int = flag(0, "toy world seed", C.SEED, group="data")
    replay: float = flag(0.2, "toy world: share of samples that replay Stage 0's restore edit (difference 6)", "[0, 1]",
                         group="data")
    examples: int = flag(6000, "toy training examples made and encoded once; a step draws about 36 of them (default "
                         "--tokens-per-step), each with its own flow time, noise and dropout", "[1, inf)", group="data")
    vae_max: int = flag(1024, "--data: VAE resize, longest side (official 1024; capped by the model's position table)", "[16, inf)", group="data")
    vae_min: int = flag(512, "--data: VAE resize, shortest side (official 512)", "[16, inf)", group="data")
    vit_max: int = flag(518, "--data: ViT resize, longest side (official 518; capped by the model's position table)", "[14, inf)", group="data")
    vit_min: int = flag(224, "--data: ViT resize, shortest side (official 224)", "[14, inf)", group="data")
    # objective
    ce_weight: float = flag(1.0, "CE weight (official 1.0)", "[0, inf)", group="objective")
    mse_weight: float = flag(1.0, "flow-matching MSE weight (official 1.0)", "[0, inf)", group="objective")
    distill_weight: float = flag(0.0, "ViT->VAE distillation weight, bridge.py (official 0.4, release 0.1)", "[0, inf)", group="objective")
    distill_mode: str = flag("per_layer_kl", "distillation variant (official HEAD / release)",
                             choices=["per_layer_kl", "final_mse"], group="objective")
    distill_stride: int = flag(1, "per_layer_kl: every stride-th layer plus the last", "[1, inf)", group="objective")
    text_dropout: float = flag(0.1, "text condition dropout (official 0.1)", "[0, 1]", group="objective")
    vit_dropout: float = flag(0.4, "ViT condition dropout (official 0.4)", "[0, 1]", group="objective")
    vae_dropout: float = flag(0.0, "VAE condition dropout (official 0)", "[0, 1]", group="objective")
    # optimisation
    steps: int = flag(600, "optimiser steps (official 8000)", "[1, inf)", group="optimisation")
    lr: float = flag(5e-4, "peak learning rate (official 1e-5)", "(0, inf)", group="optimisation")
    min_lr: float | None = flag(None, "cosine floor (default lr / 10; official 1e-7)", "[0, inf)", group="optimisation", type=float)
    warmup: int = flag(30, "warmup steps (official 500)", "[0, inf)", group="optimisation")
    weight_decay: float = flag(0.0, "AdamW weight decay (official 0.01)", "[0, inf)", group="optimisation")
    ema: float = flag(0.99, "EMA decay of the saved weights (official 0.995)", "[0, 1)", group="optimisation")
    grad_clip: float = flag(1.0, "gradient-norm clip (official 1.0)", "(0, inf)", group="optimisation")
    tokens_per_step: int = flag(4096, "token budget per step and process (official 30000)", "[1, inf)", group="optimisation")
    row_tokens: int = flag(512, "pack samples into rows of at most this many tokens", "[1, inf)", group="optimisation")
    # run
    out: str = flag("out/sft", "output checkpoint folder")
    resume: bool = flag(False, "continue from --out's train_state")
    resume_force: bool = flag(False, "with --resume: continue although settings differ from the checkpoint's (printed)")
    save_every: int = flag(100, "checkpoint every N steps (atomic)", "[1, inf)")
    seed: int = flag(0, "training seed", C.SEED)
    device: str = flag("auto", "auto | cpu | cuda | mps")
    dtype: str = flag("auto", "auto | fp32 | bf16", choices=["auto", *C.DTYPES])
    threads: int = flag(0, "CPU threads for torch (0 = its default)", "[0, inf)")
    compile: bool = flag(False, "torch.compile the model")
    fsdp: bool = flag(False, "FSDP2 + activation checkpointing (multi-GPU, real weights)")
    flex_attention: bool = flag(False, "FlexAttention block masks instead of dense masks (long rows on GPU; no CPU backward)")
    # the summary table (toy world)
    eval_n: int = flag(192, "held-out toy questions per severity (0 = skip the table)", "[0, inf)", group="summary table")
    eval_seed: int = flag(0, "held-out split seed", C.SEED, group="summary table")
    eval_steps: int = flag(10, "denoising points when restoring (official 50)", "[2, inf)", group="summary table")
    reentry: str = flag("bridge", "how the restored image re-enters the context", choices=bridge.REENTRY, group="summary table")
    max_text_tokens: int = flag(48, "tokens per decoded segment (official 4096)", "[1, inf)", group="summary table")
    # the official CFG (engine.InferenceConfig's, evaluate.py's default too). Measured before choosing it, on 384 hard training-side pictures
    # per world (never the held-out split), with an earlier README's checkpoints (eight colours): the probe reads SFT
    # always-restore pictures 3.4 (world 0) and 4.7 (world 1) points better than without guidance, and the answers of
    # the SFT and RL models (always restore, interleaved) rise by 0.6 points on average; restoring costs ~2x
    cfg_text_scale: float = flag(E.InferenceConfig.cfg_text_scale, "text CFG when restoring (official 3.0)", "[0, inf)", group="summary table")
    cfg_img_scale: float = flag(E.InferenceConfig.cfg_img_scale, "image CFG when restoring (official 1.5)", "[0, inf)", group="summary table")
    base_steps: int = flag(1300, "Stage 0 steps when the toy base must be built (pretrain.py --steps)", "[1, inf)", group="data")


SIZE_FLAGS = ("vae_max", "vae_min", "vit_max", "vit_min")
TABLE_FLAGS = ("eval_n", "eval_seed", "eval_steps", "reentry", "max_text_tokens", "cfg_text_scale", "cfg_img_scale")
# what --resume lets differ from the checkpoint's settings: more --steps (extends the run), where and how it runs, the
# summary table; anything else (seed, lr, data, token budget, --init, ...) would not continue the same run
RESUME_MAY_CHANGE = ("steps", "save_every", "threads", "device", "compile", "flex_attention", "out", "resume",
                     "resume_force", *TABLE_FLAGS)
BASE = "out/base"  # the toy base model (Stage 0) when there is no --init


def parse_config(description: str, argv=None, defaults: dict | None = None, unused: tuple = ()) -> SFTConfig:
    """Flags -> SFTConfig, refusing values out of range and flags that would have no effect (sft.py and bridge.py)."""
    cfg, prog, given = C.parse_flags(SFTConfig, description, argv, defaults)
    C.refuse_given(prog, given, unused, "in this script")
    if (cfg.data is None) != (cfg.images is None):
        C.refuse(prog, "--data and --images go together: the JSONL's image paths are relative to --images")
    if cfg.init is not None:
        C.refuse_given(prog, given, ("base_steps",), "with --init (it sizes the toy base built when there is none)")
    if cfg.data is not None:
        C.refuse_given(prog, given, ("world_seed", "examples", "replay"), "with --data (the toy world is not used)")
        cfg = replace(cfg, replay=0.0)
    else:
        C.refuse_given(prog, given, SIZE_FLAGS, f"on the toy world (its pictures are {D.MODEL_SIZE} px)")
        C.refuse_given(prog, given, ("tool_share",), "on the toy world (it restores where its rule says, difference 2)")
    if cfg.data is not None or cfg.fsdp:  # the summary table runs on the toy world, in one process
        why = "with --data (the toy world is not used)" if cfg.data is not None else "with --fsdp (no summary table)"
        C.refuse_given(prog, given - {"eval_n"} if cfg.eval_n == 0 else given, TABLE_FLAGS, why)
        cfg = replace(cfg, eval_n=0)
    elif cfg.eval_n == 0:
        C.refuse_given(prog, given - {"eval_n"}, TABLE_FLAGS, "with --eval-n 0 (no summary table)")
    if cfg.text_reason_rate + cfg.replay > 1:
        C.refuse(prog, f"--text-reason-rate {cfg.text_reason_rate} + --replay {cfg.replay} is above 1: they are shares of "
                       "the same samples")
    if not cfg.resume:
        C.refuse_given(prog, given, ("resume_force",), "without --resume")
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        C.refuse(prog, "--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N > 1)")
    if cfg.fsdp and cfg.resume:
        C.refuse(prog, "--resume is implemented for single-process and DDP runs; an FSDP run restarts from its last --init")
    if cfg.distill_weight == 0:
        C.refuse_given(prog, given, ("distill_mode", "distill_stride"), "without --distill-weight > 0")
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
        seq += bridge.distill_pair(ex.clean, x0, grid, sizes.vit[2])  # the ViT stride is the model's patch
    else:
        seq += [M.VaeImage(x0, grid), M.VitImage(D.image_to_tensor(D.resize_image(ex.clean, *sizes.vit)))]
    if rest.strip():  # official: parts[1] is added only when it is not blank
        seq.append(M.Text(tok.encode(rest), loss=True))
    return seq


def text_reason_sample(ex: D.Example, tok: D.Tokenizer, sizes: D.ImageSizes = D.TOY_SIZES) -> list:
    """Text-only reasoning sample (official TextReasonIterableDataset): a system prompt, the degraded image as ViT
    only, the question, then a CoT with CE. The official CoT was written from the clean picture; here it is the direct
    response, or for a restore response what follows <image_restore> (the reasoning on the clean picture). The prompt
    is the one the official evaluation's text reasoning uses (VLM_THINK_SYSTEM_PROMPT; difference 4)."""
    turn = split_response(ex.response)
    cot = ex.response if turn is None else turn[1].strip()
    return [M.Text(tok.encode(D.VLM_THINK_SYSTEM_PROMPT)), M.VitImage(D.image_to_tensor(D.resize_image(ex.degraded, *sizes.vit))),
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
    pixels = [D.vae_pixels(ex.degraded, sizes) for ex in examples] + [D.vae_pixels(examples[i].clean, sizes) for i in restoring]
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


def pool_draw(world: D.ToyWorld, rng, n: int, encode: Callable, every_clean: bool = False, chunk: int = 256) -> Callable:
    """draw(rng) -> (example, its latents) from n toy training examples made and encoded once, as Stage 0 does
    (pretrain.example_pool): rendering, degrading and encoding fresh pictures would be over a third of every CPU step
    (difference 5); each draw still gets its own flow time, noise and condition dropout. every_clean: encode every
    clean picture (replay restores all of them), not only those of restoring samples."""
    stream = world.stream(rng)
    examples = [next(stream) for _ in tqdm(range(n), desc="toy training examples", leave=False, dynamic_ncols=True)]
    pool = []
    for i in range(0, n, chunk):
        part = examples[i:i + chunk]
        pool += zip(part, encode_examples(part, encode, every_clean=every_clean))
    return lambda rng: pool[int(rng.integers(len(pool)))]


def picture_sizes(cfg, model_cfg: M.ModelConfig) -> D.ImageSizes:
    """The official transforms capped by the model for --data (overridable by flags); the toy's own size otherwise."""
    if cfg.data is None:
        return D.image_sizes(model_cfg, *D.TOY_SIDES)
    return D.image_sizes(model_cfg, (cfg.vae_max, cfg.vae_min), (cfg.vit_max, cfg.vit_min))


def batches(cfg: SFTConfig, model_cfg: M.ModelConfig, tok: D.Tokenizer, encode: Callable, draw: Callable, device):
    """batch(step, np_rng, torch_gen): samples until the step's token budget (counted before dropout) is reached,
    packed into rows with the condition dropouts (BAGEL: expected_num_tokens per rank; pack_sequence's text / ViT / VAE
    cfg dropout). draw(rng) -> (example, its (degraded, clean) latents or None). Each drawn example becomes a text-only
    reasoning sample (cfg.text_reason_rate), a replayed restore edit (cfg.replay, the toy's pool only) or a CLEAR
    sample."""
    sizes = picture_sizes(cfg, model_cfg)

    def batch(step, rng, gen):
        samples, tokens = [], 0
        while tokens < cfg.tokens_per_step:
            drawn = [draw(rng) for _ in range(4)]
            u = [rng.random() for _ in drawn]  # one draw decides the kind: text-only | replay | CLEAR
            kept = [d for d, x in zip(drawn, u) if x >= cfg.text_reason_rate + cfg.replay]
            latents = [lat for _, lat in kept]
            built = build_batch([ex for ex, _ in kept], tok, encode, gen, cfg.system, sizes, model_cfg.timestep_shift,
                                cfg.distill_weight > 0, None if any(lat is None for lat in latents) else latents)
            built += [text_reason_sample(ex, tok, sizes) for (ex, _), x in zip(drawn, u) if x < cfg.text_reason_rate]
            built += [replay_sample(ex, lat, tok, gen, model_cfg.timestep_shift) for (ex, lat), x in zip(drawn, u)
                      if cfg.text_reason_rate <= x < cfg.text_reason_rate + cfg.replay]
            samples += built
            tokens += sum(sample_tokens(s, model_cfg.vit_patch_size) for s in built)
        dropout = (cfg.text_dropout, cfg.vit_dropout, cfg.vae_dropout)
        return M.pack(samples, model_cfg, dropout, gen, row_tokens=cfg.row_tokens).to(device)
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# The objective and one step


def sft_loss(out: M.TrainOutput, n_ce: float, n_mse: float, ce_weight: float, mse_weight: float):
    """CE summed over assistant tokens / global token count + MSE summed over target tokens / global count (BAGEL)."""
    ce = out.ce.sum() / max(n_ce, 1.0)
    mse = out.mse.sum() / max(n_mse, 1.0)
    return ce_weight * ce + mse_weight * mse, ce, mse


def step_loss(model, packed: M.Packed, run: C.Run, num_layers: int, ce_weight: float, mse_weight: float,
              distill_weight: float = 0.0, distill_mode: str = "per_layer_kl", distill_stride: int = 1,
              flex: bool = False, recompute: bool = False):
    """The Stage 1 (and Stage 2) objective for one packed batch, normalised by global token / pair counts."""
    n_ce = C.all_reduce_sum(packed.ce_idx.numel(), run)
    n_mse = C.all_reduce_sum(int(packed.mse_mask.sum()), run)
    n_pairs = C.all_reduce_sum(len(packed.pairs), run) if distill_weight > 0 else 0  # every rank joins the sum
    hook, finish = (None, None)
    if distill_weight > 0 and packed.pairs:
        hook, finish = bridge.distill_loss(packed.pairs, num_layers, distill_mode, distill_stride)
    out = model(packed, hidden_hook=hook, flex=flex, recompute=recompute)
    loss, ce, mse = sft_loss(out, n_ce, n_mse, ce_weight, mse_weight)
    metrics = {"ce": float(ce.detach()) * run.world, "mse": float(mse.detach()) * run.world}
    if finish is not None:
        distill = finish(out) / max(n_pairs, 1.0)  # CLEAR: normalised by the global number of pairs
        loss = loss + distill_weight * distill
        metrics["distill"] = float(distill.detach()) * run.world
    elif distill_weight > 0:
        loss = loss + 0 * out.hidden.sum()  # keeps every rank's graph the same shape (official dummy pass)
    return loss * run.world, metrics  # DDP averages gradients over ranks; the counts above are global


# ----------------------------------------------------------------------------------------------------------------------
# The trainer (Stage 1, and Stage 2 through bridge.py)


def load_start(cfg: SFTConfig, run: C.Run) -> tuple[M.Bagel, D.Tokenizer, str]:
    """The model to fine-tune: --init, or the toy base (Stage 0, built in this process if out/base/ is missing)."""
    init = cfg.init
    if init is None:
        init = BASE
        if (Path(init) / "ema.safetensors").exists():  # Stage 0 is cached in out/base, keyed by its settings
            built = M.read_json(Path(init) / "nanoclear.json").get("args", {})  # pretrain.py's settings
            asked = {"seed": cfg.seed, "world_seed": cfg.world_seed, "steps": cfg.base_steps}
            if any(built.get(k) != v for k, v in asked.items()):
                flags = lambda a: f"--seed {a.get('seed')} --world-seed {a.get('world_seed')} --base-steps {a.get('steps')}"  # noqa: E731
                raise M.InputError(f"{init} holds a toy base built with {flags(built)}, this run asks for {flags(asked)}: "
                                   f"remove {init}, run in another folder, or pass --init {init}")
        else:
            if run.world > 1:
                raise SystemExit("build the toy base first (python pretrain.py), then launch torchrun")
            print("No --init and no out/base/: building the toy base model first (pretrain.py, Stage 0).")
            C.seed_everything(cfg.seed)  # as `python pretrain.py --seed S` would
            pretrain.build_base(pretrain.PretrainConfig(steps=cfg.base_steps, seed=cfg.seed, world_seed=cfg.world_seed,
                                                        out=init), run)
            C.seed_everything(cfg.seed)
    return C.load_for_training(init, run, cfg.fsdp), D.Tokenizer.from_folder(init), init


def finetune(cfg: SFTConfig, name: str) -> tuple[M.Bagel | None, M.Bagel, D.Tokenizer]:
    """Fine-tune with CE + MSE (+ distillation); returns (start model for the table or None, EMA model, tokenizer).
    `name` is the stage recorded in the checkpoint ("sft" or "bridge"), which --resume checks."""
    run = C.setup_run(cfg.device, cfg.dtype, cfg.seed, cfg.threads)
    t0 = time.time()
    if cfg.resume:  # before any work: --out must hold this very run
        C.check_resume(cfg.out, name, {**vars(cfg), "init": cfg.init or BASE}, RESUME_MAY_CHANGE, cfg.resume_force, run)
    else:  # or be a folder the first save may replace
        C.check_out(cfg.out, cfg.init or BASE)
    if cfg.init is not None:
        M.config_from_folder(cfg.init)  # a wrong --init stops here, before the data is read
    if cfg.data:
        rows, problems = D.read_jsonl(cfg.data, cfg.images)
        if run.main:
            print(D.skip_report(cfg.data, rows, problems, "line"))
        draw = mixed_draw(rows, cfg.tool_share)
    model, tok, init = load_start(cfg, run)
    if not cfg.data:
        t = time.time()
        draw = pool_draw(D.ToyWorld(cfg.world_seed), np.random.default_rng([cfg.world_seed, cfg.seed, 6]), cfg.examples,
                         model.encode_pixels, every_clean=cfg.replay > 0)
        if run.main:
            print(f"{cfg.examples} toy training examples made and encoded in {time.time() - t:.0f} s")
    start = M.load_pretrained(init, run.device, run.dtype) if run.main and cfg.eval_n and not cfg.fsdp else None
    C.freeze_encoders(model)
    opt = C.make_optimizer(model, cfg.lr, weight_decay=cfg.weight_decay)
    ema = C.EMA(model, cfg.ema)
    out = Path(cfg.out)
    start_step = C.load_resume_state(out, model, ema, opt) if cfg.resume else 0
    wrapped = model
    if run.world > 1 and not cfg.fsdp:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    loop = C.LoopConfig(cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr, cfg.ema, cfg.grad_clip, cfg.seed, cfg.save_every, 1)
    batch = batches(cfg, model.cfg, tok, model.encode_pixels, draw, run.device)

    def loss(m, packed):
        return step_loss(m, packed, run, model.cfg.num_hidden_layers, cfg.ce_weight, cfg.mse_weight, cfg.distill_weight,
                         cfg.distill_mode, cfg.distill_stride, cfg.flex_attention, cfg.fsdp)

    C.train_loop(run, model, wrapped, opt, ema, loop, out, name, batch, loss, tok.tk,
                 {"args": vars(cfg), "init": init}, start_step=start_step)
    if run.main:
        print(f"{name} finished in {time.time() - t0:.0f} s -> {out}")
    ema.copy_to(model)
    if run.world > 1:
        dist.destroy_process_group()
    return start, model.eval(), tok


def summary_table(cfg: SFTConfig, tok: D.Tokenizer, models: dict, modes: dict) -> str:
    """The held-out toy table printed at the end of the stage."""
    split = D.ToyWorld(cfg.world_seed).eval_split(cfg.eval_n, seed=cfg.eval_seed)
    icfg = E.InferenceConfig(reentry=cfg.reentry, max_text_tokens=cfg.max_text_tokens, num_timesteps=cfg.eval_steps,
                             cfg_text_scale=cfg.cfg_text_scale, cfg_img_scale=cfg.cfg_img_scale)
    return E.toy_table(models, modes, tok, split, icfg, cfg.eval_seed, cfg.system)


def main(argv=None):
    cfg = parse_config(__doc__, argv)
    start, tuned, tok = finetune(cfg, "sft")
    if start is not None:
        modes = {"base": "direct" if cfg.init is None else "interleave", "sft": "interleave"}
        print(summary_table(cfg, tok, {"base": start, "sft": tuned}, modes))


if __name__ == "__main__":
    C.run_cli(main)

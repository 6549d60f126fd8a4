"""
Stage 3 of CLEAR (§3.4): Interleaved GRPO — text GRPO and Flow-GRPO on the denoising steps, under answer rewards.

For each degraded-image question the policy writes G interleaved rollouts: text sampled until <|im_end|>; a segment
ending in <image_restore> makes it denoise a restored image with the SDE sampler (every step recorded), which re-enters
through the latent bridge; then the text continues. Rewards score each rollout, advantages centre them per group, and

    L = mean over the B completions of ( L_text + lambda * L_image )
    L_text  = token-level PPO-clip on the sampled text, + beta * KL_k3(reference || policy)
    L_image = PPO-clip on the Gaussian log-probability of ONE recorded denoising step of the completion's restorations
              (Flow-GRPO); a completion that did not restore adds 0

share one backward through the same forward, whose context is exactly the one the rollout was sampled in (the
bridged latent, not a re-encoded picture; the official code replays a different context, see clear_method §3.6).

The official recipe, as presets (--recipe; a flag given explicitly overrides its preset value):
  * head (official scripts/train_reason_interleave_grpo.sh at HEAD 411d6bd): reward = 0.75 accuracy + 0.10 format
    (enable_reward_decision False, enable_reward_latent_quality False); loss_type dr_grpo, i.e. the text loss summed
    over tokens / (B * max_completion_length); the image term uses the same advantages (separate_image_rewards False);
    the training score with t_safe 1e-4, blended toward (1 - t) v below t = 0.1, clamped at +-50;
  * release (the same script at the release a65d61f): + 0.15 decision reward; loss_type grpo (per-sequence token
    mean); image advantages from the latent-quality reward alone (separate_image_rewards True; NaN -> 0 before the
    group mean), which never enters the scalar reward (weight_map latent_quality 0.0); the training score with
    t_safe 1e-6, no blend, clamped at +-100 (as at rollout).
  Both (interleave_grpo.py and the trainer, bagel_interleave_grpo_trainer.py): image_loss_weight 0.5, G = 8,
  epsilon 0.2, beta 0.04, temperature 1.0, top_p 1.0, SDE sigma 0.3 on a 20-point grid with shift 3 and no CFG,
  num_iterations 1 (ratio 1), scale_rewards False, round-robin step choice excluding each trajectory's last step,
  "restored" = <image_restore> in the completion text, AdamW (0.9, 0.999) lr 5e-6 cosine without warmup, 32 (head) /
  16 (release) questions x G per optimiser step over 8 processes, 400 (head) / 200 (release) steps (OFFICIAL_SCALE).

CPU (toy): python rl.py                  # from out/bridge/ (or out/sft/), a few minutes on 2 cores, writes
                                         # out/rl/, then prints the restore-decision signal (decision_signal) and
                                         # a before/after table
GPU:       python rl.py --device cuda --dtype bf16 --init path/to/CLEAR-or-BAGEL --data rl.jsonl --images DIR
           torchrun --nproc_per_node 8 rl.py ... (each process rolls out its share of the recipe's questions;
                                                  gradients are averaged)
           with --data every default is the official value of --recipe (prompt, scale, lr, lengths)

Differences from the official recipe (numbered; deliberate):
  1. The KL reference is a frozen copy of the starting checkpoint; the official code uses the rollout policy itself,
     which makes the KL vanish (`--ref rollout` reproduces that).
  2. The forward that scores a rollout replays its exact context (bridged latent, sampled token ids); officially the
     generated image is re-encoded through VAE + ViT, so post-image log-probs see another context.
  3. Toy-sized defaults on the toy world (G = 4, 10 SDE points, 48-token segments, max_completion_length 144,
     4 questions per step, lr 2e-5, 150 steps); with --data every default is the official value of --recipe (each
     flag's help gives both).
  4. Accuracy is exact match (MC by letter) on the toy; a judge callable plugs in for open answers (no network).
  5. All B completions of a step form one batch for one optimiser step; officially each of 8 processes accumulates
     32 (HEAD) / 16 (release) micro-steps of one completion, 256 / 128 completions per step; the loss is the same
     mean over completions.
  6. The CE scores exactly the sampled tokens; the official one also scores one <|im_end|> after each segment's
     closing <|im_end|> (output_transfer.py:200,216-218,485 @411d6bd), a label no rollout sampled.
  7. The training forward attends as the rollout did; the official forward's mask pairs its split lengths with a mode
     list that has no entry for VAE splits (output_transfer.py:274-321, zipped at data_utils.py:82), so completion
     rows attend to nothing, or, before a restoration, to the tokens they predict (official_mask; --official-mask, a
     research switch, runs the toy under it).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoint as CK
import common as C
import data as D
import engine as E
import model as M
from common import flag

# ----------------------------------------------------------------------------------------------------------------------
# Settings


RECIPES = {  # official scripts/train_reason_interleave_grpo.sh at HEAD (411d6bd) and at the release (a65d61f)
    "head": dict(w_decision=0.0, loss_type="dr_grpo", separate_image_rewards=False),
    "release": dict(w_decision=0.15, loss_type="grpo", separate_image_rewards=True),
}
# The official scale, the defaults with --data (the toy world keeps RLConfig's): 8 processes x gradient accumulation
# 32 (HEAD) / 16 (release) micro-steps of one completion, G 8 (train_reason_interleave_grpo.sh:45,50,39, the same lines
# @411d6bd and @a65d61f), so 256 / 128 completions = 32 / 16 questions per optimiser step
OFFICIAL_SCALE = {"head": dict(questions=32, steps=400), "release": dict(questions=16, steps=200)}
OFFICIAL = dict(group=8,  # --num_generations: train_reason_interleave_grpo.sh:39
                lr=5e-6,  # --learning_rate: :36
                sde_points=20,  # --num_timesteps_train: :63
                max_completion_length=16384)  # :31 (and --max_think_token_n 4096, :30: engine.inference_config)


@dataclass
class RLConfig(C.TrainingFlags, C.DataFlags, C.PictureSizeFlags, E.InferenceFlags, E.ToyTableFlags):
    # rollouts (also: --reentry, --max-rounds, --max-text-tokens, --timestep-shift of the inference group)
    prompts: int = flag(4, "questions per step and process (toy 4; official 32 questions x G 8 per optimiser step at "
                        "HEAD, 16 x 8 at the release; with --data the official total divided over the processes)",
                        "[1, inf)", group="rollouts")
    group: int = flag(4, "rollouts per question, G (toy 4; official 8); advantages need at least 2", "[2, inf)",
                      group="rollouts")
    temperature: float = flag(1.0, "text sampling temperature (official 1.0)", "(0, inf)", group="rollouts")
    top_p: float = flag(1.0, "nucleus sampling (official 1.0)", "(0, 1]", group="rollouts")
    sde_points: int = flag(10, "SDE grid points, N-1 steps (toy 10; official 20)", E.GRID_POINTS, group="rollouts")
    sde_sigma: float = flag(0.3, "constant SDE noise level (official 0.3)", "(0, inf)", group="rollouts")
    # rewards
    recipe: str = flag("head", "official preset (module docstring): head or release", choices=list(RECIPES),
                       group="rewards")
    w_accuracy: float = flag(0.75, "accuracy reward weight (official 0.75)", "[0, inf)", group="rewards")
    w_format: float = flag(0.10, "format reward weight (official 0.10)", "[0, inf)", group="rewards")
    w_decision: float = flag(0.0, "decision reward weight (official head 0, release 0.15)", "[0, inf)", group="rewards")
    w_latent: float = flag(0.0, "latent-quality weight in the scalar reward (official 0.0)", "[0, inf)",
                           group="rewards")
    decision_smooth: bool = flag(False, "1.0/0.5/0.5/-0.2 decision table (official False)", group="rewards")
    separate_image_rewards: bool = flag(False, "image advantages from the latent-quality reward (official head False, "
                                        "release True)", group="rewards")
    # loss
    loss_type: str = flag("dr_grpo", "token aggregation (official head dr_grpo, release grpo)",
                          choices=["grpo", "dr_grpo"], group="loss")
    max_completion_length: int = flag(144, "Dr.GRPO denominator per completion (toy 144; official 16384)", "[1, inf)",
                                      group="loss")
    scale_rewards: bool = flag(False, "divide advantages by the group std (official False)", group="loss")
    epsilon: float = flag(0.2, "PPO clip range (official 0.2)", "(0, 1)", group="loss")
    beta: float = flag(0.04, "KL weight, k3 estimator (official 0.04)", "[0, inf)", group="loss")
    ref: str = flag("frozen", "KL reference: frozen start checkpoint or the rollout policy (official)",
                    choices=["frozen", "rollout"], group="loss")
    image_loss_weight: float = flag(0.5, "lambda of the Flow-GRPO term (official 0.5)", "[0, inf)", group="loss")
    step_strategy: str = flag("round_robin", "which denoising step of a completion is trained (official round_robin)",
                              choices=["round_robin", "random", "weighted"], group="loss")
    official_mask: bool = flag(False, "research, off by default: the training forward attends with the official "
                               "code's misaligned mask (difference 7, official_mask); rollouts unchanged", group="loss")
    # optimisation
    # the toy's reward stays flat over 300 steps (docs/results.md), and half of them keeps the quickstart short
    steps: int = flag(150, "optimiser steps (toy 150; official 400 at HEAD, 200 at the release; with --data the "
                      "recipe's)", "[1, inf)", group="optimisation")
    lr: float = flag(2e-5, "learning rate, cosine, no warmup (toy 2e-5; official 5e-6)", "(0, inf)",
                     group="optimisation")
    grad_clip: float = flag(1.0, "gradient-norm clip (official 1.0)", "(0, inf)", group="optimisation")


RL_DEFAULTS = dict(out="out/rl", save_every=20)
# the flags that only shape the table at the end (the rollouts use --reentry, --max-rounds, --max-text-tokens and
# --timestep-shift too)
TABLE_FLAGS = ("eval_n", "eval_seed", "denoise_steps", "cfg_text_scale", "cfg_img_scale", "cfg_interval",
               "cfg_renorm_type")
# what --resume may change besides where and how it runs (common.RESUME_MAY_CHANGE): more --steps, the final table
RESUME_MAY_CHANGE = ("steps", *TABLE_FLAGS)


def parse_config(argv=None) -> RLConfig:
    """Flags -> RLConfig: the recipe's values where no flag was given (with --data also its official scale and prompt);
    out-of-range values and flags that would have no effect are refused."""
    cfg, prog, given = C.parse_flags(RLConfig, __doc__, argv, RL_DEFAULTS)
    cfg = replace(cfg, **{k: v for k, v in RECIPES[cfg.recipe].items() if k not in given})
    cfg = C.check_data_flags(prog, cfg, given)
    if cfg.data is not None:
        scale, world = OFFICIAL_SCALE[cfg.recipe], int(os.environ.get("WORLD_SIZE", 1))
        if "prompts" not in given and scale["questions"] % world:
            C.refuse(prog, f"--data: the official {cfg.recipe} recipe's {scale['questions']} questions per optimiser "
                           f"step do not divide over {world} processes; pass --prompts N (questions per process)")
        official = dict(OFFICIAL, prompts=scale["questions"] // world, steps=scale["steps"])
        cfg = replace(cfg, **{k: v for k, v in official.items() if k not in given})
    C.check_training_flags(prog, cfg, given)
    E.check_inference_flags(prog, cfg)
    E.check_time_grid(prog, cfg.timestep_shift, cfg.sde_points, "--sde-points")
    cfg = E.check_table_flags(prog, cfg, given, TABLE_FLAGS,
                              "with --data (the toy world is not used)" if cfg.data is not None else None)
    if cfg.loss_type == "grpo":
        C.refuse_given(prog, given, ("max_completion_length",), "with --loss-type grpo (only dr_grpo divides by it)")
    if cfg.beta == 0:
        C.refuse_given(prog, given, ("ref",), "with --beta 0 (no KL term)")
    if cfg.image_loss_weight == 0:
        C.refuse_given(prog, given, ("step_strategy", "separate_image_rewards"),
                       "with --image-loss-weight 0 (no Flow-GRPO term)")
    if cfg.w_decision == 0:
        C.refuse_given(prog, given, ("decision_smooth",), "with --w-decision 0")
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Rewards (CLEAR §3.4; official interleave_grpo.py), one pure function each


def accuracy_reward(reply: str, example: D.Example, judge=None) -> float:
    """1 if the reply's answer matches (exact/normalised, A-D letter for multiple choice), else 0; an optional
    judge(question, prediction, truth) -> [0, 1] scores open answers instead (official: an LLM judge)."""
    if judge is not None and not example.options:
        pred = D.extract_answer(reply)
        return float(min(1.0, max(0.0, judge(example.question, reply.strip() if pred is None else pred,
                                             example.answer))))
    return float(D.is_correct(reply, example))


def format_reward(texts: list[str]) -> float:
    """0.35 for a complete <think>, 0.35 for a complete <answer>, 0.3 for think before answer
    (official format_reward_v2)."""
    s = " ".join(texts)
    r = (0.35 * bool(re.search(r"<think>.+?</think>", s, re.DOTALL))
         + 0.35 * bool(re.search(r"<answer>.+?</answer>", s, re.DOTALL)))
    end_think, answer = s.find("</think>"), s.find("<answer>")
    return r + 0.3 * (end_think > 0 and answer > end_think)


def decision_reward(restored: bool, correct: bool, smooth: bool = False) -> float:
    """Reward the restore decision by its outcome (official decision_reward_auto; smooth=True: 1.0/0.5/0.5/-0.2)."""
    if correct:
        return 1.0 if restored else (0.5 if smooth else 0.6)
    return (0.5 if smooth else 0.4) if restored else -0.2


def latent_quality_reward(gen: torch.Tensor | None, clean: torch.Tensor | None, mse_scale: float = 0.5) -> float:
    """0.3 exp(-0.5 MSE) + 0.3 global cosine + 0.4 mean per-token cosine of generated vs clean latents (NaN if either
    is missing: no restoration, or no clean picture to compare with)."""
    if gen is None or clean is None:
        return float("nan")
    n = min(len(gen), len(clean))
    g, c = gen[:n].float(), clean[:n].float()
    r_mse = math.exp(-mse_scale * float((g - c).pow(2).mean()))
    r_cos = max(float(torch.nn.functional.cosine_similarity(g.flatten(), c.flatten(), dim=0)), 0.0)
    r_local = float(torch.nn.functional.cosine_similarity(g, c, dim=-1).clamp(min=0).mean())
    return 0.3 * r_mse + 0.3 * r_cos + 0.4 * r_local


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = False) -> torch.Tensor:
    """A_i = R_i - mean of its group (official: scale_rewards=False); with scale, divided by the group's standard
    deviation (unbiased, as torch.std) + 1e-4 (TRL)."""
    r = rewards.view(-1, group)
    a = r - r.mean(1, keepdim=True)
    if scale:
        a = a / (r.std(1, keepdim=True) + 1e-4)
    return a.reshape(-1)


def restore_gaps(restored: list[bool], accuracy: list[float], group: int) -> list[float | None]:
    """The signal GRPO has for the restore decision, per group: the mean accuracy of the rollouts that restored minus
    that of those that did not; None where they all agree (the decision token then gets the same advantage either
    way, so nothing to learn from)."""
    gaps = []
    for i in range(0, len(restored), group):
        pairs = list(zip(restored[i:i + group], accuracy[i:i + group]))
        yes, no = [a for r, a in pairs if r], [a for r, a in pairs if not r]
        gaps.append(sum(yes) / len(yes) - sum(no) / len(no) if yes and no else None)
    return gaps


def decision_signal(log_path: Path, prompts: int) -> str:
    """One line from the run's log (resumed parts included; the main process's groups): how often a group disagreed
    on restoring, and by how much restoring changed the accuracy there, in all and split by whether the question's
    reference answer restores (the rule SFT taught), each with a 95% bootstrap interval over those groups."""
    records = [record for _, record in C.read_log(log_path)]
    # .get: steps logged by an older rl.py (a resumed run) have no gaps
    split = {"reference restores": [g for rec in records for g in rec.get("gaps_ref_restores", [])],
             "reference does not": [g for rec in records for g in rec.get("gaps_ref_keeps", [])]}
    every = split["reference restores"] + split["reference does not"]
    line = (f"restore decision signal: the rollouts disagreed on restoring in {len(every)} of "
            f"{len(records) * prompts} groups")
    if not every:
        return line + " (GRPO had nothing to learn the decision from)"
    line += "; there, restored minus not restored accuracy (points)"
    for name, gaps in {"all": every, **split}.items():
        d = C.paired_bootstrap(gaps, [0.0] * len(gaps)) if gaps else None  # each group's gap against 0
        line += f", {name} ({len(gaps)}): " + (f"{d['diff']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]" if d else "-")
    return line


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps: float = 0.2):
    """Per-element -min(rho A, clip(rho, 1-eps, 1+eps) A) with rho = exp(logp - old); also the clipped mask."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    return loss, ((ratio - 1).abs() > eps).float()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || ref) per token: exp(ref - logp) - (ref - logp) - 1 (Schulman; TRL GRPO)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token: torch.Tensor, seq: torch.Tensor, n_seq: int, kind: str, max_len: int) -> torch.Tensor:
    """grpo: mean over each sequence's tokens, then over sequences; dr_grpo: sum / (sequences * max length)."""
    if kind == "dr_grpo":
        return per_token.sum() / (n_seq * max_len)
    sums = torch.zeros(n_seq, device=per_token.device).index_add(0, seq, per_token)
    counts = torch.zeros(n_seq, device=per_token.device).index_add(0, seq, torch.ones_like(per_token))
    return (sums / counts.clamp(min=1)).mean()


# The Flow-GRPO training score of each preset, passed to flow_step_logprob by grpo_loss. A score is clamped in both;
# HEAD also blends it toward (1 - t) v below t = 0.1 (never on the official grid: its candidate steps have t >= 0.26).
TRAINING_SCORE = {
    "head": dict(t_min=1e-4, blend_below=0.1, clamp=50.0),  # bagel_interleave_grpo_trainer.py:1019-1035 @411d6bd
    "release": dict(t_min=1e-6, blend_below=0.0, clamp=100.0),  # bagel_interleave_grpo_trainer.py:1017-1022 @a65d61f
}


def flow_step_logprob(x_t, v, x_next, t: float, dt: float, sigma: float,
                      t_min: float = 1e-4, blend_below: float = 0.1, clamp: float = 50.0):
    """Log-probability of a recorded SDE step under the current velocity v, as the official trainer scores it:
    score s = (x_t + (1 - t') v) / t' with t' = max(t, t_min); below t = blend_below, s is blended toward (1 - t) v
    with weight t / blend_below; s is clamped to +-clamp; mean = x_t - (v + sigma^2 / 2 * s) dt and
    log p = -mean over elements of min((x_next - mean)^2 / (sigma^2 dt), 1e8) / 2. Defaults: the HEAD preset."""
    t_safe = max(t, t_min)
    score = (x_t + (1 - t_safe) * v) / t_safe
    if t < blend_below:
        w = t / blend_below
        score = w * (1 - t) * v + (1 - w) * score
    # HEAD then zeroes a score holding NaN; a NaN score needs a NaN x_t or v, which makes log p NaN anyway: omitted
    mean = x_t - (v + 0.5 * sigma ** 2 * score.clamp(-clamp, clamp)) * dt
    sq = ((x_next - mean) ** 2 / (sigma ** 2 * dt)).clamp(max=1e8)  # official: the squared error clamped at 1e8
    return -0.5 * sq.flatten(1).mean(1)


def choose_step(ts: list, strategy: str, counter: int, rng: np.random.Generator) -> int:
    """Which of a completion's candidate steps (times ts) is trained (official: round robin over a global counter,
    random, or weighted by 1 / (|0.5 - t| + 0.1))."""
    if strategy == "round_robin":
        return counter % len(ts)
    if strategy == "random":
        return int(rng.integers(len(ts)))
    w = np.array([1.0 / (abs(0.5 - t) + 0.1) for t in ts])
    return int(rng.choice(len(ts), p=w / w.sum()))


# ----------------------------------------------------------------------------------------------------------------------
# Research: the attention mask of the official RL training forward (off by default; --official-mask trains under it).
# Its OutputTransfer.pack_sequence appends a mode for every text split ("causal", data/output_transfer.py:223 @411d6bd)
# and ViT split ("full", :268) but none for a VAE split (:274-321), and prepare_attention_mask_per_sample pairs lengths
# with modes by zip (data/data_utils.py:82): after each VAE split the modes land one split early, and the last splits
# get none, so their rows attend to nothing. Same code at a65d61f.


def official_layout(splits: list) -> list:
    """(length, mode) per split of one replayed sample, as the official training forward pairs them; mode None:
    the split's rows attend to nothing. `splits` are the sample's (row, sample, start, length, mode) from M.pack, in
    the official roles: the first full split is the question picture's VAE block and each noise split a restored
    picture's VAE block (where the official puts x_t); the rest are text (causal) or a picture the model reads
    (full: the question's ViT block, or our re-entered restoration, which the official re-enters through the ViT).
    Exact when every restoration carries its x_t split (one per completion, as trained); the official gives an
    untrained restoration a VAE block too (zero-filled), ours none."""
    first_full = next(i for i, sp in enumerate(splits) if sp[4] == "full")
    modes = [sp[4] for i, sp in enumerate(splits) if i != first_full and sp[4] != "noise"]  # official: none for VAE
    return [(sp[3], modes[i] if i < len(modes) else None) for i, sp in enumerate(splits)]  # official: zip


def official_mask(splits: list, rows: int, row_len: int, device=None) -> torch.Tensor:
    """Boolean [B, T, T] mask of the official training forward, a drop-in for M.attention_mask on replayed samples:
    per sample, prepare_attention_mask_per_sample (data_utils.py:72-103 @411d6bd) on official_layout; samples never
    see each other and padding sees itself, as in ours."""
    mask = torch.zeros(rows, row_len, row_len, dtype=torch.bool)
    for r, s in dict.fromkeys((sp[0], sp[1]) for sp in splits):
        own = [sp for sp in splits if sp[:2] == (r, s)]
        if s == -1:  # padding
            mask[r].diagonal()[own[0][2]:] = True
            continue
        at = own[0][2]
        for length, mode in official_layout(own):
            block = mask[r, at:at + length]
            if mode is not None:  # official: a split's rows see all earlier tokens of the sample, and their own split
                block[:, own[0][2]:at] = True  # causally or in full ("noise" never occurs here)
                inside = torch.ones(length, length, dtype=torch.bool)
                block[:, at:at + length] = inside.tril() if mode == "causal" else inside
            at += length
    return mask.to(device)


# ----------------------------------------------------------------------------------------------------------------------
# Replaying a rollout as a training sequence


@dataclass
class Rollout:
    prefix: list
    trace: E.Trace
    example: D.Example
    reward: float = 0.0
    parts: dict | None = None


def replay_sample(r: Rollout, steps_per_image: list[list[int]], reentry: str, model: M.Bagel,
                  vit_sizes: tuple = D.TOY_SIZES.vit) -> tuple[list, list]:
    """The exact sampled context: prefix, then per round the decoded ids (CE), and per restoration the chosen noised
    steps (nobody attends to them) followed by the re-entered image. Returns (segments, label mask per CE token)."""
    seq, mask = list(r.prefix), []
    tr = r.trace
    for i, ids in enumerate(tr.ids):
        seq.append(M.Text(ids, loss=True))
        n = len(tr.logps[i])  # sampled labels; a truncated segment's closing <|im_end|> (or a forced text) was not
        mask += [True] * n + [False] * (len(ids) + 1 - n)
        if i < len(tr.latents):
            for s in steps_per_image[i]:
                st = tr.steps[i][s]
                seq.append(M.VaeImage(st["x_t"], tr.grid, t=st["t"], droppable=False))
            seq += E.reentry_segments(model, tr.latents[i], tr.grid, reentry, vit_sizes)  # what the rollout saw
    return seq, mask


def grpo_loss(model, ref: M.Bagel | None, rollouts: list[Rollout], adv: torch.Tensor, img_adv: torch.Tensor,
              cfg: RLConfig, counter: int, rng: np.random.Generator, raw: M.Bagel, sizes: D.ImageSizes = D.TOY_SIZES):
    """One Interleaved-GRPO loss over a batch of rollouts (CLEAR §3.4): returns (loss, stats, the step counter)."""
    samples, masks, chosen = [], [], []
    for i, r in enumerate(rollouts):
        # official: one step per completion, from all its images' steps but each trajectory's last
        cands = ([(img, s) for img, st in enumerate(r.trace.steps) for s in range(len(st) - 1)]
                 if cfg.image_loss_weight > 0 else [])
        per_image = [[] for _ in r.trace.steps]
        if cands:
            img, s = cands[choose_step([r.trace.steps[a][b]["t"] for a, b in cands], cfg.step_strategy, counter, rng)]
            counter += 1
            per_image[img].append(s)
            chosen.append((i, img, s))
        seq, mask = replay_sample(r, per_image, cfg.reentry, raw, sizes.vit)
        samples.append(seq)
        masks.append(mask)
    packed = M.pack(samples, raw.cfg).to(raw.device)
    # research (--official-mask): the official training forward's mask, for the policy and the reference alike
    mask = official_mask(packed.splits, packed.rows, packed.row_len, raw.device) if cfg.official_mask else None
    out = model(packed, temperature=cfg.temperature, mask=mask)
    label_mask = torch.tensor([m for ms in masks for m in ms], dtype=torch.bool, device=raw.device)
    logp = -out.ce[label_mask]
    seq_id = packed.ce_sample[label_mask]
    old = logp.detach()  # one optimisation per rollout batch: ratio 1 (official num_iterations=1)
    a_tok = adv.to(raw.device)[seq_id]
    text_loss, clipped = ppo_clip_loss(logp, old, a_tok, cfg.epsilon)
    kl = torch.zeros_like(logp)
    if cfg.beta > 0:
        if ref is not None:
            with torch.no_grad():
                ref_logp = -ref(packed, temperature=cfg.temperature, mask=mask).ce[label_mask]
        else:
            ref_logp = old  # official: the rollout policy is its own reference
        kl = kl_k3(logp, ref_logp)
    l_text = aggregate(text_loss + cfg.beta * kl, seq_id, len(rollouts), cfg.loss_type, cfg.max_completion_length)
    l_img = out.v.sum() * 0
    if chosen:
        vs, dev = out.v.split(packed.flow_lens), raw.device
        lps = []
        for (i, img, s), v in zip(chosen, vs):
            st = rollouts[i].trace.steps[img][s]
            x_t, x_next = st["x_t"].to(dev).float()[None], st["x_next"].to(dev).float()[None]
            lps.append(flow_step_logprob(x_t, v.float()[None], x_next, st["t"], st["dt"], cfg.sde_sigma,
                                         **TRAINING_SCORE[cfg.recipe])[0])
        lps = torch.stack(lps)
        a_img = img_adv.to(dev)[[i for i, _, _ in chosen]]
        img_loss, _ = ppo_clip_loss(lps, lps.detach(), a_img, cfg.epsilon)  # ratio 1 at the only update, as officially
        l_img = l_img + img_loss.sum() / len(rollouts)  # official: a completion without an image adds 0
    loss = l_text + cfg.image_loss_weight * l_img
    img = cfg.image_loss_weight * abs(l_img.item())
    stats = {"kl": float(kl.detach().sum() / max(1, len(kl))), "clip": float(clipped.mean()) if len(clipped) else 0.0,
             "img_share": img / (abs(l_text.item()) + img + 1e-8),  # |lambda L_image| / (|L_text| + |lambda L_image|)
             "logp_drift": float(max((abs(float(a) - b) for a, b in zip(logp.tolist(), rollout_logps(rollouts))),
                                     default=0.0))}
    return loss, stats, counter


def rollout_logps(rollouts: list[Rollout]) -> list[float]:
    """The sampler's own log-probs of the scored tokens, in CE order (the replay must reproduce them)."""
    return [lp for r in rollouts for seg in r.trace.logps for lp in seg]


# ----------------------------------------------------------------------------------------------------------------------
# Rollouts and rewards


def score(rollouts: list[Rollout], clean_latents: list, cfg: RLConfig, judge=None):
    """Each rollout's reward parts and their weighted sum (official weight_map; NaN parts count 0)."""
    for r, clean in zip(rollouts, clean_latents):
        reply = E.final_text(r.trace)
        acc = accuracy_reward(reply, r.example, judge)
        parts = {"accuracy": acc, "format": format_reward(r.trace.texts),
                 "decision": decision_reward(any(D.requests_restore(t) for t in r.trace.texts), acc > 0.5,  # official
                                             cfg.decision_smooth),  # restored = <image_restore> in the completion text
                 "latent": latent_quality_reward(r.trace.latents[0] if r.trace.latents else None, clean)}
        weights = {"accuracy": cfg.w_accuracy, "format": cfg.w_format, "decision": cfg.w_decision,
                   "latent": cfg.w_latent}
        r.reward = sum(0.0 if math.isnan(v) else weights[k] * v for k, v in parts.items())  # official: NaN -> 0
        r.parts = parts


def decision_gaps(rollouts: list[Rollout], group: int) -> dict:
    """This step's restore_gaps (groups that disagreed), split by whether the question's reference answer restores."""
    gaps = restore_gaps([r.trace.restored for r in rollouts], [r.parts["accuracy"] for r in rollouts], group)
    ref = [D.requests_restore(r.example.response) for r in rollouts[::group]]
    return {"gaps_ref_restores": [round(g, 4) for g, y in zip(gaps, ref) if g is not None and y],
            "gaps_ref_keeps": [round(g, 4) for g, y in zip(gaps, ref) if g is not None and not y]}


def mean_defined(values: list) -> float:
    """Mean over the rollouts where a reward part is defined (the latent part needs a restored image); NaN if none."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def collect(model: M.Bagel, tok, examples: list, cfg: RLConfig, encode, gen: torch.Generator,
            sizes: D.ImageSizes = D.TOY_SIZES) -> list[Rollout]:
    """G rollouts per example, all rows of one batched interleaved-reasoning run (seeded, so reproducible)."""
    icfg = E.inference_config(cfg, toy=cfg.data is None, temperature=cfg.temperature, top_p=cfg.top_p, sampler="sde",
                              num_timesteps=cfg.sde_points, sde_sigma=cfg.sde_sigma, vit_transform=sizes.vit)
    prefixes = D.inference_prefix(examples, tok, encode, cfg.system, sizes)
    rows = [(p, ex) for p, ex in zip(prefixes, examples) for _ in range(cfg.group)]
    traces = E.reason(model, tok, [p for p, _ in rows], icfg, gen)
    return [Rollout(p, tr, ex) for (p, ex), tr in zip(rows, traces)]


# ----------------------------------------------------------------------------------------------------------------------


def resumed_counter(out: Path) -> int:
    """The round-robin position a resumed run continues from (nanoclear.json "counter"), checked as --resume checks
    every scalar."""
    value = CK.read_json(out / "nanoclear.json").get("counter")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CK.InputError(f"{out}/nanoclear.json: counter is {value!r}, not a count of trained denoising steps; "
                            "resume from an intact copy, or start a fresh --out")
    return value


def main(argv=None):
    cfg = parse_config(argv)
    with C.output_lock(cfg.out):  # before any work: one run per --out
        train(cfg)


def train(cfg: RLConfig):
    run = C.setup_run(cfg.device, cfg.dtype, cfg.seed, cfg.threads)
    init = cfg.init or ("out/bridge" if CK.has_checkpoint("out/bridge") else "out/sft")
    if cfg.init is None and not CK.has_checkpoint(init):
        raise CK.InputError(f"{init} has no checkpoint: run python sft.py (and python bridge.py) first, or pass --init")
    C.prepare_out(cfg, "rl", init, RESUME_MAY_CHANGE, run.main)
    model_cfg = CK.config_from_folder(init)  # a wrong --init stops here, before the data is read
    if cfg.data:  # every row checked before the model is loaded
        rows, problems = D.read_jsonl(cfg.data, cfg.images, cfg.images_anywhere)
        unscorable = {r["line"] for r in rows if D.extract_answer(r["response"]) is None
                      and (D.RESTORE_TOKEN in r["response"] or D.TAG_RE.search(r["response"]))}
        problems += [(n, "a tagged answer without <answer>...</answer>: nothing to score against")
                     for n in sorted(unscorable)]
        rows = [r for r in rows if r["line"] not in unscorable]
        if not rows:
            raise CK.InputError(f"{cfg.data}: none of its rows has an answer to score (first: line {problems[0][0]}, "
                               f"{problems[0][1]})")
        if run.main:
            print(D.skip_report(cfg.data, rows, problems, "line"))
    tok = D.Tokenizer.from_folder(init)
    E.check_positions(E.inference_config(cfg, toy=cfg.data is None), model_cfg, tok,
                      [r["question"] for r in rows] if cfg.data else D.toy_questions(), cfg.system,
                      cfg.data or "the toy world")
    model = CK.load_pretrained(init, run.device, run.dtype)
    frozen_ref = cfg.ref == "frozen" and cfg.beta > 0
    ref = CK.load_pretrained(init, run.device, run.dtype).requires_grad_(False) if frozen_ref else None
    C.freeze_encoders(model)
    encode = model.encode_pixels
    sizes = cfg.sizes(model.cfg, toy=cfg.data is None)
    opt = C.make_optimizer(model, cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    out = Path(cfg.out)
    start = CK.load_resume_state(out, model, opt) if cfg.resume else 0
    wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if run.world > 1 else model
    if cfg.data:
        stream_fn = lambda rng: (D.jsonl_example(rows[int(i)], rng)  # noqa: E731
                                 for i in iter(lambda: rng.integers(len(rows)), None))
    else:
        stream_fn = D.ToyWorld(cfg.world_seed).stream
    log = C.Log(out.with_name(out.name + ".log.jsonl"), start if start else None, run.main)
    if run.main:
        print(f"Interleaved GRPO from {init}: {cfg.prompts} questions x G={cfg.group} rollouts per step, "
              f"{cfg.steps} steps")
    t_start, counter = time.time(), resumed_counter(out) if start else 0  # round-robin step
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="rl", disable=not run.main,
               dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        rng, gen = C.step_rngs(cfg.seed, step, run.rank)
        stream = stream_fn(rng)
        examples = [next(stream) for _ in range(cfg.prompts)]
        model.eval()
        rollouts = collect(model, tok, examples, cfg, encode, gen, sizes)
        references = {id(ex): encode(D.vae_pixels(ex.clean, sizes)[None])[0][0] for ex in examples
                      if ex.clean is not None}
        clean = [references.get(id(r.example)) for r in rollouts]  # official: VAE.encode(vae_transform(clean image))
        score(rollouts, clean, cfg)
        rewards = torch.tensor([r.reward for r in rollouts])
        adv = group_advantages(rewards, cfg.group, cfg.scale_rewards)
        img_adv = adv
        if cfg.separate_image_rewards:  # official release: latent quality alone, NaN (no image) -> 0 before the mean
            quality = torch.tensor([r.parts["latent"] for r in rollouts]).nan_to_num(0.0)
            img_adv = group_advantages(quality, cfg.group, cfg.scale_rewards)
        model.train()
        C.set_lr(opt, C.lr_at(step, cfg.steps, cfg.lr, 0, 0.0))
        loss, stats, counter = grpo_loss(wrapped, ref, rollouts, adv, img_adv, cfg, counter, rng, model, sizes)
        loss.backward()
        gnorm = C.clip_and_step(model, opt, cfg.grad_clip)
        if run.main:
            parts = {k: mean_defined([r.parts[k] for r in rollouts]) for k in rollouts[0].parts}
            log({"step": step + 1, "reward": float(rewards.mean()), "reward_std": float(rewards.std()), **parts,
                 "restore": float(np.mean([r.trace.restored for r in rollouts])), **decision_gaps(rollouts, cfg.group),
                 **stats, "loss": loss.item(), "gnorm": gnorm, "s": round(time.time() - t0, 1)}, bar)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            C.save(out, run, model, opt, tok.tk, step + 1, {"stage": "rl", "args": vars(cfg), "init": init,
                                                           "counter": counter})
    bar.close()
    if run.main:
        print(f"RL finished in {time.time() - t_start:.0f} s -> {out}")
        print(decision_signal(log.path, cfg.prompts))
        if cfg.eval_n and not cfg.data:
            split = D.ToyWorld(cfg.world_seed).eval_split(cfg.eval_n, seed=cfg.eval_seed)
            icfg = E.inference_config(cfg, toy=True)
            before = CK.load_pretrained(init, run.device, run.dtype)
            names = {Path(init).name: before, "rl": model.eval()}
            print(E.toy_table(names, {n: "interleave" for n in names}, tok, split, icfg, cfg.eval_seed, cfg.system))


if __name__ == "__main__":
    C.run_cli(main)

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
  * release (the same script at the release a65d61f): + 0.15 decision reward; loss_type grpo (per-sequence token
    mean); image advantages from the latent-quality reward alone (separate_image_rewards True; NaN -> 0 before the
    group mean), which never enters the scalar reward (weight_map latent_quality 0.0).
  Both (interleave_grpo.py and the trainer, bagel_interleave_grpo_trainer.py): image_loss_weight 0.5, G = 8,
  epsilon 0.2, beta 0.04, temperature 1.0, top_p 1.0, SDE sigma 0.3 on a 20-point grid with shift 3 and no CFG,
  num_iterations 1 (ratio 1), scale_rewards False, round-robin step choice excluding each trajectory's last step,
  the training score clamped at +-50 after a blend toward (1 - t) v below t = 0.1, "restored" = <image_restore> in
  the completion text, AdamW (0.9, 0.999) lr 5e-6 cosine without warmup, 400 (head) / 200 (release) steps.

CPU (toy): python rl.py                  # from out/bridge/ (or out/sft/), ~5 min on 2 cores, writes out/rl/, then prints
                                         # the restore-decision signal (decision_signal) and a before/after table
GPU:       python rl.py --device cuda --dtype bf16 --init path/to/CLEAR-or-BAGEL --data rl.jsonl --images DIR
           torchrun --nproc_per_node 8 rl.py ... (each process rolls out its own prompts; gradients are averaged)

Differences from the official recipe (numbered; deliberate):
  1. The KL reference is a frozen copy of the starting checkpoint; the official code uses the rollout policy itself,
     which makes the KL vanish (`--ref rollout` reproduces that).
  2. The forward that scores a rollout replays its exact context (bridged latent, sampled token ids); officially the
     generated image is re-encoded through VAE + ViT, so post-image log-probs see another context.
  3. Toy-sized defaults: G = 4, 10 SDE points, 48-token segments, max_completion_length 144, 4 questions per step,
     lr 2e-5, 300 steps; the official values are in each flag's help.
  4. Accuracy is exact match (MC by letter) on the toy; a judge callable plugs in for open answers (no network).
  5. All B completions of a step form one batch for one optimiser step (officially 32 micro-steps of one completion
     accumulate into one); the loss is the same mean over completions.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import bridge
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


@dataclass
class RLConfig:
    # rollouts
    init: str | None = flag(None, "policy to start from (default out/bridge, else out/sft)", group="rollouts")
    data: str | None = flag(None, "LLaVA-style JSONL of RL questions (default: the toy world)", group="rollouts")
    images: str | None = flag(None, "image folder of --data (its image paths are relative to it)", group="rollouts")
    system: str = flag("toy", "system prompt", choices=sorted(D.SYSTEM_PROMPTS), group="rollouts")
    vae_max: int = flag(1024, "--data: VAE resize, longest side (official 1024; capped by the model's position table)", "[16, inf)", group="rollouts")
    vae_min: int = flag(512, "--data: VAE resize, shortest side (official 512)", "[16, inf)", group="rollouts")
    vit_max: int = flag(518, "--data: ViT resize, longest side (official 518; capped by the model's position table)", "[14, inf)", group="rollouts")
    vit_min: int = flag(224, "--data: ViT resize, shortest side (official 224)", "[14, inf)", group="rollouts")
    prompts: int = flag(4, "questions per step (and process)", "[1, inf)", group="rollouts")
    group: int = flag(4, "rollouts per question, G (official 8); advantages need at least 2", "[2, inf)", group="rollouts")
    temperature: float = flag(1.0, "text sampling temperature (official 1.0)", "(0, inf)", group="rollouts")
    top_p: float = flag(1.0, "nucleus sampling (official 1.0)", "(0, 1]", group="rollouts")
    max_rounds: int = flag(3, "text segments per rollout (official max_inter_num 3)", "[1, inf)", group="rollouts")
    max_text_tokens: int = flag(48, "tokens per segment (official 4096)", "[1, inf)", group="rollouts")
    sde_points: int = flag(10, "SDE grid points, N-1 steps (official 20)", "[2, inf)", group="rollouts")
    timestep_shift: float = flag(3.0, "timestep shift of the SDE grid (official 3)", "(0, inf)", group="rollouts")
    sde_sigma: float = flag(0.3, "constant SDE noise level (official 0.3)", "(0, inf)", group="rollouts")
    reentry: str = flag("bridge", "how the restored image re-enters", choices=bridge.REENTRY[:2], group="rollouts")
    # rewards
    recipe: str = flag("head", "official preset (module docstring): head or release", choices=list(RECIPES), group="rewards")
    w_accuracy: float = flag(0.75, "accuracy reward weight (official 0.75)", "[0, inf)", group="rewards")
    w_format: float = flag(0.10, "format reward weight (official 0.10)", "[0, inf)", group="rewards")
    w_decision: float = flag(0.0, "decision reward weight (official head 0, release 0.15)", "[0, inf)", group="rewards")
    w_latent: float = flag(0.0, "latent-quality weight in the scalar reward (official 0.0)", "[0, inf)", group="rewards")
    decision_smooth: bool = flag(False, "1.0/0.5/0.5/-0.2 decision table (official False)", group="rewards")
    separate_image_rewards: bool = flag(False, "image advantages from the latent-quality reward (official head False, "
                                        "release True)", group="rewards")
    # loss
    loss_type: str = flag("dr_grpo", "token aggregation (official head dr_grpo, release grpo)", choices=["grpo", "dr_grpo"], group="loss")
    max_completion_length: int = flag(144, "Dr.GRPO denominator per completion (official 16384)", "[1, inf)", group="loss")
    scale_rewards: bool = flag(False, "divide advantages by the group std", group="loss")
    epsilon: float = flag(0.2, "PPO clip range", "(0, 1)", group="loss")
    beta: float = flag(0.04, "KL weight (k3 estimator)", "[0, inf)", group="loss")
    ref: str = flag("frozen", "KL reference: frozen start checkpoint or the rollout policy (official)",
                    choices=["frozen", "rollout"], group="loss")
    image_loss_weight: float = flag(0.5, "lambda of the Flow-GRPO term (official 0.5)", "[0, inf)", group="loss")
    step_strategy: str = flag("round_robin", "which denoising step of a completion is trained (official round_robin)",
                              choices=["round_robin", "random", "weighted"], group="loss")
    # optimisation
    steps: int = flag(300, "optimiser steps (official 400)", "[1, inf)", group="optimisation")
    lr: float = flag(2e-5, "learning rate, cosine, no warmup (official 5e-6)", "(0, inf)", group="optimisation")
    grad_clip: float = flag(1.0, "gradient-norm clip", "(0, inf)", group="optimisation")
    # run
    out: str = flag("out/rl", "output checkpoint folder")
    resume: bool = flag(False, "continue from --out's train_state")
    resume_force: bool = flag(False, "with --resume: continue although settings differ from the checkpoint's (printed)")
    save_every: int = flag(20, "checkpoint every N steps", "[1, inf)")
    seed: int = flag(0, "seed of the rollouts and the data", C.SEED)
    device: str = flag("auto", "auto | cpu | cuda | mps")
    dtype: str = flag("auto", "auto | fp32 | bf16", choices=["auto", *C.DTYPES])
    threads: int = flag(0, "CPU threads for torch (0 = its default)", "[0, inf)")
    world_seed: int = flag(0, "toy world seed", C.SEED)
    eval_n: int = flag(192, "held-out toy questions per severity for the final table (0 = skip)", "[0, inf)")
    eval_seed: int = flag(0, "held-out split seed", C.SEED)


# what --resume lets differ from the checkpoint's settings: more --steps (extends the run), where it runs, the final
# table; anything else (seed, lr, rewards, rollouts, --init, ...) would not continue the same run
RESUME_MAY_CHANGE = ("steps", "save_every", "threads", "device", "out", "resume", "resume_force", "eval_n", "eval_seed")


def parse_config(argv=None) -> RLConfig:
    """Flags -> RLConfig: the recipe's values where no flag was given; out-of-range values and flags that would have
    no effect are refused."""
    cfg, prog, given = C.parse_flags(RLConfig, __doc__, argv)
    cfg = replace(cfg, **{k: v for k, v in RECIPES[cfg.recipe].items() if k not in given})
    if (cfg.data is None) != (cfg.images is None):
        C.refuse(prog, "--data and --images go together: the JSONL's image paths are relative to --images")
    if cfg.data is not None:
        C.refuse_given(prog, given, ("world_seed", "eval_n", "eval_seed"), "with --data (the toy world is not used)")
    else:
        C.refuse_given(prog, given, ("vae_max", "vae_min", "vit_max", "vit_min"), f"on the toy world (its pictures are {D.MODEL_SIZE} px)")
        if cfg.eval_n == 0:
            C.refuse_given(prog, given, ("eval_seed",), "with --eval-n 0 (no final table)")
    if cfg.loss_type == "grpo":
        C.refuse_given(prog, given, ("max_completion_length",), "with --loss-type grpo (only dr_grpo divides by it)")
    if not cfg.resume:
        C.refuse_given(prog, given, ("resume_force",), "without --resume")
    if cfg.beta == 0:
        C.refuse_given(prog, given, ("ref",), "with --beta 0 (no KL term)")
    if cfg.image_loss_weight == 0:
        C.refuse_given(prog, given, ("step_strategy", "separate_image_rewards"), "with --image-loss-weight 0 (no Flow-GRPO term)")
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
        return float(min(1.0, max(0.0, judge(example.question, reply.strip() if pred is None else pred, example.answer))))
    return float(D.is_correct(reply, example))


def format_reward(texts: list[str]) -> float:
    """0.35 for a complete <think>, 0.35 for a complete <answer>, 0.3 for think before answer (official format_reward_v2)."""
    s = " ".join(texts)
    r = 0.35 * bool(re.search(r"<think>.+?</think>", s, re.DOTALL)) + 0.35 * bool(re.search(r"<answer>.+?</answer>", s, re.DOTALL))
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
    """A_i = R_i - mean of its group (official: scale_rewards=False); optionally divided by the group std."""
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
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    # .get: steps logged by an older rl.py (a resumed run) have no gaps
    split = {"reference restores": [g for rec in records for g in rec.get("gaps_ref_restores", [])],
             "reference does not": [g for rec in records for g in rec.get("gaps_ref_keeps", [])]}
    every = split["reference restores"] + split["reference does not"]
    line = f"restore decision signal: the rollouts disagreed on restoring in {len(every)} of {len(records) * prompts} groups"
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


def flow_step_logprob(x_t, v, x_next, t: float, dt: float, sigma: float):
    """Log-probability of a recorded SDE step under the current velocity, in the official training form: below
    t = 0.1 the score is blended toward (1 - t) v with weight t / 0.1, then clamped to +-50 (the rollout used +-100)."""
    score = (x_t + (1 - t) * v) / max(t, 1e-4)  # official: t_safe = max(t, 1e-4)
    if t < 0.1:  # official: weight * (1 - t) v + (1 - weight) * standard score, weight = t / 0.1
        w = t / 0.1
        score = w * (1 - t) * v + (1 - w) * score
    mean = x_t - (v + 0.5 * sigma ** 2 * score.clamp(-50.0, 50.0)) * dt  # official: clamp after the blend
    return M.sde_step_logprob(x_next, mean, sigma, dt)


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
            if reentry == "bridge":
                seq.append(M.VaeImage(tr.latents[i], tr.grid, droppable=False))  # CLEAR §3.3: what the rollout saw
            else:
                picture = D.resize_image(bridge.decode_image(model, tr.latents[i], tr.grid), *vit_sizes)
                seq.append(M.VitImage(D.image_to_tensor(picture), droppable=False))
    return seq, mask


def grpo_loss(model, ref: M.Bagel | None, rollouts: list[Rollout], adv: torch.Tensor, img_adv: torch.Tensor,
              cfg: RLConfig, counter: int, rng: np.random.Generator, raw: M.Bagel, sizes: D.ImageSizes = D.TOY_SIZES):
    """One Interleaved-GRPO loss over a batch of rollouts (CLEAR §3.4): returns (loss, stats, the step counter)."""
    samples, masks, chosen = [], [], []
    for i, r in enumerate(rollouts):
        # official: one step per completion, from all its images' steps but each trajectory's last
        cands = [(img, s) for img, st in enumerate(r.trace.steps) for s in range(len(st) - 1)] if cfg.image_loss_weight > 0 else []
        per_image = [[] for _ in r.trace.steps]
        if cands:
            img, s = cands[choose_step([r.trace.steps[a][b]["t"] for a, b in cands], cfg.step_strategy, counter, rng)]
            counter += 1
            per_image[img].append(s)
            chosen.append((i, img, s))
        seq, mask = replay_sample(r, per_image, cfg.reentry, raw, sizes.vit)
        samples.append(seq), masks.append(mask)
    packed = M.pack(samples, raw.cfg).to(raw.device)
    out = model(packed, temperature=cfg.temperature)
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
                ref_logp = -ref(packed, temperature=cfg.temperature).ce[label_mask]
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
            lps.append(flow_step_logprob(st["x_t"].to(dev)[None], v.float()[None], st["x_next"].to(dev)[None], st["t"], st["dt"], cfg.sde_sigma)[0])
        lps = torch.stack(lps)
        a_img = img_adv.to(dev)[[i for i, _, _ in chosen]]
        img_loss, _ = ppo_clip_loss(lps, lps.detach(), a_img, cfg.epsilon)  # ratio 1 at the only update, as officially
        l_img = l_img + img_loss.sum() / len(rollouts)  # official: a completion without an image adds 0
    loss = l_text + cfg.image_loss_weight * l_img
    img = cfg.image_loss_weight * abs(l_img.item())
    stats = {"kl": float(kl.detach().sum() / max(1, len(kl))), "clip": float(clipped.mean()) if len(clipped) else 0.0,
             "img_share": img / (abs(l_text.item()) + img + 1e-8),  # |lambda L_image| / (|L_text| + |lambda L_image|)
             "logp_drift": float(max((abs(float(a) - b) for a, b in zip(logp.tolist(), rollout_logps(rollouts))), default=0.0))}
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
        weights = {"accuracy": cfg.w_accuracy, "format": cfg.w_format, "decision": cfg.w_decision, "latent": cfg.w_latent}
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
    icfg = E.InferenceConfig(reentry=cfg.reentry, max_rounds=cfg.max_rounds, max_text_tokens=cfg.max_text_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, sampler="sde",
                             num_timesteps=cfg.sde_points, timestep_shift=cfg.timestep_shift, sde_sigma=cfg.sde_sigma,
                             vit_transform=sizes.vit)
    prefixes = D.inference_prefix(examples, tok, encode, cfg.system, sizes)
    rows = [(p, ex) for p, ex in zip(prefixes, examples) for _ in range(cfg.group)]
    traces = E.reason(model, tok, [p for p, _ in rows], icfg, gen)
    return [Rollout(p, tr, ex) for (p, ex), tr in zip(rows, traces)]


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(argv)
    run = C.setup_run(cfg.device, cfg.dtype, cfg.seed, cfg.threads)
    init = cfg.init or ("out/bridge" if (Path("out/bridge") / "ema.safetensors").exists() else "out/sft")
    if cfg.init is None and not (Path(init) / "ema.safetensors").exists():
        raise M.InputError(f"{init} has no checkpoint: run python sft.py (and python bridge.py) first, or pass --init")
    if cfg.resume:  # before any work: --out must hold this very run
        C.check_resume(cfg.out, "rl", {**vars(cfg), "init": init}, RESUME_MAY_CHANGE, cfg.resume_force, run)
    else:  # or be a folder the first save may replace
        C.check_out(cfg.out, init)
    M.config_from_folder(init)  # a wrong --init stops here, before the data is read
    if cfg.data:  # every row checked before the model is loaded
        rows, problems = D.read_jsonl(cfg.data, cfg.images)
        unscorable = {r["line"] for r in rows if D.extract_answer(r["response"]) is None
                      and (D.RESTORE_TOKEN in r["response"] or D.TAG_RE.search(r["response"]))}
        problems += [(n, "a tagged answer without <answer>...</answer>: nothing to score against") for n in sorted(unscorable)]
        rows = [r for r in rows if r["line"] not in unscorable]
        if not rows:
            raise M.InputError(f"{cfg.data}: none of its rows has an answer to score (first: line {problems[0][0]}, "
                               f"{problems[0][1]})")
        if run.main:
            print(D.skip_report(cfg.data, rows, problems, "line"))
    model = M.load_pretrained(init, run.device, run.dtype)
    tok = D.Tokenizer.from_folder(init)
    ref = M.load_pretrained(init, run.device, run.dtype).requires_grad_(False) if cfg.ref == "frozen" and cfg.beta > 0 else None
    C.freeze_encoders(model)
    encode = model.encode_pixels
    sizes = D.image_sizes(model.cfg, (cfg.vae_max, cfg.vae_min), (cfg.vit_max, cfg.vit_min)) if cfg.data else \
        D.image_sizes(model.cfg, *D.TOY_SIDES)
    opt = C.make_optimizer(model, cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    out = Path(cfg.out)
    start = C.load_resume_state(out, model, None, opt) if cfg.resume else 0
    wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if run.world > 1 else model
    if cfg.data:
        stream_fn = lambda rng: (D.jsonl_example(rows[int(i)], rng) for i in iter(lambda: rng.integers(len(rows)), None))  # noqa: E731
    else:
        stream_fn = D.ToyWorld(cfg.world_seed).stream
    log = C.Log(out.with_name(out.name + ".log.jsonl"), start if start else None, run.main)
    if run.main:
        print(f"Interleaved GRPO from {init}: {cfg.prompts} questions x G={cfg.group} rollouts per step, {cfg.steps} steps")
    t_start, counter = time.time(), M.read_json(out / "nanoclear.json")["counter"] if start else 0  # round-robin position
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="rl", disable=not run.main,
               dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        rng, gen = C.step_rngs(cfg.seed, step, run.rank)
        stream = stream_fn(rng)
        examples = [next(stream) for _ in range(cfg.prompts)]
        model.eval()
        rollouts = collect(model, tok, examples, cfg, encode, gen, sizes)
        references = {id(ex): encode(D.vae_pixels(ex.clean, sizes)[None])[0][0] for ex in examples if ex.clean is not None}
        clean = [references.get(id(r.example)) for r in rollouts]  # official: VAE.encode(vae_transform(clean image))
        score(rollouts, clean, cfg)
        rewards = torch.tensor([r.reward for r in rollouts])
        adv = group_advantages(rewards, cfg.group, cfg.scale_rewards)
        img_adv = adv
        if cfg.separate_image_rewards:  # official release: latent quality alone, NaN (no image) -> 0 before the mean
            quality = torch.tensor([r.parts["latent"] for r in rollouts]).nan_to_num(0.0)
            img_adv = group_advantages(quality, cfg.group, cfg.scale_rewards)
        model.train()
        for g_ in opt.param_groups:
            g_["lr"] = C.lr_at(step, cfg.steps, cfg.lr, 0, 0.0)
        loss, stats, counter = grpo_loss(wrapped, ref, rollouts, adv, img_adv, cfg, counter, rng, model, sizes)
        loss.backward()
        gnorm = C.clip_and_step(model, opt, cfg.grad_clip)
        if run.main:
            parts = {k: mean_defined([r.parts[k] for r in rollouts]) for k in rollouts[0].parts}
            log({"step": step + 1, "reward": float(rewards.mean()), "reward_std": float(rewards.std()), **parts,
                 "restore": float(np.mean([r.trace.restored for r in rollouts])), **decision_gaps(rollouts, cfg.group),
                 **stats, "loss": loss.item(), "gnorm": gnorm, "s": round(time.time() - t0, 1)}, bar)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            C.save_checkpoint(out, model, None, opt, tok.tk, step + 1, {"stage": "rl", "args": vars(cfg), "init": init,
                                                                        "counter": counter}, run)
            if run.world > 1:
                dist.barrier()
    bar.close()
    if run.main:
        print(f"RL finished in {time.time() - t_start:.0f} s -> {out}")
        print(decision_signal(log.path, cfg.prompts))
        if cfg.eval_n and not cfg.data:
            split = D.ToyWorld(cfg.world_seed).eval_split(cfg.eval_n, seed=cfg.eval_seed)
            icfg = E.InferenceConfig(reentry=cfg.reentry, max_text_tokens=cfg.max_text_tokens, num_timesteps=10)  # official CFG
            before = M.load_pretrained(init, run.device, run.dtype)
            names = {Path(init).name: before, "rl": model.eval()}
            print(E.toy_table(names, {n: "interleave" for n in names}, tok, split, icfg, cfg.eval_seed, cfg.system))


if __name__ == "__main__":
    C.run_cli(main)

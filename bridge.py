"""
Stage 2 of CLEAR (§3.3): the Latent Representation Bridge — how it is trained, and what it buys.

After the model denoises a restored image, its final latent x0 could go back into the context the long way: decode
to pixels with the VAE, re-encode them with the ViT (and the VAE), insert those tokens. The bridge skips the detour:

    b(x0) = vae2llm(x0) + time_embedder(0) + latent_pos_embed(pos)                      (model.Bagel.embed_latent)

written into the KV cache as one full-attention image block through the gen expert (one RoPE id, markers through
und): exactly how a clean VAE conditioning image enters BAGEL, so no new parameter exists. It saves the decode and
the re-encode, and keeps the graph differentiable from the answer back into the denoiser. `engine.reentry_segments` is
the switch between the bridge and the detour; every inference (evaluation, RL rollouts and their replay, the tables)
goes through it.

The model reads ViT features of a picture better than VAE latents of it, so Stage 2 teaches it to read latents as
well: in every restore sample the clean picture appears as VAE tokens (student, gen expert, t = 0) and as ViT tokens
whose patch grid equals the VAE grid (teacher, und expert, detached) (sft.distill_pair, the official enable_distill
layout). The distillation loss (`distill_loss`), added to Stage 1's losses and normalised by the global number of
pairs (`step_loss`), trains through Stage 1's loop (sft.train):
  * per_layer_kl (official HEAD): at every layer l (or every stride-th, plus the last), per token,
        KL( softmax(stopgrad(H_vit[l])) || softmax(H_vae[l]) ) over the hidden dim, weighted (l + 1) / sum;
  * final_mse (official release): MSE between mean-pooled final hidden states.

CPU (toy):  python bridge.py            # from out/sft/: Stage 2 (SFT + 0.4 distill) -> out/bridge/, then accuracy
                                        # with bridge vs decode-reencode (SFT and Stage 2) and the re-entry latency
            python bridge.py --init out/base --steps 600 --lr 5e-4   # the official "one job": Stages 1 and 2 at once
GPU:        python bridge.py --device cuda --dtype bf16 --init path/to/sft-checkpoint --data sft.jsonl --images DIR

Differences from the official code (numbered):
  1. Officially there is no Stage-2 script: the distillation runs inside the SFT job. Here it is its own stage (with
     the SFT losses kept on so nothing is forgotten); started from the base with Stage 1's settings it is that one job.
  2. Toy-sized defaults on the toy world; with --data every default is the official value of --recipe (sft.RECIPES),
     and the distillation is the recipe's on both (DISTILL).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

import common as C
import data as D
import engine as E
import model as M
import sft
from common import flag

# ----------------------------------------------------------------------------------------------------------------------
# Settings: Stage 1's, plus the distillation


@dataclass
class BridgeConfig(sft.SFTConfig):
    recipe: str = flag("head", "the official run whose distillation is the default (DISTILL), and with --data all its "
                       "values: head (scripts/train_mix.sh at HEAD 411d6bd) or release (at a65d61f)",
                       choices=["head", "release"], group="optimisation")
    distill_weight: float = flag(0.4, "ViT->VAE distillation weight (official HEAD 0.4, release 0.1; --recipe's)",
                                 "[0, inf)", group="objective")
    distill_mode: str = flag("per_layer_kl", "distillation variant (official HEAD per_layer_kl, release final_mse; "
                             "--recipe's)", choices=["per_layer_kl", "final_mse"], group="objective")
    distill_stride: int = flag(1, "per_layer_kl: every stride-th layer plus the last (official HEAD 1)", "[1, inf)",
                               group="objective")


BRIDGE_DEFAULTS = dict(steps=400, lr=2e-4, init="out/sft", out="out/bridge")
DISTILL = {  # each recipe's distillation, the defaults of the flags not given (toy world and --data alike)
    "head": dict(distill_weight=0.4, distill_mode="per_layer_kl", distill_stride=1),  # train_mix.sh:25-27, 13-14
    "release": dict(distill_weight=0.1,  # train_mix.sh:17 @a65d61f
                    distill_mode="final_mse"),  # its only mode: modeling/bagel/bagel.py:288-305 @a65d61f
}


def parse_config(argv=None) -> BridgeConfig:
    """Flags -> BridgeConfig: Stage 1's checks (sft.check_config), then the distillation's: --recipe's for the flags
    not given."""
    cfg, prog, given = C.parse_flags(BridgeConfig, __doc__, argv, {**sft.SFT_DEFAULTS, **BRIDGE_DEFAULTS})
    cfg = sft.check_config(cfg, prog, given)
    cfg = replace(cfg, **{k: v for k, v in DISTILL[cfg.recipe].items() if k not in given})
    C.refuse_given(prog, given, ("reentry",), "in this script (its table compares both re-entry paths)")
    if cfg.distill_weight == 0:
        C.refuse_given(prog, given, ("distill_mode", "distill_stride"), "without --distill-weight > 0")
    elif cfg.distill_mode == "final_mse":
        C.refuse_given(prog, given, ("distill_stride",), "with --distill-mode final_mse (it reads the last layer only)")
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Training the bridge: ViT -> VAE hidden-state distillation (CLEAR §3.3; official Bagel.forward distill_fn)


def distill_layer_weights(num_layers: int, stride: int = 1) -> dict:
    """Layers {stride-1, 2 stride-1, ...} plus the last, weighted (l+1)/sum (CLEAR §3.3, per_layer_kl)."""
    layers = sorted(set(range(stride - 1, num_layers, stride)) | {num_layers - 1})
    total = sum(l + 1 for l in layers)  # noqa: E741
    return {l: (l + 1) / total for l in layers}  # noqa: E741


def distill_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(stopgrad(teacher)) || softmax(student)) over the hidden dim (CLEAR §3.3)."""
    log_p = torch.log_softmax(teacher.detach().float(), dim=-1)
    log_q = torch.log_softmax(student.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # = F.kl_div(log_q, log_p, log_target=True, 'batchmean')


def distill_final_mse(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """MSE between mean-pooled final hidden states, teacher detached (CLEAR release: final_mse)."""
    return (teacher.detach().float().mean(0) - student.float().mean(0)).pow(2).mean()


def distill_loss(pairs: list, num_layers: int, mode: str, stride: int):
    """(hidden_hook, finish): per_layer_kl collects its terms after every decoder layer during the forward (official
    distill_fn); final_mse reads the final hidden states after it. finish(out) sums the pairs' terms."""
    terms = []
    if mode == "per_layer_kl":
        weights = distill_layer_weights(num_layers, stride)

        def hook(layer, h):  # CLEAR §3.3: after every decoder layer, ViT tokens teach VAE tokens of the same picture
            if layer in weights:
                terms.append(weights[layer] * sum(distill_kl(h[v], h[a]) for v, a in pairs))

        return hook, lambda out: sum(terms)
    if mode == "final_mse":
        return None, lambda out: sum(distill_final_mse(out.hidden[v], out.hidden[a]) for v, a in pairs)
    raise ValueError(f"distill mode must be per_layer_kl or final_mse, not {mode!r}")


def step_loss(model, packed: M.Packed, run: C.Run, cfg: BridgeConfig):
    """Stage 2's objective of one packed batch: Stage 1's (sft.step_loss) + distill_weight * the distillation,
    normalised by the global number of pairs (CLEAR)."""
    n_pairs = C.all_reduce_sum(len(packed.pairs), run) if cfg.distill_weight > 0 else 0  # every rank joins the sum
    hook, finish = None, None
    if cfg.distill_weight > 0 and packed.pairs:
        hook, finish = distill_loss(packed.pairs, C.unwrap(model).cfg.num_hidden_layers, cfg.distill_mode,
                                    cfg.distill_stride)
    loss, metrics, out = sft.step_loss(model, packed, run, cfg, hidden_hook=hook)
    if finish is not None:
        distill = finish(out) / max(n_pairs, 1.0)
        loss = loss + cfg.distill_weight * distill
        metrics["distill"] = float(distill.detach()) * run.world
    elif cfg.distill_weight > 0:
        loss = loss + 0 * out.hidden.sum()  # keeps every rank's graph the same shape (official dummy pass)
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------------
# What the bridge buys: accuracy and latency of each re-entry path


@torch.no_grad()
def reentry_latency(model: M.Bagel, grid: tuple, context: int, repeats: int = 7) -> dict:
    """Median seconds of one restoration's re-entry step, each path measured side by side on the same context."""
    cfg = model.cfg
    cache = model.new_cache(capacity=context + 4 * (grid[0] * grid[1] + 2))
    model.add_text(cache, [[cfg.bos_token_id] * (context - 2)])
    x0 = torch.randn(1, grid[0] * grid[1], cfg.patch_latent_dim, device=model.device)
    s = cfg.latent_downsample
    vit = (max(grid) * s, min(grid) * s, cfg.vit_patch_size)  # re-encode at the picture's own size
    times = {r: [] for r in E.REENTRY}
    for _ in range(repeats):
        for reentry in E.REENTRY:
            trial = cache.copy()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            E.reenter(model, trial, x0, grid, torch.ones(1, dtype=torch.bool), reentry, vit)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times[reentry].append(time.perf_counter() - t0)
    return {r: statistics.median(v[1:]) for r, v in times.items()}  # the first round is warm-up


def compare_reentry(models: dict, tok, cfg: BridgeConfig) -> str:
    """Accuracy at hard, where restorations are most frequent, with each re-entry path, for every checkpoint
    (markdown; evaluate.py compares them at every severity, paired)."""
    split = {"hard": D.ToyWorld(cfg.world_seed).eval_split(cfg.eval_n, seed=cfg.eval_seed)["hard"]}
    lines = ["| model | re-entry | hard | restore hard |", "|---|---|---|---|"]
    bar = tqdm(total=2 * len(models) * cfg.eval_n, leave=False, dynamic_ncols=True, unit="question")
    for name, model in models.items():
        for reentry in ("bridge", "decode_reencode"):
            icfg = E.inference_config(cfg, toy=True, reentry=reentry)
            bar.set_description(f"table: {name}, {reentry}")
            res = E.benchmark(model, tok, split, "interleave", icfg, model.encode_pixels, seed=cfg.eval_seed,
                              system=cfg.system, bar=bar)
            hard = res["hard"]
            lines.append(f"| {name} | {reentry} | {100 * hard['acc']:.1f} | {100 * hard['restore']:.0f}% |")
    bar.close()
    return "\n".join(lines)


def main(argv=None):
    cfg = parse_config(argv)
    with C.output_lock(cfg.out):  # before any work: one run per --out
        start, tuned, tok = sft.train(cfg, "bridge", step_loss, distill=cfg.distill_weight > 0)
    if start is None:
        return
    print(compare_reentry({"sft": start, "bridge": tuned}, tok, cfg))
    grid = (D.MODEL_SIZE // tuned.cfg.latent_downsample,) * 2  # the toy picture's latent grid
    lat = reentry_latency(tuned, grid, context=200)
    print(f"re-entry of one restored {grid[0]}x{grid[1]}-token image on {tuned.device} (median of 6): "
          + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in lat.items())
          + f" | decode_reencode / bridge = {lat['decode_reencode'] / lat['bridge']:.1f}x")


if __name__ == "__main__":
    C.run_cli(main)

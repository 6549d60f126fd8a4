"""
Stage 2 of CLEAR (§3.3): the Latent Representation Bridge — train it, switch it against decode-reencode, measure both.

After the model denoises a restored image, its final latent x0 could go back into the context the long way: decode
to pixels with the VAE, re-encode them with the ViT (and the VAE), insert those tokens. The bridge skips the detour:

    b(x0) = vae2llm(x0) + time_embedder(0) + latent_pos_embed(pos)        (model.Bagel.embed_latent at t = 0)

written into the KV cache as one full-attention image block through the gen expert (one RoPE id, markers through
und): exactly how a clean VAE conditioning image enters BAGEL, so no new parameter exists. It saves the decode and
the re-encode, and keeps the graph differentiable from the answer back into the denoiser (RL can use that).

The model reads ViT features of a picture better than VAE latents of it, so Stage 2 teaches it to read latents as
well: in every restore sample the clean picture appears as VAE tokens (student, gen expert, t = 0) and as ViT tokens
whose patch grid equals the VAE grid (teacher, und expert, detached). The distillation loss, added to the SFT losses:
  * per_layer_kl (official HEAD): at every layer l (or every stride-th, plus the last), per token,
        KL( softmax(stopgrad(H_vit[l])) || softmax(H_vae[l]) ) over the hidden dim, weighted (l + 1) / sum;
  * final_mse (official release): MSE between mean-pooled final hidden states.

CPU (toy):  python bridge.py            # from out/sft/: Stage 2 (SFT + 0.4 distill) ~10 min -> out/bridge/, then
                                        # accuracy with bridge vs decode-reencode (SFT and Stage 2) and re-entry latency
            python sft.py --distill-weight 0.4   # the official "one job" form: Stages 1 and 2 in a single run
GPU:        python bridge.py --device cuda --dtype bf16 --init path/to/sft-checkpoint --data sft.jsonl --images DIR

Differences from the official code (numbered):
  1. Officially there is no Stage-2 script: the distillation runs inside the SFT job. Here it is its own stage (with
     the SFT losses kept on so nothing is forgotten), and sft.py takes the same flags for the one-job form.
  2. Toy-sized defaults; official values in the flags' help.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import common as C
import data as D
import engine as E
import model as M


def bridge_embedding(model: M.Bagel, x0: torch.Tensor, grid: tuple) -> torch.Tensor:
    """b(x0) = vae2llm(x0) + time_embedder(0) + latent_pos_embed(pos): the LLM input rows of a bridged latent [N, H]."""
    pos = M.vit_position_ids(*grid, model.cfg.max_latent_size, model.device)
    return model.embed_latent(x0, torch.zeros(len(x0), device=model.device), pos)  # CLEAR §3.3: t = 0, like a clean VAE image


def teacher_size(grid: tuple, vit_patch: int) -> tuple[int, int]:
    """(w, h) in pixels of the teacher ViT image whose patch grid equals the VAE token grid (CLEAR enable_distill)."""
    return grid[1] * vit_patch, grid[0] * vit_patch


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
            E.reenter(model, trial, x0, grid, torch.ones(1, dtype=torch.bool), E.InferenceConfig(reentry=reentry, vit_transform=vit))
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times[reentry].append(time.perf_counter() - t0)
    return {r: statistics.median(v[1:]) for r, v in times.items()}  # the first round is warm-up


def compare_reentry(models: dict, tok, args) -> str:
    """Accuracy at mid and hard with each re-entry path, for every checkpoint (markdown)."""
    split = D.ToyWorld(args.world_seed).eval_split(args.eval_n, seed=args.eval_seed)
    split = {k: split[k] for k in ("mid", "hard")}
    lines = ["| model | re-entry | mid | hard | restore mid / hard |", "|---|---|---|---|---|"]
    for name, model in models.items():
        for reentry in ("bridge", "decode_reencode"):
            icfg = E.InferenceConfig(reentry=reentry, max_text_tokens=args.max_text_tokens, num_timesteps=args.eval_steps,
                                     cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale,
                                     vit_transform=D.TOY_SIZES.vit)
            res = E.benchmark(model, tok, split, "interleave", icfg, model.encode_pixels, seed=args.eval_seed, system=args.system)
            lines.append(f"| {name} | {reentry} | {100 * res['mid']['acc']:.1f} | {100 * res['hard']['acc']:.1f} | "
                         f"{100 * res['mid']['restore']:.0f}% / {100 * res['hard']['restore']:.0f}% |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_finetune_args(p, steps=400, lr=2e-4, distill_weight=0.4, init="out/sft", out="out/bridge")
    args = p.parse_args()
    start, tuned, tok = C.finetune(args, "bridge")
    if start is None:
        return
    print(compare_reentry({"sft": start, "bridge": tuned}, tok, args))
    grid = (8, 8)
    lat = reentry_latency(tuned, grid, context=200)
    print(f"re-entry of one restored {grid[0]}x{grid[1]}-token image on {tuned.device} (median of 6): "
          + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in lat.items())
          + f" | decode_reencode / bridge = {lat['decode_reencode'] / lat['bridge']:.1f}x")


if __name__ == "__main__":
    main()

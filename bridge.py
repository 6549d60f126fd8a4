"""
Stage 2 of CLEAR (§3.3): the Latent Representation Bridge — what it is, how it is trained, and what it buys.

After the model denoises a restored image, its final latent x0 could go back into the context the long way: decode
to pixels with the VAE, re-encode them with the ViT (and the VAE), insert those tokens. The bridge skips the detour:

    b(x0) = vae2llm(x0) + time_embedder(0) + latent_pos_embed(pos)                      (bridge_embedding)

written into the KV cache as one full-attention image block through the gen expert (one RoPE id, markers through
und): exactly how a clean VAE conditioning image enters BAGEL, so no new parameter exists. It saves the decode and
the re-encode, and keeps the graph differentiable from the answer back into the denoiser. `reenter` is the switch
between the bridge and the detour; every inference (evaluation, RL rollouts, the tables) goes through it.

The model reads ViT features of a picture better than VAE latents of it, so Stage 2 teaches it to read latents as
well: in every restore sample the clean picture appears as VAE tokens (student, gen expert, t = 0) and as ViT tokens
whose patch grid equals the VAE grid (teacher, und expert, detached) (`distill_pair`). The distillation loss, added
to the SFT losses (sft.py's trainer, normalised by the global number of pairs):
  * per_layer_kl (official HEAD): at every layer l (or every stride-th, plus the last), per token,
        KL( softmax(stopgrad(H_vit[l])) || softmax(H_vae[l]) ) over the hidden dim, weighted (l + 1) / sum;
  * final_mse (official release): MSE between mean-pooled final hidden states.

CPU (toy):  python bridge.py            # from out/sft/: Stage 2 (SFT + 0.4 distill) -> out/bridge/, then accuracy
                                        # with bridge vs decode-reencode (SFT and Stage 2) and the re-entry latency
            python sft.py --distill-weight 0.4   # the official "one job" form: Stages 1 and 2 in a single run
GPU:        python bridge.py --device cuda --dtype bf16 --init path/to/sft-checkpoint --data sft.jsonl --images DIR

Differences from the official code (numbered):
  1. Officially there is no Stage-2 script: the distillation runs inside the SFT job. Here it is its own stage (with
     the SFT losses kept on so nothing is forgotten), and sft.py takes the same flags for the one-job form.
  2. Toy-sized defaults; official values in the flags' help.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

import data as D
import model as M

REENTRY = ("bridge", "decode_reencode", "decode_reencode_vae")

# ----------------------------------------------------------------------------------------------------------------------
# The bridge and the re-entry switch


def bridge_embedding(model: M.Bagel, x0: torch.Tensor, grid: tuple) -> torch.Tensor:
    """b(x0) = vae2llm(x0) + time_embedder(0) + latent_pos_embed(pos): LLM input rows [B, N, H] of latents [B, N, D]."""
    return model.latent_embedding(x0, 0.0, grid)  # CLEAR §3.3: t = 0, exactly like a clean VAE conditioning image


def decode_image(model: M.Bagel, x0: torch.Tensor, grid: tuple):
    """Restored latent tokens [N, D] -> the 8-bit PIL picture (BAGEL decode_image): the detour's first half."""
    return D.tensor_to_image(model.decode_latent(x0, grid))


def reenter(model: M.Bagel, cache: M.KVCache, x0: torch.Tensor, grid: tuple, rows: torch.Tensor, reentry: str,
            vit_sizes: tuple):
    """Put restored latents x0 [B, N, D] back into the context of the selected rows [B] (bool):
      * bridge: b(x0) through the gen expert (CLEAR §3.3; official output_need_vae);
      * decode_reencode: x0 -> VAE decoder -> 8-bit picture -> ViT at vit_sizes (official output_need_vit);
      * decode_reencode_vae: the same, through the VAE as well as the ViT (BAGEL's update_context_image)."""
    if reentry == "bridge":
        model.add_latent_embedding(cache, bridge_embedding(model, x0.to(model.device), grid), active=rows)
        return
    if reentry not in REENTRY:
        raise ValueError(f"reentry must be one of {REENTRY}, not {reentry!r}")
    idx = rows.nonzero().squeeze(1).tolist()
    images = {b: decode_image(model, x0[b], grid) for b in idx}  # official: VAE decode -> 8-bit picture
    if reentry == "decode_reencode_vae":  # BAGEL update_context_image: VAE block first, then ViT
        tokens = torch.zeros(x0.shape)
        tokens[idx] = model.encode_pixels(torch.stack([D.image_to_tensor(images[b]) for b in idx]))[0]
        model.add_latent(cache, tokens, grid, active=rows)
    vit = [D.image_to_tensor(D.resize_image(images[b], *vit_sizes)) for b in idx]
    pixels = torch.zeros(len(x0), *vit[0].shape)
    pixels[idx] = torch.stack(vit)
    model.add_vit_image(cache, pixels, active=rows)


# ----------------------------------------------------------------------------------------------------------------------
# Training the bridge: ViT -> VAE hidden-state distillation (CLEAR §3.3; official Bagel.forward distill_fn)


def teacher_size(grid: tuple, vit_patch: int) -> tuple[int, int]:
    """(w, h) in pixels of the teacher ViT image whose patch grid equals the VAE token grid (official enable_distill)."""
    return grid[1] * vit_patch, grid[0] * vit_patch


def distill_pair(clean, x0: torch.Tensor, grid: tuple, vit_patch: int) -> list:
    """The restored picture as student and teacher (official _add_image with distill_pair_id): its clean latent at
    t = 0 (gen expert) and its ViT patches on the same grid (und expert), so token n of both covers one picture cell."""
    teacher = D.image_to_tensor(clean, teacher_size(grid, vit_patch))
    return [M.VaeImage(x0, grid, pair=0),  # CLEAR §3.3 distillation student: the clean latent at t=0
            M.VitImage(teacher, pair=0)]  # teacher, ViT grid == VAE grid


def distill_layer_weights(num_layers: int, stride: int = 1) -> dict:
    """Layers {stride-1, 2 stride-1, ...} plus the last, weighted (l+1)/sum (CLEAR §3.3, per_layer_kl)."""
    layers = sorted(set(range(stride - 1, num_layers, stride)) | {num_layers - 1})
    total = sum(l + 1 for l in layers)
    return {l: (l + 1) / total for l in layers}


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
    times = {r: [] for r in REENTRY}
    for _ in range(repeats):
        for reentry in REENTRY:
            trial = cache.copy()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            reenter(model, trial, x0, grid, torch.ones(1, dtype=torch.bool), reentry, vit)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times[reentry].append(time.perf_counter() - t0)
    return {r: statistics.median(v[1:]) for r, v in times.items()}  # the first round is warm-up


def compare_reentry(models: dict, tok, cfg) -> str:
    """Accuracy at mid and hard with each re-entry path, for every checkpoint (markdown); cfg: sft.SFTConfig."""
    import engine as E  # engine imports this file's re-entry switch, so it is imported here, not at the top
    split = D.ToyWorld(cfg.world_seed).eval_split(cfg.eval_n, seed=cfg.eval_seed)
    split = {k: split[k] for k in ("mid", "hard")}
    lines = ["| model | re-entry | mid | hard | restore mid / hard |", "|---|---|---|---|---|"]
    bar = tqdm(total=2 * len(models) * 2 * cfg.eval_n, leave=False, dynamic_ncols=True, unit="question")
    for name, model in models.items():
        for reentry in ("bridge", "decode_reencode"):
            icfg = E.InferenceConfig(reentry=reentry, max_text_tokens=cfg.max_text_tokens, num_timesteps=cfg.eval_steps,
                                     cfg_text_scale=cfg.cfg_text_scale, cfg_img_scale=cfg.cfg_img_scale,
                                     vit_transform=D.TOY_SIZES.vit)
            bar.set_description(f"table: {name}, {reentry}")
            res = E.benchmark(model, tok, split, "interleave", icfg, model.encode_pixels, seed=cfg.eval_seed,
                              system=cfg.system, bar=bar)
            lines.append(f"| {name} | {reentry} | {100 * res['mid']['acc']:.1f} | {100 * res['hard']['acc']:.1f} | "
                         f"{100 * res['mid']['restore']:.0f}% / {100 * res['hard']['restore']:.0f}% |")
    bar.close()
    return "\n".join(lines)


def main(argv=None):
    import sft  # Stage 2 is Stage 1's trainer plus the distillation term (sft.py imports this file's losses)
    cfg = sft.parse_config(__doc__, argv, defaults=dict(steps=400, lr=2e-4, distill_weight=0.4, init="out/sft",
                                                       out="out/bridge"), unused=("reentry", "base_steps"))
    start, tuned, tok = sft.finetune(cfg, "bridge")
    if start is None:
        return
    print(compare_reentry({"sft": start, "bridge": tuned}, tok, cfg))
    grid = (D.MODEL_SIZE // tuned.cfg.latent_downsample,) * 2  # the toy picture's latent grid
    lat = reentry_latency(tuned, grid, context=200)
    print(f"re-entry of one restored {grid[0]}x{grid[1]}-token image on {tuned.device} (median of 6): "
          + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in lat.items())
          + f" | decode_reencode / bridge = {lat['decode_reencode'] / lat['bridge']:.1f}x")


if __name__ == "__main__":
    import common  # the scripts' entry point, as in main (this file's import list stays model, data)
    common.run_cli(main)

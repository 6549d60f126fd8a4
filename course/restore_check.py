"""A2's toy run: the Stage 0 base restores held-out degraded toy pictures through YOUR model.py pieces (the rectified
flow and its time grid, classifier-free guidance, the latent input, the MoT routing, RoPE and the attention rule), and
this prints how close the restorations come to the clean pictures.

    python course/restore_check.py                          # out/base, 64 hard pictures, 10 points, BAGEL's guidance
    python course/restore_check.py --cfg-text-scale 1       # the same without guidance, for comparison

Each picture gets the restore edit Stage 0 was trained on (pretrain.restore_edit: the degraded picture as VAE and ViT
tokens, then "Restore this picture."), is denoised by Bagel.generate_image with the text-free and image-free
contexts engine.reason builds for guidance, and decoded. Printed: mean PSNR against the clean picture of the
restorations and of the degraded inputs, and the flow-matching error of the clean latent at t = 1 in the same context
(the training forward: packing, attention rule, loss) beside predicting the mean latent (evaluate.py's generator check).
Writes a picture: one row per question, degraded | restored | clean.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script in course/: the project's modules are one up
import checkpoint as CK
import common as C
import data as D
import engine as E
import model as M
import pretrain


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@torch.no_grad()
def restore(model: M.Bagel, tok: D.Tokenizer, examples: list, steps: int, text_scale: float, img_scale: float,
            seed: int) -> tuple[list, float, float]:
    """(restored pictures, flow-matching error of the clean latents at t = 1, that of predicting the mean latent)."""
    latents = D.encode_images([D.image_to_tensor(ex.degraded) for ex in examples], model.encode_pixels)
    prefixes = [pretrain.restore_edit(lat, ex.degraded, tok) for lat, ex in zip(latents, examples)]
    grid = latents[0][1]
    cache, text_free, image_free = model.new_cache(len(examples)), model.new_cache(len(examples)), None
    E.prefill(model, cache, prefixes)
    E.prefill(model, text_free, [p[:-1] for p in prefixes])  # guidance's context without the instruction
    if img_scale > 1.0:
        image_free = model.new_cache(len(examples))
        E.prefill(model, image_free, prefixes, texts_only=True)  # ... and without the picture
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(examples), grid[0] * grid[1], model.cfg.patch_latent_dim, generator=gen)
    x0, _ = model.generate_image(cache, grid, noise, steps, model.cfg.timestep_shift, cfg_text_cache=text_free,
                                 cfg_img_cache=image_free, cfg_text_scale=text_scale, cfg_img_scale=img_scale,
                                 cfg_renorm_type="text_channel")
    pictures = [E.decode_image(model, x, grid) for x in x0]
    clean = D.encode_images([D.image_to_tensor(ex.clean) for ex in examples], model.encode_pixels)
    targets = [[M.VaeImage(n, g, t=1.0, target=n - c)] for n, (c, g) in zip(noise, clean)]  # x_1 is the noise
    flow = float(model(M.pack([p + t for p, t in zip(prefixes, targets)], model.cfg)).mse.mean())
    mean = float(np.mean([float(c.pow(2).mean()) for c, _ in clean]))  # v = noise predicts x0 = 0
    return pictures, flow, mean


def sheet(examples: list, pictures: list) -> Image.Image:
    side = 2 * D.MODEL_SIZE
    out = Image.new("RGB", (3 * side, len(examples) * side), "white")
    for i, (ex, pic) in enumerate(zip(examples, pictures)):
        for j, im in enumerate((ex.degraded, pic, ex.clean)):
            out.paste(im.resize((side, side), Image.NEAREST), (j * side, i * side))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="restore_check.py", description="A2's toy run: the base model restores degraded "
                                 "toy pictures with your sampler, guidance and model.")
    ap.add_argument("--init", default="out/base", help="the Stage 0 base checkpoint (default out/base)")
    ap.add_argument("--n", type=int, default=64, help="held-out questions (default 64)")
    ap.add_argument("--severity", default="hard", choices=list(D.SEVERITIES), help="their corruption's severity")
    ap.add_argument("--denoise-steps", type=int, default=10, help="denoising grid points (default 10, the toy's)")
    ap.add_argument("--cfg-text-scale", type=float, default=3.0, help="text guidance (default 3.0, BAGEL's)")
    ap.add_argument("--cfg-img-scale", type=float, default=1.5, help="image guidance (default 1.5, BAGEL's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the noise")
    ap.add_argument("--world-seed", type=int, default=0, help="toy world seed (the one the base was trained in)")
    ap.add_argument("--out", default="out/a2_restorations.png", help="where to write the picture")
    args = ap.parse_args(argv)
    for name, low in (("n", 1), ("denoise_steps", 2), ("seed", 0), ("world_seed", 0)):
        if getattr(args, name) < low:
            ap.exit(2, f"{ap.prog}: error: --{name.replace('_', '-')} {getattr(args, name)}: must be an integer >= "
                       f"{low}\n")
    if args.cfg_text_scale < 0 or args.cfg_img_scale < 0:
        ap.exit(2, f"{ap.prog}: error: --cfg-text-scale and --cfg-img-scale must be >= 0\n")
    if Path(args.out).suffix.lower() not in Image.registered_extensions() or not Path(args.out).parent.is_dir():
        ap.exit(2, f"{ap.prog}: error: --out {args.out}: must name a picture file (.png, ...) in an existing folder\n")
    model, tok = CK.load_pretrained(args.init).eval(), D.Tokenizer.from_folder(args.init)
    examples = D.ToyWorld(args.world_seed).eval_split(args.n, seed=args.seed)[args.severity]
    pictures, flow, mean = [], [], []
    for i in range(0, len(examples), 32):
        p, f, m = restore(model, tok, examples[i:i + 32], args.denoise_steps, args.cfg_text_scale,
                          args.cfg_img_scale, args.seed)
        pictures, flow, mean = pictures + p, flow + [f], mean + [m]
    restored = np.mean([psnr(p, ex.clean) for p, ex in zip(pictures, examples)])
    degraded = np.mean([psnr(ex.degraded, ex.clean) for ex in examples])
    sheet(examples[:16], pictures[:16]).save(args.out)
    print(f"{len(examples)} {args.severity} pictures, {args.denoise_steps} points, guidance text "
          f"{args.cfg_text_scale:g} / image {args.cfg_img_scale:g}: PSNR to the clean picture, restored "
          f"{restored:.2f} dB, degraded input {degraded:.2f} dB; flow-matching error at t = 1 {np.mean(flow):.3f} "
          f"(mean latent {np.mean(mean):.3f}); wrote {args.out}")


if __name__ == "__main__":
    C.run_cli(main)

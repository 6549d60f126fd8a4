"""
Stage 0 (toy only): make the tiny base unified model on a CPU — the stand-in for BAGEL's pretraining.

CLEAR starts from BAGEL-7B-MoT, a model that already understands and generates. The toy has no such checkpoint, so
this file builds one in a few minutes, in three phases:
  1. the autoencoder (FLUX architecture at toy width) learns to reconstruct clean toy pictures, as FLUX's learned
     from clean photos (a degraded picture is encoded as it is); its latent shift and scale are then measured so
     latents have zero mean and unit variance (what FLUX's constants do);
  2. the vision encoder (the SigLIP stand-in) learns scene attributes from clean pictures;
  3. the unified model (connector, both MoT experts, the generation heads) learns, with autoencoder and ViT frozen:
       * language, captioning and plain VQA on clean pictures: [ViT (and sometimes VAE) tokens, question] -> answer;
       * generation of a clean picture from its caption, from itself, or from a degraded copy ("Restore this
         picture." — an edit, as BAGEL is pretrained on editing). Restoring is 70% of the mix (TASK_MIX says why).
     Its 6000 examples (--examples) are made and encoded once and drawn about 5 times each, each time with a fresh task,
     flow time and noise: rendering and degrading pictures would otherwise be half of every step.
Degraded pictures are never shown to understanding here (BAGEL's understanding data are clean photos), so the base
loses accuracy on them as BAGEL does. The <think>/<image_restore>/<answer> format, the decision to restore and
answering from a restored picture are deliberately NOT taught here: that is CLEAR's Stage 1 (sft.py), so the tables
can show what it adds.

CPU:  python pretrain.py                      (builds assets/toy_base, which sft.py copies to out/base when there is
                                              no --init and no out/base/; for another --seed, --world-seed or
                                              --base-steps sft.py runs this itself; a cached out/base must match them)
      python pretrain.py --ae-steps 400 --steps 600 --out out/base

Differences from BAGEL's pretraining (numbered):
  1. Toy scale: a ~1M-parameter-per-expert LLM trained from scratch for minutes, not 7B + 7B on trillions of tokens.
  2. The autoencoder is trained here (BAGEL reuses FLUX's), with L1 + L2 + a small KL, on 32x32 crops for speed, and
     GroupNorm with 8 groups, not FLUX's 32 (at the toy's 16-64 channels, 32 groups normalise away every colour).
  3. No text-only or interleaved web data: the language the toy needs is its own question/answer vocabulary.
  4. Flow time t is drawn with the tiny preset's shift 3 (BAGEL trains at 1.0; see model.PRESETS).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import checkpoint as CK
import common as C
import data as D
import model as M
from common import flag

# ----------------------------------------------------------------------------------------------------------------------
# Settings

STAGE0, UNIFIED = "Stage 0 (toy base model)", "unified pretraining"
# what `python pretrain.py` builds at its defaults, shipped so the quickstart starts at CLEAR's Stage 1 as CLEAR starts
# from BAGEL's released weights; tests/test_pretrain.py checks it matches these defaults and the model code
SHIPPED = Path(__file__).resolve().parent / "assets" / "toy_base"


@dataclass
class PretrainConfig(C.MachineFlags, C.WorldFlags):
    ae_steps: int = flag(1200, "autoencoder training steps", "[1, inf)", group=STAGE0)
    ae_batch: int = flag(16, "pictures per autoencoder step", "[1, inf)", group=STAGE0)
    ae_crop: int = flag(32, "crop side for autoencoder training (fully convolutional; a multiple of 8)", "[8, inf)",
                        group=STAGE0)
    ae_lr: float = flag(2e-3, "autoencoder peak learning rate", "(0, inf)", group=STAGE0)
    ae_kl: float = flag(1e-5, "KL weight of the autoencoder", "[0, inf)", group=STAGE0)
    vit_steps: int = flag(600, "vision-encoder training steps", "[1, inf)", group=STAGE0)
    vit_batch: int = flag(32, "pictures per vision-encoder step", "[1, inf)", group=STAGE0)
    vit_lr: float = flag(2e-3, "vision-encoder peak learning rate", "(0, inf)", group=STAGE0)
    pictures: int = flag(3000, "clean pictures rendered once for the autoencoder and vision-encoder phases", "[1, inf)",
                         group=STAGE0)
    examples: int = flag(6000, "degraded examples made once for the unified phase", "[1, inf)", group=UNIFIED)
    # the generator is what the toy's restorations lack, and training it longer is what lifts them; the step count is
    # what sft.py's time allows (docs/toy_design.md, "Stage 0")
    steps: int = flag(1300, "unified-model training steps", "[1, inf)", group=UNIFIED)
    batch: int = flag(24, "samples per step", "[1, inf)", group=UNIFIED)
    lr: float = flag(2e-3, "peak learning rate", "(0, inf)", group=UNIFIED)
    warmup: int = flag(50, "warmup steps", "[0, inf)", group=UNIFIED)
    ema: float = flag(0.99, "EMA decay of the saved weights", "[0, 1)", group=UNIFIED)
    out: str = flag("out/base", "output checkpoint folder")
    seed: int = flag(0, "training seed", C.SEED)


# ----------------------------------------------------------------------------------------------------------------------
# The model


def toy_config(tok: D.Tokenizer) -> M.ModelConfig:
    """The tiny preset with the toy tokenizer's vocabulary and special-token ids."""
    return replace(M.PRESETS["tiny"], **D.config_ids(tok))


def init_weights(model: M.Bagel, std: float = 0.02):
    """From-scratch init: Qwen2-style N(0, 0.02) for the LLM and ViT, zero biases, unit norms, llm2vae zero (BAGEL).

    The modules that feed the LLM from the fixed 2-D sin-cos tables (connector, vae2llm, time_embedder) get
    N(0, 1/fan_in) instead, so picture content enters at the same scale as the unit-size position code added to it;
    at 0.02 the position code drowns it and the model learns to ignore pictures (BAGEL inherits these weights
    pretrained, so its recipe never meets this). The autoencoder keeps PyTorch's default conv init.
    """
    feeders = ("connector", "vae2llm", "time_embedder")
    for name, mod in model.named_modules():
        if name.startswith("vae.") or name == "vae":
            continue
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            fan_in = mod.weight.shape[1]
            torch.nn.init.normal_(mod.weight, 0.0, fan_in ** -0.5 if name.startswith(feeders) else std)
            if getattr(mod, "bias", None) is not None:
                torch.nn.init.zeros_(mod.bias)
    torch.nn.init.zeros_(model.llm2vae.weight)  # BAGEL: llm2vae starts at zero
    torch.nn.init.zeros_(model.llm2vae.bias)


# ----------------------------------------------------------------------------------------------------------------------
# Phase 1: the autoencoder


def ae_loss(ae: M.AutoEncoder, x: torch.Tensor, generator, kl_weight: float):
    """L1 + L2 reconstruction of a posterior sample plus a small KL to N(0, I) (the usual KL-VAE recipe, no GAN)."""
    mean, logvar = ae.encoder(x).chunk(2, dim=1)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator).to(mean)
    rec = ae.decoder(z)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    l1, l2 = (rec - x).abs().mean(), (rec - x).pow(2).mean()
    return l1 + l2 + kl_weight * kl, {"l1": float(l1.detach()), "psnr": float(10 * torch.log10(4 / l2.detach()))}


def picture_pool(world: D.ToyWorld, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list]:
    """n clean training pictures [n, 3, S, S] and their scenes, rendered once: the autoencoder and vision-encoder phases
    draw their batches from it (rendering, not the small networks, would otherwise take most of their time)."""
    pictures = world.pictures(rng)
    drawn = (next(pictures) for _ in tqdm(range(n), desc="clean pictures", leave=False, dynamic_ncols=True))
    scenes, images = zip(*drawn)
    return torch.stack([D.image_to_tensor(im) for im in images]), list(scenes)


def picture_batch(pool: torch.Tensor, rng: np.random.Generator, n: int, crop: int) -> torch.Tensor:
    """n clean pictures from the pool, cropped to crop px at one random place (FLUX's autoencoder learned from clean
    photos; a degraded picture is encoded as it is)."""
    x = pool[torch.from_numpy(rng.integers(0, len(pool), n))]
    if crop < x.shape[-1]:
        i, j = (int(v) // 8 * 8 for v in rng.integers(0, x.shape[-1] - crop + 1, 2))
        x = x[:, :, i:i + crop, j:j + crop]
    return x


@torch.no_grad()
def latent_stats(ae: M.AutoEncoder, x: torch.Tensor) -> tuple[float, float]:
    """(shift, scale) so that scale * (mean - shift) has zero mean and unit std (FLUX's shift/scale factors)."""
    mean = ae.encoder(x).chunk(2, dim=1)[0]
    return float(mean.mean()), float(1.0 / mean.std())


# ----------------------------------------------------------------------------------------------------------------------
# Phase 2: the vision encoder (the SigLIP stand-in)


def scene_labels(scenes: list[D.Scene]) -> dict:
    """What the vision encoder must see in each picture: object count, and per quadrant occupancy, shape and colour."""
    occupied = [[float(any(o[2] == q for o in sc.objects)) for q in range(4)] for sc in scenes]
    return {"count": torch.tensor([len(sc.objects) for sc in scenes]), "occupied": torch.tensor(occupied),
            "shape": torch.tensor([D.SHAPES.index(sc.objects[0][0]) for sc in scenes]),
            "colour": torch.tensor([list(D.COLOURS).index(sc.objects[0][1]) for sc in scenes])}


class VisionProbe(torch.nn.Module):
    """Linear heads on ViT features, used to train the encoder in Stage 0, then thrown away. Shape and colour are read
    from each occupied quadrant's own patches: pooled over the whole picture, one object's outline drowns in the
    background (a mean-pooled shape head stayed near chance); the LLM's attention can make the same local read."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict(dict(shape=torch.nn.Linear(dim, len(D.SHAPES)),
                                              colour=torch.nn.Linear(dim, len(D.COLOURS)),
                                              count=torch.nn.Linear(dim, 5), occupied=torch.nn.Linear(dim, 1)))
        half = (torch.arange(grid) >= grid // 2).long()
        self.register_buffer("quadrant", (2 * half[:, None] + half[None, :]).flatten(),
                             persistent=False)  # patch -> quadrant

    def forward(self, h: torch.Tensor, labels: dict):
        """h [N, patches, D] -> summed losses of the heads, and picture-level accuracies."""
        quads = torch.stack([h[:, self.quadrant == q].mean(1) for q in range(4)], 1)  # [N, 4, D]
        occ = labels["occupied"].bool()
        count = self.heads["count"](h.mean(1))
        loss = F.cross_entropy(count, labels["count"]) + F.binary_cross_entropy_with_logits(
            self.heads["occupied"](quads).squeeze(-1), labels["occupied"])
        acc = {"count": float((count.argmax(-1) == labels["count"]).float().mean())}
        for k in ("shape", "colour"):
            logits = self.heads[k](quads)  # [N, 4, classes]
            target = labels[k][:, None].expand(-1, 4)
            loss = loss + F.cross_entropy(logits[occ], target[occ])
            vote = (logits * occ[..., None]).sum(1)  # the picture's answer: occupied quadrants vote
            acc[k] = float((vote.argmax(-1) == labels[k]).float().mean())
        return loss, acc


def vision_batch(pool: torch.Tensor, scenes: list, rng: np.random.Generator, n: int):
    """Clean pictures (SigLIP learned from web photos, not from our corruptions) and the attributes of their scenes."""
    idx = rng.integers(0, len(pool), n)
    return pool[torch.from_numpy(idx)], scene_labels([scenes[i] for i in idx])


def vision_loss(model: M.Bagel, probe: VisionProbe, pixels: torch.Tensor, labels: dict):
    P = model.cfg.vit_patch_size
    n, gh, gw = len(pixels), pixels.shape[2] // P, pixels.shape[3] // P
    ids = M.vit_position_ids(gh, gw, model.cfg.vit_max_num_patch_per_side, model.device)
    patches = torch.cat([M.patchify(x, P) for x in pixels]).to(model.device)
    h = model.vit_model.vision_model(patches, ids.repeat(n), [gh * gw] * n).view(n, gh * gw, -1)
    return probe(h, {k: v.to(model.device) for k, v in labels.items()})


# ----------------------------------------------------------------------------------------------------------------------
# Phase 3: understanding and generation


def scene_questions(scene: D.Scene, rng: np.random.Generator, qtypes: tuple) -> list[tuple[str, str]]:
    """Every question of the world's types the scene supports, as open questions: (question, answer) pairs."""
    kinds = [q for q in qtypes if q != "position" or len(scene.objects) == 1]
    return [D.ask(scene, k, rng, mc=False)[:2] for k in kinds]


# Stage 0's mix of tasks (probabilities) and how many flow times each generation sample trains. Restoration is most
# of it: BAGEL is pretrained on editing at scale, the toy has minutes, and with less restoring the generator did not
# beat predicting the mean latent (docs/toy_design.md, "Stage 0").
TASK_MIX = {"language": 0.06, "caption": 0.03, "vqa": 0.15, "text_to_image": 0.03, "redraw": 0.03, "restore": 0.70}
NOISED_COPIES = 6  # noised copies of the target per generation sample, each at its own t (they never see each other)


def example_pool(world: D.ToyWorld, rng: np.random.Generator, n: int, encode, chunk: int = 256) -> list[tuple]:
    """n degraded training examples (training corruption weights) with the latents of their clean and degraded
    pictures, made once: the unified phase draws its batches from it, each example about batch * steps / n times with
    a fresh task, flow time and noise (making a picture and degrading it would otherwise be half of every step)."""
    stream = world.stream(rng)
    examples = [next(stream) for _ in tqdm(range(n), desc="degraded examples", leave=False, dynamic_ncols=True)]
    latents = []
    for i in range(0, n, chunk):
        encoded = D.encode_images([D.image_to_tensor(p) for ex in examples[i:i + chunk]
                                   for p in (ex.clean, ex.degraded)], encode)
        latents += [(encoded[2 * j], encoded[2 * j + 1]) for j in range(len(encoded) // 2)]  # (clean, degraded)
    return list(zip(examples, latents))


RESTORE_PROMPT = "Restore this picture."  # Stage 0's restore edit (sft.py replays it, its difference 6)


def restore_edit(degraded_latent: tuple, degraded: Image.Image, tok: D.Tokenizer) -> list:
    """The restore edit's context: the degraded picture as VAE and ViT tokens, then the instruction (BAGEL's editing
    format). The clean picture follows as the generation target (noised_targets)."""
    d0, grid = degraded_latent
    return [M.VaeImage(d0, grid), M.VitImage(D.image_to_tensor(degraded)), M.Text(tok.encode(RESTORE_PROMPT))]


def noised_targets(x0: torch.Tensor, grid: tuple, gen: torch.Generator, shift: float, copies: int) -> list:
    """`copies` noised copies of the clean latent x0 as flow-matching targets, each at its own logit-normal t (BAGEL:
    v = noise - x0); packed after one context they never see each other, so they share its compute."""
    out = []
    for _ in range(copies):
        t = float(M.sample_flow_time(1, shift, gen))
        x_t, v = M.flow_interpolate(x0, torch.randn(x0.shape, generator=gen), t)
        out.append(M.VaeImage(x_t, grid, t=t, target=v, droppable=False))  # official: the target has enable_cfg=0
    return out


def base_samples(pool: list[tuple], tok: D.Tokenizer, rng: np.random.Generator, gen: torch.Generator,
                 shift: float = 1.0, qtypes: tuple = D.TOY_QTYPES) -> list:
    """A mix of what a base unified model does (BAGEL's understanding, generation and editing formats, no CLEAR tags):
    text questions about a description (BAGEL's LLM arrives pretrained on language, ours learns it here), captioning
    and plain VQA on clean pictures (BAGEL's understanding data), text-to-image, and two edits: draw the picture again,
    and restore a degraded picture (BAGEL is pretrained on editing; restoring is one edit among many, the generative
    potential CLEAR unlocks). Understanding never sees a degraded picture here, as BAGEL's did not: that gap is what
    CLEAR's Stage 1 closes. A generation sample trains NOISED_COPIES flow times of its target against one context:
    the noised blocks are invisible to each other (BAGEL's noise split), so they are independent samples that share
    the context's compute."""
    names, cum = list(TASK_MIX), np.cumsum(list(TASK_MIX.values()))
    samples = []
    for ex, ((c0, grid), (d0, _)) in pool:
        task = names[min(int(np.searchsorted(cum, rng.random(), side="right")), len(names) - 1)]
        seen = [M.VaeImage(c0, grid), M.VitImage(D.image_to_tensor(ex.clean))]
        seen = seen if rng.random() < 0.5 else seen[1:]
        if task == "language":  # questions answered from a text description (the toy LLM has no pretrained language)
            turns = [M.Text(tok.encode(ex.caption))]
            for question, answer in scene_questions(ex.scene, rng, qtypes):
                turns += [M.Text(tok.encode(question)), M.Text(tok.encode(answer), loss=True)]
            samples.append(turns)
        elif task == "caption":
            samples.append(seen + [M.Text(tok.encode("Describe the picture.")),
                                   M.Text(tok.encode(ex.caption), loss=True)])
        elif task == "vqa":  # every question the scene supports, as turns of one conversation (LLaVA-style)
            turns = [M.Text(tok.encode(ex.question)), M.Text(tok.encode(ex.answer), loss=True)]
            for question, answer in scene_questions(ex.scene, rng, qtypes):
                turns += [M.Text(tok.encode(question)), M.Text(tok.encode(answer), loss=True)]
            samples.append(seen + turns)
        else:  # generation of the clean picture: from its caption, from itself, or from a degraded copy
            if task == "text_to_image":
                prompt = [M.Text(tok.encode(ex.caption))]
            elif task == "redraw":
                prompt = [M.VaeImage(c0, grid), M.VitImage(D.image_to_tensor(ex.clean)),
                          M.Text(tok.encode("Draw this picture again."))]
            else:
                prompt = restore_edit((d0, grid), ex.degraded, tok)
            samples.append(prompt + noised_targets(c0, grid, gen, shift, NOISED_COPIES))
    return samples


def unified_loss(model, packed: M.Packed, mse_weight: float = 1.0):
    out = model(packed)
    ce = out.ce.mean() if out.ce.numel() else out.v.sum() * 0
    mse = out.mse.mean() if out.mse.numel() else out.v.sum() * 0
    return ce + mse_weight * mse, {"ce": float(ce.detach()), "mse": float(mse.detach())}


# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# The three phases


def train_phase(run: C.Run, model: M.Bagel, optimizer, name: str, steps: int, lr: float, warmup: int, min_lr: float,
                seed: int, batch_fn: Callable, loss_fn: Callable, log_path: Path, log_every: int,
                ema: C.EMA | None = None):
    """One phase's loop: batch_fn(np_rng, torch_gen) -> batch, loss_fn(model, batch) -> (loss, metrics); linear
    warmup then cosine, gradient clip 1.0."""
    log = C.Log(log_path, None, run.main)
    bar = tqdm(range(steps), total=steps, desc=name, disable=not run.main, dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        C.set_lr(optimizer, C.lr_at(step, steps, lr, warmup, min_lr))
        rng, gen = C.step_rngs(seed, step, run.rank)
        model.train()
        loss, metrics = loss_fn(model, batch_fn(rng, gen))
        loss.backward()
        gnorm = C.clip_and_step(model, optimizer, 1.0)
        if ema is not None:
            ema.update(model)
        if run.main and (step % log_every == 0 or step == steps - 1):
            log({"step": step + 1, "loss": float(loss.detach()), **metrics, "lr": optimizer.param_groups[0]["lr"],
                 "gnorm": gnorm, "ms": round(1000 * (time.time() - t0))}, bar)
    bar.close()


def shipped_base(seed: int, world_seed: int, steps: int) -> Path | None:
    """The shipped toy base when it is the one these settings would build (the settings sft.py passes to Stage 0; every
    other setting at its default), else None."""
    if not (SHIPPED / "ema.safetensors").exists():
        return None
    built = CK.read_json(SHIPPED / "nanoclear.json").get("args", {})
    asked = {**shipped_settings(PretrainConfig()), "seed": seed, "world_seed": world_seed, "steps": steps}
    return SHIPPED if shipped_settings(built) == asked else None


def shipped_settings(args) -> dict:
    """The settings that shape a base (not where or on what it ran)."""
    args = args if isinstance(args, dict) else vars(args)
    return {k: v for k, v in args.items() if k not in ("out", "device", "dtype", "threads")}


def copy_shipped_base(out: str):
    """Copy the shipped base's files into the checkpoint folder `out` (atomically, as every checkpoint is written)."""
    CK.atomic_write_folder(out, lambda tmp: [shutil.copy2(f, tmp / f.name) for f in sorted(SHIPPED.iterdir())
                                             if f.is_file() and f.name != CK.MARKER])


def build_base(args: "PretrainConfig", run: C.Run) -> M.Bagel:
    """Stage 0's three phases; writes the base checkpoint to args.out and returns the EMA model."""
    CK.check_out(args.out)
    t_start = time.time()
    world = D.ToyWorld(args.world_seed)
    tok = D.train_toy_tokenizer(D.toy_corpus(seed=args.world_seed))
    model = M.Bagel(toy_config(tok)).to(run.device)
    init_weights(model)
    out = Path(args.out)
    print(f"Stage 0: building the toy base model in {out} (BAGEL's pretraining stand-in). Model: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {tok.vocab_size}.")

    pool, scenes = picture_pool(world, np.random.default_rng([args.world_seed, args.seed, 4]), args.pictures)
    print(f"Phase 1/3: autoencoder, {args.ae_steps} steps on {args.ae_crop}px crops of {len(pool)} clean pictures.")
    model.requires_grad_(False).vae.requires_grad_(True)
    opt = C.make_optimizer(model, args.ae_lr, betas=(0.9, 0.99), eps=1e-8)
    train_phase(run, model, opt, "pretrain-ae", steps=args.ae_steps, lr=args.ae_lr, warmup=args.ae_steps // 20,
                min_lr=args.ae_lr / 20, seed=args.seed,
                batch_fn=lambda rng, gen: (picture_batch(pool, rng, args.ae_batch, args.ae_crop), gen),
                loss_fn=lambda m, batch: ae_loss(m.vae, batch[0].to(run.device), batch[1], args.ae_kl),
                log_path=out.with_name(out.name + "_ae.log.jsonl"), log_every=max(1, args.ae_steps // 10))
    probe = picture_batch(pool, np.random.default_rng(args.seed + 1), 64, D.MODEL_SIZE).to(run.device)
    shift, scale = latent_stats(model.vae, probe)
    model.cfg.ae_shift_factor, model.cfg.ae_scale_factor = shift, scale
    model.vae.shift, model.vae.scale = shift, scale
    print(f"  latent shift {shift:.4f}, scale {scale:.4f} (so latents are ~N(0, 1))")

    print(f"Phase 2/3: vision encoder (the SigLIP stand-in), {args.vit_steps} steps of scene attributes.")
    model.requires_grad_(False).vit_model.requires_grad_(True)
    probe = VisionProbe(model.cfg.vit_hidden_size, model.cfg.vit_image_size // model.cfg.vit_patch_size).to(run.device)
    opt = torch.optim.AdamW([p for _, p in C.trainable(model)] + list(probe.parameters()), lr=args.vit_lr,
                            betas=(0.9, 0.99))
    train_phase(run, model, opt, "pretrain-vit", steps=args.vit_steps, lr=args.vit_lr, warmup=args.vit_steps // 20,
                min_lr=args.vit_lr / 20, seed=args.seed,
                batch_fn=lambda rng, gen: vision_batch(pool, scenes, rng, args.vit_batch),
                loss_fn=lambda m, batch: vision_loss(m, probe, *batch),
                log_path=out.with_name(out.name + "_vit.log.jsonl"), log_every=max(1, args.vit_steps // 10))

    print(f"Phase 3/3: unified model, {args.steps} steps of language, captioning, VQA (clean) and generation.")
    model.requires_grad_(True)
    for frozen in (model.vae, model.vit_model, model.vit_pos_embed, model.latent_pos_embed):
        frozen.requires_grad_(False)
    pool = example_pool(world, np.random.default_rng([args.world_seed, args.seed, 5]), args.examples,
                        model.encode_pixels)
    opt = C.make_optimizer(model, args.lr)
    ema = C.EMA(model, args.ema)

    def batch_fn(rng, gen):
        drawn = [pool[i] for i in rng.integers(0, len(pool), args.batch)]
        return M.pack(base_samples(drawn, tok, rng, gen, model.cfg.timestep_shift, world.qtypes),
                      model.cfg).to(run.device)

    train_phase(run, model, opt, "pretrain", steps=args.steps, lr=args.lr, warmup=args.warmup, min_lr=args.lr / 10,
                seed=args.seed, batch_fn=batch_fn, loss_fn=unified_loss,
                log_path=out.with_name(out.name + ".log.jsonl"), log_every=max(1, args.steps // 20), ema=ema)
    C.save(out, run, model, opt, tok.tk, args.steps,
           {"args": vars(args), "seconds": round(time.time() - t_start), "stage": "pretrain"}, ema)
    print(f"Stage 0 done in {time.time() - t_start:.0f} s: {out}")
    ema.copy_to(model)
    return model.eval()


def main(argv=None):
    cfg, prog, _ = C.parse_flags(PretrainConfig, __doc__, argv)
    if cfg.ae_crop % 8 or cfg.ae_crop > D.MODEL_SIZE:
        C.refuse(prog, f"--ae-crop {cfg.ae_crop}: must be a multiple of 8 and at most the picture side {D.MODEL_SIZE}")
    with C.output_lock(cfg.out):  # before any work: one run per --out
        build_base(cfg, C.setup_run(cfg.device, cfg.dtype, cfg.seed, cfg.threads))


if __name__ == "__main__":
    C.run_cli(main)

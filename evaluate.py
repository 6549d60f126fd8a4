"""
MMD-Bench-style evaluation (CLEAR §4; paper_notes §4-5): the paper's tables and figures in miniature for the toy
models, and the real VLMEvalKit TSV files (MMD-Bench) for BAGEL-format checkpoints.

Toy (CPU, a few minutes on 2 cores; the README gives the time):
    python evaluate.py                 # every checkpoint under out/ (base, sft, bridge, rl) -> out/eval/
  writes report.md + report.json with
    1. accuracy clean / low / mid / hard and the clean->hard drop, per checkpoint x reasoning mode
       (direct answer; text-only reasoning; interleaved with decode-reencode; interleaved with the bridge;
       always-restore first, "perception enhancement");
    2. per-corruption accuracy at hard (16 sets) for the best model and the base;
    3. restore rate per severity (the paper's adaptive-triggering figure) and wall time per mode;
    4. does restoring help? paired differences at hard on the same questions (always restore / interleaved vs text
       reasoning, RL vs the base) with 95% bootstrap intervals, and interleaved vs text reasoning split by the model's
       own decision (the questions it chose to restore, and the others);
    5. restoration quality: PSNR of the restored picture and of the degraded input against the clean one, the accuracy
       of a perception probe trained on clean pictures reading each, and the generator's flow-matching error at fixed
       t beside the same model reading another question's picture, copying the degraded latent and the mean latent;
    6. pictures: examples.png (the SFT model restoring hard pictures: degraded, restored, clean, question, answer,
       right?) and accuracy.png (bars per severity).

One picture (the first thing to try; toy checkpoints from the quickstart, or any BAGEL-format folder):
    python evaluate.py --demo-toy 0    # held-out toy question 0 at hard; also writes its picture to out/demo/input.png
    python evaluate.py --image out/demo/input.png --question "How many shapes are there?" [--degrade motion_blur:hard]
    python evaluate.py --init path/to/CLEAR --image photo.jpg --question "..." --device cuda --dtype bf16
  prints the reasoning trace (think texts, whether it restored, the answer) and writes out/demo/demo.png (input,
  restored picture, the clean picture for a toy question, the texts). The toy model reads only toy pictures (64 px
  scenes of 1-4 shapes, asked their colour or count); a photo shows how it fails.

Real benchmarks (GPU):
    python evaluate.py --init path/to/CLEAR --tsv MMBench_DEV_EN_V11_LOW_LEVEL_HIGH.tsv ... --device cuda --dtype bf16
  multiple-choice rows are scored by letter (the <answer> content, plain-letter fallback); open-ended rows need a
  judge (`--judge module:function`, called as judge(question, prediction, answer) -> score in [0, 1]); none is
  called by default and such rows are reported as unscored. Official inference settings are the defaults.

Other checkpoints on the toy benchmark (an RL variant against the RL stage, paired on the same questions):
    python evaluate.py --checkpoints rl=out/rl rl_release=out/rl_release --out out/eval_release

Differences from the official evaluation (numbered):
  1. Multiple choice is scored by extracting the letter, not by VLMEvalKit's LLM-judge option matching, and MMBench's
     circular evaluation is not applied (each row counts once).
  2. The toy benchmark is generated (data.ToyWorld.eval_split); MMD-Bench is read from its released TSVs.
  3. always_restore (BAGEL-PE) has no working official counterpart: BagelInference's 'image' mode calls
     inferencer.image_reason_tool_condition (bagel_inference.py:263-266 @411d6bd / a65d61f), which neither commit
     defines.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import checkpoint as CK
import common as C
import data as D
import engine as E
import model as M
from common import flag
from degrade import CORRUPTIONS, degrade

SEVERITIES = ("clean", "low", "mid", "hard")
MODES = {  # row label -> (reasoning mode, re-entry path)
    "direct": ("direct", "bridge"),
    "text reasoning": ("text", "bridge"),
    "interleaved, decode-reencode": ("interleave", "decode_reencode"),
    "interleaved, bridge": ("interleave", "bridge"),
    "always restore": ("always_restore", "bridge"),
}
STAGES = ("base", "sft", "bridge", "rl")


# ----------------------------------------------------------------------------------------------------------------------
# Settings

TOY, REAL, DEMO = "toy benchmark (default)", "real benchmarks", "one-photo demo"


@dataclass
class EvalConfig(C.MachineFlags, C.WorldFlags, C.PictureSizeFlags, E.InferenceFlags):
    out_root: str = flag("out", "folder holding the stage checkpoints (base, sft, bridge, rl) and the probe's cache",
                         group=TOY)
    checkpoints: tuple = flag((), "the checkpoints to evaluate instead of OUT_ROOT's stages, as NAME=FOLDER; 'base' is "
                              "read in direct mode only, and every name that is not a stage's gets rl's comparisons "
                              "and one with rl (interleaved, bridge)", group=TOY, nargs="*")
    n: int = flag(128, "held-out questions per severity (the README's tables ask 288, for paired intervals at hard "
                       "1/sqrt(2) as wide, in about twice the time)", "[1, inf)", group=TOY)
    batch: int = flag(64, "questions run together (another value draws other restoration noise)", "[1, inf)", group=TOY)
    n_corruption: int = flag(24, "questions per corruption in the per-corruption sets (0 = skip them)", "[0, inf)",
                             group=TOY)
    probe_n: int = flag(3000, "training pictures of the clean-trained perception probe (the shipped one at the "
                              "defaults in world 0; else trained once and cached in OUT_ROOT/probe)", "[1, inf)",
                        group=TOY)
    probe_steps: int = flag(500, "training steps of the perception probe", "[1, inf)", group=TOY)
    init: str | None = flag(None, "BAGEL-format checkpoint (BAGEL-7B-MoT, CLEAR or ours)", group=REAL)
    tsv: tuple = flag((), "VLMEvalKit TSV files (MMD-Bench)", group=REAL, nargs="*")
    mode: str = flag("interleave", "reasoning mode for the TSVs", choices=E.MODES, group=REAL)
    judge: str | None = flag(None, "module:function judge for open-ended rows (none by default)", group=REAL)
    system: str | None = flag(None, "system prompt for --tsv runs: the one --init was trained with (its "
                              "nanoclear.json; a BAGEL or CLEAR folder: 'official', INTERLEAVE_REASON_SYSTEM_PROMPT, "
                              "inferencer.py:662 @411d6bd); 'toy' only for a toy checkpoint",
                              choices=sorted(D.SYSTEM_PROMPTS), group=REAL, type=str)
    demo_toy: int | None = flag(None, "the demo on held-out toy question N at hard (the toy benchmark's N-th): its "
                                "picture, question, clean picture and answer; also saves its picture as OUT/input.png",
                                "[0, inf)", group=DEMO, type=int)
    image: str | None = flag(None, "the demo on a picture file (with --question; --init defaults to the latest toy "
                             "stage, which reads only toy pictures: try --demo-toy first)", group=DEMO)
    question: str | None = flag(None, "the demo's question", group=DEMO)
    degrade: str | None = flag(None, "the demo with --image: degrade the picture first, KIND:SEVERITY (e.g. "
                               "motion_blur:hard)",
                               group=DEMO)
    out: str | None = flag(None, "output folder (default out/eval, or out/eval_tsv for --tsv)")
    seed: int = flag(0, "seed of the held-out split and of any sampling", C.SEED)


# ----------------------------------------------------------------------------------------------------------------------
# Toy benchmark


def per_corruption_split(world: D.ToyWorld, n: int, seed: int) -> dict:
    """16 sets at hard: the same n held-out questions degraded by each corruption (MMD-Bench per-degradation sets)."""
    return {kind: [world.examples(np.random.default_rng([world.seed, seed, 2, i]), True, kind,
                                  [D.SEVERITIES["hard"]])[0]
                   for i in range(n)] for kind in CORRUPTIONS}  # question i: its own seed, so every set asks the same


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def restored_pictures(model: M.Bagel, traces: list) -> list:
    """The first restored picture of each trace (None where it did not restore), decoded to 8-bit pixels."""
    return [E.decode_image(model, tr.latents[0], tr.grid) if tr.latents else None for tr in traces]


def restoration_quality(examples: list, pictures: list, probe) -> dict:
    """Over the questions that restored: mean PSNR (dB) against the clean picture of the restored picture and of the
    degraded input, and the accuracy of the clean-trained perception probe reading each (colour and count)."""
    kept = [(ex, im.resize(ex.clean.size, Image.BICUBIC)) for ex, im in zip(examples, pictures) if im is not None]
    if not kept:
        return {"n": 0, "restored_psnr": None, "degraded_psnr": None, "probe_restored": None, "probe_degraded": None}
    exs, ims = [ex for ex, _ in kept], [im for _, im in kept]
    probe_acc = lambda pics: float(np.mean([a == ex.answer  # noqa: E731
                                            for a, ex in zip(D.probe_answers(probe, pics, exs), exs)]))
    return {"n": len(kept),
            "restored_psnr": float(np.mean([psnr(np.asarray(im), np.asarray(ex.clean)) for ex, im in kept])),
            "degraded_psnr": float(np.mean([psnr(np.asarray(ex.degraded), np.asarray(ex.clean)) for ex in exs])),
            "probe_restored": probe_acc(ims), "probe_degraded": probe_acc([ex.degraded for ex in exs])}


# (checkpoint, mode) - (checkpoint, mode) at hard: does restoring help the answer? (CLEAR's claim, Table 1 / Fig. 4)
COMPARISONS = [(("sft", "always restore"), ("sft", "text reasoning")),
               (("sft", "interleaved, bridge"), ("sft", "text reasoning")),
               (("rl", "always restore"), ("rl", "text reasoning")),
               (("rl", "interleaved, bridge"), ("rl", "text reasoning")),
               (("rl", "interleaved, bridge"), ("base", "direct"))]


def comparison_pairs(names) -> list:
    """COMPARISONS, plus for each checkpoint that is not a stage (--checkpoints): rl's comparisons with it in rl's
    place, and itself against rl ("interleaved, bridge")."""
    pairs = list(COMPARISONS)
    for x in (n for n in names if n not in STAGES):
        pairs += [tuple((x if c == "rl" else c, m) for c, m in pair) for pair in COMPARISONS if pair[0][0] == "rl"]
        pairs.append(((x, "interleaved, bridge"), ("rl", "interleaved, bridge")))
    return pairs


def comparisons(results: dict, severity: str = "hard", seed: int = 0) -> list:
    out = []
    for (ca, ma), (cb, mb) in comparison_pairs(results):
        if ma in results.get(ca, {}) and mb in results.get(cb, {}):
            out.append({"a": [ca, ma], "b": [cb, mb], "severity": severity,
                        **C.paired_bootstrap(results[ca][ma][severity]["correct"], results[cb][mb][severity]["correct"],
                                             seed=seed)})
    return out


def decision_split(results: dict, severity: str = "hard", seed: int = 0) -> list:
    """Where does restoring help? Per checkpoint, "interleaved, bridge" - "text reasoning" on the same questions, split
    by the interleaved run's own decision: the questions it chose to restore, and the others."""
    out = []
    for ckpt, rows in results.items():
        if "interleaved, bridge" not in rows or "text reasoning" not in rows:
            continue
        inter, text = rows["interleaved, bridge"][severity], rows["text reasoning"][severity]
        for subset, keep in (("restored", True), ("not restored", False)):
            idx = [i for i, r in enumerate(inter["restored"]) if r == keep]
            if idx:
                a, b = [inter["correct"][i] for i in idx], [text["correct"][i] for i in idx]
                out.append({"checkpoint": ckpt, "subset": subset, "severity": severity,
                            "acc_interleaved": sum(a) / len(a), "acc_text": sum(b) / len(b),
                            **C.paired_bootstrap(a, b, seed=seed)})
    return out


def decision_table(rows: list) -> str:
    lines = ["| checkpoint | hard questions | n | interleaved, bridge | text reasoning | difference (points) | "
             "95% bootstrap interval |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['checkpoint']} | {r['subset']} | {r['n']} | {100 * r['acc_interleaved']:.1f} | "
              f"{100 * r['acc_text']:.1f} | {r['diff']:+.1f} | [{r['lo']:+.1f}, {r['hi']:+.1f}] |" for r in rows]
    return "\n".join(lines)


def comparison_table(rows: list) -> str:
    lines = ["| comparison (hard, same questions) | difference (points) | 95% bootstrap interval |", "|---|---|---|"]
    lines += [f"| {r['a'][0]} {r['a'][1]} - {r['b'][0]} {r['b'][1]} | {r['diff']:+.1f} | "
              f"[{r['lo']:+.1f}, {r['hi']:+.1f}] |"
              for r in rows]
    return "\n".join(lines)


FLOW_CHECK_T = (0.3, 0.6, 0.9, 1.0)
FLOW_CHECK_N = 64  # hard questions in the generator check


@torch.no_grad()
def flow_error_by_t(model: M.Bagel, tok, examples: list, ts=FLOW_CHECK_T, seed: int = 0) -> dict:
    """Can the generator restore? Flow-matching MSE of the clean latent at fixed t, in the CLEAR restore context
    (prefix, then <image_restore>, as in always-restore mode), next to the same model given ANOTHER question's
    degraded picture as context (same noise: what reading the right picture is worth) and two references that need no
    model: copying the degraded latent (v = noise - degraded) and predicting the mean latent (v = noise). A generator
    that restores beats the mean and the shuffled context widely at t = 1, where only the context says what to draw."""
    prefixes = D.inference_prefix(examples, tok, model.encode_pixels)
    clean = D.encode_images([D.image_to_tensor(ex.clean) for ex in examples], model.encode_pixels)
    degraded = [next(s for s in p if isinstance(s, M.VaeImage)).tokens for p in prefixes]
    # with v = noise - x0 the references' errors do not depend on t or the noise: |x0 - degraded|^2 and |x0|^2
    copy = float(np.mean([float((x0 - d0).pow(2).mean()) for (x0, _), d0 in zip(clean, degraded)]))
    mean = float(np.mean([float(x0.pow(2).mean()) for x0, _ in clean]))
    gen = torch.Generator().manual_seed(seed)
    shuffled = prefixes[1:] + prefixes[:1]  # question i reads question i+1's degraded picture
    out = {}
    for t in ts:
        noised = []
        for x0, grid in clean:
            x_t, v = M.flow_interpolate(x0, torch.randn(x0.shape, generator=gen), t)
            noised.append([M.Text(tok.encode(D.RESTORE_TOKEN)), M.VaeImage(x_t, grid, t=t, target=v)])
        err = {}
        for name, context in (("model", prefixes), ("shuffled", shuffled)):
            err[name] = float(model(M.pack([c + n for c, n in zip(context, noised)],
                                           model.cfg).to(model.device)).mse.mean())
        out[t] = {**err, "copy": copy, "mean": mean}
    return out


def flow_table(flow: dict) -> str:
    ts = FLOW_CHECK_T
    lines = ["| predictor | " + " | ".join(f"t = {t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for ckpt, by_t in flow.items():
        lines.append(f"| {ckpt} | " + " | ".join(f"{by_t[t]['model']:.3f}" for t in ts) + " |")
        lines.append(f"| {ckpt}, another question's picture as context | "
                     + " | ".join(f"{by_t[t]['shuffled']:.3f}" for t in ts) + " |")
    first = next(iter(flow.values()))
    lines.append("| copy the degraded latent | " + " | ".join(f"{first[t]['copy']:.3f}" for t in ts) + " |")
    lines.append("| predict the mean latent (0) | " + " | ".join(f"{first[t]['mean']:.3f}" for t in ts) + " |")
    return "\n".join(lines)


def remembered_encoder(model: M.Bagel, memo: dict):
    """model.encode_pixels, computed once per autoencoder and input: every mode of every checkpoint shows the same
    degraded pictures, and the autoencoder stays frozen after Stage 0 (official: the VAE is never trained)."""
    ae = C.digest(*model.vae.state_dict().values())

    def encode(pixels: torch.Tensor):
        key = (ae, C.digest(pixels))
        if key not in memo:
            memo[key] = model.encode_pixels(pixels)
        return memo[key]
    return encode


def evaluate_checkpoint(model, tok, split, modes: dict, icfg: E.InferenceConfig, seed: int, probe, batch: int,
                        encode, bar: tqdm | None = None, name: str = "") -> dict:
    """Every requested mode on the aligned clean/low/mid/hard split; restoration quality of its hard restorations.
    `bar`: the evaluation's progress bar, labelled with the checkpoint `name` and the mode."""
    rows = {}
    for label, (mode, reentry) in modes.items():
        if bar is not None:
            bar.set_description(f"{name}, {label}")
        res = E.benchmark(model, tok, split, mode, replace(icfg, reentry=reentry), encode, batch, seed, bar=bar)
        rows[label] = {s: {k: v for k, v in res[s].items() if k != "traces"} for s in res}
        pictures = restored_pictures(model, res["hard"]["traces"])
        rows[label]["quality"] = restoration_quality(split["hard"], pictures, probe)
        rows[label]["_shown"] = (res["hard"]["traces"], pictures)
    return rows


def main_table(results: dict) -> str:
    lines = ["| checkpoint | mode | clean | low | mid | hard | drop clean->hard | restore low / mid / hard | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ckpt, rows in results.items():
        for label, r in rows.items():
            acc = [100 * r[s]["acc"] for s in SEVERITIES]
            rr = " / ".join(f"{100 * r[s]['restore']:.0f}%" for s in ("low", "mid", "hard"))
            secs = sum(r[s]["seconds"] for s in SEVERITIES)
            lines.append(f"| {ckpt} | {label} | " + " | ".join(f"{a:.1f}" for a in acc)
                         + f" | {acc[0] - acc[3]:.1f} | {rr} | {secs:.0f} |")
    return "\n".join(lines)


def quality_table(results: dict) -> str:
    lines = ["| checkpoint | mode | restorations (hard) | PSNR restored | PSNR degraded input | probe on restored | "
             "probe on degraded input |", "|---|---|---|---|---|---|---|"]
    for ckpt, rows in results.items():
        for label, r in rows.items():
            q = r["quality"]
            if q["n"]:
                lines.append(f"| {ckpt} | {label} | {q['n']} | {q['restored_psnr']:.2f} | {q['degraded_psnr']:.2f} | "
                             f"{100 * q['probe_restored']:.1f} | {100 * q['probe_degraded']:.1f} |")
    return "\n".join(lines)


def corruption_table(per: dict) -> str:
    names = list(per)
    lines = ["| corruption | category | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for kind, cat in CORRUPTIONS.items():
        lines.append(f"| {kind} | {cat} | " + " | ".join(f"{100 * per[n][kind]:.1f}" for n in names) + " |")
    return "\n".join(lines)


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's built-in font at `size` px (at its default 10 px it squeezes spaces out: "shapesare")."""
    return ImageFont.load_default(size)


def wrap(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> list[str]:
    """Lines of at most `width` px, broken between words (a word wider than the line gets a line of its own)."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            if line and draw.textlength(f"{line} {word}", font=face) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines


def fill_panel(sheet: Image.Image, im: Image.Image, box: tuple):
    """Paste `im` scaled to fill box (x, y, w, h) with its aspect kept and centred: toy pictures are enlarged pixel
    for pixel (what the model saw), photos resampled."""
    x, y, w, h = box
    scale = min(w / im.width, h / im.height)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    shown = im.convert("RGB").resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)
    sheet.paste(shown, (x + (w - size[0]) // 2, y + (h - size[1]) // 2))


def draw_examples(examples: list, traces: list, pictures: list, path: Path, n: int = 8):
    """A grid at hard: degraded input | restored picture | clean picture | corruption, question, answer, right or
    wrong; a header row names the columns."""
    cell, text_w, pad, head = 128, 400, 8, 28
    rows = [i for i, im in enumerate(pictures) if im is not None][:n] or list(range(min(n, len(examples))))
    sheet = Image.new("RGB", (3 * cell + 2 * pad + text_w, head + (cell + pad) * len(rows)), "white")
    draw, small, big = ImageDraw.Draw(sheet), font(14), font(16)
    for x, title in enumerate(("degraded input", "restored", "clean")):
        draw.text((x * (cell + pad // 2) + 4, 6), title, fill="black", font=big)
    for y, i in enumerate(rows):
        ex, tr, top = examples[i], traces[i], head + y * (cell + pad)
        for x, im in enumerate((ex.degraded, pictures[i], ex.clean)):
            if im is not None:
                fill_panel(sheet, im, (x * (cell + pad // 2), top, cell, cell))
        reply = E.final_text(tr)
        ok = D.is_correct(reply, ex)
        left, width = 3 * cell + 2 * pad, text_w - pad
        lines = [(f"{ex.corruption} (hard)", "black")]
        lines += [(line, "black") for line in wrap(draw, ex.question.split("\n")[0], small, width)]
        answer = wrap(draw, f"answer: {D.extract_answer(reply) or reply}", small, width)[:2]
        lines += [(line, "black") for line in answer]
        lines.append((f"truth: {ex.answer}   {'RIGHT' if ok else 'WRONG'}", (0, 120, 0) if ok else (180, 0, 0)))
        for j, (line, colour) in enumerate(lines):
            draw.text((left, top + 4 + 20 * j), line, fill=colour, font=small)
    sheet.save(path)


BAR_SERIES = ("interleaved, bridge", "direct")  # the row accuracy.png shows per checkpoint: the first one it has


def draw_bars(results: dict, path: Path):
    """Accuracy by severity: one bar group per severity, one bar per checkpoint in its BAR_SERIES mode (named in the
    legend), the value over each bar, and a 0-100% axis with a grid line every 20%."""
    palette = [(120, 120, 120), (66, 133, 244), (52, 168, 83), (234, 67, 53), (251, 188, 5)]
    series = {}
    for ckpt, rows in results.items():
        label = next((m for m in BAR_SERIES if m in rows), None)
        if label is not None:
            series[f"{ckpt} ({label})"] = rows[label]
    W, H, left, right, top, bottom = 860, 440, 56, 16, 64, 40
    img = Image.new("RGB", (W, H), "white")
    d, small, big = ImageDraw.Draw(img), font(13), font(15)
    y_of = lambda acc: H - bottom - acc * (H - top - bottom)  # noqa: E731
    for tick in range(0, 101, 20):
        y = y_of(tick / 100)
        d.line([left, y, W - right, y], fill=(225, 225, 225) if tick else "black")
        d.text((left - 8, y), f"{tick}%", fill="black", font=small, anchor="rm")
    group = (W - left - right) / len(SEVERITIES)
    bar = group * 0.8 / max(1, len(series))
    for g, sev in enumerate(SEVERITIES):
        d.text((left + (g + 0.5) * group, H - bottom + 8), sev, fill="black", font=big, anchor="mt")
        for k, r in enumerate(series.values()):
            acc = r[sev]["acc"]
            x0 = left + g * group + group * 0.1 + k * bar
            d.rectangle([x0, y_of(acc), x0 + bar - 3, H - bottom], fill=palette[k % len(palette)])
            d.text((x0 + (bar - 3) / 2, y_of(acc) - 3), f"{100 * acc:.0f}", fill="black", font=small, anchor="mb")
    x = left
    for k, name in enumerate(series):
        d.rectangle([x, 12, x + 12, 24], fill=palette[k % len(palette)])
        d.text((x + 16, 18), name, fill="black", font=small, anchor="lm")
        x += 28 + d.textlength(name, font=small)
    d.text((left, 36), "accuracy on the held-out toy questions, by severity", fill="black", font=small)
    img.save(path)


def toy_checkpoints(cfg: EvalConfig) -> dict:
    """{name: folder} of the toy benchmark: --checkpoints NAME=FOLDER as given, else OUT_ROOT's stages that exist."""
    if cfg.checkpoints:
        return {name: Path(folder) for name, folder in (c.split("=", 1) for c in cfg.checkpoints)}
    return {s: Path(cfg.out_root) / s for s in STAGES if CK.has_checkpoint(Path(cfg.out_root) / s)}


def evaluate_toy(cfg: EvalConfig, run: C.Run):
    ckpts = toy_checkpoints(cfg)
    if not ckpts:
        raise CK.InputError(f"no checkpoints under {cfg.out_root}/ ({', '.join(STAGES)}): run python sft.py first")
    for folder in ckpts.values():  # every row fits every model's positions, before any work
        E.check_positions(E.inference_config(cfg, toy=True), CK.config_from_folder(folder),
                          D.Tokenizer.from_folder(folder), D.toy_questions(), "toy", "the toy world")
    world = D.ToyWorld(cfg.world_seed)
    split = world.eval_split(cfg.n, seed=cfg.seed)
    icfg = E.inference_config(cfg, toy=True)
    probe = D.perception_probe(world, Path(cfg.out_root) / "probe", cfg.probe_n,
                               cfg.probe_steps)  # clean-trained, cached
    modes = {name: {"direct": MODES["direct"]} if name == "base" else MODES for name in ckpts}  # the base never learned
    # the CLEAR format; one bar over every question of every part, in order: main table, per-corruption sets, generator
    corrupted = (("base" in ckpts) + any(name != "base" for name in ckpts)) * len(CORRUPTIONS) * cfg.n_corruption
    flow_n = min(FLOW_CHECK_N, cfg.n) * sum(name != "base" for name in ckpts)
    bar = tqdm(total=cfg.n * len(SEVERITIES) * sum(map(len, modes.values())) + corrupted + flow_n, unit="question",
               dynamic_ncols=True)
    results, models, toks, latents, t0 = {}, {}, {}, {}, time.time()
    for name, folder in ckpts.items():
        models[name] = CK.load_pretrained(folder, run.device, run.dtype)
        toks[name] = D.Tokenizer.from_folder(folder)
        results[name] = evaluate_checkpoint(models[name], toks[name], split, modes[name], icfg, cfg.seed, probe,
                                            cfg.batch, remembered_encoder(models[name], latents), bar, name)
    best = max((c for c in results if c != "base"), key=lambda c: results[c]["interleaved, bridge"]["hard"]["acc"],
               default=None)
    per, hard = {}, per_corruption_split(world, cfg.n_corruption, cfg.seed)
    for name, mode in (("base", "direct"), (best, "interleave")) if cfg.n_corruption else ():
        if name is None or name not in models:
            continue
        bar.set_description(f"{name}, {mode}, per corruption")
        res = E.benchmark(models[name], toks[name], hard, mode, icfg, models[name].encode_pixels, cfg.batch, cfg.seed,
                          bar=bar)
        per[f"{name} ({mode})"] = {k: v["acc"] for k, v in res.items()}
    flow_set, flow = split["hard"][:FLOW_CHECK_N], {}
    for name in (name for name in models if name != "base"):
        bar.set_description(f"{name}, generator check")
        flow[name] = flow_error_by_t(models[name], toks[name], flow_set, seed=cfg.seed)
        bar.update(len(flow_set))
    bar.close()
    paired, split_rows = comparisons(results, seed=cfg.seed), decision_split(results, seed=cfg.seed)
    out = Path(cfg.out)
    report = ["# Toy MMD-Bench", "",
              f"`python evaluate.py --n {cfg.n} --batch {cfg.batch} --seed {cfg.seed}"
              + "".join(f" {c}" for c in (("--checkpoints",) + cfg.checkpoints if cfg.checkpoints else ()))
              + f"` on {run.device}, "
              f"{time.time() - t0:.0f} s in all.", "", "## Accuracy (%) and restore rate", "", main_table(results), "",
              "## Does restoring help the answer?", "", comparison_table(paired), "",
              "Split by each checkpoint's own decision at hard (\"interleaved, bridge\"): the questions it chose "
              "to restore, and the others, against its text-only reasoning on the same questions.", "",
              decision_table(split_rows), "",
              "## Accuracy (%) at hard per corruption", "", corruption_table(per), "",
              "## Restoration quality at hard (PSNR against the clean picture, dB; accuracy % of a perception probe "
              "trained on clean pictures, reading each picture)", "", quality_table(results), ""]
    if flow:
        report += [f"## Generator check at hard (flow-matching MSE of the clean latent at fixed t, {len(flow_set)} "
                   "questions, restore context)", "", flow_table(flow), ""]
    clean = {c: {m: {k: v for k, v in r.items() if k != "_shown"} for m, r in rows.items()}
             for c, rows in results.items()}
    show = "sft" if "sft" in results else best or "base"  # the SFT generator restoring every hard picture

    def write(tmp: Path):  # the four files as one set: a kill leaves the earlier set or this one
        (tmp / "report.md").write_text("\n".join(report))
        (tmp / "report.json").write_text(json.dumps({"main": clean, "comparisons": paired, "decision_split": split_rows,
                                                     "per_corruption": per, "flow_check": flow, "args": vars(cfg)},
                                                    indent=1))
        draw_examples(split["hard"], *results[show]["always restore" if show != "base" else "direct"]["_shown"],
                      tmp / "examples.png")
        draw_bars(results, tmp / "accuracy.png")
    CK.atomic_write_folder(out, write)
    print("\n".join(report))
    print(f"wrote {out}/report.md, report.json, examples.png, accuracy.png")


# ----------------------------------------------------------------------------------------------------------------------
# Real benchmarks (VLMEvalKit TSV)


def load_judge(spec: str | None):
    """'module:function' -> a callable judge(question, prediction, answer) -> float in [0, 1]; never a network default.
    checkpoint.InputError when the spec does not name a function that can be imported."""
    if not spec:
        return None
    module, _, fn = spec.partition(":")
    if not module or not fn:
        raise CK.InputError(f"--judge {spec}: give module:function, e.g. my_judge:score")
    try:
        judge = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise CK.InputError(f"--judge {spec}: cannot import it ({e}); "
                            "the module must be importable from here") from None
    if not callable(judge):
        raise CK.InputError(f"--judge {spec}: {fn} is not a function")
    return judge


def judge_score(judge, spec, question: str, pred: str, answer: str, index) -> float:
    """The judge's score of one open-ended row, which must be a number in [0, 1]."""
    try:
        score = judge(question, pred, answer)
    except Exception as e:  # the user's code: its failure is named, with the row it failed on
        raise CK.InputError(f"--judge {spec or judge} failed on index {index} ({type(e).__name__}: {e})") from None
    try:
        value = float(score)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 <= value <= 1:  # NaN too
        raise CK.InputError(f"--judge {spec or judge} returned {score!r} for index {index}: "
                            "a judge returns a score in [0, 1]")
    return value


def evaluate_tsv(model, tok, path: Path, mode: str, sizes: D.ImageSizes, system: str, seed: int,
                 icfg: E.InferenceConfig, judge=None, table: tuple | None = None,
                 judge_spec: str | None = None) -> dict:
    """Score one VLMEvalKit TSV in one reasoning mode; malformed rows are counted and listed, never scored. table: what
    D.read_tsv(path) returned, when the caller read it already."""
    rows, problems = table or D.read_tsv(path)
    preds, scored, correct, unscored = [], 0, 0.0, []
    by_cat = {}
    gen = torch.Generator().manual_seed(seed)
    cfg = replace(E.mode_config(mode, icfg), vit_transform=sizes.vit)
    for row in rows:
        ex = D.tsv_example(row)  # read_tsv decoded every image fully
        prefix = E.mode_prefixes(mode, [ex], tok, model.encode_pixels, system, sizes)
        tr = E.reason(model, tok, prefix, cfg, gen)[0]
        reply = E.final_text(tr, mode)
        if ex.options:
            score = float(D.is_correct(reply, ex))
        elif judge is not None:
            pred = D.extract_answer(reply)
            score = judge_score(judge, judge_spec, ex.question, reply.strip() if pred is None else pred, ex.answer,
                                row["index"])
        else:
            unscored.append(row["index"])
            score = None
        if score is not None:
            scored += 1
            correct += score
            cat = row.get("category") or "all"
            by_cat.setdefault(cat, []).append(score)
        preds.append({"index": row["index"], "prediction": reply, "answer": ex.answer, "score": score,
                      "restored": tr.restored, "category": row.get("category")})
    return {"file": str(path), "rows": len(rows), "scored": scored, "accuracy": correct / scored if scored else None,
            "restore_rate": sum(p["restored"] for p in preds) / max(1, len(preds)),
            "by_category": {k: sum(v) / len(v) for k, v in by_cat.items()},
            "problems": [{"index": i, "reason": r} for i, r in problems], "unscored": unscored, "predictions": preds}


SUMMARY_HEADER = "| benchmark | scored / rows | accuracy % | restore rate | malformed | unscored (no judge) |"


def evaluate_real(cfg: EvalConfig, run: C.Run):
    judge = load_judge(cfg.judge)
    tables = {tsv: D.read_tsv(tsv) for tsv in cfg.tsv}  # every file and row checked before the model is loaded
    tok = D.Tokenizer.from_folder(cfg.init)
    icfg = E.inference_config(cfg, toy=False)
    for tsv, (rows, _) in tables.items():
        E.check_positions(E.mode_config(cfg.mode, icfg), CK.config_from_folder(cfg.init), tok,
                          [D.mc_prompt(r) if r["options"] else r["question"] for r in rows], cfg.system, tsv)
    model = CK.load_pretrained(cfg.init, run.device, run.dtype)
    sizes = cfg.sizes(model.cfg, toy=False)
    out = Path(cfg.out)
    summary, files = [], {}
    for tsv in cfg.tsv:
        res = evaluate_tsv(model, tok, Path(tsv), cfg.mode, sizes, cfg.system, cfg.seed, icfg, judge, tables[tsv],
                           cfg.judge)
        name = Path(tsv).stem
        files[f"{name}.json"] = json.dumps(res, indent=1)
        acc = "n/a" if res["accuracy"] is None else f"{100 * res['accuracy']:.2f}"
        summary.append(f"| {name} | {res['scored']}/{res['rows']} | {acc} | {100 * res['restore_rate']:.1f}% | "
                       f"{len(res['problems'])} | {len(res['unscored'])} |")
        if res["problems"]:
            print(f"{name}: {len(res['problems'])} malformed rows skipped: "
                  + ", ".join(f"{p['index']} ({p['reason']})" for p in res["problems"][:10]))
        table = "\n".join([SUMMARY_HEADER, "|---|---|---|---|---|---|"] + summary)
        files["summary.md"] = table + "\n"
        write_set(out, files)  # the benchmarks done so far and their summary, all from this run
    print(table)


def write_set(out: Path, files: dict):
    """Write a run's result files {name: text} as one set (checkpoint.atomic_write_folder): a kill leaves the earlier
    set or this one, never files of two runs side by side."""
    CK.atomic_write_folder(out, lambda tmp: [(tmp / name).write_text(text) for name, text in files.items()])


def draw_demo(panels: list, question: str, texts: list, answer: str | None, truth: tuple | None):
    """The demo's picture: one panel per (title, picture or None), each picture scaled to fill it, then the question,
    the model's texts, its answer and, for a toy question, truth = (the true answer, whether the reply is right),
    wrapped between words."""
    cell, text_w, pad, head = 320, 380, 12, 34
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    small, big = font(15), font(18)
    lines = [("question:", big, "black"), *[(ln, small, "black") for ln in wrap(probe, question, small, text_w - pad)]]
    for i, text in enumerate(texts):
        lines += [(f"[{i + 1}]", big, "black")]
        lines += [(ln, small, (70, 70, 70)) for ln in wrap(probe, text, small, text_w - pad)]
    lines.append((f"answer: {answer if answer is not None else '(no <answer> tag)'}", big, "black"))
    if truth is not None:
        ok = truth[1]
        lines.append((f"truth: {truth[0]}   {'RIGHT' if ok else 'WRONG'}", big, (0, 120, 0) if ok else (180, 0, 0)))
    height = max(head + cell, 10 + sum(24 if face is big else 20 for _, face, _ in lines)) + pad
    sheet = Image.new("RGB", (len(panels) * (cell + pad) + text_w, height), "white")
    draw = ImageDraw.Draw(sheet)
    for x, (title, im) in enumerate(panels):
        draw.text((x * (cell + pad) + 4, 8), title, fill="black", font=big)
        if im is not None:
            fill_panel(sheet, im, (x * (cell + pad), head, cell, cell))
        else:
            draw.rectangle([x * (cell + pad), head, x * (cell + pad) + cell - 1, head + cell - 1],
                           outline=(200, 200, 200))
    y, left = 8, len(panels) * (cell + pad)
    for line, face, colour in lines:
        draw.text((left, y), line, fill=colour, font=face)
        y += 24 if face is big else 20
    return sheet


def demo(cfg: EvalConfig, run: C.Run):
    """One picture, one question: the reasoning trace on stdout and input | restored (| clean) | texts in one PNG.
    With --demo-toy N the picture, question, clean picture and answer are held-out toy question N's at hard (the N-th
    question of the toy benchmark), and its picture is saved as input.png beside demo.png."""
    system = CK.checkpoint_system(cfg.init, D.SYSTEM_PROMPTS)
    tok = D.Tokenizer.from_folder(cfg.init)
    if cfg.demo_toy is not None:
        toy = D.ToyWorld(cfg.world_seed).eval_split(cfg.demo_toy + 1, seed=cfg.seed)["hard"][cfg.demo_toy]
        picture, question, title = toy.degraded, toy.question, f"input ({toy.corruption}, hard)"
    else:
        toy, picture, question = None, D.open_image(cfg.image), cfg.question
        title = "input" + (f" ({cfg.degrade})" if cfg.degrade else "")
    E.check_positions(E.inference_config(cfg, toy=system == "toy"), CK.config_from_folder(cfg.init), tok,
                      [question], system, "--question")
    model = CK.load_pretrained(cfg.init, run.device, run.dtype)
    if cfg.degrade:
        kind, severity = cfg.degrade.split(":")
        picture = degrade(picture, kind, severity, cfg.seed)
    sizes = cfg.sizes(model.cfg, toy=toy is not None)
    ex = D.Example(picture, question, "")
    icfg = E.mode_config("interleave", E.inference_config(cfg, toy=system == "toy", vit_transform=sizes.vit))
    prefix = E.mode_prefixes("interleave", [ex], tok, model.encode_pixels, system, sizes)
    tr = E.reason(model, tok, prefix, icfg, torch.Generator().manual_seed(cfg.seed))[0]
    print(f"{cfg.init} ({system} prompt), picture {picture.size[0]}x{picture.size[1]}"
          + (f" degraded by {cfg.degrade}" if cfg.degrade else "") + f"; question: {question}")
    for i, text in enumerate(tr.texts):
        print(f"[{i + 1}] {text}")
        if i < len(tr.latents):
            print(f"    -> restored a {tr.grid[0]}x{tr.grid[1]}-token picture, back into the context by the "
                  f"{icfg.reentry}")
    answer = D.extract_answer(tr.texts[-1]) if tr.texts else None
    print(f"restored: {'yes' if tr.restored else 'no'} | "
          f"answer: {answer if answer is not None else '(no <answer> tag)'}"
          + (f" | truth: {toy.answer}" if toy is not None else ""))
    restored = E.decode_image(model, tr.latents[0], tr.grid) if tr.latents else None
    panels = [(title, picture), ("restored" if restored else "not restored", restored)]
    panels += [("clean", toy.clean)] if toy is not None else []
    truth = None if toy is None else (toy.answer, D.is_correct(E.final_text(tr), toy))
    sheet = draw_demo(panels, question, tr.texts, answer, truth)
    out = Path(cfg.out)

    def write(tmp: Path):
        sheet.save(tmp / "demo.png")
        if toy is not None:
            picture.save(tmp / "input.png")  # the toy question's degraded picture, to try with --image
    CK.atomic_write_folder(out, write)  # as every output folder: whole or nothing
    print(f"wrote {out / 'demo.png'}"
          + (f" and {out / 'input.png'} (try it: --image {out / 'input.png'})" if toy else ""))


def check_checkpoints(prog: str, named: tuple):
    """--checkpoints: NAME=FOLDER each, names distinct, every folder a checkpoint (before any work)."""
    names = []
    for c in named:
        name, _, folder = c.partition("=")
        if not re.fullmatch(r"[\w.-]+", name) or not folder:
            C.refuse(prog, f"--checkpoints {c}: give NAME=FOLDER, e.g. rl_release=out/rl_release (NAME: letters, "
                           "digits, _ . -)")
        if name in names:
            C.refuse(prog, f"--checkpoints: the name {name} is given twice; each checkpoint needs its own")
        if not CK.has_checkpoint(folder):
            C.refuse(prog, f"--checkpoints {c}: {folder} holds no checkpoint (ema.safetensors)")
        names.append(name)


def default_checkpoint(out_root: str) -> str | None:
    """The latest toy stage there is: rl, then bridge, then sft."""
    return next((str(Path(out_root) / s) for s in ("rl", "bridge", "sft") if CK.has_checkpoint(Path(out_root) / s)),
                None)


EVAL_OUTPUTS = ("report.md", "report.json", "examples.png", "accuracy.png", "summary.md", "demo.png")


def check_eval_out(out: Path):
    """Before any work: the results replace --out as a whole (write_set), so it must be new, empty or an earlier
    output of evaluate.py (its files only, *.json of --tsv runs included), and never a checkpoint."""
    problem = CK.output_problem(out)
    if problem:
        raise CK.InputError(f"--out {out} {problem}")
    if out.exists() and not out.is_dir():
        raise CK.InputError(f"--out {out} is a file: pass a folder for the results")
    if (out / "nanoclear.json").exists():
        raise CK.InputError(f"--out {out} is a checkpoint, and the results replace the folder as a whole: pass "
                            "another folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in (CK.MARKER, *EVAL_OUTPUTS)
                    and p.suffix != ".json") if out.is_dir() else []
    if others:
        raise CK.InputError(f"--out {out} holds {others[0]!r}, which evaluate.py did not write, and the results "
                            "replace the folder as a whole: pass a new folder or an earlier evaluate.py output")


def main(argv=None):
    cfg, prog, given = C.parse_flags(EvalConfig, __doc__, argv)
    toy_flags = ("out_root", "checkpoints", "n", "batch", "n_corruption", "world_seed", "probe_n", "probe_steps")
    real_flags = ("mode", *C.SIZE_FLAGS, "judge", "system", "reentry")
    if "tsv" in given and not cfg.tsv:
        C.refuse(prog, "--tsv needs at least one file (a VLMEvalKit TSV)")
    E.check_inference_flags(prog, cfg)
    if cfg.demo_toy is not None:
        C.refuse_given(prog, given, ("image", "question", "degrade", *C.SIZE_FLAGS), "with --demo-toy (it brings its "
                       "own degraded picture and question, at the toy's sizes; for another picture or corruption use "
                       "--image and --degrade)")
    if cfg.image or cfg.question or cfg.degrade or cfg.demo_toy is not None:
        if cfg.demo_toy is None and not (cfg.image and cfg.question):
            C.refuse(prog, "the demo needs both --image PICTURE and --question TEXT (or --demo-toy N for a toy "
                           "question)")
        if cfg.tsv:
            C.refuse(prog, "the demo (--image, --demo-toy) and --tsv (a benchmark) are separate runs")
        toy_only = ("world_seed",) if cfg.demo_toy is not None else ()
        C.refuse_given(prog, given, tuple(f for f in toy_flags[1:] if f not in toy_only) + ("mode", "judge", "system"),
                       "in the demo (one picture, interleaved reasoning)")
        if cfg.degrade and (cfg.degrade.count(":") != 1 or cfg.degrade.split(":")[0] not in CORRUPTIONS
                            or cfg.degrade.split(":")[1] not in D.SEVERITIES):
            C.refuse(prog, f"--degrade {cfg.degrade}: use KIND:SEVERITY with KIND one of {', '.join(CORRUPTIONS)} and "
                           f"SEVERITY one of {', '.join(D.SEVERITIES)}")
        picture = D.open_image(cfg.image) if cfg.image else None  # before any work: not a picture stops here
        if cfg.degrade and min(picture.size) < D.MIN_SIZE:
            C.refuse(prog, f"--image {cfg.image} is {picture.width}x{picture.height} px: --degrade needs at least "
                           f"{D.MIN_SIZE} px a side")
        init = cfg.init or default_checkpoint(cfg.out_root)
        if init is None:
            C.refuse(prog, f"no --init and no checkpoint under {cfg.out_root}/ (rl, bridge, sft): "
                           "run python sft.py first")
        cfg = replace(cfg, init=init, out="out/demo" if cfg.out is None else cfg.out)
        mode = "demo"
    elif cfg.tsv:
        if not cfg.init:
            C.refuse(prog, "--tsv needs --init PATH (a BAGEL-format checkpoint folder)")
        C.refuse_given(prog, given, toy_flags, "with --tsv (toy benchmark flags)")
        if cfg.mode in ("direct", "text"):  # one text answer, the picture as ViT tokens only
            C.refuse_given(prog, given, ("reentry", "max_rounds", "denoise_steps", "timestep_shift", "cfg_text_scale",
                                         "cfg_img_scale", "cfg_interval", "cfg_renorm_type", "vae_max", "vae_min",
                                         "system"),
                           f"with --mode {cfg.mode} (it never restores, and shows the picture as ViT tokens only)")
        names = [Path(t).stem for t in cfg.tsv]
        if len(set(names)) < len(names):
            twice = max(names, key=names.count)
            C.refuse(prog, f"--tsv: two files are named {twice}.tsv, and their results ({twice}.json) would overwrite "
                           "each other; rename one")
        load_judge(cfg.judge)  # before any work
        mode = "tsv"
        cfg = replace(cfg, out="out/eval_tsv" if cfg.out is None else cfg.out)
    else:
        C.refuse_given(prog, given, ("init",) + real_flags,
                       "on the toy benchmark (it runs every mode and re-entry path; pass --tsv for a real benchmark)")
        check_checkpoints(prog, cfg.checkpoints)
        mode = "toy"
        cfg = replace(cfg, out="out/eval" if cfg.out is None else cfg.out)
    if mode == "tsv":  # the prompt --init was trained with; the toy's only for a toy checkpoint
        trained = CK.checkpoint_system(cfg.init, D.SYSTEM_PROMPTS)
        if cfg.system == "toy" and trained != "toy":
            C.refuse(prog, f"--system toy: the toy prompt describes the toy world's tags and rule; {cfg.init} was "
                           "trained under the official INTERLEAVE_REASON_SYSTEM_PROMPT (its nanoclear.json, or a BAGEL "
                           "or CLEAR folder)")
        cfg = replace(cfg, system=cfg.system or trained)
    with C.output_lock(cfg.out):  # before any work: --out can be written, and by this run only
        check_eval_out(Path(cfg.out))
        run = C.setup_run(cfg.device, cfg.dtype, cfg.seed, cfg.threads)
        with torch.no_grad():  # each mode checks its rows against the model's positions before any work
            {"demo": demo, "tsv": evaluate_real, "toy": evaluate_toy}[mode](cfg, run)


if __name__ == "__main__":
    C.run_cli(main)

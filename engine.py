"""
CLEAR inference: generate-then-answer with the KV cache, batched over rows (CLEAR §3.1, §3.3; official
inferencer.py interleave_reason_tool_condition), used by evaluation, RL rollouts, the stages' summary tables and demos.

A row is one question. Its prefix (system prompt, degraded image as VAE + ViT tokens, question) is prefilled; then up
to `max_rounds` text segments are decoded. A segment holding <answer>...</answer> ends the row; one ending in
<image_restore> makes the model denoise a restored image, which re-enters the context through bridge.reenter, the
switch between the Latent Representation Bridge (CLEAR §3.3) and the decode-reencode detour it replaces.
Images are sampled by the Euler ODE with classifier-free guidance (evaluation) or by the SDE without guidance,
recording every step (RL rollouts, CLEAR §3.4).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

import bridge
import data as D
import model as M

MODES = ("direct", "text", "interleave", "always_restore")  # answer at once | text-only reasoning | CLEAR | restore first


@dataclass
class InferenceConfig:
    reentry: str = "bridge"  # how a restored image re-enters the context (see module docstring)
    allow_restore: bool = True  # False: one text segment, no restoration (direct / text-only reasoning)
    force_restore: bool = False  # restore before anything else ("perception enhancement")
    max_rounds: int = 3  # text segments per question (official max_inter_num)
    max_text_tokens: int = 64  # per segment (official max_think_token_n 4096)
    temperature: float = 0.0  # 0 = greedy (official evaluation)
    top_p: float = 1.0
    sampler: str = "ode"  # ode: Euler + CFG (evaluation) | sde: stochastic, recorded, no CFG (RL rollouts)
    num_timesteps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 3.0
    cfg_img_scale: float = 1.5
    cfg_interval: tuple = (0.4, 1.0)
    cfg_renorm_type: str = "text_channel"
    cfg_renorm_min: float = 0.0
    sde_sigma: float = 0.3
    vit_transform: tuple = D.TOY_SIZES.vit  # (max, min, stride) of re-encoded ViT images (BAGEL app: 980, 224, 14)

    def __post_init__(self):
        if self.reentry not in bridge.REENTRY:
            raise ValueError(f"reentry must be one of {bridge.REENTRY}, not {self.reentry!r}")
        if self.sampler not in ("ode", "sde"):
            raise ValueError(f"sampler must be 'ode' or 'sde', not {self.sampler!r}")


@dataclass
class Trace:
    """Everything one row produced, in context order, so a forward can replay exactly the sampled context."""
    texts: list = field(default_factory=list)  # decoded strings, one per segment
    ids: list = field(default_factory=list)  # token ids per segment (without <|im_start|> and the stop token)
    logps: list = field(default_factory=list)  # log-prob of each sampled token, stop token included
    stopped: list = field(default_factory=list)  # did the segment end with <|im_end|> (else truncated)
    latents: list = field(default_factory=list)  # restored x0 tokens [N, D] per restoration
    steps: list = field(default_factory=list)  # SDE steps per restoration (sampler == 'sde')
    grid: tuple = ()
    answer: str | None = None

    @property
    def restored(self) -> bool:
        return len(self.latents) > 0


def prefill(model: M.Bagel, cache: M.KVCache, prefixes: list[list], texts_only: bool = False):
    """Prefill each row's prefix segments; rows must share the segment structure (same kinds, image grids)."""
    kinds = [[type(s).__name__ for s in p] for p in prefixes]
    if any(k != kinds[0] for k in kinds):
        raise ValueError("rows of one batch need prefixes of the same structure (segment kinds in the same order)")
    for i, seg in enumerate(prefixes[0]):
        segs = [p[i] for p in prefixes]
        if isinstance(seg, M.Text):
            model.add_text(cache, [s.ids for s in segs])
        elif texts_only:
            continue
        elif isinstance(seg, M.VitImage):
            model.add_vit_image(cache, torch.stack([s.pixels for s in segs]))
        elif isinstance(seg, M.VaeImage):
            model.add_latent(cache, torch.stack([s.tokens for s in segs]), seg.grid)


@torch.no_grad()
def reason(model: M.Bagel, tokenizer, prefixes: list[list], cfg: InferenceConfig,
           generator: torch.Generator | None = None) -> list[Trace]:
    """Run CLEAR's interleaved reasoning loop on a batch of prefixes; returns one Trace per row."""
    B = len(prefixes)
    grid = next((s.grid for s in prefixes[0] if isinstance(s, M.VaeImage)), None)
    cache = model.new_cache(B)
    prefill(model, cache, prefixes)
    guided = cfg.sampler == "ode" and cfg.cfg_text_scale > 1.0 and cfg.allow_restore
    img_cache = None
    if guided and cfg.cfg_img_scale > 1.0:  # official: the image-unconditional context holds the texts only
        img_cache = model.new_cache(B)
        prefill(model, img_cache, prefixes, texts_only=True)
    traces = [Trace(grid=grid) for _ in range(B)]
    active = torch.ones(B, dtype=torch.bool)
    for round_ in range(1, cfg.max_rounds + 1):
        text_cache = cache.copy() if guided else None  # official: context before the last text (consider_think)
        if cfg.force_restore and round_ == 1:
            ids = [tokenizer.encode(D.RESTORE_TOKEN)] * B
            model.add_text(cache, ids, active=active)
            logps, stops = [[] for _ in range(B)], [model.cfg.eos_token_id] * B
        else:
            ids, logps, stops = model.decode_text(cache, cfg.max_text_tokens, cfg.temperature, cfg.top_p,
                                                  generator=generator, active=active)
        if img_cache is not None:
            model.add_text(img_cache, ids, active=active)
        want = torch.zeros(B, dtype=torch.bool)
        for b in range(B):
            if not active[b]:
                continue
            tr, text = traces[b], tokenizer.decode(ids[b])
            tr.texts.append(text), tr.ids.append(ids[b]), tr.logps.append(logps[b])
            tr.stopped.append(stops[b] == model.cfg.eos_token_id)
            tr.answer = D.extract_answer(text)
            if tr.answer is None and D.requests_restore(text) and cfg.allow_restore and round_ < cfg.max_rounds and grid:
                want[b] = True  # official: restore only while rounds remain
        if not want.any():
            break
        rows = want.nonzero().squeeze(1)
        x0, steps = restore(model, cache.rows(rows), grid, cfg, generator,
                            text_cache.rows(rows) if guided else None, img_cache.rows(rows) if img_cache is not None else None)
        full = torch.zeros(B, *x0.shape[1:])
        full[rows] = x0.cpu()
        bridge.reenter(model, cache, full, grid, want, cfg.reentry, cfg.vit_transform)
        for j, b in enumerate(rows.tolist()):
            traces[b].latents.append(x0[j].cpu())
            traces[b].steps.append([{k: (v[j].cpu() if torch.is_tensor(v) else v) for k, v in s.items()} for s in steps])
        if img_cache is not None:
            img_cache = cache.copy()  # official: both CFG contexts become copies of the context after restoration
        active = want
    return traces


def restore(model: M.Bagel, cache: M.KVCache, grid: tuple, cfg: InferenceConfig, generator, text_cache, img_cache):
    """Denoise a restored latent for each row of `cache` (its rows all asked for <image_restore>)."""
    N = grid[0] * grid[1]
    dev = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(cache.batch, N, model.cfg.patch_latent_dim, generator=generator, device=dev)
    if cfg.sampler == "sde":  # CLEAR §3.4: SDE sampler, CFG off, every step recorded for Flow-GRPO
        return model.sample_sde(cache, grid, noise, cfg.num_timesteps, cfg.timestep_shift, cfg.sde_sigma, generator)
    x0, _ = model.generate_image(cache, grid, noise, cfg.num_timesteps, cfg.timestep_shift, cfg_text_cache=text_cache,
                              cfg_img_cache=img_cache, cfg_text_scale=cfg.cfg_text_scale if text_cache is not None else 1.0,
                              cfg_img_scale=cfg.cfg_img_scale, cfg_interval=cfg.cfg_interval,
                              cfg_renorm_type=cfg.cfg_renorm_type, cfg_renorm_min=cfg.cfg_renorm_min)
    return x0, []


# ----------------------------------------------------------------------------------------------------------------------
# The toy benchmark (what sft.py, bridge.py and rl.py print at the end; evaluate.py builds the full tables on it)


def mode_config(mode: str, base: InferenceConfig) -> InferenceConfig:
    """Reasoning modes of the paper's comparison (BAGEL / BAGEL-RE / CLEAR / BAGEL-PE)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode in ("direct", "text"):
        return replace(base, allow_restore=False, force_restore=False, max_rounds=1)
    return replace(base, allow_restore=True, force_restore=mode == "always_restore")


def mode_prefixes(mode: str, examples: list, tok, encode, system: str = "toy", sizes=D.TOY_SIZES) -> list[list]:
    """What the model is shown in each mode: direct = BAGEL's understanding format (ViT image, question); text = BAGEL's
    thinking prompt with the image as ViT only (official text_reason, is_thinking: VLM_THINK_SYSTEM_PROMPT);
    interleave / always_restore = CLEAR's prefix."""
    vit = lambda ex: M.VitImage(D.image_to_tensor(D.resize_image(ex.degraded, *sizes.vit)))  # noqa: E731
    if mode == "direct":
        return [[vit(ex), M.Text(tok.encode(ex.question))] for ex in examples]
    if mode == "text":
        return [[M.Text(tok.encode(D.VLM_THINK_SYSTEM_PROMPT)), vit(ex), M.Text(tok.encode(ex.question))] for ex in examples]
    return D.inference_prefix(examples, tok, encode, system, sizes)


def final_text(trace: Trace, mode: str = "interleave") -> str:
    """The reply that is scored (official BagelInference.generate_inner): in text mode the <answer> content, empty
    when there is none; otherwise the last decoded text (output_list[-1]), whose <answer> content data.is_correct
    reads, or the whole reply when it has none (VLMEvalKit)."""
    last = trace.texts[-1] if trace.texts else ""
    return (D.extract_answer(last) or "") if mode == "text" else last


def benchmark(model: M.Bagel, tok, split: dict, mode: str, cfg: InferenceConfig, encode, batch_size: int = 32,
              seed: int = 0, system: str = "toy", bar: tqdm | None = None) -> dict:
    """Accuracy and restore rate per severity on aligned example lists {severity: [Example]} (same questions).
    Each set samples from its own generator, seeded by (seed, set name): a set's numbers do not depend on which
    other sets are evaluated with it. `bar`: a progress bar advanced by each question, showing the set's name."""
    cfg = mode_config(mode, cfg)
    result = {}
    for sev, examples in split.items():
        digest = hashlib.blake2b(f"{seed}:{sev}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)
        t0, traces = time.time(), []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            if bar is not None:
                bar.set_postfix_str(sev)
            traces += reason(model, tok, mode_prefixes(mode, chunk, tok, encode, system), cfg, gen)
            if bar is not None:
                bar.update(len(chunk))
        right = [D.is_correct(final_text(tr, mode), ex) for ex, tr in zip(examples, traces)]
        restored = [tr.restored for tr in traces]
        result[sev] = {"acc": sum(right) / len(examples), "restore": sum(restored) / len(examples),
                       "seconds": time.time() - t0, "correct": right, "restored": restored, "traces": traces}
    return result


def toy_table(models: dict, modes: dict, tok, split: dict, cfg: InferenceConfig, seed: int = 0, system: str = "toy") -> str:
    """Markdown table: accuracy per severity and restore rate on the held-out toy split, one row per checkpoint."""
    lines = ["| model | mode | clean | low | mid | hard | restore low / mid / hard | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    bar = tqdm(total=len(models) * sum(map(len, split.values())), leave=False, dynamic_ncols=True, unit="question")
    for name, model in models.items():
        bar.set_description(f"table: {name}, {modes[name]}")
        res = benchmark(model, tok, split, modes[name], cfg, model.encode_pixels, seed=seed, system=system, bar=bar)
        accs = " | ".join(f"{100 * res[s]['acc']:.1f}" for s in ("clean", "low", "mid", "hard"))
        rr = " / ".join(f"{100 * res[s]['restore']:.0f}%" for s in ("low", "mid", "hard"))
        lines.append(f"| {name} | {modes[name]} | {accs} | {rr} | {sum(r['seconds'] for r in res.values()):.0f} |")
    bar.close()
    return "\n".join(lines)

"""
CLEAR inference: generate-then-answer with the KV cache, batched over rows (CLEAR §3.1, §3.3; official
inferencer.py interleave_reason_tool_condition), used by evaluation, RL rollouts, the stages' summary tables and demos.

A row is one question. Its prefix (system prompt, degraded image as VAE + ViT tokens, question) is prefilled; then up
to `max_rounds` text segments are decoded. A segment holding <answer>...</answer> ends the row; one ending in
<image_restore> makes the model denoise a restored image, which re-enters the context through `reenter`, the switch
between the Latent Representation Bridge (CLEAR §3.3) and the decode-reencode detour it replaces; RL's training replay
uses the same switch (`reentry_segments`), so it scores exactly the context a rollout was sampled in.
Images are sampled by the Euler ODE with classifier-free guidance (evaluation) or by the SDE without guidance,
recording every step (RL rollouts, CLEAR §3.4).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, fields, replace

import torch
from tqdm import tqdm

import checkpoint as CK
import data as D
import model as M
from common import SEED, flag, refuse, refuse_given

# answer at once | text-only reasoning | CLEAR | restore first
MODES = ("direct", "text", "interleave", "always_restore")
REENTRY = ("bridge", "decode_reencode", "decode_reencode_vae")  # how a restored picture re-enters the context

# ----------------------------------------------------------------------------------------------------------------------
# The re-entry switch (CLEAR §3.3): what a restored latent becomes in the context, for inference and RL's replay alike


def decode_image(model: M.Bagel, x0: torch.Tensor, grid: tuple):
    """Restored latent tokens [N, D] -> the 8-bit PIL picture (BAGEL decode_image): the detour's first half."""
    return D.tensor_to_image(model.decode_latent(x0, grid))


def reentry_segments(model: M.Bagel, x0: torch.Tensor, grid: tuple, reentry: str, vit_sizes: tuple) -> list:
    """The context segments through which one restored latent x0 [N, D] re-enters:
      * bridge: x0 itself as a clean VAE block, b(x0) = vae2llm(x0) + time_embedder(0) + latent_pos_embed (CLEAR §3.3;
        official output_need_vae), exactly how a clean conditioning picture enters BAGEL;
      * decode_reencode: x0 -> VAE decoder -> 8-bit picture -> ViT at vit_sizes (official output_need_vit);
      * decode_reencode_vae: the same picture through the VAE as well as the ViT (BAGEL's update_context_image)."""
    if reentry == "bridge":
        return [M.VaeImage(x0, grid, droppable=False)]
    if reentry not in REENTRY:
        raise ValueError(f"reentry must be one of {REENTRY}, not {reentry!r}")
    picture = decode_image(model, x0, grid)  # official: VAE decode -> 8-bit picture
    vit = M.VitImage(D.image_to_tensor(D.resize_image(picture, *vit_sizes)), droppable=False)
    if reentry == "decode_reencode":
        return [vit]
    latent, _ = model.encode_pixels(D.image_to_tensor(picture)[None])
    return [M.VaeImage(latent[0], grid, droppable=False), vit]  # BAGEL update_context_image: VAE block first


def reenter(model: M.Bagel, cache: M.KVCache, x0: torch.Tensor, grid: tuple, rows: torch.Tensor, reentry: str,
            vit_sizes: tuple):
    """Put restored latents x0 [B, N, D] back into the context of the selected rows [B] (bool), through
    reentry_segments; the other rows are left as they are."""
    idx = rows.nonzero().squeeze(1).tolist()
    restored = {b: reentry_segments(model, x0[b], grid, reentry, vit_sizes) for b in idx}
    blank = [zeros_like(s) for s in restored[idx[0]]]  # the rows left alone: placeholders of the same shapes
    prefill(model, cache, [restored.get(b, blank) for b in range(len(x0))], active=rows)


def zeros_like(seg):
    """A VitImage or VaeImage of the same shape, all zeros."""
    if isinstance(seg, M.VitImage):
        return replace(seg, pixels=torch.zeros_like(seg.pixels))
    return replace(seg, tokens=torch.zeros_like(seg.tokens))


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
        if self.reentry not in REENTRY:
            raise ValueError(f"reentry must be one of {REENTRY}, not {self.reentry!r}")
        if self.sampler not in ("ode", "sde"):
            raise ValueError(f"sampler must be 'ode' or 'sde', not {self.sampler!r}")



# The denoising grid's flags: far beyond the official values (50 points, shift 3), and within what the grid's float32
# arithmetic holds. A shift far from 1 crowds the points together until two are equal and the SDE's step divides by
# zero (a NaN restoration, then a crash sampling the next text); every point is a model call
GRID_POINTS = "[2, 10000]"
SHIFTS = "[0.001, 1000]"


@dataclass
class InferenceFlags:
    """The inference settings a script exposes as flags (the stages' toy tables, evaluate.py); `inference_config` maps
    them to an InferenceConfig."""
    reentry: str = flag("bridge", "how a restored picture re-enters the context (CLEAR: bridge)", choices=REENTRY,
                        group="inference")
    max_rounds: int = flag(3, "text segments per question (official max_inter_num 3)", "[1, inf)", group="inference")
    max_text_tokens: int | None = flag(None, "tokens per decoded segment (default: toy 48; real data 4096, official)",
                                       "[1, inf)", group="inference", type=int)
    denoise_steps: int | None = flag(None, "denoising points when restoring (default: toy 10; real data 50, official)",
                                     GRID_POINTS, group="inference", type=int)
    timestep_shift: float = flag(3.0, "timestep shift of the denoising grid (official 3.0)", SHIFTS,
                                 group="inference")
    cfg_text_scale: float = flag(3.0, "text CFG when restoring (official 3.0)", "[0, inf)", group="inference")
    cfg_img_scale: float = flag(1.5, "image CFG when restoring (official 1.5)", "[0, inf)", group="inference")
    cfg_interval: tuple = flag((0.4, 1.0), "CFG on for t in (LO, HI] (official 0.4 1.0)", "[0, 1]", group="inference")
    cfg_renorm_type: str = flag("text_channel", "CFG renorm (official text_channel)",
                                choices=["global", "channel", "text_channel"], group="inference")



INFERENCE_FLAGS = tuple(f.name for f in fields(InferenceFlags))


@dataclass
class ToyTableFlags:
    eval_n: int = flag(128, "held-out toy questions per severity in the table at the end (0 = no table)", "[0, inf)",
                       group="summary table")
    eval_seed: int = flag(0, "held-out split seed", SEED, group="summary table")

TOY_INFERENCE = dict(max_text_tokens=48, num_timesteps=10)  # CPU-sized: the toy's replies are a few dozen tokens
OFFICIAL_INFERENCE = dict(max_text_tokens=4096, num_timesteps=50)  # official max_think_token_n, num_timesteps


def inference_config(flags: InferenceFlags, toy: bool, **overrides) -> InferenceConfig:
    """The one mapping from inference flags to an InferenceConfig; unset lengths take the toy's or the official
    values, and `overrides` (a rollout's sampler, say) win over both."""
    default = TOY_INFERENCE if toy else OFFICIAL_INFERENCE
    values = dict(reentry=flags.reentry, max_rounds=flags.max_rounds, timestep_shift=flags.timestep_shift,
                  cfg_text_scale=flags.cfg_text_scale, cfg_img_scale=flags.cfg_img_scale,
                  cfg_interval=tuple(flags.cfg_interval), cfg_renorm_type=flags.cfg_renorm_type,
                  max_text_tokens=(default["max_text_tokens"] if flags.max_text_tokens is None
                                   else flags.max_text_tokens),
                  num_timesteps=default["num_timesteps"] if flags.denoise_steps is None else flags.denoise_steps)
    return InferenceConfig(**{**values, **overrides})


def check_table_flags(prog: str, cfg, given: set, table_flags: tuple, no_table: str | None):
    """A stage's summary table runs on the toy world: where there is none (no_table says why) or with --eval-n 0, the
    flags that only shape it are refused (--eval-n 0 itself is accepted); returns cfg with eval_n 0 then."""
    if no_table is None and cfg.eval_n:
        return cfg
    refuse_given(prog, given - {"eval_n"} if cfg.eval_n == 0 else given, table_flags,
                 no_table or "with --eval-n 0 (no summary table)")
    return replace(cfg, eval_n=0)


def positions_needed(cfg: InferenceConfig, prefix: int, restore_text: int = 1) -> int:
    """The most RoPE positions one row can take: its prefix, then max_rounds text segments of max_text_tokens (or the
    forced <image_restore> of restore_text tokens), each framed by <|im_start|> and <|im_end|>, and a restored picture
    re-entering before every later round (one position per image block; the noised block takes none)."""
    pictures = {"bridge": 1, "decode_reencode": 1, "decode_reencode_vae": 2}[cfg.reentry]
    rounds = cfg.max_rounds if cfg.allow_restore else 1
    return prefix + rounds * (max(cfg.max_text_tokens, restore_text) + 2) + (rounds - 1) * pictures


def check_positions(cfg: InferenceConfig, model_cfg: M.ModelConfig, tok, questions, system: str,
                    source: str):
    """Before any work: InputError for inference settings whose longest row would run past the model's positions
    (max_position_embeddings), which fails mid-run. The prefix counted is the longest a mode builds: a system prompt
    (the stage's or the text mode's), the picture as VAE and as ViT block, the longest of `questions`."""
    prompt = max(len(tok.encode(D.SYSTEM_PROMPTS[system])), len(tok.encode(D.VLM_THINK_SYSTEM_PROMPT)))
    longest = max(len(tok.encode(q.replace("<image>", "").strip())) for q in questions)
    prefix = prompt + 2 + 2 + longest + 2
    need = positions_needed(cfg, prefix, len(tok.encode(D.RESTORE_TOKEN)))
    if need > model_cfg.max_position_embeddings:
        raise CK.InputError(f"--max-text-tokens {cfg.max_text_tokens} with --max-rounds {cfg.max_rounds}: a row takes "
                            f"up to {need} positions (a prefix of {prefix} with the longest question of {source}, then "
                            f"every round), but the model's positions end at {model_cfg.max_position_embeddings}: "
                            "pass a smaller --max-text-tokens or --max-rounds")


def check_time_grid(prog: str, shift: float, points: int, flag: str):
    """Refuse a shift and a number of points whose shifted grid has two equal points in float32 (the step between them
    is zero, and the SDE divides by it)."""
    ts = M.flow_timesteps(points, shift)
    if not bool(torch.isfinite(ts).all()) or not bool((ts[:-1] > ts[1:]).all()):
        refuse(prog, f"--timestep-shift {shift} with {points} {flag}: two points of the shifted time grid are equal in "
                     "float32 (a step of zero); pass a shift nearer 1 (official 3.0) or fewer points")


def check_inference_flags(prog: str, flags: InferenceFlags):
    lo, hi = flags.cfg_interval
    if lo >= hi:
        refuse(prog, f"--cfg-interval {lo} {hi}: CFG is on for t in (LO, HI], so LO must be below HI")
    check_time_grid(prog, flags.timestep_shift, flags.denoise_steps or OFFICIAL_INFERENCE["num_timesteps"],
                    "--denoise-steps")

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


def prefill(model: M.Bagel, cache: M.KVCache, prefixes: list[list], texts_only: bool = False, active=None):
    """Prefill each row's segments; rows must share the segment structure (same kinds, image grids). Rows where
    `active` [B] is False are left unchanged."""
    kinds = [[type(s).__name__ for s in p] for p in prefixes]
    if any(k != kinds[0] for k in kinds):
        raise ValueError("rows of one batch need prefixes of the same structure (segment kinds in the same order)")
    for i, seg in enumerate(prefixes[0]):
        segs = [p[i] for p in prefixes]
        if isinstance(seg, M.Text):
            model.add_text(cache, [s.ids for s in segs], active=active)
        elif texts_only:
            continue
        elif isinstance(seg, M.VitImage):
            model.add_vit_image(cache, torch.stack([s.pixels for s in segs]), active=active)
        elif isinstance(seg, M.VaeImage):
            model.add_latent(cache, torch.stack([s.tokens for s in segs]), seg.grid, active=active)


def structure(prefix: list) -> tuple:
    """What the rows of one batch must share: segment kinds in order and every picture's size (texts may differ)."""
    size = {M.VaeImage: lambda s: s.grid, M.VitImage: lambda s: tuple(s.pixels.shape)}
    return tuple((type(s).__name__, size.get(type(s), lambda s: None)(s)) for s in prefix)


@torch.no_grad()
def reason(model: M.Bagel, tokenizer, prefixes: list[list], cfg: InferenceConfig,
           generator: torch.Generator | None = None) -> list[Trace]:
    """Run CLEAR's interleaved reasoning loop on a batch of prefixes; returns one Trace per row. Rows whose prefixes
    differ in structure (real data: pictures of other sizes) run as separate batches, in order of first appearance."""
    groups = {}
    for i, p in enumerate(prefixes):
        groups.setdefault(structure(p), []).append(i)
    if len(groups) > 1:
        traces = [None] * len(prefixes)
        for rows in groups.values():
            for i, tr in zip(rows, reason(model, tokenizer, [prefixes[i] for i in rows], cfg, generator)):
                traces[i] = tr
        return traces
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
            tr.texts.append(text)
            tr.ids.append(ids[b])
            tr.logps.append(logps[b])
            tr.stopped.append(stops[b] == model.cfg.eos_token_id)
            tr.answer = D.extract_answer(text)
            if (tr.answer is None and D.requests_restore(text) and cfg.allow_restore and
                    round_ < cfg.max_rounds and grid):
                want[b] = True  # official: restore only while rounds remain
        if not want.any():
            break
        rows = want.nonzero().squeeze(1)
        x0, steps = restore(model, cache.rows(rows), grid, cfg, generator,
                            text_cache.rows(rows) if guided else None,
                            img_cache.rows(rows) if img_cache is not None else None)
        full = x0.new_zeros(B, *x0.shape[1:])  # x0 stays on its device
        full[rows] = x0
        reenter(model, cache, full, grid, want, cfg.reentry, cfg.vit_transform)
        for j, b in enumerate(rows.tolist()):
            traces[b].latents.append(x0[j].cpu())
            traces[b].steps.append([{k: (v[j].cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
                                    for s in steps])
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
                              cfg_img_cache=img_cache,
                              cfg_text_scale=cfg.cfg_text_scale if text_cache is not None else 1.0,
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
        return [[M.Text(tok.encode(D.VLM_THINK_SYSTEM_PROMPT)), vit(ex), M.Text(tok.encode(ex.question))]
                for ex in examples]
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


def toy_table(models: dict, modes: dict, tok, split: dict, cfg: InferenceConfig, seed: int = 0,
              system: str = "toy") -> str:
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

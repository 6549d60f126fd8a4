"""
Speed and memory of nanoCLEAR, each figure next to the physical bound it is measured against (README "Speed").

    python bench.py                                   # every section at the tiny size on this machine (CPU: minutes)
    python bench.py --only train_overhead degrade     # CPU checks: MoT/packing cost vs a plain transformer; corruptions
    python bench.py --preset bagel-7b-mot --device cuda --dtype bf16     # BAGEL-7B-MoT shapes on a GPU (random weights)

Sections (random weights in the preset's real shapes, no download; warm-up excluded; medians; peak memory on GPU):
  decode          text tokens/s at batch 1 and 8 with the KV cache; bound = bytes read per token / memory bandwidth
  prefill         tokens/s of a ~2k-token interleaved sequence with one ViT image; bound = FLOPs / matmul peak
  denoise         one denoising step (1024 latent tokens, ~1k context, 3 CFG branches) and a 50-step generation
  reentry         a restored image back into the context: bridge vs decode-reencode, as a ratio
  train           forward + backward + AdamW of a ~1B-parameter config on packed 8k-token rows: tokens/s and MFU
  train_overhead  the tiny default's training step vs a plain dense transformer of the same width/depth (CPU; the two
                  take turns, and the ratio is the median of the rounds' ratios)
  degrade         each corruption at 256x256 on one thread
  profile         where one step of each toy stage spends its time, by phase (wall clock) and by kind of op
                  (torch.profiler self time): Stage 0 unified step, Stage 1 SFT step, RL step (rollouts + update),
                  evaluation batch; tiny preset, CPU, random weights (every rollout and evaluation row restores once,
                  and its text runs to the token limit: a trained model writes shorter texts)
The bounds: memory bandwidth and matmul peak are the device's datasheet values when known (H100 SXM: 3.35 TB/s,
989 TFLOP/s dense bf16; H200: 4.8 TB/s, same peak) and otherwise measured here (a large copy, a large matmul).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import common as C
import model as M

DATASHEET = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}  # HBM bytes/s, dense bf16 FLOP/s


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() over repeats, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_pair(fn_a, fn_b, device, repeats: int = 7) -> tuple[float, float, float]:
    """Median seconds of fn_a() and fn_b() run in turn (a, b, a, b, ... after one warm-up call each) and the median of
    the per-round ratios a / b: taking turns keeps the ratio meaningful when the machine's speed drifts."""
    fn_a(), fn_b()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, a), (fn_b, b)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def peak_memory(device) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"


def bounds(device, dtype) -> tuple[float, float, str]:
    """(memory bytes/s, matmul FLOP/s, where they come from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        for key, (bw, flops) in DATASHEET.items():
            if key in name:
                return bw, flops, f"{key} datasheet"
    n = 1 << 26 if device.type == "cuda" else 1 << 24
    src = torch.empty(n, device=device, dtype=torch.float32)
    bw = 2 * src.numel() * 4 / timed(lambda: src.clone(), device)
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    flops = 2 * 2048 ** 3 / timed(lambda: a @ a, device)
    return bw, flops, "measured (copy bandwidth, 2048^3 matmul)"


def build(cfg: M.ModelConfig, device, dtype) -> M.Bagel:
    """Random weights in the real shapes, materialised directly on the device (meta init, no CPU copy)."""
    with torch.device("meta"):
        model = M.Bagel(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or p.dim() == 1:
                p.fill_(1.0 if "norm" in name and "weight" in name else 0.0)
            else:
                p.normal_(0, 0.02)
        model.vit_pos_embed.pos_embed.copy_(M.sincos_2d(cfg.hidden_size, cfg.vit_max_num_patch_per_side))
        model.latent_pos_embed.pos_embed.copy_(M.sincos_2d(cfg.hidden_size, cfg.max_latent_size))
    return model.eval()


def expert_params(cfg: M.ModelConfig) -> int:
    """Parameters one token touches in the LLM (one expert of every layer, embeddings excluded)."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim  # noqa: E741
    attn = H * cfg.num_attention_heads * hd * 2 + H * cfg.num_key_value_heads * hd * 2
    return cfg.num_hidden_layers * (attn + 3 * H * I)


def llm_flops(cfg: M.ModelConfig, tokens: int, context: float) -> float:
    """Forward FLOPs: 2 * active params per token + attention (QK^T and AV) over `context` keys per token."""
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context
    return tokens * (2 * expert_params(cfg) + attn + 2 * cfg.hidden_size * cfg.vocab_size * 0)


# ----------------------------------------------------------------------------------------------------------------------


def bench_decode(cfg, device, dtype, context: int = 1024, new: int = 32) -> list[dict]:
    model = build(cfg, device, dtype)
    bw, _, src = bounds(device, dtype)
    rows = []
    for batch in (1, 8):
        cache = model.new_cache(batch, capacity=context + new + 8)
        with torch.no_grad():
            model.add_text(cache, [[cfg.bos_token_id] * (context - 2)] * batch)
            snapshot = cache.copy()

            def run():
                c = snapshot.copy()
                model.decode_text(c, new, stop_ids=())
            secs = timed(run, device, repeats=3)
        per_token = secs / (new + 2)
        weight_bytes = (expert_params(cfg) + cfg.hidden_size * cfg.vocab_size) * torch.finfo(dtype).bits // 8
        kv_bytes = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * batch
                    * torch.finfo(dtype).bits // 8)
        bound = bw / (weight_bytes + kv_bytes)  # decode steps per second if reading were the only cost
        rows.append({"section": f"decode batch {batch}", "measured": f"{batch / per_token:.1f} tok/s",
                     "bound": f"{batch * bound:.1f} tok/s ({src})", "of bound": f"{100 / per_token / bound:.0f}%",
                     "peak memory": peak_memory(device)})
    return rows


def bench_prefill(cfg, device, dtype, tokens: int = 2048) -> list[dict]:
    model = build(cfg, device, dtype)
    _, peak, src = bounds(device, dtype)
    P = cfg.vit_patch_size
    side = min(cfg.vit_image_size, 32 * P)  # one ViT image of up to 32x32 patches
    pixels = torch.rand(3, side, side, device=device) * 2 - 1
    n_img = (side // P) ** 2
    text = max(8, tokens - n_img - 2)

    def run():
        with torch.no_grad():
            cache = model.new_cache(1, capacity=tokens + 8)
            model.add_text(cache, [[cfg.bos_token_id] * (text // 2)])
            model.add_vit_image(cache, pixels)
            model.add_text(cache, [[cfg.bos_token_id] * (text - text // 2 - 4)])
    secs = timed(run, device, repeats=3)
    total = text + n_img + 2
    flops = llm_flops(cfg, total, total / 2)
    return [{"section": f"prefill {total} tokens (1 ViT image, {n_img} patches)",
             "measured": f"{total / secs:.0f} tok/s",
             "bound": f"{peak * total / flops:.0f} tok/s ({src})", "of bound": f"{100 * flops / secs / peak:.0f}%",
             "peak memory": peak_memory(device)}]


def bench_denoise(cfg, device, dtype, latent_tokens: int = 1024, context: int = 1024, steps: int = 50) -> list[dict]:
    model = build(cfg, device, dtype)
    _, peak, src = bounds(device, dtype)
    side = int(math.sqrt(latent_tokens))
    side = min(side, cfg.max_latent_size)
    grid = (side, side)
    N = side * side
    caches = []
    with torch.no_grad():
        for n in (context, context // 2, context // 2):  # full, text-unconditional, image-unconditional contexts
            c = model.new_cache(1, capacity=n + N + 8)
            model.add_text(c, [[cfg.bos_token_id] * (n - 2)])
            caches.append(c)
        both = M.KVCache.stack(caches)
        x = torch.randn(3, N, cfg.patch_latent_dim, device=device)
        step = timed(lambda: model.velocity(both, x, 0.7, grid), device)
        noise = torch.randn(1, N, cfg.patch_latent_dim, device=device)
        full = timed(lambda: model.generate_image(caches[0], grid, noise, steps, 3.0, caches[1], caches[2], 4.0, 1.5,
                                                   (0.4, 1.0)), device, repeats=1)
    flops = 3 * llm_flops(cfg, N + 2, (context * 2 / 3) + N)
    n_cfg = sum(0.4 < float(t) <= 1.0 for t in M.flow_timesteps(steps, 3.0)[:-1])
    gen_flops = flops * n_cfg + flops / 3 * (steps - 1 - n_cfg)
    return [{"section": f"denoise step ({N} tokens, 3 CFG branches)", "measured": f"{1000 * step:.1f} ms",
             "bound": f"{1000 * flops / peak:.1f} ms ({src})", "of bound": f"{100 * flops / step / peak:.0f}% MFU",
             "peak memory": peak_memory(device)},
            {"section": f"{steps}-point generation", "measured": f"{full:.2f} s", "bound": f"{gen_flops / peak:.2f} s",
             "of bound": f"{100 * gen_flops / full / peak:.0f}% MFU", "peak memory": peak_memory(device)}]


def bench_reentry(cfg, device, dtype, latent_tokens: int = 1024, context: int = 1024) -> list[dict]:
    import bridge
    model = build(cfg, device, dtype)
    side = min(int(math.sqrt(latent_tokens)), cfg.max_latent_size)
    lat = bridge.reentry_latency(model, (side, side), context, repeats=5)
    return [{"section": f"re-entry of a {side}x{side}-token image: {k}", "measured": f"{1000 * v:.1f} ms",
             "bound": "", "of bound": f"{v / lat['bridge']:.1f}x bridge", "peak memory": peak_memory(device)}
            for k, v in lat.items()]


def train_config(cfg: M.ModelConfig) -> M.ModelConfig:
    """~1B parameters with BAGEL's shape ratios (for a GPU); the tiny preset stays tiny."""
    if cfg.hidden_size < 1024:
        return cfg
    return replace(cfg, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=32768)


def bench_train(cfg, device, dtype, row_tokens: int = 8192) -> list[dict]:
    cfg = train_config(cfg)
    model = build(cfg, device, dtype).train()
    model.vae.requires_grad_(False)
    _, peak, src = bounds(device, dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")
    D = cfg.patch_latent_dim
    g = torch.Generator().manual_seed(0)
    grid = (min(16, cfg.max_latent_size),) * 2
    n = grid[0] * grid[1]
    sample = [M.Text(list(range(200)), loss=True), M.VaeImage(torch.randn(n, D, generator=g), grid),
              M.VaeImage(torch.randn(n, D, generator=g), grid, t=0.5, target=torch.randn(n, D, generator=g)),
              M.Text(list(range(200)), loss=True)]
    per = sum(len(s.ids) + 2 if isinstance(s, M.Text) else n + 2 for s in sample)
    packed = M.pack([sample] * max(1, row_tokens // per), cfg, row_tokens=row_tokens).to(device)
    tokens = sum(packed.sample_lens)

    def step():
        out = model(packed)
        (out.ce.mean() + out.mse.mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    secs = timed(step, device, repeats=3)
    flops = 3 * llm_flops(cfg, tokens, per / 2)
    params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.vae.parameters())
    return [{"section": f"train step, {params / 1e9:.2f}B params, {tokens} tokens",
             "measured": f"{tokens / secs:.0f} tok/s",
             "bound": f"{peak * tokens / flops:.0f} tok/s ({src})", "of bound": f"{100 * flops / secs / peak:.0f}% MFU",
             "peak memory": peak_memory(device)}]


class PlainBlock(torch.nn.Module):
    """A plain pre-norm decoder block (one weight set, causal SDPA): the reference for the MoT overhead."""

    def __init__(self, cfg: M.ModelConfig):
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.norm1, self.norm2 = M.RMSNorm(H, cfg.rms_norm_eps), M.RMSNorm(H, cfg.rms_norm_eps)
        self.qkv = torch.nn.Linear(H, (self.nh + 2 * self.nkv) * hd)
        self.o = torch.nn.Linear(self.nh * hd, H, bias=False)
        self.mlp = M.SwiGLU(H, cfg.intermediate_size)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, -1, self.hd).split([self.nh, self.nkv, self.nkv], 2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        return x + self.mlp(self.norm2(x))


def bench_train_overhead(cfg, device, dtype) -> list[dict]:
    """One default Stage 1 step of the tiny toy (`python sft.py`'s token budget and row length: packed CLEAR samples,
    their attention rules, MoT routing, images) vs a plain causal transformer of the same width and depth on as many
    rows of as many tokens; both with the stages' optimizer."""
    import numpy as np

    import data as D
    import pretrain
    import sft
    tok = D.train_toy_tokenizer(D.toy_corpus(n=300))
    tiny = pretrain.toy_config(tok)
    model = M.Bagel(tiny).to(device, dtype).train()
    for frozen in (model.vae, model.vit_model):
        frozen.requires_grad_(False)
    pool = sft.toy_pool(D.ToyWorld(0), np.random.default_rng(0), 64, model.encode_pixels, every_clean=True)
    batch = sft.batches(sft.parse_config([]), tiny, tok, model.encode_pixels, sft.pool_draw(pool), device)
    packed = batch(np.random.default_rng(0), torch.Generator().manual_seed(0))  # one default Stage 1 step's rows
    opt = C.make_optimizer(model, lr=1e-4)

    def ours():
        out = model(packed)
        (out.ce.mean() + out.mse.mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    plain = torch.nn.Sequential(*[PlainBlock(tiny) for _ in range(tiny.num_hidden_layers)]).to(device, dtype)
    head = torch.nn.Linear(tiny.hidden_size, tiny.vocab_size, bias=False).to(device, dtype)
    x = torch.randn(packed.rows, packed.row_len, tiny.hidden_size, device=device, dtype=dtype)
    opt2 = C.make_optimizer(torch.nn.ModuleList([plain, head]), lr=1e-4)

    def reference():
        h = plain(x)
        loss = head(h.reshape(-1, h.shape[-1])[: packed.ce_idx.numel()]).float().logsumexp(-1).mean()
        loss.backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)
    t_ours, t_plain, ratio = timed_pair(ours, reference, device)
    tokens = packed.rows * packed.row_len
    return [{"section": f"tiny training step ({packed.rows} rows x {packed.row_len} tokens)",
             "measured": f"{1000 * t_ours:.0f} ms",
             "bound": f"plain transformer {1000 * t_plain:.0f} ms", "of bound": f"{ratio:.2f}x plain",
             "peak memory": peak_memory(device), "tokens": tokens}]


def bench_degrade(cfg, device, dtype, size: int = 256, repeats: int = 5) -> list[dict]:
    """Median milliseconds of each MMD-Bench corruption at each severity on a size x size photo-like image.

    One thread: torch.set_num_threads(1) (numpy's element-wise ops are single-threaded, and degrade.py leaves
    its matrix products to torch). One untimed warm-up call per op and severity; seed fixed per repeat."""
    import degrade

    image, threads = degrade.demo_image(size), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for kind, category in degrade.CORRUPTIONS.items():
            row = {"op": kind, "category": category}
            for name in degrade.SEVERITIES:
                degrade.degrade(image, kind, name, 0)
                times = []
                for seed in range(repeats):
                    start = time.perf_counter()
                    degrade.degrade(image, kind, name, seed)
                    times.append(time.perf_counter() - start)
                row[f"{name} ms"] = round(1000 * statistics.median(times), 1)
            rows.append(row)
        return rows
    finally:
        torch.set_num_threads(threads)


# kind of work of a profiled op, by the first pattern its name contains (anything else: element-wise and other ops)
OP_KINDS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
            ("attention", ("scaled_dot_product", "flash_attention")),
            ("convolution", ("convolution", "conv2d", "conv_depthwise")),
            ("gathers, scatters and copies", ("index", "scatter", "gather", "aten::cat", "copy_", "aten::fill_",
                                              "aten::zero_", "aten::clone", "aten::contiguous", "aten::where")),
            ("optimizer and EMA", ("Optimizer.step", "aten::lerp", "_foreach", "aten::addcdiv", "aten::addcmul",
                                   "aten::sqrt", "linalg_vector_norm")),
            ("element-wise, norms and the rest", ("",)))


def op_kind(name: str) -> str:
    return next(kind for kind, patterns in OP_KINDS if any(p in name for p in patterns))


def shares(seconds: dict, total: float) -> str:
    """'name 41%, ...' in decreasing order."""
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]) if v > 0)


class PhaseClock:
    """Wall-clock seconds spent inside chosen functions, each exclusive of the others nested in it (patched in for the
    measurement, restored after)."""

    def __init__(self, targets: list):
        self.targets, self.seconds, self.saved, self.nested = targets, {}, [], [0.0]

    def __enter__(self):
        for obj, attr, label in self.targets:
            fn = getattr(obj, attr)
            self.saved.append((obj, attr, fn))
            self.seconds.setdefault(label, 0.0)

            def timed_fn(*a, _fn=fn, _label=label, **k):
                self.nested.append(0.0)
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    took = time.perf_counter() - t0
                    self.seconds[_label] += took - self.nested.pop()
                    self.nested[-1] += took
            setattr(obj, attr, timed_fn)
        return self

    def __exit__(self, *exc):
        for obj, attr, fn in reversed(self.saved):
            setattr(obj, attr, fn)


def profile_step(name: str, step, phases: list, repeats: int = 3) -> list[dict]:
    """Two rows for `step` (one warm-up call first): the median wall time and its split by phase (PhaseClock on the
    functions in `phases`; the rest is "other"), and the split of the profiled op time by kind (OP_KINDS; "Python and
    framework" is the wall time no op accounts for)."""
    from torch.profiler import ProfilerActivity, profile
    step()
    walls, by_phase = [], []
    for _ in range(repeats):
        with PhaseClock(phases) as clock:
            t0 = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t0)
        by_phase.append(clock.seconds)
    i = walls.index(statistics.median(walls))
    phase = {**by_phase[i], "other": walls[i] - sum(by_phase[i].values())}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    kinds = {}
    for ev in prof.key_averages():
        kinds[op_kind(ev.key)] = kinds.get(op_kind(ev.key), 0.0) + ev.self_cpu_time_total / 1e6
    kinds["Python and framework"] = max(0.0, wall - sum(kinds.values()))
    ms = f"{1000 * walls[i]:.0f} ms"
    return [{"step": name, "wall": ms, "split": "by phase (wall clock)", "shares": shares(phase, walls[i])},
            {"step": "", "wall": "", "split": "by kind of op (profiler)", "shares": shares(kinds, wall)}]


def bench_profile(cfg, device, dtype) -> list[dict]:
    """One step of each toy stage at the tiny preset (random weights), split by phase and by kind of op."""
    import numpy as np

    import data as D
    import engine as E
    import pretrain
    import rl
    import sft
    if device.type != "cpu":
        raise SystemExit("bench.py --only profile measures the CPU toy: run it with --device cpu")
    tok = D.train_toy_tokenizer(D.toy_corpus(n=300))
    model = M.Bagel(pretrain.toy_config(tok)).to(device, dtype)
    pretrain.init_weights(model)
    world, rng = D.ToyWorld(0), np.random.default_rng(0)
    C.freeze_encoders(model)
    opt, ema = C.make_optimizer(model, 1e-4), C.EMA(model, 0.99)
    train = [(M, "pack", "packing"), (M, "AttentionGroups", "attention groups and mask"), (model, "forward", "forward"),
             (torch.Tensor, "backward", "backward"), (C, "clip_and_step", "optimizer"), (ema, "update", "EMA")]
    rows = []

    pool = pretrain.example_pool(world, rng, 48, model.encode_pixels)

    def stage0():
        step_rng, gen = C.step_rngs(0, 0)
        drawn = [pool[i] for i in step_rng.integers(0, len(pool), 24)]
        samples = pretrain.base_samples(drawn, tok, step_rng, gen, model.cfg.timestep_shift, world.qtypes)
        loss, _ = pretrain.unified_loss(model, M.pack(samples, model.cfg))
        loss.backward()
        C.clip_and_step(model, opt, 1.0)
        ema.update(model)
    rows += profile_step("Stage 0 unified step (24 samples)", stage0,
                         [(pretrain, "base_samples", "samples"), *train])

    scfg = sft.parse_config([])
    draw = sft.pool_draw(sft.toy_pool(world, rng, 48, model.encode_pixels, every_clean=True))
    batch = sft.batches(scfg, model.cfg, tok, model.encode_pixels, draw, device)
    run = C.Run(device, dtype)

    def stage1():
        loss = sft.step_loss(model, batch(*C.step_rngs(0, 0)), run, scfg)[0]
        loss.backward()
        C.clip_and_step(model, opt, 1.0)
        ema.update(model)
    rows += profile_step(f"SFT step ({scfg.tokens_per_step} tokens)", stage1,
                         [(sft, "build_batch", "samples"), (sft, "replay_sample", "samples"),
                          (sft, "text_reason_sample", "samples"), *train])

    rcfg = rl.parse_config([])
    icfg = E.inference_config(rcfg, toy=True, temperature=rcfg.temperature, sampler="sde",
                              num_timesteps=rcfg.sde_points, force_restore=True)
    ref = M.Bagel(model.cfg).to(device, dtype).requires_grad_(False)
    ref.load_state_dict(model.state_dict())
    inference = [(E, "prefill", "prefill"), (model, "decode_text", "decoding"), (model, "sample_sde", "denoising"),
                 (model, "generate_image", "denoising"), (E, "reenter", "re-entry")]

    def rl_step():
        step_rng, gen = C.step_rngs(0, 0)
        stream = world.stream(step_rng)
        examples = [next(stream) for _ in range(rcfg.prompts)]
        prefixes = D.inference_prefix(examples, tok, model.encode_pixels)
        rows_ = [(p, ex) for p, ex in zip(prefixes, examples) for _ in range(rcfg.group)]
        model.eval()
        traces = E.reason(model, tok, [p for p, _ in rows_], icfg, gen)
        rollouts = [rl.Rollout(p, tr, ex) for (p, ex), tr in zip(rows_, traces)]
        rl.score(rollouts, [None] * len(rollouts), rcfg)
        adv = rl.group_advantages(torch.tensor([r.reward for r in rollouts]), rcfg.group)
        model.train()
        loss, _, _ = rl.grpo_loss(model, ref, rollouts, adv, adv, rcfg, 0, step_rng, model)
        loss.backward()
        C.clip_and_step(model, opt, 1.0)
    rows += profile_step(f"RL step ({rcfg.prompts} questions x {rcfg.group} rollouts)", rl_step,
                         [(world, "examples", "rendering and degrading"), *inference, *train[:5]])

    split = world.eval_split(64)
    ecfg = E.mode_config("always_restore", E.InferenceConfig(max_text_tokens=48, num_timesteps=10))
    with torch.no_grad():  # random weights decode <|im_end|> greedily at once: keep them writing to the token limit
        model.language_model.lm_head.weight[model.cfg.eos_token_id] = 0

    def eval_batch():
        model.eval()
        with torch.no_grad():
            prefixes = E.mode_prefixes("always_restore", split["hard"], tok, model.encode_pixels)
            E.reason(model, tok, prefixes, ecfg, torch.Generator().manual_seed(0))
    rows += profile_step("evaluation batch (64 questions, always restore)", eval_batch,
                         [(D, "encode_images", "encoding pictures"), *inference])
    return rows


SECTIONS = {"decode": bench_decode, "prefill": bench_prefill, "denoise": bench_denoise, "reentry": bench_reentry,
            "train": bench_train, "train_overhead": bench_train_overhead, "degrade": bench_degrade,
            "profile": bench_profile}


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(row.get(k, "")) for k in header) + " |" for row in rows])


OWN_MODEL = ("train_overhead", "degrade")  # sections that measure the toy model, or no model: --preset does nothing
NO_DEVICE = ("degrade",)  # the corruptions run on one CPU thread: --device and --dtype do nothing


def main(argv=None):
    p = C.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run these sections instead of all")
    p.add_argument("--preset", default="tiny", choices=list(M.PRESETS), help="model shapes (random weights)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", *C.DTYPES], help="auto | fp32 | bf16")
    args = p.parse_args(argv)
    given = {k for k, v in vars(p.parse_args(argv, argparse.Namespace(preset=None, device=None, dtype=None))).items()
             if v is not None}  # the flags on the command line (argparse keeps attributes it finds set)
    sections = args.only or list(SECTIONS)
    C.refuse_given(p.prog, given, ("preset",) if set(sections) <= set(OWN_MODEL) else (),
                   f"in {', '.join(sections)} (the toy model, or none, is measured)")
    C.refuse_given(p.prog, given, ("device", "dtype") if set(sections) <= set(NO_DEVICE) else (),
                   "in degrade (one CPU thread)")
    device, why = C.pick_device(args.device)
    dtype, why_dt = C.pick_dtype(args.dtype, device)
    cfg = M.PRESETS[args.preset]
    print(f"device {device} ({why}), dtype {dtype} ({why_dt}), torch {torch.__version__}, preset {args.preset}")
    for name in sections:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        print(f"\n## {name}\n\n{markdown(SECTIONS[name](cfg, device, dtype))}", flush=True)


if __name__ == "__main__":
    C.run_cli(main)

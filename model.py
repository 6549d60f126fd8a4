"""
nanoCLEAR model: the BAGEL-7B-MoT unified transformer that CLEAR (arXiv 2604.04780) is built on, in plain PyTorch.

One transformer reads and writes both modalities (BAGEL, Deng et al. 2025):
  * a Qwen2 decoder whose every layer holds two weight sets, Mixture-of-Transformers style: the *und* expert for
    text, ViT and image-marker tokens, the *gen* expert (`*_moe_gen`) for VAE-latent tokens; one joint attention;
  * a SigLIP-NaViT encoder + MLP connector that turns pixels into understanding tokens;
  * a FLUX autoencoder whose 2x2-patchified latents are the generation tokens, denoised by rectified flow;
  * packed interleaved sequences (training) and a KV cache (inference), including CLEAR's latent bridge: a
    denoised latent re-enters the context as `vae2llm(x0) + time_embedder(0) + latent_pos_embed` (CLEAR §3.3).
Weights load from / save to BAGEL-format folders with the official key names, so public checkpoints load as is.

Every convention that must match the official code is cited on its line as `# BAGEL: ...` (see
shared/conformance/bagel_tiny/CONVENTIONS.md); tests/test_conformance.py checks the numbers.

Differences from the official code:
  1. Inference rows are padded (a batch of KV-cache rows with per-row lengths) instead of varlen-packed, so the three
     CFG branches and the G rollouts of an RL group run as one batched forward.
  2. Decoded text stays in the cache (closed with `<|im_end|>`) instead of being re-tokenized and re-prefilled; the
     result equals the official re-prefill when tokenization round-trips, and keeps the sampled ids when it doesn't.
  3. float32 on CPU, the parameter dtype (bf16) on GPU, without the official hard-coded bf16 casts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# ----------------------------------------------------------------------------------------------------------------------
# Configuration


ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def is_int(v, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


# sizes are >= 1 and factors > 0, except these: the ViT may have no layer, ids start at 0, the AE shift has any sign
MAY_BE_ZERO = ("vit_num_hidden_layers", "ae_shift_factor", "bos_token_id", "eos_token_id", "start_of_image_id",
               "end_of_image_id")
VALID = {  # field type -> test of a value
    "int": lambda v, name: is_int(v, 0 if name in MAY_BE_ZERO else 1),
    "float": lambda v, name: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             and (v > 0 or name in MAY_BE_ZERO),
    "str": lambda v, name: isinstance(v, str),
    "tuple": lambda v, name: isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(m, 1) for m in v),
}
VALID_WORDS = {"int": "an integer >= 1 (>= 0 for ViT layers and token ids)",
               "float": "a finite number (> 0 but the AE shift)",
               "str": "a string", "tuple": "a non-empty list of integers >= 1"}


@dataclass
class ModelConfig:
    # language model: Qwen2 + Mixture-of-Transformers (llm_config.json)
    vocab_size: int = 768
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 2048  # longest RoPE position we accept (RoPE itself has no table)
    # vision encoder: SigLIP-NaViT (vit_config.json; layers = the json value - 1, as BAGEL's loader does)
    vit_hidden_size: int = 64
    vit_intermediate_size: int = 192
    vit_num_hidden_layers: int = 4
    vit_num_attention_heads: int = 2
    vit_patch_size: int = 8
    vit_image_size: int = 64  # learned position table is (image_size / patch_size)^2
    vit_layer_norm_eps: float = 1e-6
    vit_hidden_act: str = "gelu_pytorch_tanh"
    # Bagel-level settings (hard-coded in BAGEL's app.py; kept in nanoclear.json for our checkpoints)
    latent_patch_size: int = 2  # 2x2 latent patches -> one generation token
    max_latent_size: int = 8  # latent_pos_embed is max_latent_size^2 rows
    vit_max_num_patch_per_side: int = 8  # vit_pos_embed is vit_max_num_patch_per_side^2 rows
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0  # training-time shift of the logit-normal t (BagelConfig.timestep_shift)
    # FLUX autoencoder (ae.safetensors; BAGEL's load_ae hard-codes the 7B values)
    ae_ch: int = 32
    ae_ch_mult: tuple = (1, 2, 2)
    ae_num_res_blocks: int = 1
    ae_z_channels: int = 16
    ae_scale_factor: float = 0.3611
    ae_shift_factor: float = 0.1159
    ae_norm_groups: int = 8  # FLUX always uses 32; at 32 channels that normalises colour away (see pretrain.py)
    # special tokens, looked up by text in tokenizer.json (never hard-coded for real weights)
    bos_token_id: int = 0  # <|im_start|>
    eos_token_id: int = 1  # <|im_end|>
    start_of_image_id: int = 2  # <|vision_start|>
    end_of_image_id: int = 3  # <|vision_end|>

    def __post_init__(self):
        for f in fields(self):  # values read from json files may be of any type: refuse them here, by name
            value, kind = getattr(self, f.name), f.type
            if not VALID[kind](value, f.name):
                raise ValueError(f"ModelConfig: {f.name} is {value!r}, it must be {VALID_WORDS[kind]}")
        self.ae_ch_mult = tuple(self.ae_ch_mult)
        checks = [
            (self.hidden_size % self.num_attention_heads == 0, "hidden_size must be divisible by num_attention_heads"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads"),
            (self.head_dim % 2 == 0, "the LLM head dim must be even (RoPE rotates halves)"),
            (self.hidden_size % 4 == 0, "hidden_size must be divisible by 4 (2-D sin-cos tables)"),
            (self.vit_hidden_size % self.vit_num_attention_heads == 0,
             "vit_hidden_size must be divisible by its heads"),
            (self.vit_image_size // self.vit_patch_size >= self.vit_max_num_patch_per_side,
             "vit_image_size / vit_patch_size must be >= vit_max_num_patch_per_side (ViT ids index the learned table)"),
            (all((self.ae_ch * m) % self.ae_norm_groups == 0 for m in self.ae_ch_mult),
             "autoencoder channels must be multiples of ae_norm_groups"),
            (self.connector_act in ACTIVATIONS and self.vit_hidden_act in ACTIVATIONS,
             f"activations must be one of {sorted(ACTIVATIONS)}"),
            (max(self.bos_token_id, self.eos_token_id, self.start_of_image_id, self.end_of_image_id) < self.vocab_size,
             "the special token ids must be below vocab_size"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

    head_dim = property(lambda self: self.hidden_size // self.num_attention_heads)
    patch_latent_dim = property(lambda self: self.latent_patch_size ** 2 * self.ae_z_channels)  # 64 in BAGEL
    ae_downsample = property(lambda self: 2 ** (len(self.ae_ch_mult) - 1))
    latent_downsample = property(lambda self: self.ae_downsample * self.latent_patch_size)  # pixels per token side


PRESETS = {
    # the CPU toy model: a 64 px picture is 4x4 ViT patches of 16 px and 4x4 latent tokens of 64 numbers, few enough
    # tokens for a short CPU step and for the generator to learn to restore; t is trained with the shift its sampler
    # uses (3); the autoencoder is half FLUX's toy width (docs/toy_design.md, "The picture")
    "tiny": ModelConfig(timestep_shift=3.0, latent_patch_size=4, ae_ch=16, ae_z_channels=4, vit_patch_size=16,
                        vit_max_num_patch_per_side=4, max_latent_size=4),
    "bagel-7b-mot": ModelConfig(  # BAGEL-7B-MoT: llm_config.json, vit_config.json, app.py, load_ae
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, vit_hidden_size=1152, vit_intermediate_size=4304,
        vit_num_hidden_layers=26, vit_num_attention_heads=16, vit_patch_size=14, vit_image_size=980,
        max_latent_size=64, vit_max_num_patch_per_side=70, ae_ch=128, ae_ch_mult=(1, 2, 4, 4), ae_num_res_blocks=2,
        ae_norm_groups=32, bos_token_id=151644, eos_token_id=151645, start_of_image_id=151652,
        end_of_image_id=151653),
}


# ----------------------------------------------------------------------------------------------------------------------
# Language model: Qwen2 with Mixture-of-Transformers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # BAGEL: Qwen2RMSNorm, float32
        return self.weight * h.to(x.dtype)  # cast back, then scale


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype):
    """RoPE tables for positions [...] -> cos, sin [..., head_dim] (BAGEL: Qwen2RotaryEmbedding, default type)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
                               / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)  # BAGEL: split-halves layout, not interleaved
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, heads, hd]; cos/sin [B, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # BAGEL: rotate_half
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class Route:
    """Which rows of a flat token batch [B*T, ...] go through the und expert and which through the gen expert (MoT).

    The decoder keeps its residual stream in expert order (every und row, then every gen row, each group in token
    order), so an expert reads a slice of it; only attention needs another order (`to_attention`, `from_attention`):
    token order, or the slots of AttentionGroups in training. That is two gathers per layer instead of a gather and a
    scatter around every expert call, whose backward (an index_add into zeros) was most of the routing cost
    (`python bench.py --only profile`). Gathers are index_select (its backward is a fast index_add, unlike the
    accumulating index_put of x[idx])."""

    def __init__(self, gen_mask: torch.Tensor | None):
        """gen_mask [N] (bool): True rows go to the gen expert, the others to und; None (or no True) sends every row
        to und and leaves the order alone. Expert order: the und rows, then the gen rows, each in token order."""
        self.order = None
        if gen_mask is not None and bool(gen_mask.any()):
            und, gen = (~gen_mask).nonzero().squeeze(1), gen_mask.nonzero().squeeze(1)
            self.n_und, self.order = len(und), torch.cat([und, gen])  # expert position -> token position
            self.unsort = self.order.argsort()  # token position -> expert position

    def to_experts(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, ...] in token order -> expert order."""
        return x if self.order is None else x.index_select(0, self.order)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, ...] in expert order -> token order (the inverse of to_experts)."""
        return x if self.order is None else x.index_select(0, self.unsort)

    slots = None  # (expert position of each attention slot, slot of each expert position) after attend_in

    def attend_in(self, groups: AttentionGroups) -> Route:
        """Attention reads the tokens re-packed into groups (AttentionGroups) instead of in token order: each way is
        still one gather, from expert order straight to the groups' slots and back."""
        token, slot = groups.token.reshape(-1), groups.slot
        self.slots = (token, slot) if self.order is None else (self.unsort[token], slot[self.order])
        return self

    def to_attention(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, ...] in expert order -> attention's order: token order, or the groups' slots (attend_in)."""
        return self.to_tokens(x) if self.slots is None else x.index_select(0, self.slots[0])

    def from_attention(self, x: torch.Tensor) -> torch.Tensor:
        """x in attention's order -> [N, ...] in expert order (the inverse of to_attention)."""
        return self.to_experts(x) if self.slots is None else x.index_select(0, self.slots[1])

    def __call__(self, x: torch.Tensor, und: Callable, gen: Callable) -> torch.Tensor:
        """Apply `und` to the und rows and `gen` to the gen rows of x [N, ...] in expert order (BAGEL:
        packed_und/gen_token_indexes)."""
        if self.order is None:
            return und(x)
        return torch.cat([und(x[:self.n_und]), gen(x[self.n_und:])])


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    """Joint attention over und and gen tokens with separate projections per expert (BAGEL: PackedAttentionMoT)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.nh, self.nkv, self.hd = nh, nkv, hd
        for suffix in ("", "_moe_gen"):  # BAGEL: q/k/v with bias, o without; *_moe_gen is the gen expert
            setattr(self, "q_proj" + suffix, nn.Linear(H, nh * hd, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(H, nkv * hd, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(H, nkv * hd, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(nh * hd, H, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(hd, cfg.rms_norm_eps))
            setattr(self, "k_norm" + suffix, RMSNorm(hd, cfg.rms_norm_eps))

    def forward(self, x, route: Route, cos, sin, mask, kv_write: Callable | None):
        """x [B*T, H] in expert order (Route); cos/sin [B, T, hd] in attention's order (rows, or groups of slots)."""
        B, T = cos.shape[:2]

        def qkv(suffix):
            def f(h):
                q = getattr(self, "q_proj" + suffix)(h).view(-1, self.nh, self.hd)
                k = getattr(self, "k_proj" + suffix)(h).view(-1, self.nkv, self.hd)
                v = getattr(self, "v_proj" + suffix)(h).view(-1, self.nkv, self.hd)
                # BAGEL: per-head q/k RMSNorm before RoPE
                return torch.cat([getattr(self, "q_norm" + suffix)(q), getattr(self, "k_norm" + suffix)(k), v], dim=1)
            return f

        qkv_slots = route.to_attention(route(x, qkv(""), qkv("_moe_gen")))
        q, k, v = qkv_slots.view(B, T, -1, self.hd).split([self.nh, self.nkv, self.nkv], dim=2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if kv_write is not None:  # inference: new keys go into the cache, queries attend to the whole cache
            k, v = kv_write(k, v)
        # BAGEL: GQA head h reads kv head h // (nh / nkv); scale 1/sqrt(hd); one softmax over und + gen tokens
        if isinstance(mask, torch.Tensor) or mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nkv != self.nh)
        else:  # a FlexAttention BlockMask (long packed training rows)
            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=self.nkv != self.nh)
        out = route.from_attention(out.transpose(1, 2).reshape(B * T, -1))
        return route(out, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    """Pre-norm Qwen2 block, each piece doubled for the gen expert (BAGEL: Qwen2MoTDecoderLayer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        for name in ("input_layernorm", "input_layernorm_moe_gen", "post_attention_layernorm",
                     "post_attention_layernorm_moe_gen"):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def forward(self, x, route, cos, sin, mask, kv_write=None):
        """x [B*T, H] in expert order (Route)."""
        h = route(x, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, route, cos, sin, mask, kv_write)
        h = route(x, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        return x + route(h, self.mlp, self.mlp_moe_gen)


class Qwen2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """Holds `model` and an untied `lm_head`, so parameter names equal BAGEL's `language_model.*` keys."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # BAGEL: tie_word_embeddings=False


# ----------------------------------------------------------------------------------------------------------------------
# Vision encoder: SigLIP-NaViT + connector


class SiglipAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, mask):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # BAGEL: full attention within each image
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class SiglipMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.vit_hidden_size
        self.layer_norm1 = nn.LayerNorm(D, eps=cfg.vit_layer_norm_eps)
        self.self_attn = SiglipAttention(D, cfg.vit_num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(D, eps=cfg.vit_layer_norm_eps)
        self.mlp = SiglipMLP(D, cfg.vit_intermediate_size, cfg.vit_hidden_act)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)  # BAGEL: pre-LN SigLIP layer
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # BAGEL: the patch Conv2d is stored in Linear form, inputs ordered (row, col, channel)
        self.patch_embedding = nn.Linear(3 * cfg.vit_patch_size ** 2, cfg.vit_hidden_size)
        self.position_embedding = nn.Embedding((cfg.vit_image_size // cfg.vit_patch_size) ** 2, cfg.vit_hidden_size)


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.vit_num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.vit_hidden_size, eps=cfg.vit_layer_norm_eps)

    def forward(self, patches, pos_ids, image_lens: list[int]):
        """patches [N, 3p^2] of several images packed back to back -> [N, D] after post_layernorm."""
        # BAGEL: rope=False, learned position embedding indexed by row * vit_max_num_patch_per_side + col
        x = self.embeddings.patch_embedding(patches) + self.embeddings.position_embedding(pos_ids)
        L = max(image_lens)
        keep = torch.arange(L, device=x.device)[None, :] < torch.tensor(image_lens, device=x.device)[:, None]  # [n, L]
        rows = x.new_zeros(len(image_lens), L, x.shape[-1]).masked_scatter(keep[..., None], x)  # one image per row
        mask = None if all(n == L for n in image_lens) else keep[:, None, None, :]  # BAGEL: attention within an image
        for layer in self.encoder.layers:
            rows = layer(rows, mask)
        return self.post_layernorm(rows[keep])


class VitModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)


class MLPConnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim), ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # BAGEL: MLPconnector


# ----------------------------------------------------------------------------------------------------------------------
# Position and time embeddings


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Row r*grid+c = [E(c), E(r)], E(p) = [sin(p w), cos(p w)], w_k = 10000^(-k/(dim/4))
    (BAGEL: get_2d_sincos_pos_embed)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def emb(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # BAGEL: the first half encodes the column (its meshgrid puts w first and calls it emb_h)
    return torch.from_numpy(np.concatenate([emb(cols), emb(rows)], axis=1)).float()


class PositionEmbedding(nn.Module):
    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid), requires_grad=False)  # BAGEL: frozen, stored in ema

    def forward(self, ids):
        return self.pos_embed[ids]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs  # BAGEL: t in [0, 1] used as is (no x1000)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # BAGEL: cos first
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def vit_position_ids(h: int, w: int, max_per_side: int, device=None) -> torch.Tensor:
    """Flattened row * max_per_side + col ids of an h x w grid (BAGEL: get_flattened_position_ids_extrapolate)."""
    if h > max_per_side or w > max_per_side:
        raise ValueError(f"a {h}x{w} token grid exceeds the position table side {max_per_side}: use a smaller image")
    return (torch.arange(h, device=device)[:, None] * max_per_side + torch.arange(w, device=device)).flatten()


# ----------------------------------------------------------------------------------------------------------------------
# FLUX autoencoder


def swish(x):
    return x * torch.sigmoid(x)


def group_norm(c, groups):
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)  # FLUX: 32 groups


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = group_norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))  # one head, dim C
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # FLUX: asymmetric zero pad, then stride-2 conv


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder; `attn` stays empty as in FLUX."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList()
        if resample is not None:
            setattr(self, resample_name, resample)


class Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = (ResnetBlock(c, c, groups), AttnBlock(c, groups),
                                                   ResnetBlock(c, c, groups))

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch, mult, n, g = cfg.ae_ch, cfg.ae_ch_mult, cfg.ae_num_res_blocks, cfg.ae_norm_groups
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down, cin = nn.ModuleList(), ch
        for i, m in enumerate(mult):
            blocks = [ResnetBlock(cin if j == 0 else ch * m, ch * m, g) for j in range(n)]
            cin = ch * m
            self.down.append(Level(blocks, Downsample(cin) if i < len(mult) - 1 else None, "downsample"))
        self.mid = Mid(cin, g)
        self.norm_out, self.conv_out = group_norm(cin, g), nn.Conv2d(cin, 2 * cfg.ae_z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch, mult, n, g = cfg.ae_ch, cfg.ae_ch_mult, cfg.ae_num_res_blocks, cfg.ae_norm_groups
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.ae_z_channels, cin, 3, padding=1)
        self.mid = Mid(cin, g)
        levels = []
        for i in reversed(range(len(mult))):  # FLUX: n+1 blocks per level, up[i] is level i
            blocks = [ResnetBlock(cin if j == 0 else ch * mult[i], ch * mult[i], g) for j in range(n + 1)]
            cin = ch * mult[i]
            levels.insert(0, Level(blocks, Upsample(cin) if i > 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = group_norm(cin, g), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.scale, self.shift = cfg.ae_scale_factor, cfg.ae_shift_factor

    def encode(self, x):
        """Pixels [B,3,H,W] in [-1,1] -> scaled latent [B,z,H/8,W/8], the posterior mean (BAGEL samples from the
        posterior, DiagonalGaussian(sample=True); the mean makes latents reproducible)."""
        mean = self.encoder(x).chunk(2, dim=1)[0]
        return self.scale * (mean - self.shift)  # FLUX: z = scale * (z - shift)

    def decode(self, z):
        return self.decoder(z / self.scale + self.shift)


# ----------------------------------------------------------------------------------------------------------------------
# Rectified flow (BAGEL §generation; CLEAR §3.2 flow-matching loss, §3.4 SDE sampler)


def shift_time(t, shift: float):
    """Timestep shift t' = s t / (1 + (s - 1) t) (BAGEL: generate_image / Bagel.forward)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_interpolate(x0, noise, t):
    """x_t = (1 - t) x0 + t noise and the velocity target v = noise - x0 (t = 1 is pure noise)."""
    return (1 - t) * x0 + t * noise, noise - x0


def sample_flow_time(n: int, shift: float, generator=None, device=None) -> torch.Tensor:
    """Logit-normal t = sigmoid(N(0,1)), then shifted (BAGEL: pack_sequence + Bagel.forward)."""
    return shift_time(torch.sigmoid(torch.randn(n, generator=generator, device=device)), shift)


def flow_matching_loss(v_pred, v_target):
    """Per-token MSE averaged over the latent channels (BAGEL: mse = (llm2vae(h) - (noise - x0))^2)."""
    return (v_pred.float() - v_target.float()).pow(2).mean(-1)


def flow_timesteps(num_timesteps: int, shift: float, device=None) -> torch.Tensor:
    """Shifted grid linspace(1, 0, N): N points, N-1 model calls (BAGEL: generate_image)."""
    return shift_time(torch.linspace(1, 0, num_timesteps, device=device), shift)


def cfg_combine(v, v_text, v_img, text_scale: float, img_scale: float, renorm: str = "global", renorm_min: float = 0.0):
    """Classifier-free guidance exactly as BAGEL's _forward_flow. v* are [B, N, D]; global norms are per row."""
    if text_scale <= 1.0:  # BAGEL: no CFG at all unless the text scale exceeds 1
        return v
    if renorm not in ("global", "channel", "text_channel"):
        raise ValueError(f"cfg renorm must be global, channel or text_channel, not {renorm!r}")
    vt = v_text + text_scale * (v - v_text)
    if renorm == "text_channel":  # BAGEL: per-token renorm of the text-guided v, none after image CFG
        vt = vt * (v.norm(dim=-1, keepdim=True) / (vt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
        return v_img + img_scale * (vt - v_img) if img_scale > 1.0 else vt
    vg = v_img + img_scale * (vt - v_img) if img_scale > 1.0 else vt
    dims = (1, 2) if renorm == "global" else (-1,)  # BAGEL: global = all tokens and channels of one image
    return vg * (v.norm(dim=dims, keepdim=True) / (vg.norm(dim=dims, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)


def sde_step_mean(x_t, v, t, dt, sigma: float, score_clamp: float = 100.0):
    """Mean of one SDE step of the rectified flow (CLEAR §3.4; Flow-GRPO, Liu et al. 2025).

    The ODE dx = v dt (v = noise - x0, integrated from t=1 down to 0) has the same marginals as the reverse SDE
    dx = [v + (sigma^2 / 2) * s] dt + sigma dW with s = -grad log p_t(x) (time runs backwards, so the drift is
    subtracted). For the linear path, the noise estimate is eps = x_t + (1 - t) v and s ~ eps / t.
    """
    s = ((x_t + (1 - t) * v) / max(t, 1e-6)).clamp(-score_clamp, score_clamp)  # CLEAR: s_neg, clamp +-100 at rollout
    return x_t - (v + 0.5 * sigma ** 2 * s) * dt


def sde_step_logprob(x_next, mean, sigma: float, dt):
    """Gaussian log-density of a step, mean over latent elements, constants dropped (CLEAR: log p = -mean(...)/2)."""
    return -((x_next.float() - mean.float()) ** 2).flatten(1).mean(1) / (2 * sigma ** 2 * dt)


# ----------------------------------------------------------------------------------------------------------------------
# Patches (BAGEL: data_utils.patchify; the picture transforms live in data.py)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p)(W/p), p*p*C], row-major patches, features ordered (row, col, channel) (BAGEL: patchify)."""
    C, H, W = x.shape
    return x.reshape(C, H // p, p, W // p, p).permute(1, 3, 2, 4, 0).reshape((H // p) * (W // p), p * p * C)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """Inverse of patchify: [h*w, p*p*C] -> [C, h*p, w*p]."""
    h, w = grid
    C = tokens.shape[-1] // (p * p)
    return tokens.reshape(h, w, p, p, C).permute(4, 0, 2, 1, 3).reshape(C, h * p, w * p)


# ----------------------------------------------------------------------------------------------------------------------
# Interleaved samples and packing (BAGEL: data/dataset_base.py pack_sequence,
# data_utils.prepare_attention_mask_per_sample)


@dataclass
class Text:
    """A text block, packed as <|im_start|> ids <|im_end|>; with loss, CE on ids + <|im_end|>."""
    ids: list
    loss: bool = False
    droppable: bool = True  # may be removed by text condition dropout (BAGEL: enable_cfg)


@dataclass
class VitImage:
    """An understanding image: pixels [3, H, W] in [-1, 1], H and W multiples of the ViT patch."""
    pixels: torch.Tensor
    pair: int | None = None  # distillation pair id (CLEAR §3.3): the VaeImage of the same picture carries it too
    droppable: bool = True


@dataclass
class VaeImage:
    """A generation-latent image: tokens [h*w, p*p*z] at flow time t.

    t = 0: clean (a conditioning image, or a restored latent entering through the bridge): full attention.
    t > 0: noised (tokens are x_t): nobody attends to it; its velocity is predicted, and MSE'd against `target`.
    """
    tokens: torch.Tensor
    grid: tuple
    t: float = 0.0
    target: torch.Tensor | None = None
    pair: int | None = None
    droppable: bool = True


def _part(kind: str, dtype=torch.long, width=None):
    """A Packed field filled sample by sample: `index` (positions, shifted into the batch), `tensor` (concatenated,
    an empty one is [0] or [0, width(cfg)] of dtype), or `list` (extended as is)."""
    return field(default=None, metadata=dict(kind=kind, dtype=dtype, width=width))


@dataclass
class Packed:
    """Samples laid out in B padded rows of T tokens (a row may hold several samples); indices are into B*T.
    `layout` fills the parts of one sample, `pack` shifts and concatenates them: this class is their only list."""
    rows: int
    row_len: int
    position_ids: torch.Tensor  # [B, T] RoPE ids
    splits: list  # (row, sample, start, length, mode) with mode causal | full | noise | pad
    sample_lens: list  # tokens per sample
    pairs: list  # (vit positions, vae positions) distillation pairs (CLEAR §3.3)
    ce_sample: torch.Tensor  # [n_ce] which sample each scored token belongs to
    text_ids: torch.Tensor = _part("tensor")  # [n_text] token ids at text_idx
    text_idx: torch.Tensor = _part("index")
    vit_patches: torch.Tensor = _part("tensor", torch.float32, lambda c: 3 * c.vit_patch_size ** 2)  # [n_vit, 3 p^2]
    vit_pos: torch.Tensor = _part("tensor")  # [n_vit] learned / sin-cos table rows
    vit_lens: list = _part("list")  # tokens per ViT image
    vit_idx: torch.Tensor = _part("index")
    vae_tokens: torch.Tensor = _part("tensor", torch.float32,
                                     lambda c: c.patch_latent_dim)  # [n_vae, p^2 z]: x_t (x0 at t=0)
    vae_t: torch.Tensor = _part("tensor", torch.float32)  # [n_vae] flow time per token
    vae_pos: torch.Tensor = _part("tensor")
    vae_idx: torch.Tensor = _part("index")
    ce_idx: torch.Tensor = _part("index")  # positions whose next token is scored
    ce_labels: torch.Tensor = _part("tensor")
    flow_idx: torch.Tensor = _part("index")  # positions of noised latent tokens (velocity predicted)
    flow_lens: list = _part("list")  # tokens per noised image, in order
    mse_mask: torch.Tensor = _part("tensor", torch.bool)  # [n_flow] bool: has a target
    mse_target: torch.Tensor = _part("tensor", torch.float32, lambda c: c.patch_latent_dim)  # [n_mse, p^2 z]

    def to(self, device):
        for f in fields(self):
            val = getattr(self, f.name)
            if isinstance(val, torch.Tensor):
                setattr(self, f.name, val.to(device))
        self.pairs = [(a.to(device), b.to(device)) for a, b in self.pairs]
        return self


PARTS = [f for f in fields(Packed) if f.metadata]


def layout(sample: list, cfg: ModelConfig, dropout: tuple, generator) -> dict:
    """One sample's parts (PARTS, as lists) at local positions 0..n-1 (BAGEL: pack_sequence). dropout = (text, vit,
    vae) probs; a dropped image still advances the RoPE id, a dropped text does not."""
    p_text, p_vit, p_vae = dropout
    L = {f.name: [] for f in PARTS} | {"pos": [], "splits": []}
    pair_vit, pair_vae = {}, {}
    T, rope = 0, 0  # BAGEL: positions restart at 0 for every sample

    def dropped(seg, prob):
        return seg.droppable and prob > 0 and float(torch.rand((), generator=generator)) < prob

    def image_block(n_inner):  # <|vision_start|> inner tokens <|vision_end|>, all at one RoPE id (BAGEL)
        L["text_ids"].append(torch.tensor([cfg.start_of_image_id, cfg.end_of_image_id]))
        L["text_idx"].extend([T, T + n_inner + 1])
        L["pos"].extend([rope] * (n_inner + 2))
        return list(range(T + 1, T + 1 + n_inner))

    for seg in sample:
        if isinstance(seg, Text):
            if dropped(seg, p_text):
                continue
            ids = [cfg.bos_token_id] + list(seg.ids) + [cfg.eos_token_id]
            L["text_ids"].append(torch.tensor(ids))
            L["text_idx"].extend(range(T, T + len(ids)))
            L["pos"].extend(range(rope, rope + len(ids)))
            if seg.loss:  # BAGEL: inputs [bos] + ids, labels ids + [eos]; the trailing eos has no label
                L["ce_idx"].extend(range(T, T + len(ids) - 1))
                L["ce_labels"].append(torch.tensor(ids[1:]))
            L["splits"].append((T, len(ids), "causal"))
            T, rope = T + len(ids), rope + len(ids)
        elif isinstance(seg, VitImage):
            if dropped(seg, p_vit):
                rope += 1  # BAGEL: a dropped image still takes its RoPE id
                continue
            P = cfg.vit_patch_size
            if seg.pixels.shape[1] % P or seg.pixels.shape[2] % P:
                raise ValueError(f"ViT image {tuple(seg.pixels.shape)}: sides must be multiples of the patch {P}")
            h, w = seg.pixels.shape[1] // P, seg.pixels.shape[2] // P
            L["vit_patches"].append(patchify(seg.pixels, P))
            L["vit_pos"].append(vit_position_ids(h, w, cfg.vit_max_num_patch_per_side))
            L["vit_lens"].append(h * w)
            inner = image_block(h * w)
            L["vit_idx"].extend(inner)
            if seg.pair is not None:
                pair_vit[seg.pair] = inner
            L["splits"].append((T, h * w + 2, "full"))
            T, rope = T + h * w + 2, rope + 1  # BAGEL: an image block advances RoPE by 1
        elif isinstance(seg, VaeImage):
            noised = seg.t > 0
            if not noised and dropped(seg, p_vae):
                rope += 1
                continue
            h, w = seg.grid
            if seg.tokens.shape[0] != h * w:
                raise ValueError(f"VaeImage has {seg.tokens.shape[0]} tokens but grid {h}x{w}")
            L["vae_tokens"].append(seg.tokens)
            L["vae_t"].append(torch.full((h * w,), float(seg.t)))
            L["vae_pos"].append(vit_position_ids(h, w, cfg.max_latent_size))
            inner = image_block(h * w)
            L["vae_idx"].extend(inner)
            if noised:  # BAGEL: a noised block takes the current RoPE id without advancing it
                L["flow_idx"].extend(inner)
                L["flow_lens"].append(h * w)
                L["mse_mask"].append(torch.full((h * w,), seg.target is not None))
                if seg.target is not None:
                    L["mse_target"].append(seg.target)
            elif seg.pair is not None:
                pair_vae[seg.pair] = inner
            L["splits"].append((T, h * w + 2, "noise" if noised else "full"))
            T, rope = T + h * w + 2, rope + (0 if noised else 1)
        else:
            raise TypeError(f"a sample holds Text, VitImage or VaeImage segments, not {type(seg).__name__}")
    if T and max(L["pos"]) >= cfg.max_position_embeddings:
        raise ValueError(f"a sample reaches RoPE position {max(L['pos'])} >= max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    L["pairs"] = [(pair_vit[k], pair_vae[k]) for k in pair_vit if k in pair_vae]  # CLEAR: only if neither was dropped
    L["length"] = T
    return L


def pack(samples: list[list], cfg: ModelConfig, dropout: tuple = (0.0, 0.0, 0.0),
         generator: torch.Generator | None = None, row_tokens: int | None = None) -> Packed:
    """Lay samples (lists of Text / VitImage / VaeImage) out in padded rows: one sample per row, or, with row_tokens,
    several samples per row (first fit) that never attend to each other (BAGEL's packed sequences)."""
    lays = [layout(s, cfg, dropout, generator) for s in samples]
    rows, fill = [], []
    for i, lay in enumerate(lays):
        r = next((j for j, f in enumerate(fill) if row_tokens and f + lay["length"] <= row_tokens), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        fill[r] += lay["length"]
    T = max(max(fill), 1)
    parts = {f.name: [] for f in PARTS}
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    splits, pairs, ce_sample = [], [], []
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            lay, off = lays[i], r * T + start
            pos[r, start:start + lay["length"]] = torch.tensor(lay["pos"], dtype=torch.long)
            for f in PARTS:
                parts[f.name].extend([x + off for x in lay[f.name]] if f.metadata["kind"] == "index" else lay[f.name])
            ce_sample.extend([i] * len(lay["ce_idx"]))
            splits.extend((r, i, start + s, n, mode) for s, n, mode in lay["splits"])
            pairs.extend((torch.tensor(a) + off, torch.tensor(b) + off) for a, b in lay["pairs"])
            start += lay["length"]
        if start < T:
            splits.append((r, -1, start, T - start, "pad"))

    def tensor(f, values):
        kind, dtype, width = f.metadata["kind"], f.metadata["dtype"], f.metadata["width"]
        if kind == "list":
            return values
        if kind == "index":
            return torch.tensor(values, dtype=torch.long)
        return torch.cat(values) if values else torch.zeros((0, width(cfg)) if width else (0,), dtype=dtype)

    return Packed(rows=len(rows), row_len=T, position_ids=pos, splits=splits,
                  sample_lens=[lay["length"] for lay in lays],
                  pairs=pairs, ce_sample=torch.tensor(ce_sample, dtype=torch.long),
                  **{f.name: tensor(f, parts[f.name]) for f in PARTS})


def split_tables(splits: list, rows: int, row_len: int, device=None) -> dict:
    """Per-token sample id, split id and split kind ([B, T] each) from the (row, sample, start, length, mode) splits.
    Filled by one scatter per table (a slice assignment per split was most of building a packed batch's mask)."""
    r, sample, start, n = (torch.tensor([sp[j] for sp in splits], dtype=torch.long).reshape(-1) for j in range(4))
    split = torch.arange(len(splits)).repeat_interleave(n)  # the split of every token the splits cover
    first = (torch.cumsum(n, 0) - n).repeat_interleave(n)
    flat = (r * row_len + start).repeat_interleave(n) + torch.arange(len(split)) - first  # its index in B*T
    values = {"sample": sample, "split": torch.arange(len(splits))}
    values.update({k: torch.tensor([sp[4] == k for sp in splits], dtype=torch.bool)
                   for k in ("noise", "causal", "pad")})
    t = {}
    for k, v in values.items():
        t[k] = torch.full((rows * row_len,), -1 if k == "sample" else 0, dtype=v.dtype)
        t[k][flat] = v[split]
    return {k: v.view(rows, row_len).to(device) for k, v in t.items()}


def may_attend(t: dict, b, q, k):
    """The attention rule for query q and key k of row b (BAGEL: prepare_attention_mask_per_sample): within a sample
    every split sees all earlier splits except noised ones; causal splits are lower-triangular inside, full and noise
    splits bidirectional; samples never see each other; padding sees only itself."""
    same = (t["sample"][b, q] == t["sample"][b, k]) & ~t["pad"][b, q]
    earlier = (t["split"][b, q] > t["split"][b, k]) & ~t["noise"][b, k]  # BAGEL: nobody attends to a noised split
    inside = (t["split"][b, q] == t["split"][b, k]) & (~t["causal"][b, q] | (q >= k))
    return (same & (earlier | inside)) | (t["pad"][b, q] & (q == k))


def attention_mask(splits: list, rows: int, row_len: int, device=None) -> torch.Tensor:
    """Boolean [B, T, T] mask of may_attend, True = may attend."""
    t = split_tables(splits, rows, row_len, device)
    b = torch.arange(rows, device=device)[:, None, None]
    i = torch.arange(row_len, device=device)
    return may_attend(t, b, i[None, :, None], i[None, None, :])


def additive_mask(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean attention mask as 0 / -inf in `dtype`: the form SDPA turns a boolean mask into at every call (and
    again in its backward), made once per forward for all layers; the attention computed is the same to the bit."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def block_mask(splits: list, rows: int, row_len: int, device=None):
    """The same rule as a FlexAttention BlockMask: no dense [T, T] mask, and fully masked blocks are skipped."""
    t = split_tables(splits, rows, row_len, device)
    return create_block_mask(lambda b, h, q, k: may_attend(t, b, q, k), rows, None, row_len, row_len, device=device)


class AttentionGroups:
    """Packed rows re-packed for attention into G short rows of L slots, L the longest sample: each sample (and each
    piece of a row's padding) keeps its tokens together and in order, and they fill the short rows first-fit, longest
    first. No token attends across samples, so this is the rows' block-diagonal mask without most of its empty blocks:
    about L / T of the attention work (BAGEL's training attention is per sample too: PackedAttentionMoT.forward runs
    one SDPA per sample with that sample's mask). Slots left over at a short row's end are padding."""

    def __init__(self, splits: list, rows: int, row_len: int, dtype, device=None):
        spans = {}  # (row, sample) -> (first, end) token of the row; a row's padding is its sample -1
        for r, sample, start, n, _ in splits:
            first, end = spans.get((r, sample), (start, start + n))
            spans[(r, sample)] = (min(first, start), max(end, start + n))
        L = max([b - a for (_, sample), (a, b) in spans.items() if sample != -1], default=1)
        # padding tokens see only themselves: a row's padding is cut into pieces of at most L
        spans = sorted(((r * row_len + c, min(L, b - c)) for (r, _), (a, b) in spans.items() for c in range(a, b, L)),
                       key=lambda s: -s[1])
        fill, token = [], []
        for first, n in spans:  # first fit, longest first
            g = next((j for j, f in enumerate(fill) if f + n <= L), len(fill))
            if g == len(fill):
                fill.append(0)
                token.append(torch.zeros(L, dtype=torch.long))
            token[g][fill[g]:fill[g] + n] = torch.arange(first, first + n)
            fill[g] += n
        G, i = len(fill), torch.arange(L, device=device)
        valid = i < torch.tensor(fill, device=device)[:, None]  # [G, L]
        self.token = torch.stack(token).to(device)  # [G, L] the token of each slot (padding slots: token 0, never read)
        self.slot = torch.empty(rows * row_len, dtype=torch.long, device=device)  # [B*T] the slot of each token
        self.slot[self.token[valid]] = (torch.arange(G, device=device)[:, None] * L + i)[valid]
        t = {k: v.reshape(-1)[self.token] for k, v in split_tables(splits, rows, row_len, device).items()}
        g = torch.arange(G, device=device)[:, None, None]
        allowed = may_attend(t, g, i[None, :, None], i[None, None, :]) & valid[:, :, None] & valid[:, None, :]
        allowed |= ~valid[:, :, None] & (i[:, None] == i[None, :])  # a padding slot sees itself: no empty softmax
        self.mask = additive_mask(allowed, dtype)[:, None]  # [G, 1, L, L], built where it is used
        self.shape = (G, L)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] per token -> [G, L, ...] per slot."""
        return x.reshape(-1, *x.shape[2:])[self.token]


@dataclass
class TrainOutput:
    ce: torch.Tensor  # [n_ce] per-token cross entropy (= -log p of each label)
    mse: torch.Tensor  # [n_mse] per-token flow-matching MSE
    v: torch.Tensor  # [n_flow, p^2 z] predicted velocity at every noised latent token
    hidden: torch.Tensor  # [B*T, H] final-normed hidden states of the padded rows


# ----------------------------------------------------------------------------------------------------------------------
# KV cache for interleaved inference (BAGEL: NaiveCache + gen_context {kv_lens, ropes})


class KVCache:
    """Keys (after k-norm and RoPE) and values of B independent context rows, padded to a common capacity.

    Row b holds lens[b] valid slots and will place its next block at RoPE id ropes[b]. Grows by doubling unless
    created with the capacity it needs (then every step has static shapes, as a compiled decode wants).
    """

    def __init__(self, cfg: ModelConfig, batch: int = 1, capacity: int = 256, device=None, dtype=torch.float32):
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        self.ropes = torch.zeros(batch, dtype=torch.long, device=device)

    batch = property(lambda self: self.lens.shape[0])
    capacity = property(lambda self: self.k[0].shape[2])

    def reserve(self, n: int):
        need = int(self.lens.max()) + n
        if need > self.capacity:
            new = max(need, 2 * self.capacity)
            pad = lambda x: F.pad(x, (0, 0, 0, new - x.shape[2]))  # noqa: E731
            self.k, self.v = [pad(x) for x in self.k], [pad(x) for x in self.v]

    def copy(self) -> "KVCache":
        """An independent snapshot (BAGEL: deepcopy of a gen_context)."""
        return KVCache.stack([self])

    def rows(self, idx) -> "KVCache":
        """A cache of the selected rows (copies)."""
        idx = torch.as_tensor(idx, device=self.lens.device)
        out = KVCache.__new__(KVCache)
        out.k, out.v = [x[idx] for x in self.k], [x[idx] for x in self.v]
        out.lens, out.ropes = self.lens[idx].clone(), self.ropes[idx].clone()
        return out

    @staticmethod
    def stack(caches: list["KVCache"]) -> "KVCache":
        """Concatenate the rows of several caches (e.g. the three CFG contexts) into one batched cache."""
        cap = max(int(c.lens.max()) for c in caches) + 1
        out = KVCache.__new__(KVCache)
        out.k = [torch.cat([c.k[i][:, :, :cap] if c.capacity >= cap else F.pad(c.k[i], (0, 0, 0, cap - c.capacity))
                            for c in caches]) for i in range(len(caches[0].k))]
        out.v = [torch.cat([c.v[i][:, :, :cap] if c.capacity >= cap else F.pad(c.v[i], (0, 0, 0, cap - c.capacity))
                            for c in caches]) for i in range(len(caches[0].v))]
        out.lens = torch.cat([c.lens for c in caches]).clone()
        out.ropes = torch.cat([c.ropes for c in caches]).clone()
        return out


# ----------------------------------------------------------------------------------------------------------------------
# The unified model


class Bagel(nn.Module):
    """BAGEL-7B-MoT-style unified model; parameter names equal the official ema.safetensors keys (+ `vae.` = ae)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.hidden_size, cfg.patch_latent_dim
        self.language_model = LanguageModel(cfg)
        self.vit_model = VitModel(cfg)
        self.connector = MLPConnector(cfg.vit_hidden_size, H, cfg.connector_act)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, H)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, H)
        self.time_embedder = TimestepEmbedder(H)
        self.vae2llm = nn.Linear(D, H)
        self.llm2vae = nn.Linear(H, D)
        self.vae = AutoEncoder(cfg)

    # ---- shared pieces of every forward ------------------------------------------------------------------------------

    def embed_vit(self, patches, pos_ids, image_lens):
        """ViT -> connector -> + vit_pos_embed: the LLM input rows of understanding-image tokens (BAGEL)."""
        x = self.vit_model.vision_model(patches.to(self.dtype), pos_ids, image_lens)
        return self.connector(x) + self.vit_pos_embed(pos_ids)

    def embed_latent(self, tokens, t, pos_ids):
        """vae2llm(x_t) + time_embedder(t) + latent_pos_embed: LLM input rows of latent tokens
        (BAGEL; CLEAR's bridge at t=0)."""
        return self.vae2llm(tokens.to(self.dtype)) + self.time_embedder(t) + self.latent_pos_embed(pos_ids)

    def run_layers(self, x, pos, gen_mask, mask, kv_write=None, hidden_hook=None, recompute=False):
        """The MoT decoder on x [B, T, H]; returns final-normed hidden states (norm for und, norm_moe_gen for gen).
        mask: an additive [B, 1, T, T] mask, a FlexAttention BlockMask, or AttentionGroups (attention per sample).
        recompute: run each layer again in the backward pass instead of keeping its activations (memory for time)."""
        cfg = self.cfg
        groups = mask if isinstance(mask, AttentionGroups) else None
        mask = mask if groups is None else groups.mask
        cos, sin = rope_cos_sin(pos if groups is None else groups.gather(pos), cfg.head_dim, cfg.rope_theta, x.dtype)
        route = Route(gen_mask.reshape(-1) if gen_mask is not None else None)
        if groups is not None:
            route.attend_in(groups)
        lm = self.language_model.model
        B, T, H = x.shape
        x = route.to_experts(x.reshape(B * T, H))
        for i, layer in enumerate(lm.layers):
            if recompute and torch.is_grad_enabled() and kv_write is None:  # BAGEL: gradient_checkpointing
                x = torch.utils.checkpoint.checkpoint(layer, x, route, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, route, cos, sin, mask, None if kv_write is None else kv_write(i))
            if hidden_hook is not None:
                hidden_hook(i, route.to_tokens(x).view(B, T, H))  # CLEAR: distill_fn(layer_idx, hidden) per layer
        return route.to_tokens(route(x, lm.norm, lm.norm_moe_gen)).view(B, T, H)

    @property
    def dtype(self):
        return self.vae2llm.weight.dtype

    @property
    def device(self):
        return self.vae2llm.weight.device

    # ---- training forward -------------------------------------------------------------------------------------------

    def forward(self, packed: Packed, temperature: float = 1.0, hidden_hook=None, flex: bool = False,
                recompute: bool = False, mask: torch.Tensor | None = None) -> TrainOutput:
        """Packed rows -> per-token CE, per-token flow MSE and velocities (BAGEL: Bagel.forward).

        `temperature` divides the logits before the CE (RL log-probs of tokens sampled at that temperature).
        `hidden_hook(layer, hidden [B*T, H])` is called after every layer (CLEAR's distillation reads it).
        `flex`: FlexAttention block masks instead of a dense [T, T] mask (long rows on GPU; no CPU backward).
        `recompute`: activation checkpointing per decoder layer (FSDP fine-tuning of the real model).
        `mask`: a boolean [B, T, T] attention mask to use instead of the packing's rules (research: rl.official_mask).
        """
        lm, B, T = self.language_model, packed.rows, packed.row_len
        x = torch.zeros(B * T, self.cfg.hidden_size, device=self.device, dtype=self.dtype)
        x = x.index_put((packed.text_idx,), lm.model.embed_tokens(packed.text_ids))
        if packed.vit_lens:
            x = x.index_put((packed.vit_idx,), self.embed_vit(packed.vit_patches, packed.vit_pos, packed.vit_lens))
        if packed.vae_idx.numel():
            x = x.index_put((packed.vae_idx,), self.embed_latent(packed.vae_tokens, packed.vae_t, packed.vae_pos))
        gen_mask = torch.zeros(B * T, dtype=torch.bool, device=self.device)
        gen_mask[packed.vae_idx] = True  # BAGEL: VAE tokens (clean or noised) -> gen expert; text + ViT -> und
        if mask is not None:
            if flex:
                raise ValueError("a given mask is dense: pass flex=False")
            mask = additive_mask(mask.to(self.device), self.dtype)[:, None]
        elif flex:  # no dense [T, T] mask: FlexAttention skips the blocks nobody may attend to
            mask = block_mask(packed.splits, B, T, self.device)
        else:  # each sample attends within itself: the rows' mask, without the blocks nobody may attend to
            mask = AttentionGroups(packed.splits, B, T, self.dtype, self.device)
        hook = None if hidden_hook is None else (lambda i, h: hidden_hook(i, h.reshape(B * T, -1)))
        h = self.run_layers(x.view(B, T, -1), packed.position_ids, gen_mask.view(B, T), mask, hidden_hook=hook,
                           recompute=recompute)
        h = h.reshape(B * T, -1)
        logits = lm.lm_head(h[packed.ce_idx]).float() / temperature
        ce = F.cross_entropy(logits, packed.ce_labels, reduction="none")
        v = self.llm2vae(h[packed.flow_idx])
        mse = flow_matching_loss(v[packed.mse_mask], packed.mse_target)
        return TrainOutput(ce=ce, mse=mse, v=v, hidden=h)

    # ---- inference with the KV cache --------------------------------------------------------------------------------

    def new_cache(self, batch: int = 1, capacity: int = 256) -> KVCache:
        return KVCache(self.cfg, batch, capacity, self.device, self.dtype)

    def extend(self, cache: KVCache, x, pos, gen_mask=None, causal=True, n_valid=None, commit=True):
        """Run a block x [B, n, H] at RoPE ids pos [B, n] against each row's cache (BAGEL: forward_inference).

        The block attends to the row's cache and to itself (causally, bottom-right aligned, or fully). Rows may carry
        fewer valid tokens than n (n_valid [B]); with commit the valid keys stay in the cache, otherwise they are
        overwritten later (a noised block: nobody sees it). gen_mask [n] routes block positions to the gen expert.
        """
        B, n, _ = x.shape
        if int(pos.max()) >= self.cfg.max_position_embeddings:
            raise ValueError(f"RoPE position {int(pos.max())} >= max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        n_valid = torch.full((B,), n, device=self.device) if n_valid is None else n_valid.to(self.device)
        cache.reserve(n)
        old = cache.lens
        slots = old[:, None] + torch.arange(n, device=self.device)  # [B, n] where the new keys go
        q_idx = torch.arange(n, device=self.device)
        limit = old[:, None] + (q_idx[None, :] + 1 if causal else torch.full_like(q_idx, n)[None, :])  # [B, n]
        mask = torch.arange(cache.capacity, device=self.device)[None, None, :] < limit[:, :, None]

        def kv_write(layer):
            def write(k, v):  # k, v [B, nkv, n, hd]
                rows = torch.arange(B, device=self.device)[:, None]
                if torch.is_grad_enabled():  # keep earlier versions for autograd: write into a copy
                    cache.k[layer], cache.v[layer] = cache.k[layer].clone(), cache.v[layer].clone()
                cache.k[layer][rows, :, slots] = k.transpose(1, 2).to(cache.k[layer].dtype)
                cache.v[layer][rows, :, slots] = v.transpose(1, 2).to(cache.v[layer].dtype)
                return cache.k[layer], cache.v[layer]
            return write

        gen = None if gen_mask is None else gen_mask.to(self.device)[None].expand(B, n)
        h = self.run_layers(x.to(self.dtype), pos, gen, additive_mask(mask, self.dtype)[:, None], kv_write)
        if commit:
            cache.lens = old + n_valid
        return h

    def add_text(self, cache: KVCache, ids: list[list[int]], wrap: bool = True, active=None):
        """Prefill a text block per row (<|im_start|> ids <|im_end|> if wrap); returns hidden states [B, n, H].

        Rows where `active` [B] is False are left unchanged (their ids are ignored).
        """
        cfg = self.cfg
        rows = [([cfg.bos_token_id] + list(r) + [cfg.eos_token_id]) if wrap else list(r) for r in ids]
        n = max(len(r) for r in rows)
        tok = torch.tensor([r + [cfg.eos_token_id] * (n - len(r)) for r in rows], device=self.device)
        n_valid = torch.tensor([len(r) for r in rows], device=self.device)
        if active is not None:
            n_valid = n_valid * active.to(self.device)
        pos = cache.ropes[:, None] + torch.arange(n, device=self.device)
        h = self.extend(cache, self.language_model.model.embed_tokens(tok), pos, causal=True, n_valid=n_valid)
        cache.ropes = cache.ropes + n_valid  # BAGEL: text advances RoPE by its length
        return h

    def image_block(self, cache: KVCache, inner: torch.Tensor):
        """Frame per-row inner rows [B, N, H] with <|vision_start|> / <|vision_end|> at one RoPE id (BAGEL)."""
        B, N, _ = inner.shape
        marks = self.language_model.model.embed_tokens(torch.tensor([self.cfg.start_of_image_id,
                                                                     self.cfg.end_of_image_id], device=self.device))
        x = torch.cat([marks[0].expand(B, 1, -1), inner.to(self.dtype), marks[1].expand(B, 1, -1)], dim=1)
        pos = cache.ropes[:, None].expand(B, N + 2)  # BAGEL: every token of an image block shares one RoPE id
        return x, pos

    def add_vit_image(self, cache: KVCache, pixels: torch.Tensor, active=None):
        """Prefill a ViT block, one image [3, H, W] or one per row [B, 3, H, W]; returns its hidden states
        (BAGEL: forward_cache_update_vit)."""
        P = self.cfg.vit_patch_size
        pixels = pixels.expand(cache.batch, *pixels.shape[-3:]) if pixels.dim() == 3 else pixels
        h, w = pixels.shape[-2] // P, pixels.shape[-1] // P
        ids = vit_position_ids(h, w, self.cfg.vit_max_num_patch_per_side, self.device)
        patches = torch.cat([patchify(p, P) for p in pixels]).to(self.device)
        emb = self.embed_vit(patches, ids.repeat(len(pixels)), [h * w] * len(pixels)).view(len(pixels), h * w, -1)
        x, pos = self.image_block(cache, emb)
        return self.commit_block(cache, x, pos, None, active)  # und expert, full attention

    def commit_block(self, cache: KVCache, x, pos, gen_mask, active):
        """Prefill an image block (full attention) in the rows where `active` (all if None), then advance their RoPE."""
        keep = (torch.ones(cache.batch, dtype=torch.long, device=self.device) if active is None
                else active.long().to(self.device))
        h = self.extend(cache, x, pos, gen_mask, causal=False, n_valid=keep * x.shape[1])
        cache.ropes = cache.ropes + keep  # BAGEL: an image advances RoPE by 1
        return h

    def latent_embedding(self, tokens: torch.Tensor, t, grid: tuple) -> torch.Tensor:
        """LLM input rows [B, N, H] of latent tokens [B, N, p^2 z] at flow time t on an h x w grid (BAGEL)."""
        h, w = grid
        ids = vit_position_ids(h, w, self.cfg.max_latent_size, self.device)
        B, N = tokens.shape[0], h * w
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(B)
        return self.embed_latent(tokens.reshape(B * N, -1).to(self.device), t.repeat_interleave(N),
                                 ids.repeat(B)).view(B, N, -1)

    def latent_block(self, cache: KVCache, emb: torch.Tensor):
        """Framed latent rows at one RoPE id, and the mask routing them (not the markers) to the gen expert."""
        x, pos = self.image_block(cache, emb)
        gen_mask = torch.ones(emb.shape[1] + 2, dtype=torch.bool, device=self.device)
        gen_mask[0] = gen_mask[-1] = False  # BAGEL: the two markers go through the und expert
        return x, pos, gen_mask

    def add_latent(self, cache: KVCache, tokens: torch.Tensor, grid: tuple, active=None):
        """Prefill clean latent tokens [B, N, p^2 z] at t=0: a VAE conditioning image
        (BAGEL: forward_cache_update_vae)."""
        return self.add_latent_embedding(cache, self.latent_embedding(tokens, 0.0, grid), active)

    def add_latent_embedding(self, cache: KVCache, emb: torch.Tensor, active=None):
        """Prefill embedded latent rows [B, N, H] as one full-attention block through the gen expert (CLEAR:
        forward_cache_update_vae_from_packed_latent, how bridge.py puts a restored latent back into the context)."""
        x, pos, gen_mask = self.latent_block(cache, emb)
        return self.commit_block(cache, x, pos, gen_mask, active)

    def velocity(self, cache: KVCache, x_t: torch.Tensor, t, grid: tuple) -> torch.Tensor:
        """Predicted v for noised tokens x_t [B, N, D] at time t against each row's context (BAGEL: _forward_flow)."""
        x, pos, gen_mask = self.latent_block(cache, self.latent_embedding(x_t, t, grid))
        h = self.extend(cache, x, pos, gen_mask, causal=False, commit=False)  # BAGEL: update_past_key_values=False
        return self.llm2vae(h[:, 1:-1]).float()

    def logits(self, h):
        return self.language_model.lm_head(h).float()

    def decode_text(self, cache: KVCache, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    stop_ids: tuple | None = None, generator: torch.Generator | None = None, active=None):
        """Generate text per row from <|im_start|> at the row's RoPE id (BAGEL: prepare_start_tokens + generate_text).

        Greedy when temperature == 0, else softmax(logits / T) with nucleus top_p. A row ends at a stop token
        (default <|im_end|>), which is fed to close the block, so the cache holds <|im_start|> ids <stop> exactly as a
        prefilled text block; a row that runs out of tokens is closed with <|im_end|>. Returns (ids per row without
        start and stop tokens, log-probs per sampled token including the stop token, stop token per row or None).
        Rows where `active` is False are left unchanged.
        """
        cfg = self.cfg
        stop_ids = (cfg.eos_token_id,) if stop_ids is None else tuple(stop_ids)
        B = cache.batch
        GEN, CLOSE, DONE = 0, 1, 2
        state = [GEN if active is None or bool(active[b]) else DONE for b in range(B)]
        tok = torch.full((B,), cfg.bos_token_id, device=self.device)
        ids, logps, stops = [[] for _ in range(B)], [[] for _ in range(B)], [None] * B
        for step in range(max_new_tokens + 2):
            feed = torch.tensor([s != DONE for s in state], device=self.device)
            if not bool(feed.any()):
                break
            h = self.extend(cache, self.language_model.model.embed_tokens(tok)[:, None], cache.ropes[:, None],
                            n_valid=feed.long())
            cache.ropes = cache.ropes + feed.long()  # BAGEL: +1 RoPE and +1 KV slot per decoded token
            state = [DONE if s == CLOSE else s for s in state]
            if GEN not in state:
                break
            if step == max_new_tokens:  # out of budget: close the still-open rows with <|im_end|>
                tok = torch.full_like(tok, cfg.eos_token_id)
                state = [CLOSE if s == GEN else s for s in state]
                continue
            new, logp = sample_token(self.logits(h[:, -1]), temperature, top_p, generator)
            new_ids, new_logps = new.tolist(), logp.tolist()  # one conversion per step, not one per row
            for b in range(B):
                if state[b] != GEN:
                    continue
                t = new_ids[b]
                logps[b].append(new_logps[b])
                if t in stop_ids:
                    stops[b], state[b] = t, CLOSE
                else:
                    ids[b].append(t)
            tok = new
        return ids, logps, stops

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor):
        """Batched posterior-mean latents: pixels [N, 3, H, W] -> (tokens [N, h*w, p^2 z] on CPU, grid (h, w))."""
        s = self.cfg.latent_downsample
        if pixels.shape[-1] % s or pixels.shape[-2] % s:
            raise ValueError(f"image {tuple(pixels.shape[-2:])}: sides must be multiples of {s} for the autoencoder")
        z = self.vae.encode(pixels.to(self.device, self.dtype)).float().cpu()
        return (torch.stack([patchify(x, self.cfg.latent_patch_size) for x in z]),
                (pixels.shape[2] // s, pixels.shape[3] // s))

    def decode_latent(self, tokens: torch.Tensor, grid: tuple) -> torch.Tensor:
        """Latent tokens [h*w, p^2 z] -> pixels [3, H, W] (float, unclamped) (BAGEL: decode_image)."""
        z = unpatchify(tokens.to(self.device, self.dtype), grid, self.cfg.latent_patch_size)
        return self.vae.decode(z[None])[0]

    @torch.no_grad()
    def generate_image(self, cache: KVCache, grid: tuple, noise: torch.Tensor, num_timesteps: int = 50,
                       shift: float = 3.0, cfg_text_cache: KVCache | None = None, cfg_img_cache: KVCache | None = None,
                       cfg_text_scale: float = 1.0, cfg_img_scale: float = 1.0, cfg_interval=(0.4, 1.0),
                       cfg_renorm_type: str = "global", cfg_renorm_min: float = 0.0):
        """Euler ODE sampling with classifier-free guidance (BAGEL: generate_image + _forward_flow).

        noise [B, N, D] is x at t=1; the three guidance branches (full context, text-unconditional, image-
        unconditional) run as rows of one batched forward. Returns x0 [B, N, D] and the steps, dict(x_t, t, v) each,
        as the SDE sampler does.
        """
        B = cache.batch
        branches = [cache]
        if cfg_text_scale > 1.0:
            branches.append(cfg_text_cache)
            if cfg_img_scale > 1.0:
                branches.append(cfg_img_cache)
        if any(c is None for c in branches):
            raise ValueError("CFG needs cfg_text_cache (and cfg_img_cache when cfg_img_scale > 1)")
        both = KVCache.stack(branches) if len(branches) > 1 else cache
        x = noise.float().to(self.device)
        ts = flow_timesteps(num_timesteps, shift, self.device)
        steps = []
        for i in range(num_timesteps - 1):
            t = float(ts[i])
            guided = cfg_interval[0] < t <= cfg_interval[1] and len(branches) > 1  # BAGEL: CFG only inside the interval
            ctx = both if guided else cache  # outside the interval only the full-context branch runs
            v_all = self.velocity(ctx, x.repeat(len(branches) if guided else 1, 1, 1), t, grid)
            if guided:
                vs = v_all.split(B)
                v = cfg_combine(vs[0], vs[1], vs[2] if len(vs) > 2 else None, cfg_text_scale,
                                cfg_img_scale if len(vs) > 2 else 1.0, cfg_renorm_type, cfg_renorm_min)
            else:
                v = v_all
            steps.append(dict(x_t=x, t=t, v=v))
            x = x - v * (ts[i] - ts[i + 1])  # v points from data to noise
        return x, steps

    def sample_sde(self, cache: KVCache, grid: tuple, noise: torch.Tensor, num_timesteps: int = 20, shift: float = 3.0,
                   sigma: float = 0.3, generator: torch.Generator | None = None):
        """Stochastic sampler of CLEAR's rollouts (§3.4): no CFG; records every step for Flow-GRPO.

        Returns x0 [B, N, D] and a list of steps dict(x_t, x_next, t, dt, logprob [B]).
        """
        x = noise.float().to(self.device)
        ts = flow_timesteps(num_timesteps, shift, self.device)
        steps = []
        for i in range(num_timesteps - 1):
            t, dt = float(ts[i]), float(ts[i] - ts[i + 1])
            v = self.velocity(cache, x, t, grid)
            mean = sde_step_mean(x, v, t, dt, sigma)
            z = torch.randn(x.shape, generator=generator,
                            device=x.device if generator is None else generator.device).to(x.device)
            x_next = mean + sigma * math.sqrt(dt) * z  # CLEAR: x_next = x_t - drift dt + sigma sqrt(dt) z
            steps.append(dict(x_t=x, x_next=x_next, t=t, dt=dt, logprob=sde_step_logprob(x_next, mean, sigma, dt)))
            x = x_next
        return x, steps


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    """Greedy (T=0) or nucleus sampling; returns token ids [B] and their log-prob under softmax(logits / T)."""
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.zeros(len(tok), device=logits.device)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    tok = torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu" else probs, 1,
                            generator=generator).squeeze(1).to(logits.device)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


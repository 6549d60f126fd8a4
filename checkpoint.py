"""
Checkpoints: the BAGEL folder format and the atomic, resumable checkpoint folders every stage writes.

A checkpoint is a BAGEL-format folder (`ema.safetensors` with the official key names, `ae.safetensors`,
`llm_config.json`, `vit_config.json`, `tokenizer.json`), plus our `nanoclear.json` (the values no official json holds,
the run's settings, its step) and, for `--resume`, `train_state/` (raw weights, optimizer state). A folder saved from a
real BAGEL folder loads in the official code as it is. Toy folders are for nanoCLEAR only: the official load_ae
hard-codes FLUX's autoencoder (modeling/autoencoder.py:339-351 @411d6bd: ch 128, ch_mult [1, 2, 4, 4], 2 res blocks,
z 16, 32 GroupNorm groups), which the toy's (ch 16, mult (1, 2, 2), z 4, latent patch 4, 8 groups) cannot fill, and
the official slow Qwen2Tokenizer built from the toy's vocab.json + merges.txt splits `<think>`, `<image_restore>`,
`<answer>` into other pieces and " 12" otherwise: the toy's split rule (data.TOY_SPLIT) lives in tokenizer.json
only, which that tokenizer does not read.
Every read is strict: a missing, extra, mis-shaped or foreign tensor stops with one message that names the file and the
fix (`InputError`, the one documented input error; every reader of user input raises it or FileNotFoundError).

A folder is written into a temporary sibling, flushed to disk, marked complete and swapped in by two renames, so a kill
at any instant leaves a complete checkpoint; whoever next reads or writes the folder finishes or undoes an interrupted
swap (settle_folder). One process writes an output folder at a time: it holds a lock beside it (folder_lock; POSIX).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import model as M

# ----------------------------------------------------------------------------------------------------------------------
# BAGEL-format folders: ema.safetensors, ae.safetensors, llm_config.json, vit_config.json, tokenizer.json,
# nanoclear.json

# What BAGEL's app.py / load_ae pass in code (no json holds them): read from nanoclear.json for our checkpoints, and
# from the bagel-7b-mot preset for a folder without one
CODE_KEYS = ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side", "connector_act", "timestep_shift",
             "ae_ch", "ae_ch_mult", "ae_num_res_blocks", "ae_z_channels", "ae_scale_factor", "ae_shift_factor",
             "ae_norm_groups")
SPECIAL_TOKENS = {"bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>",
                  "start_of_image_id": "<|vision_start|>", "end_of_image_id": "<|vision_end|>"}
LLM_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings")


VIT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")
VIT_LAYERS = "vit_model.vision_model.encoder.layers."


class InputError(ValueError):
    """A malformed input (checkpoint folder, tokenizer, data file): the message names the file and the fix. Readers
    raise it (or FileNotFoundError for a missing file); the scripts print it as one line (common.run_cli)."""


class FolderInUse(InputError):
    """Another live process holds the folder's lock (folder_lock): it is writing there."""


# Text files a user hands in (configs, tokenizer.json, state.json, logs, caches) are read whole, so their size is
# checked first: BAGEL-7B-MoT's largest, tokenizer.json, is 7 MB; 256 MiB is far above any real one and fits in memory
MAX_TEXT_BYTES = 256 << 20
FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_problem(path) -> str | None:
    """Why `path` is no regular file (or link to one) to read, in words ("does not exist", "is a FIFO (named pipe), not
    a regular file", ...), or None. Reading a FIFO or a device would block for ever."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:  # a path through a file, a link loop, a name too long, no permission to look
        return f"cannot be read ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((k for test, k in FILE_KINDS if test(mode)), "something else")
    return "is a folder" if stat.S_ISDIR(mode) else f"is {kind}, not a regular file"


def regular_file(path, what: str) -> Path:
    """`path` when it is a regular file (or a link to one), the check every reader of user input makes first;
    FileNotFoundError when nothing is there or it is a folder, InputError for anything else. `what` is what to pass
    instead ("a JSONL file", ...)."""
    problem = file_problem(path)
    if problem is None:
        return Path(path)
    error = FileNotFoundError if problem in ("does not exist", "is a folder") else InputError
    raise error(f"{path} {problem}: pass {what}")


def read_bytes(path, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (checked before reading); InputError otherwise."""
    path = regular_file(path, what)
    try:
        size = path.stat().st_size
        if size > limit:
            raise InputError(f"{path} is {size:,} bytes, over the {limit:,} a {what.removeprefix('a ')} may have: "
                             "is it the right file?")
        return path.read_bytes()
    except OSError as e:  # no permission, an I/O error
        raise InputError(f"{path} cannot be read ({e.strerror}): pass {what}") from None


def parse_json(data: bytes, path) -> object:
    """JSON from bytes; InputError naming the file for anything that is not (deep nesting and over-long integers
    included, which the json module reports as RecursionError and ValueError)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep, an integer of 4300+ digits
        raise InputError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); restore the file from the "
                         "original checkpoint") from None


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{path} is missing: a BAGEL-format folder holds llm_config.json, vit_config.json, "
                                "ema.safetensors and ae.safetensors")
    value = parse_json(read_bytes(path, "a JSON file"), path)
    if not isinstance(value, dict):
        raise InputError(f"{path} holds a JSON {type(value).__name__}, not an object; "
                         "restore the file from the original checkpoint")
    return value


def read_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json, which must exist; the library's own errors name no file."""
    from tokenizers import Tokenizer
    data = read_bytes(path, "a tokenizer.json")
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. "key must be a string at line 1 column 2"
        raise InputError(f"{path} is not a readable tokenizer.json ({str(e)[:200]}); "
                         "restore it from the original checkpoint") from None


def special_token_ids(tk, source: str) -> dict:
    """The four BAGEL special tokens of a `tokenizers.Tokenizer`, looked up by text (BAGEL: add_special_tokens)."""
    ids = {k: tk.token_to_id(text) for k, text in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[k] for k, v in ids.items() if v is None]
    if missing:
        raise InputError(f"{source} lacks the special tokens {missing}; "
                         "use BAGEL's Qwen2 tokenizer.json or one saved by nanoCLEAR")
    return ids


def checkpoint_system(folder, known) -> str:
    """The system prompt (one of `known`, data.SYSTEM_PROMPTS' keys) a checkpoint was trained with: its nanoclear.json's
    args.system; 'toy' for the toy base (pretrain.py trains the toy world's model, before any system prompt);
    'official' for a folder without one (BAGEL, CLEAR: INTERLEAVE_REASON_SYSTEM_PROMPT, inferencer.py:662 @411d6bd)."""
    settle_folder(folder)  # as every reader of a checkpoint folder
    ours = Path(folder) / "nanoclear.json"
    if not ours.exists():
        return "official"
    saved = read_json(ours)
    args = saved.get("args") if isinstance(saved.get("args"), dict) else {}
    system = args.get("system") or ("toy" if saved.get("stage") == "pretrain" else "official")
    if system not in known:
        raise InputError(f"{ours}: args.system is {system!r}, not one of {sorted(known)}; restore the file from the "
                         "original checkpoint")
    return system


def code_values_hint(folder: Path) -> str:
    """What a folder without nanoclear.json gets for the values no json holds, and how to give it others."""
    return (f"{folder} has no nanoclear.json, so the values no json holds ({', '.join(CODE_KEYS)}) are BAGEL-7B-MoT's "
            f"(model.PRESETS['bagel-7b-mot']). If these are not BAGEL-7B-MoT's weights, add the nanoclear.json "
            f"saved with them (or one holding {{\"model\": {{...}}}} with the right values), or pass the right folder.")


# The largest value a config may give a size (checked before anything is built): far above BAGEL-7B-MoT's (widths up to
# 18944, vocab 152064, 28 layers, positions 32768) and small enough that building the model on the meta device and its
# two sin-cos tables (computed for real, in float64) stays within a machine. An absurd value fails here, not after an
# attempt to allocate tens of GiB
MAX_SIZE = 1 << 18  # widths, heads, sides, channels
MAX_SIZES = {"vocab_size": 1 << 23, "max_position_embeddings": 1 << 24, "num_hidden_layers": 1024,
             "vit_num_hidden_layers": 1024, "ae_num_res_blocks": 64}
MAX_TABLE = 1 << 27  # elements of each sin-cos position table: hidden_size x side^2 (BAGEL-7B: 3584 x 70^2 = 17.6M)


def size_problems(cfg: M.ModelConfig) -> list:
    """What in cfg is too large to build (see MAX_SIZE), in words."""
    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        limit = MAX_SIZES.get(f.name, MAX_SIZE)
        values = value if isinstance(value, tuple) else (value,)
        if f.name.endswith("_id") or not all(isinstance(v, int) for v in values):
            continue
        if max(values) > limit or len(values) > 16:
            out.append(f"{f.name} {value} (at most {limit:,}{', 16 entries' * isinstance(value, tuple)})")
    for side in ("max_latent_size", "vit_max_num_patch_per_side"):
        if not out and cfg.hidden_size * getattr(cfg, side) ** 2 > MAX_TABLE:
            out.append(f"hidden_size x {side}^2 = {cfg.hidden_size * getattr(cfg, side) ** 2:,} (a position table of "
                       f"at most {MAX_TABLE:,} numbers)")
    return out


def check_tokenizer_fits(tk, vocab_size: int, source):
    """Every id of the tokenizer must index the model's embedding (an id beyond it fails at the first forward)."""
    top = max(tk.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab_size:
        raise InputError(f"{source} has token ids up to {top}, but the model's vocabulary (vocab_size) has "
                         f"{vocab_size} rows: use the tokenizer.json that belongs to these weights")


def config_from_folder(folder, overrides: dict | None = None) -> M.ModelConfig:
    """M.ModelConfig from a BAGEL-format folder: llm/vit json, then nanoclear.json (or BAGEL-7B-MoT's code values),
    then overrides. An interrupted save of the folder is settled first (settle_folder), as every reader does."""
    folder = Path(folder)
    settle_folder(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass a BAGEL-format checkpoint folder "
                                "(e.g. out/sft or BAGEL-7B-MoT)")
    llm, vit = read_json(folder / "llm_config.json"), read_json(folder / "vit_config.json")
    if llm.get("rope_scaling") not in (None, {}):
        raise InputError(f"{folder}/llm_config.json: rope_scaling {llm['rope_scaling']} is not supported "
                         "(BAGEL uses none)")
    if llm.get("hidden_act", "silu") != "silu":
        raise InputError(f"{folder}/llm_config.json: hidden_act {llm['hidden_act']!r}; "
                         "the Qwen2 MLP here is SwiGLU (silu)")
    if vit.get("rope", False):
        raise InputError(f"{folder}/vit_config.json: rope=true; BAGEL's loader forces rope=False and so do we")
    missing = [k for k in VIT_KEYS if k not in vit]
    if missing or not M.is_int(vit["num_hidden_layers"], 1):
        raise InputError(f"{folder}/vit_config.json: " + (f"lacks {missing}" if missing else
                         f"num_hidden_layers is {vit['num_hidden_layers']!r}, not an integer >= 1")
                         + "; restore the file")
    kw = {k: llm[k] for k in LLM_KEYS if k in llm}
    kw.update(vit_hidden_size=vit["hidden_size"], vit_intermediate_size=vit["intermediate_size"],
              vit_num_hidden_layers=vit["num_hidden_layers"] - 1,  # BAGEL: num_hidden_layers -= 1 at load
              vit_num_attention_heads=vit["num_attention_heads"], vit_patch_size=vit["patch_size"],
              vit_image_size=vit["image_size"], vit_layer_norm_eps=vit.get("layer_norm_eps", 1e-6),
              vit_hidden_act=vit.get("hidden_act", "gelu_pytorch_tanh"))
    ours, tokenizer = folder / "nanoclear.json", folder / "tokenizer.json"
    base = read_json(ours).get("model") if ours.exists() else asdict(M.PRESETS["bagel-7b-mot"])
    keys = CODE_KEYS + (tuple(SPECIAL_TOKENS) if ours.exists() and not tokenizer.exists() else ())
    lacking = [k for k in keys if k not in base] if isinstance(base, dict) else ["model"]
    if lacking:
        raise InputError(f"{ours} lacks our config's {lacking}; restore the file from the original checkpoint")
    kw.update({k: base[k] for k in keys})
    tk = read_tokenizer(tokenizer) if tokenizer.exists() else None
    if tk is not None:
        kw.update(special_token_ids(tk, str(tokenizer)))
    kw.update(overrides or {})
    files = ", ".join(f for f in ("llm_config.json", "vit_config.json", "nanoclear.json", "tokenizer.json")
                      if (folder / f).exists())
    try:
        cfg = M.ModelConfig(**kw)
    except ValueError as e:
        hint = "" if ours.exists() else " " + code_values_hint(folder)
        raise InputError(f"{folder}: the values of its {files} make no valid model ({e}).{hint}") from None
    too_large = size_problems(cfg)
    if too_large:
        raise InputError(f"{folder}: its {files} ask for a model too large to build ({'; '.join(too_large)}); "
                         "restore the files from the original checkpoint")
    if tk is not None:
        check_tokenizer_fits(tk, cfg.vocab_size, tokenizer)
    return cfg


SAFETENSORS_HEADER = 100_000_000  # the library's own limit on a header's bytes


def open_safetensors(path: Path, device):
    """A safetensors file opened lazily; a truncated or foreign file, or one whose header names a tensor twice (the
    library would keep one of them silently), stops here."""
    from safetensors import safe_open
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{path} is missing: a BAGEL-format folder holds ema.safetensors and ae.safetensors")
    regular_file(path, "a safetensors file")

    def unique(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) < len(names):
            raise InputError(f"{path} names {sorted({k for k in names if names.count(k) > 1})} twice in its header; "
                             "re-save the checkpoint")
        return dict(pairs)
    try:
        with open(path, "rb") as f:  # safetensors: 8-byte little-endian header length, then the header JSON
            n = int.from_bytes(f.read(8), "little")
            json.loads(f.read(min(n, SAFETENSORS_HEADER)), object_pairs_hook=unique)
        return safe_open(str(path), framework="pt", device=str(device))
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise InputError(f"{path} is not a readable safetensors file ({e}); "
                         "re-download or re-save the checkpoint") from None


def drop_extra_vit_layer(folder: Path, cfg: M.ModelConfig, expected: dict, found: dict):
    """BAGEL's loaders build vit_config.json's num_hidden_layers - 1 ViT layers and load ema.safetensors non-strictly
    (app.py: accelerate's load_checkpoint_and_dispatch; eval: load_state_dict(strict=False)), so a file that holds all
    num_hidden_layers (SigLIP's whole tower) loses its last layer. We drop it in exactly that case and say so: a folder
    without nanoclear.json (ours hold exactly the layers they build), whose extra tensors are one complete layer, the
    last, of the shapes the model's layers have. Anything else is left for read_weights to report."""
    n = cfg.vit_num_hidden_layers
    layer = {k.replace(f"{VIT_LAYERS}0.", f"{VIT_LAYERS}{n}.", 1): s for k, s in expected.items()
             if k.startswith(f"{VIT_LAYERS}0.")}
    extra = {k: t.shape for k, (_, t) in found.items() if k.startswith(VIT_LAYERS) and k not in expected}
    if (folder / "nanoclear.json").exists() or not extra or extra != layer:
        return
    for k in extra:
        del found[k]
    print(f"{folder}/ema.safetensors: dropped ViT layer {n} ({len(extra)} tensors), as BAGEL's loader does "
          f"(vit_config.json num_hidden_layers {n + 1}, minus one)")


def mismatch_hint(folder: Path, cfg: M.ModelConfig, problems: list) -> str:
    """The likely cause of read_weights' problems, in words."""
    n = cfg.vit_num_hidden_layers
    if any(p.startswith("duplicate") for p in problems):
        return "A tensor belongs in one file: ae.safetensors holds the autoencoder, ema.safetensors everything else."
    if any(f"{VIT_LAYERS}{n}." in p for p in problems):
        return (f"ema.safetensors holds more ViT layers than the {n} that vit_config.json's num_hidden_layers {n + 1} "
                "builds (BAGEL's loader subtracts one): "
                + ("a nanoCLEAR checkpoint holds exactly the layers it builds, so vit_config.json must say one more "
                   "than the layers saved; restore the file from the original checkpoint."
                   if (folder / "nanoclear.json").exists() else "fix vit_config.json's num_hidden_layers."))
    if not (folder / "nanoclear.json").exists():
        return code_values_hint(folder)
    return "Check that llm_config.json / vit_config.json and nanoclear.json belong to these weights."


def read_weights(folder, cfg: M.ModelConfig, device="cpu", dtype=torch.float32) -> dict:
    """The state dict of a BAGEL-format folder (ema.safetensors + ae.safetensors as `vae.*`), checked strictly against
    the shapes `cfg` implies: a missing, unexpected, duplicated, mis-shaped or non-float tensor stops with one message
    listing them (the one exception: drop_extra_vit_layer)."""
    folder = Path(folder)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in M.Bagel(cfg).state_dict().items()}
    found, problems = {}, []
    for file, prefix in (("ema.safetensors", ""), ("ae.safetensors", "vae.")):
        with open_safetensors(folder / file, device) as f:
            for key in f.keys():
                name = prefix + key
                if name in found:
                    problems.append(f"duplicate {name}: {found[name][0]} and {file}:{key}")
                    continue
                t = f.get_tensor(key)
                if name == "vit_model.vision_model.embeddings.patch_embedding.weight" and t.dim() == 4:
                    t = t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)  # BAGEL: convert_conv2d_to_linear
                found[name] = (f"{file}:{key}", t.to(dtype) if t.is_floating_point() else t)  # one copy at a time
    drop_extra_vit_layer(folder, cfg, expected, found)
    state = {}
    for name, (where, t) in found.items():
        if name not in expected:
            problems.append(f"unexpected {where} {tuple(t.shape)}")
        elif t.shape != expected[name]:
            problems.append(f"mis-shaped {where} {tuple(t.shape)}, config wants {tuple(expected[name])}")
        elif not t.is_floating_point():
            problems.append(f"{where} holds {t.dtype}, not floating-point weights")
        else:
            state[name] = t
    problems += [f"missing {k} {tuple(s)}" for k, s in expected.items() if k not in found]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise InputError(f"{folder} does not match its config ({len(problems)} problem{'s' * (len(problems) > 1)}: "
                         f"{shown}). " + mismatch_hint(folder, cfg, problems))
    return state


def load_pretrained(folder, device="cpu", dtype=torch.float32, overrides: dict | None = None) -> M.Bagel:
    """Load a BAGEL-format folder strictly, without materialising random weights first (meta device + assign)."""
    cfg = config_from_folder(folder, overrides)
    with torch.device("meta"):
        model = M.Bagel(cfg)
    model.load_state_dict(read_weights(folder, cfg, device, dtype), strict=True, assign=True)
    for p in (model.vit_pos_embed.pos_embed, model.latent_pos_embed.pos_embed):
        p.requires_grad_(False)
    return model.eval()


# what Qwen2Tokenizer.from_pretrained (the official app) reads besides tokenizer.json
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "generation_config.json")


def save_pretrained(model: M.Bagel, folder, tokenizer=None, meta: dict | None = None, state: dict | None = None,
                    tokenizer_source=None):
    """Write a BAGEL-format folder, plus nanoclear.json (our config and run metadata); the official app loads it as it
    is when the model has BAGEL's autoencoder and a Qwen2 tokenizer (module docstring).

    tokenizer: a `tokenizers.Tokenizer` (saved as tokenizer.json) or None; the tokenizer files of the folder
    `tokenizer_source` (the checkpoint trained from) are kept, and a BPE tokenizer without them (the toy's) also gets
    the vocab.json + merges.txt that Qwen2Tokenizer reads. state: the weights to write instead of model.state_dict()
    (e.g. gathered from FSDP shards, or an EMA). Writes in place: save_checkpoint writes into a temporary
    folder and swaps it in.
    """
    cfg, folder = model.cfg, Path(folder)
    sd = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "rope_scaling": None,
           "tie_word_embeddings": False, "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer",
           "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, **{k: getattr(cfg, k) for k in LLM_KEYS}}
    vit = {"model_type": "siglip_vision_model", "hidden_size": cfg.vit_hidden_size,
           "intermediate_size": cfg.vit_intermediate_size,
           "num_hidden_layers": cfg.vit_num_hidden_layers + 1,  # BAGEL's loader subtracts one
           "num_attention_heads": cfg.vit_num_attention_heads, "patch_size": cfg.vit_patch_size,
           "image_size": cfg.vit_image_size, "layer_norm_eps": cfg.vit_layer_norm_eps, "hidden_act": cfg.vit_hidden_act}
    folder.mkdir(parents=True, exist_ok=True)
    pt = {"format": "pt"}  # the metadata of the official files
    save_tensors({k: v for k, v in sd.items() if not k.startswith("vae.")}, folder / "ema.safetensors", metadata=pt)
    save_tensors({k[4:]: v for k, v in sd.items() if k.startswith("vae.")}, folder / "ae.safetensors", metadata=pt)
    (folder / "llm_config.json").write_text(json.dumps(llm, indent=2))
    (folder / "vit_config.json").write_text(json.dumps(vit, indent=2))
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
        kept = [f for f in TOKENIZER_FILES if tokenizer_source is not None and (Path(tokenizer_source) / f).is_file()]
        for name in kept:
            (folder / name).write_bytes((Path(tokenizer_source) / name).read_bytes())
        if "vocab.json" not in kept and type(tokenizer.model).__name__ == "BPE":
            tokenizer.model.save(str(folder))  # vocab.json + merges.txt
    (folder / "nanoclear.json").write_text(json.dumps({"model": asdict(cfg), **(meta or {})}, indent=2))


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None):
    """safetensors.torch.save_file with the permissions of any file the user makes (the umask's): the library writes
    its files owner-only (0600), beside JSON files of 0644."""
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())


def full_state(tensors: dict) -> dict:
    """Whole tensors on the CPU from plain or FSDP-sharded ones (a collective call when sharded: every rank calls)."""
    from torch.distributed.tensor import DTensor
    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for n, t in tensors.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: a BAGEL-format folder (ema.safetensors = the EMA weights, as BAGEL/CLEAR save them) + train_state/


MARKER = ".complete"  # written last, once everything else is on disk: a temporary copy without it is a killed write


def fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path):
    """Flush every file and folder under root to disk, so that no rename can expose data still in the page cache."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def discard(path: Path):
    (path / MARKER).unlink(missing_ok=True)  # first: a half-removed copy must never look complete
    shutil.rmtree(path, ignore_errors=True)


def sibling(folder: Path, kind: str) -> Path:
    return folder.with_name(f".{folder.name}.{kind}-{os.urandom(4).hex()}")


def temporaries(folder: Path) -> list:
    """The temporary siblings atomic_write_folder calls leave beside `folder` (none when its parent is unreadable)."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    try:
        return [p for p in folder.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []


def settle_folder(folder) -> None:
    """Finish or undo what killed atomic_write_folder calls left beside `folder`: the newest complete copy becomes
    `folder` (said in one line) and every other temporary sibling is removed. Newest first: a `.tmp-` copy holding the
    marker (its write finished, the kill came before or between the renames), `folder` itself, an `.old-` copy (it was
    `folder` until a kill between the renames). Every reader and writer of a checkpoint folder calls it first. Under the
    folder's lock only: while another live process holds it, the temporaries are that writer's, and a reader just
    waits for the writer's swap to put `folder` back."""
    folder = Path(folder)
    if not temporaries(folder):
        return  # nothing to settle, and nothing written (a read-only model folder stays untouched)
    try:
        with folder_lock(folder):
            recover(folder)
    except FolderInUse as e:
        for _ in range(100):  # a live writer's two renames are microseconds apart
            if folder.exists():
                return
            time.sleep(0.02)
        raise e from None
    except InputError:  # no lock can be written beside it: read what is there, or say why there is nothing
        if not folder.exists():
            raise InputError(f"{folder} is missing and the complete copy an interrupted save left beside it cannot be "
                             "put back here (its folder is not writable): make it writable and run again") from None


def recover(folder: Path):
    temps = temporaries(folder)
    newest = lambda paths: max(paths, key=lambda p: p.stat().st_mtime_ns, default=None)  # noqa: E731
    best = newest([p for p in temps if ".tmp-" in p.name and (p / MARKER).exists()])
    if best is None and not folder.exists():
        best = newest([p for p in temps if ".old-" in p.name])
    if best is not None:
        if folder.exists():
            os.replace(folder, displaced := sibling(folder, "old"))
            temps.append(displaced)
        os.replace(best, folder)
        fsync_path(folder.parent)
        print(f"{folder}: recovered the newest complete copy from {best.name}, left by an interrupted save")
    for p in temps:
        if p != best:
            discard(p)


def atomic_write_folder(folder, write: Callable[[Path], None]):
    """Write a folder so that a kill at any instant leaves a complete one: write into a temporary sibling, flush it to
    disk, mark it complete, then swap it in by two renames, all under the folder's lock (folder_lock). The next reader
    or writer (settle_folder) finishes or undoes a swap that a kill interrupted and removes what killed writes left."""
    folder = Path(folder)
    with folder_lock(folder):
        settle_folder(folder)
        tmp = sibling(folder, "tmp")
        tmp.mkdir()  # permissions from the umask, as any folder the user makes (tempfile.mkdtemp would make it 0700)
        try:
            write(tmp)
        except BaseException:  # an error in write(); a kill leaves tmp without its marker to settle_folder
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_tree(tmp)
        (tmp / MARKER).touch()
        fsync_path(tmp / MARKER)
        fsync_path(tmp)
        old = sibling(folder, "old")
        if folder.exists():
            os.replace(folder, old)  # from here to the next rename there is no `folder`: settle_folder restores tmp
        os.replace(tmp, folder)
        fsync_path(folder.parent)
        discard(old)


# ----------------------------------------------------------------------------------------------------------------------
# One writer per output folder: an flock on `.{name}.lock` beside it (POSIX), holding the writer's PID. The OS drops the
# lock when its process dies, so a killed run never blocks the next; a second live one stops at once


HELD = {}  # the lock files this process holds -> their descriptors (folder_lock nests within a process)


def output_problem(folder: Path) -> str | None:
    """Why `folder` cannot be an output folder, before any work: no name of its own, or a path through a file."""
    if folder.name in ("", ".", ".."):
        return "has no name of its own (the current folder, a parent or the root): name a folder, e.g. out/run"
    above = next((p for p in folder.parents if p.exists() or p.is_symlink()), None)
    if above is not None and not above.is_dir():
        return f"is inside {above}, which is a file, not a folder: pass a path through folders"
    return None


@contextmanager
def folder_lock(folder):
    """Hold the lock of output folder `folder` (made with its parents when needed): InputError when the folder could
    not be written there (no name, inside a file, read-only, no permission), FolderInUse, naming the process, when
    another live process holds it. Nested calls in one process share the first one's lock."""
    folder = Path(folder)
    problem = output_problem(folder)
    if problem:
        raise InputError(f"{folder} {problem}")
    path = folder.resolve().with_name(f".{folder.resolve().name}.lock")
    if str(path) in HELD:
        yield
        return
    fd = take_lock(path, folder)
    HELD[str(path)] = fd
    try:
        yield
    finally:
        del HELD[str(path)]
        path.unlink(missing_ok=True)  # before letting go: whoever waited on this file sees it is gone (take_lock)
        os.close(fd)


def take_lock(path: Path, folder: Path) -> int:
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # read-only file system, no permission, a file in the way
            raise InputError(f"{folder} cannot be written ({e.strerror}: {e.filename}): pass a folder you can write "
                             "to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by process {pid}, another run writing there: wait for it to end, "
                              "or pass another output folder") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file as we waited on it: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_out(out, init=None):
    """Before any work: `out` will be replaced by the checkpoint at the first save, so it must be new, an empty folder
    or a checkpoint (it holds nanoclear.json), and not the --init the run starts from; InputError otherwise."""
    out = Path(out)
    problem = output_problem(out)
    if problem:
        raise InputError(f"--out {out} {problem}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: pass a folder for the checkpoint "
                         "(a new one, or an earlier checkpoint)")
    if out.is_dir() and any(out.iterdir()) and not (out / "nanoclear.json").exists():
        raise InputError(f"--out {out} is a folder that holds no checkpoint, and saving replaces it as a whole: pass "
                           "a new or empty folder (or an earlier checkpoint)")
    if init is not None and out.resolve() == Path(init).resolve():
        raise InputError(f"--out {out} is --init: the run would overwrite the checkpoint it starts from; "
                         "pass another --out")


def has_checkpoint(folder) -> bool:
    """Does `folder` hold a checkpoint (after settling an interrupted save, as every reader does)?"""
    settle_folder(folder)
    return (Path(folder) / "ema.safetensors").exists()


def save_checkpoint(folder, raw: M.Bagel, optimizer, tokenizer, step: int, meta: dict, main: bool = True,
                    ema_weights: dict | None = None):
    """Write folder atomically: ema.safetensors holds ema_weights (the EMA's shadow copies) or, without them, the raw
    weights. With --fsdp every rank takes part in gathering the shards and the main one writes; the resume state is
    written without FSDP only."""
    from torch.distributed.tensor import DTensor
    sharded = any(isinstance(p, DTensor) for p in raw.parameters())  # FSDP: gathering is a collective
    if not (main or sharded):
        return
    saved = full_state(ema_weights if ema_weights is not None else dict(raw.named_parameters()))
    if not main:
        return

    def write(tmp: Path):
        save_pretrained(raw, tmp, tokenizer=tokenizer, meta={**meta, "step": step}, state=saved,
                        tokenizer_source=meta.get("init"))  # keep the tokenizer files of the folder trained from
        if sharded:
            return
        d = tmp / "train_state"
        d.mkdir()
        save_tensors({n: p.detach().contiguous().cpu() for n, p in raw.named_parameters()}, d / "model.safetensors")
        names = {id(p): n for n, p in raw.named_parameters()}
        tensors, scalars = {}, {}
        for p, state in optimizer.state.items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    tensors[f"{names[id(p)]}::{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars[f"{names[id(p)]}::{k}"] = v
        save_tensors(tensors, d / "optimizer.safetensors")
        (d / "state.json").write_text(json.dumps({"step": step, "optimizer_scalars": scalars,
                                                  "stage": meta.get("stage")}))

    atomic_write_folder(folder, write)


def same(key: str, recorded, now) -> bool:
    """Is a setting unchanged? Folders (--init) compare as the folders they name: ../x and its absolute form are one."""
    if key == "init" and isinstance(recorded, str) and isinstance(now, str):
        return recorded == now or Path(recorded).resolve() == Path(now).resolve()
    return recorded == now


def check_resume(folder, stage: str, settings: dict, may_change: tuple, force: bool, main: bool = True,
                 defaults: dict | None = None):
    """Before any work of a --resume run: settle `folder` (settle_folder), check that it is a resumable checkpoint of
    `stage`, and compare this run's settings with those it recorded (nanoclear.json "args", and "init" as resolved):
    any difference outside `may_change` is refused in one message listing each, unless `force` (then printed). A
    setting the checkpoint did not record (a flag added since) counts as its value in `defaults`."""
    folder = Path(folder)
    if main:
        settle_folder(folder)
    if dist.is_initialized():  # the other ranks read the folder once the main one has settled it
        dist.barrier()
    if not (folder / "train_state" / "state.json").exists():
        raise FileNotFoundError(f"{folder} has no train_state/: it is not a resumable {stage} checkpoint "
                                "(start without --resume)")
    state = read_json(folder / "train_state" / "state.json")
    if state.get("stage") != stage:
        raise InputError(f"{folder} was written by stage {state.get('stage')!r}, not {stage!r}: "
                         "resume it with that stage")
    saved = read_json(folder / "nanoclear.json")
    recorded = {**(saved.get("args") if isinstance(saved.get("args"), dict) else {}), "init": saved.get("init")}
    now = json.loads(json.dumps(settings))  # tuples as the json holds them
    recorded = {**{k: v for k, v in json.loads(json.dumps(defaults or {})).items() if k in now}, **recorded}
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    changed = [f"{flag(k)} {recorded[k]!r} -> {v!r}" if k in recorded else f"{flag(k)} (not recorded) -> {v!r}"
               for k, v in now.items() if k not in may_change and (k not in recorded or not same(k, recorded[k], v))]
    if changed and not force:
        raise InputError(f"{folder} was trained with other settings: {'; '.join(changed)}. Resume with its values, "
                         "pass --resume-force to continue with these on purpose, or start a fresh --out")
    if changed and main:
        print(f"--resume-force: continuing {folder} with changed settings: {'; '.join(changed)}")


def read_tensors(path: Path) -> dict:
    """Every tensor of a safetensors file on the CPU (open_safetensors' checks first)."""
    with open_safetensors(path, "cpu") as f:
        try:
            return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a header whose offsets do not fit the file
            raise InputError(f"{path} is not a readable safetensors file ({e}); re-save the checkpoint") from None


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def state_problems(state: dict, step_saved) -> list:
    """What is wrong with train_state/state.json's scalars: the step (a count, as nanoclear.json records it) and the
    optimizer's scalars (a name -> number mapping)."""
    step, scalars = state.get("step"), state.get("optimizer_scalars")
    out = []
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2 ** 62:
        out.append(f"step is {json.dumps(step)[:40]}, not a count of steps")
    elif step_saved is not None and step != step_saved:
        out.append(f"step {step}, but nanoclear.json records step {json.dumps(step_saved)[:40]}")
    if not isinstance(scalars, dict):
        out.append(f"optimizer_scalars is {json.dumps(scalars)[:40]}, not an object")
    else:
        out += [f"optimizer scalar {k} is {json.dumps(v)[:40]}, not a finite number" for k, v in scalars.items()
                if not is_number(v)]
    return out


def optimizer_problems(entries: dict, params: dict, moments: tuple) -> list:
    """What is wrong with the optimizer state `entries` ("parameter::key" -> value) for `params` (name -> the
    parameters the optimizer steps): unknown names and keys, a parameter without all of `moments`, moments of another
    shape or dtype than their parameter, a step that is not a finite non-negative scalar."""
    out, seen = [], {}
    for key, v in entries.items():
        n, _, k = key.partition("::")
        if n not in params:
            out.append(f"{key}: no parameter {n!r} in the optimizer")
        elif k not in moments:
            out.append(f"{key}: not an optimizer entry ({', '.join(moments)})")
        elif k == "step":
            value = float(v) if torch.is_tensor(v) and v.numel() == 1 else v
            if (torch.is_tensor(v) and (v.dim() or not v.is_floating_point())) or not is_number(value) or value < 0:
                out.append(f"{key} is {tuple(v.shape) if torch.is_tensor(v) else v!r}, not a step count")
        elif not torch.is_tensor(v):
            out.append(f"{key} is {v!r}, not a tensor")
        elif tuple(v.shape) != tuple(params[n].shape) or v.dtype != params[n].dtype:
            out.append(f"{key} {tuple(v.shape)} {v.dtype}, its parameter is {tuple(params[n].shape)} {params[n].dtype}")
        seen.setdefault(n, set()).add(k)
    out += [f"{n} has {sorted(ks)} but not {sorted(set(moments) - ks)}" for n, ks in seen.items()
            if n in params and ks != set(moments)]
    return out


def load_resume_state(folder, raw: M.Bagel, optimizer, ema_weights: dict | None = None) -> int:
    """Restore raw weights, optimizer and the EMA's shadow copies (ema_weights, from ema.safetensors) from a checkpoint
    folder that check_resume accepted; returns the step to continue from. Everything is checked before anything is
    restored: every tensor's name, shape and dtype against this run's model and optimizer, every scalar; a mismatch
    is an InputError naming each (torch's copy_ would broadcast a mis-shaped weight without a word)."""
    folder = Path(folder)
    d = folder / "train_state"
    state = read_json(d / "state.json")
    saved = read_json(folder / "nanoclear.json")
    if saved.get("model") != json.loads(json.dumps(asdict(raw.cfg))):
        raise InputError(f"{folder} holds a model of another shape than this run's; "
                         "use matching flags or a fresh --out")
    weights, opt_tensors = read_tensors(d / "model.safetensors"), read_tensors(d / "optimizer.safetensors")
    by_name = dict(raw.named_parameters())
    stepped = {n: p for n, p in by_name.items() if any(p is q for g in optimizer.param_groups for q in g["params"])}
    moments = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if optimizer.defaults.get("amsgrad") else ())
    problems = [f"model.safetensors lacks {n}" for n in by_name if n not in weights]
    problems += [f"model.safetensors: {n} is not a parameter of the model" for n in weights if n not in by_name]
    problems += [f"model.safetensors: {n} {tuple(t.shape)} {t.dtype}, the model's is {tuple(by_name[n].shape)} "
                 f"{by_name[n].dtype}" for n, t in weights.items()
                 if n in by_name and (t.shape != by_name[n].shape or t.dtype != by_name[n].dtype)]
    problems += [f"state.json: {p}" for p in state_problems(state, saved.get("step"))]
    scalars = state.get("optimizer_scalars") if isinstance(state.get("optimizer_scalars"), dict) else {}
    problems += [f"optimizer state {p}" for p in optimizer_problems({**opt_tensors, **scalars}, stepped, moments)]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise InputError(f"{d} does not fit this run ({len(problems)} problem{'s' * (len(problems) > 1)}: {shown}); "
                         "resume from an intact copy, or start a fresh --out")
    ema = read_weights(folder, raw.cfg, raw.device, raw.dtype) if ema_weights is not None else {}
    with torch.no_grad():
        for n, p in raw.named_parameters():
            p.copy_(weights[n])
        for n, t in ema.items():
            ema_weights[n].copy_(t)
    for key, v in opt_tensors.items():
        n, k = key.split("::")
        optimizer.state[by_name[n]][k] = v.to(by_name[n].device)
    for key, v in state["optimizer_scalars"].items():
        n, k = key.split("::")
        optimizer.state[by_name[n]][k] = v
    return state["step"]

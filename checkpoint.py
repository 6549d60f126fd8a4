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
at any instant leaves a complete checkpoint; the next save or `--resume` finishes or undoes an interrupted swap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
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


def read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: a BAGEL-format folder holds llm_config.json, vit_config.json, "
                                "ema.safetensors and ae.safetensors") from None
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise InputError(f"{path} is not valid JSON ({e}); restore the file from the original checkpoint") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} holds a JSON {type(value).__name__}, not an object; "
                         "restore the file from the original checkpoint")
    return value


def read_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json, which must exist; the library's own errors name no file."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. "key must be a string at line 1 column 2"
        raise InputError(f"{path} is not a readable tokenizer.json ({e}); "
                         "restore it from the original checkpoint") from None


def special_token_ids(tk, source: str) -> dict:
    """The four BAGEL special tokens of a `tokenizers.Tokenizer`, looked up by text (BAGEL: add_special_tokens)."""
    ids = {k: tk.token_to_id(text) for k, text in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[k] for k, v in ids.items() if v is None]
    if missing:
        raise InputError(f"{source} lacks the special tokens {missing}; "
                         "use BAGEL's Qwen2 tokenizer.json or one saved by nanoCLEAR")
    return ids


def checkpoint_system(folder) -> str:
    """The system prompt (data.SYSTEM_PROMPTS key) a checkpoint was trained with: its nanoclear.json's args.system;
    'toy' for the toy base (pretrain.py trains the toy world's model, before any system prompt); 'official' for a
    folder without one (BAGEL, CLEAR: INTERLEAVE_REASON_SYSTEM_PROMPT, inferencer.py:662 @411d6bd)."""
    ours = Path(folder) / "nanoclear.json"
    if not ours.exists():
        return "official"
    saved = read_json(ours)
    args = saved.get("args") if isinstance(saved.get("args"), dict) else {}
    return args.get("system") or ("toy" if saved.get("stage") == "pretrain" else "official")


def code_values_hint(folder: Path) -> str:
    """What a folder without nanoclear.json gets for the values no json holds, and how to give it others."""
    return (f"{folder} has no nanoclear.json, so the values no json holds ({', '.join(CODE_KEYS)}) are BAGEL-7B-MoT's "
            f"(model.PRESETS['bagel-7b-mot']). If these are not BAGEL-7B-MoT's weights, add the nanoclear.json "
            f"saved with them (or one holding {{\"model\": {{...}}}} with the right values), or pass the right folder.")


def config_from_folder(folder, overrides: dict | None = None) -> M.ModelConfig:
    """M.ModelConfig from a BAGEL-format folder: llm/vit json, then nanoclear.json (or BAGEL-7B-MoT's code values),
    then overrides."""
    folder = Path(folder)
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
    if tokenizer.exists():
        kw.update(special_token_ids(read_tokenizer(tokenizer), str(tokenizer)))
    kw.update(overrides or {})
    try:
        return M.ModelConfig(**kw)
    except ValueError as e:
        files = ", ".join(f for f in ("llm_config.json", "vit_config.json", "nanoclear.json", "tokenizer.json")
                          if (folder / f).exists())
        hint = "" if ours.exists() else " " + code_values_hint(folder)
        raise InputError(f"{folder}: the values of its {files} make no valid model ({e}).{hint}") from None


def open_safetensors(path: Path, device):
    """A safetensors file opened lazily; a truncated or foreign file, or one whose header names a tensor twice (the
    library would keep one of them silently), stops here."""
    from safetensors import safe_open
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a BAGEL-format folder holds ema.safetensors and ae.safetensors")

    def unique(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) < len(names):
            raise InputError(f"{path} names {sorted({k for k in names if names.count(k) > 1})} twice in its header; "
                             "re-save the checkpoint")
        return dict(pairs)
    try:
        with open(path, "rb") as f:  # safetensors: 8-byte little-endian header length, then the header JSON
            n = int.from_bytes(f.read(8), "little")
            json.loads(f.read(min(n, 100_000_000)), object_pairs_hook=unique)
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
    from safetensors.torch import save_file
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
    save_file({k: v for k, v in sd.items() if not k.startswith("vae.")}, str(folder / "ema.safetensors"), metadata=pt)
    save_file({k[4:]: v for k, v in sd.items() if k.startswith("vae.")}, str(folder / "ae.safetensors"), metadata=pt)
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


def settle_folder(folder) -> None:
    """Finish or undo what killed atomic_write_folder calls left beside `folder`: the newest complete copy becomes
    `folder` (said in one line) and every other temporary sibling is removed. Newest first: a `.tmp-` copy holding the
    marker (its write finished, the kill came before or between the renames), `folder` itself, an `.old-` copy (it was
    `folder` until a kill between the renames)."""
    folder = Path(folder)
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    temps = [p for p in folder.parent.iterdir() if pattern.fullmatch(p.name)] if folder.parent.is_dir() else []
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
        print(f"{folder}: recovered the newest complete checkpoint from {best.name}, left by an interrupted save")
    for p in temps:
        if p != best:
            discard(p)


def atomic_write_folder(folder, write: Callable[[Path], None]):
    """Write a folder so that a kill at any instant leaves a complete one: write into a temporary sibling, flush it to
    disk, mark it complete, then swap it in by two renames. The next save or --resume (settle_folder) finishes or
    undoes a swap that a kill interrupted and removes what killed writes left."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
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


def check_out(out, init=None):
    """Before any work: `out` will be replaced by the checkpoint at the first save, so it must be new, an empty folder
    or a checkpoint (it holds nanoclear.json), and not the --init the run starts from; model.InputError otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: pass a folder for the checkpoint "
                         "(a new one, or an earlier checkpoint)")
    if out.is_dir() and any(out.iterdir()) and not (out / "nanoclear.json").exists():
        raise InputError(f"--out {out} is a folder that holds no checkpoint, and saving replaces it as a whole: pass "
                           "a new or empty folder (or an earlier checkpoint)")
    if init is not None and out.resolve() == Path(init).resolve():
        raise InputError(f"--out {out} is --init: the run would overwrite the checkpoint it starts from; "
                         "pass another --out")


def save_checkpoint(folder, raw: M.Bagel, optimizer, tokenizer, step: int, meta: dict, main: bool = True,
                    ema_weights: dict | None = None):
    """Write folder atomically: ema.safetensors holds ema_weights (the EMA's shadow copies) or, without them, the raw
    weights. With --fsdp every rank takes part in gathering the shards and the main one writes; the resume state is
    written without FSDP only."""
    from safetensors.torch import save_file
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
        save_file({n: p.detach().contiguous().cpu() for n, p in raw.named_parameters()}, str(d / "model.safetensors"))
        names = {id(p): n for n, p in raw.named_parameters()}
        tensors, scalars = {}, {}
        for p, state in optimizer.state.items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    tensors[f"{names[id(p)]}::{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars[f"{names[id(p)]}::{k}"] = v
        save_file(tensors, str(d / "optimizer.safetensors"))
        (d / "state.json").write_text(json.dumps({"step": step, "optimizer_scalars": scalars,
                                                  "stage": meta.get("stage")}))

    atomic_write_folder(folder, write)


def check_resume(folder, stage: str, settings: dict, may_change: tuple, force: bool, main: bool = True):
    """Before any work of a --resume run: settle `folder` (settle_folder), check that it is a resumable checkpoint of
    `stage`, and compare this run's settings with those it recorded (nanoclear.json "args", and "init" as resolved):
    any difference outside `may_change` is refused in one message listing each, unless `force` (then printed)."""
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
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    changed = [f"{flag(k)} {recorded[k]!r} -> {v!r}" if k in recorded else f"{flag(k)} (not recorded) -> {v!r}"
               for k, v in now.items() if k not in may_change and (k not in recorded or recorded[k] != v)]
    if changed and not force:
        raise InputError(f"{folder} was trained with other settings: {'; '.join(changed)}. Resume with its values, "
                         "pass --resume-force to continue with these on purpose, or start a fresh --out")
    if changed and main:
        print(f"--resume-force: continuing {folder} with changed settings: {'; '.join(changed)}")


def load_resume_state(folder, raw: M.Bagel, optimizer, ema_weights: dict | None = None) -> int:
    """Restore raw weights, optimizer and the EMA's shadow copies (ema_weights, from ema.safetensors) from a checkpoint
    folder that check_resume accepted; returns the step to continue from."""
    from safetensors.torch import load_file
    folder = Path(folder)
    d = folder / "train_state"
    state = read_json(d / "state.json")
    saved_cfg = read_json(folder / "nanoclear.json").get("model")
    if saved_cfg != json.loads(json.dumps(asdict(raw.cfg))):
        raise InputError(f"{folder} holds a model of another shape than this run's; "
                         "use matching flags or a fresh --out")
    try:
        weights = load_file(str(d / "model.safetensors"))
        opt_tensors = load_file(str(d / "optimizer.safetensors"))
    except Exception as e:
        raise InputError(f"{d} is corrupt ({e}); delete it or resume from an earlier copy") from None
    missing = set(n for n, _ in raw.named_parameters()) ^ set(weights)
    if missing:
        raise InputError(f"{d}/model.safetensors does not match the model: {sorted(missing)[:5]}")
    with torch.no_grad():
        for n, p in raw.named_parameters():
            p.copy_(weights[n])
        if ema_weights is not None:
            for n, t in read_weights(folder, raw.cfg, raw.device, raw.dtype).items():
                ema_weights[n].copy_(t)
    by_name = dict(raw.named_parameters())
    for key, v in opt_tensors.items():
        n, k = key.split("::")
        optimizer.state[by_name[n]][k] = v.to(by_name[n].device)
    for key, v in state["optimizer_scalars"].items():
        n, k = key.split("::")
        optimizer.state[by_name[n]][k] = v
    return int(state["step"])

"""
Plumbing shared by every script, written once and knowing no stage: command-line flags from dataclasses (the groups
several scripts share declared once, every value checked before any work), run setup (device, dtype, seeds, torchrun),
AdamW + cosine schedule, EMA, FSDP, saving through checkpoint.py, a paired bootstrap interval, and one log line per step
plus a JSONL log.

Every step draws its data and noise from generators seeded by (seed, step, rank), so a run resumed from a checkpoint
replays exactly the steps an uninterrupted run would take: the same loss curve.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import pickle
import random
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint as CK
import data as D
import model as M

# ----------------------------------------------------------------------------------------------------------------------
# Flags: each script's settings are one dataclass whose fields are also its command-line flags


def flag(default, help: str, allowed: str | None = None, choices=None, group: str = "run", type=None, nargs=None):
    """A config field that is also a flag. `allowed` is an interval such as "[1, inf)" or "(0, 1]" that the value must
    lie in (checked before any work starts); `choices` the values it may take; `group` its heading in --help;
    `type` the value type when the default is None; `nargs` "*" for a list of values (kept as a tuple)."""
    return field(default=default, metadata=dict(help=help, allowed=allowed, choices=choices, group=group, type=type,
                                                nargs=nargs))


SEED = "[0, 4294967295]"  # the allowed values of every seed flag: numpy's and torch's seeds are non-negative integers
# The numbers a flag may take beyond its interval: past these, arithmetic on them overflows or underflows somewhere in a
# run (float32 ends at 3.4e38 and a setting multiplies values that are squared; a 1e-320 temperature divides logits to
# inf; counts are products of counts in int64 and sizes in int32), long before any useful setting
FLOAT_RANGE = (1e-12, 1e12)  # a non-zero float flag's magnitude
INT_LIMIT = 2 ** 31 - 1  # an integer flag without a finite upper end
INTERVAL = re.compile(r"^([\[(])\s*(-?inf|-?[\d.e+-]+)\s*,\s*(-?inf|-?[\d.e+-]+)\s*([\])])$")


def in_interval(value: float, allowed: str) -> bool:
    lo_b, lo, hi, hi_b = INTERVAL.match(allowed).groups()
    lo, hi = float(lo), float(hi)
    return (value >= lo if lo_b == "[" else value > lo) and (value <= hi if hi_b == "]" else value < hi)


def interval_words(allowed: str, integer: bool) -> str:
    lo_b, lo, hi, hi_b = INTERVAL.match(allowed).groups()
    kind = "an integer" if integer else "a number"
    if hi == "inf":
        return f"{kind} {'>=' if lo_b == '[' else '>'} {lo}"
    return f"{kind} in {allowed}"


def refuse(prog: str, message: str, usage: bool = True):
    """Stop before any work: one line on stderr, exit status 2 (argparse's convention for bad usage); a usage error
    (a flag) ends with "(see --help)"."""
    print(f"{prog}: error: {message}" + (" (see --help)" if usage else ""), file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, `prog: error: message (see --help)`, instead of the usage text."""

    def error(self, message: str):
        refuse(self.prog, message)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls, description: str, defaults: dict | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of `cls` (defaults overridable per script), grouped for --help."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for f in sorted(fields(cls), key=lambda f: f.metadata["group"] == "run"):  # the run flags last
        m = f.metadata
        default = (defaults or {}).get(f.name, f.default)
        g = groups.setdefault(m["group"], p.add_argument_group(m["group"]))
        kw = dict(default=default, help=m["help"] + ("" if m["allowed"] is None else f" (allowed: {m['allowed']})"))
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif m["nargs"]:
            kw.update(nargs=m["nargs"], type=m["type"] or str)
        elif isinstance(f.default, tuple):
            kw.update(nargs=len(f.default), type=type(f.default[0]))
        else:
            kw.update(type=m["type"] or (type(f.default) if f.default is not None else str), choices=m["choices"])
        g.add_argument(flag_name(f.name), **kw)
    return p


def parse_flags(cls, description: str, argv: list[str] | None = None, defaults: dict | None = None):
    """Parse argv into `cls`, refusing any value outside its field's `allowed` interval. Returns (config, prog, the
    set of field names given on the command line), so a script can refuse flags that have no effect in its mode."""
    parser = build_parser(cls, description, defaults)
    unset = object()
    probe = argparse.Namespace(**{f.name: unset for f in fields(cls)})  # argparse keeps attributes it finds set
    given = {k for k, v in vars(parser.parse_args(argv, probe)).items() if v is not unset}
    args = parser.parse_args(argv)
    values = {f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v for f in fields(cls)}
    for f in fields(cls):
        value, allowed = values[f.name], f.metadata["allowed"]
        if allowed is None or value is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if not in_interval(v, allowed):
                refuse(parser.prog, f"{flag_name(f.name)} {v}: must be {interval_words(allowed, isinstance(v, int))}")
            if not computable(v, allowed):
                refuse(parser.prog, f"{flag_name(f.name)} {v}: too {'large' if abs(v) > 1 else 'small'} to compute "
                                    f"with (non-zero values: {FLOAT_RANGE[0]:g} to {FLOAT_RANGE[1]:g} in magnitude; "
                                    f"integers up to {INT_LIMIT})")
    return cls(**values), parser.prog, given


def computable(value, allowed: str) -> bool:
    """Within FLOAT_RANGE (floats) or INT_LIMIT (integers of an interval open to inf)?"""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    if isinstance(value, float):
        return value == 0 or FLOAT_RANGE[0] <= abs(value) <= FLOAT_RANGE[1]
    return abs(value) <= INT_LIMIT or INTERVAL.match(allowed).group(3) != "inf"


def run_cli(main: Callable):
    """A script's entry point: a bad input (checkpoint.InputError, or a missing file) ends as one line on stderr and
    exit status 2, as a bad flag does; any other exception keeps its traceback."""
    try:
        main()
    except (CK.InputError, FileNotFoundError) as e:
        refuse(os.path.basename(sys.argv[0]), str(e).replace("\n", " "), usage=False)


def refuse_given(prog: str, given: set, names: tuple, why: str):
    """Refuse flags that were given although they have no effect in this mode."""
    bad = [flag_name(n) for n in names if n in given]
    if bad:
        refuse(prog, f"{', '.join(bad)} {'has' if len(bad) == 1 else 'have'} no effect {why}")


# ----------------------------------------------------------------------------------------------------------------------
# Run setup


@dataclass
class Run:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0


def pick_device(name: str = "auto") -> tuple[torch.device, str]:
    """'auto' -> cuda, then mps, then cpu; returns the device and the reason (printed by every script). A device
    asked for must exist here (checkpoint.InputError otherwise)."""
    if name != "auto":
        try:
            dev = torch.device(name)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda", "mps"):
            raise CK.InputError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps")
        if dev.type in ("cpu", "mps") and dev.index not in (None, 0):
            raise CK.InputError(f"--device {name}: there is one {dev.type} device, {dev.type} (or {dev.type}:0)")
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()) \
                or dev.type == "mps" and not torch.backends.mps.is_available():
            raise CK.InputError(f"--device {name}: no such device here ({torch.cuda.device_count()} CUDA devices, MPS "
                               f"{'' if torch.backends.mps.is_available() else 'not '}available, "
                               f"torch {torch.__version__}); use --device auto or cpu")
        return dev, "asked for"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"auto: CUDA {torch.cuda.get_device_name()}"
    if torch.backends.mps.is_available():
        return torch.device("mps"), "auto: Apple MPS"
    return torch.device("cpu"), "auto: no accelerator found"


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """'auto' -> bf16 on GPUs that support it, else float32."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--dtype must be auto or one of {sorted(DTYPES)}, not {name!r}")
        if DTYPES[name] == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise CK.InputError(f"--dtype {name}: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or fp32")
        return DTYPES[name], "asked for"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "auto: bf16 supported on this GPU"
    return torch.float32, f"auto: float32 on {device.type}"


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for the next step instead of handing it back to the OS (Linux with glibc only;
    returns whether it applied). By default glibc unmaps large freed blocks and trims the heap top, so each training
    step's tensors fault their pages in again: minor page faults and system time, which `/usr/bin/time -v python
    pretrain.py` counts. A fixed mmap threshold of 32 MiB (glibc's largest dynamic one) and no trimming below 1 GiB
    keep them; nothing is computed differently."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # another C library (musl): other malloc settings
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def setup_run(device: str = "auto", dtype: str = "auto", seed: int = 0, threads: int = 0, quiet: bool = False) -> Run:
    """Pick device/dtype (printed with the reason), join torchrun's process group if launched by it, seed everything,
    and keep freed memory (keep_freed_memory)."""
    keep_freed_memory()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev, why_dev = pick_device(device)
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    dt, why_dt = pick_dtype(dtype, dev)
    if threads > (os.cpu_count() or 1):
        raise CK.InputError(f"--threads {threads}: this machine has {os.cpu_count()} CPUs; pass at most that, or 0 "
                            "(torch's default)")
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed + rank)
    if rank == 0 and not quiet:
        print(f"device {dev} ({why_dev}) | dtype {str(dt).replace('torch.', '')} ({why_dt}) | processes {world} | "
              f"torch {torch.__version__}")
    return Run(dev, dt, rank, world)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cached(path: Path, key: str, make: Callable) -> tuple:
    """(make(), False), or (what an earlier make() with the same `key` left at `path`, True). One file per path
    (pickled, written to a temporary sibling and renamed: a kill leaves the old file or the new one); a new key replaces
    it, and a file that cannot be read is made again."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            stored_key, value = pickle.load(f)
        if stored_key == key:
            return value, True
    except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError, pickle.UnpicklingError):
        pass  # no file yet, or one a crash or another version of the code left: make it again
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            pickle.dump((key, value), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:  # a full disk or a kill (Ctrl-C) mid-write: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise
    return value, False


def digest(*parts) -> str:
    """A short hex digest of strings, bytes and tensors (a cache key; a tensor counts with its shape and dtype)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(repr((tuple(part.shape), part.dtype)).encode())
            part = part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()


def step_rngs(seed: int, step: int, rank: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """The data (numpy) and noise/dropout (torch) generators of one training step."""
    return np.random.default_rng([seed, step, rank]), torch.Generator().manual_seed(hash((seed, step, rank)) % 2**63)


def all_reduce_sum(x: float, run: Run) -> float:
    if run.world == 1:
        return x
    t = torch.tensor([float(x)], device=run.device if run.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t)


# ----------------------------------------------------------------------------------------------------------------------
# Flag groups several scripts share, declared once: a script's config inherits the groups it takes


@dataclass
class MachineFlags:
    device: str = flag("auto", "auto | cpu | cuda | cuda:N | mps "
                               "(auto: cuda, then mps, then cpu; printed with the reason)")
    dtype: str = flag("auto", "auto | fp32 | bf16 (auto: bf16 on a GPU that supports it, else fp32)",
                      choices=["auto", *DTYPES])
    threads: int = flag(0, "CPU threads for torch (0 = its default)", "[0, inf)")


@dataclass
class TrainingFlags(MachineFlags):
    out: str = flag("out/run", "output checkpoint folder (each save replaces it as a whole)")
    resume: bool = flag(False, "continue from --out's train_state")
    resume_force: bool = flag(False, "with --resume: continue although settings differ from the checkpoint's (printed)")
    save_every: int = flag(100, "checkpoint every N steps (atomic)", "[1, inf)")
    seed: int = flag(0, "training seed (data, noise and dropout draws)", SEED)


# what --resume lets differ from the checkpoint's settings in every training script: where and how it runs; the
# scripts add theirs (more --steps extends a run); anything else would not continue the same run
RESUME_MAY_CHANGE = ("out", "resume", "resume_force", "save_every", "device", "threads")


@dataclass
class WorldFlags:
    world_seed: int = flag(0, "toy world seed (its scenes, questions and held-out split)", SEED, group="data")


@dataclass
class DataFlags(WorldFlags):
    init: str | None = flag(None, "BAGEL-format checkpoint folder to start from (default: the previous toy stage)",
                            group="data")
    data: str | None = flag(None, "LLaVA-style JSONL of real data (default: the toy world)", group="data")
    images: str | None = flag(None, "image folder of --data (its image paths are relative to it)", group="data")
    images_anywhere: bool = flag(False, "--data: also read image paths that leave --images (absolute, or with ..)",
                                 group="data")
    system: str | None = flag(None, "system prompt: with --data 'official' (INTERLEAVE_REASON_SYSTEM_PROMPT, what "
                              "CLEAR trains and rolls out under: inferencer.py:662 @411d6bd, "
                              "interleave_reason.py:131); else the one --init was trained with (the toy stages: 'toy')",
                              choices=sorted(D.SYSTEM_PROMPTS), group="data", type=str)


@dataclass
class PictureSizeFlags:
    vae_max: int = flag(1024, "real pictures: VAE resize, longest side (official 1024; capped by the model's position "
                        "table)", "[16, inf)", group="data")
    vae_min: int = flag(512, "real pictures: VAE resize, shortest side (official 512)", "[16, inf)", group="data")
    vit_max: int = flag(518, "real pictures: ViT resize, longest side (official 518; capped by the model's position "
                        "table)", "[14, inf)", group="data")
    vit_min: int = flag(224, "real pictures: ViT resize, shortest side (official 224)", "[14, inf)", group="data")

    def sizes(self, model_cfg: M.ModelConfig, toy: bool) -> D.ImageSizes:
        """The official transforms capped by the model (overridable by these flags); the toy's own size on the toy."""
        if toy:
            return D.image_sizes(model_cfg, *D.TOY_SIDES)
        return D.image_sizes(model_cfg, (self.vae_max, self.vae_min), (self.vit_max, self.vit_min))


SIZE_FLAGS = tuple(f.name for f in fields(PictureSizeFlags))


def check_data_flags(prog: str, cfg: DataFlags, given: set, toy_only: tuple = ()) -> DataFlags:
    """The refusals every script with --data shares: --data and --images together; toy flags (world_seed and
    `toy_only`) and the toy prompt refused with real data, picture sizes refused on the toy world. Returns cfg with
    --system resolved: with --data the official prompt; else the one --init was trained with (no --init: a toy stage's
    default, trained with the toy prompt)."""
    if (cfg.data is None) != (cfg.images is None):
        refuse(prog, "--data and --images go together: the JSONL's image paths are relative to --images")
    if cfg.data is not None:
        refuse_given(prog, given, ("world_seed", *toy_only), "with --data (the toy world is not used)")
        if cfg.system == "toy":
            refuse(prog, "--system toy with --data: the toy prompt describes the toy world's tags and rule; real data "
                         "is trained and rolled out under the official INTERLEAVE_REASON_SYSTEM_PROMPT")
        return replace(cfg, system="official")  # inferencer.py:662 @411d6bd, interleave_reason.py:131
    refuse_given(prog, given, ("images_anywhere",), "without --data")
    if isinstance(cfg, PictureSizeFlags):
        refuse_given(prog, given, SIZE_FLAGS, f"on the toy world (its pictures are {D.MODEL_SIZE} px)")
    if cfg.system is None:
        return replace(cfg, system="toy" if cfg.init is None else CK.checkpoint_system(cfg.init, D.SYSTEM_PROMPTS))
    return cfg


def check_training_flags(prog: str, cfg: TrainingFlags, given: set):
    if not cfg.resume:
        refuse_given(prog, given, ("resume_force",), "without --resume")


def output_lock(out):
    """Hold the lock of output folder `out` for the run (checkpoint.folder_lock; the main process only: torchrun's
    others write nothing), taken before any work: a second run on the same folder stops at once, naming the first."""
    problem = CK.output_problem(Path(out))
    if problem:  # as the flag was given: Path("") reads "."
        raise CK.InputError(f"--out {out!r} {problem}")
    return CK.folder_lock(out) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext()


def prepare_out(cfg: TrainingFlags, stage: str, init: str, may_change: tuple, main: bool = True):
    """Before any work: --out must hold this very run (--resume: settled, same stage, same settings but `may_change`)
    or be a folder the first save may replace."""
    if cfg.resume:
        defaults = {f.name: f.default for f in fields(cfg)}  # what a setting a checkpoint never recorded was then
        CK.check_resume(cfg.out, stage, {**vars(cfg), "init": init}, RESUME_MAY_CHANGE + may_change, cfg.resume_force,
                        main, defaults)
    else:
        CK.check_out(cfg.out, init)


# ----------------------------------------------------------------------------------------------------------------------
# Optimisation


def trainable(model: torch.nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model, lr: float, betas=(0.9, 0.95), eps: float = 1e-15, weight_decay: float = 0.0):
    """AdamW as BAGEL/CLEAR train: beta (0.9, 0.95), eps 1e-15, one group: every trainable parameter decays, biases
    and norms too (official AdamW(fsdp_model.parameters(), weight_decay=...): pretrain_unified_corruption.py:651-657
    @411d6bd)."""
    return torch.optim.AdamW([p for _, p in trainable(model)], lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay, foreach=True)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warmup, then cosine from peak down to the floor (CLEAR SFT: cosine, min_lr 1e-7)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


class EMA:
    """Exponential moving average of the trainable weights (BAGEL fsdp_ema_update; CLEAR SFT decay 0.995).

    The shadow copies keep their parameters' own layout, so the same code serves plain and FSDP-sharded models.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        pairs = [(self.shadow[n], p.detach()) for n, p in model.named_parameters() if p.requires_grad]
        if pairs:  # shadow = decay * shadow + (1 - decay) * p, one call for all (the same numbers as one per tensor)
            torch._foreach_lerp_([s for s, _ in pairs], [p for _, p in pairs], 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module):
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n])


def clip_and_step(model, optimizer, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable(model)], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)



def set_lr(optimizer, lr: float):
    for g in optimizer.param_groups:
        g["lr"] = lr


def save(out, run: Run, raw: M.Bagel, optimizer, tokenizer, step: int, meta: dict, ema: EMA | None = None):
    """A checkpoint of the run (checkpoint.save_checkpoint: atomic; ema.safetensors = the EMA, or the raw weights
    without one); every rank waits until it is on disk."""
    CK.save_checkpoint(out, raw, optimizer, tokenizer, step, meta, run.main, None if ema is None else ema.shadow)
    if run.world > 1:
        dist.barrier()

# ----------------------------------------------------------------------------------------------------------------------
# Models for training: whole on every process, or FSDP2-sharded



def shard(model: M.Bagel, dtype: torch.dtype):
    """FSDP2: each decoder layer and then the rest sharded across ranks (the frozen autoencoder stays whole, as the
    data pipeline calls it), compute in `dtype`, gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.language_model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp, ignored_params=set(model.vae.parameters()))


def load_for_training(init, run: Run, fsdp: bool) -> M.Bagel:
    """The checkpoint as a trainable model: whole on every process, or (fsdp) built on the meta device, sharded,
    and filled from rank 0's copy of the weights, so no process ever holds more than its shard plus one file read."""
    if not fsdp:
        return CK.load_pretrained(init, run.device, run.dtype)
    if run.world < 2:
        raise SystemExit("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N > 1)")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    cfg = CK.config_from_folder(init)
    with torch.device("meta"):
        model = M.Bagel(cfg)
    shard(model, run.dtype)
    model.to_empty(device=run.device)
    weights = CK.read_weights(init, cfg, "cpu", torch.float32) if run.main else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside its DDP and torch.compile wrappers."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def freeze_encoders(model: M.Bagel):
    """Train everything but the ViT, the autoencoder and the fixed sin-cos tables (official: freeze_vit, freeze_vae)."""
    model.requires_grad_(True)
    for frozen in (model.vit_model, model.vae, model.vit_pos_embed, model.latent_pos_embed):
        frozen.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


def paired_bootstrap(a, b, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean of a - b over the same questions (1 = right, 0 = wrong) in points, with a 95% percentile bootstrap
    interval: resample the questions with replacement n_boot times, keep the pairs together."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    means = d[np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": 100 * float(d.mean()), "lo": 100 * float(lo), "hi": 100 * float(hi), "n": len(d)}


# ----------------------------------------------------------------------------------------------------------------------
# Logging


def read_log(path: Path) -> list[tuple[str, dict]]:
    """The (line, record) pairs of a JSONL log that Log wrote. A last line that a crash (a full disk, a kill) cut short
    is dropped with a warning; any other line that is not a record with an integer step is an InputError naming it."""
    lines = CK.read_bytes(path, "a JSONL log").split(b"\n")
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):  # not UTF-8, not JSON (cut short), nested too deep
            record = None
        step = record.get("step", 0) if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            out.append((raw.decode(), record))
        elif n == len(lines):  # no newline after it: the write that a crash interrupted
            print(f"warning: {path} line {n} was cut short (a crash as it was written); dropped it", file=sys.stderr)
        else:
            raise CK.InputError(f"{path} line {n} is not a log record (a JSON object with an integer step): remove "
                                "that line, or the log")
    return out


class Log:
    """One line per step with fixed fields on stdout (via tqdm) and the same record in a JSONL file."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if resume_step is not None and self.path.exists():  # drop what the killed run logged after its checkpoint
            keep = [line for line, record in read_log(self.path) if record.get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def __call__(self, record: dict, bar: tqdm | None = None):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        line = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        (bar.write if bar is not None else print)(line)

"""
Plumbing shared by every script, written once and knowing no stage: command-line flags from a dataclass (each
checked before any work), run setup (device, dtype, seeds, torchrun), AdamW + cosine schedule, EMA, FSDP, atomic
checkpoints with resume, a paired bootstrap interval, one log line per step plus a JSONL log, and a generic
training loop.

Every step draws its data and noise from generators seeded by (seed, step, rank), so a run resumed from a checkpoint
replays exactly the steps an uninterrupted run would take: the same loss curve.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

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


def refuse(prog: str, message: str):
    """Stop before any work: one line on stderr, exit status 2 (argparse's convention for bad usage)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls, description: str, defaults: dict | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of `cls` (defaults overridable per script), grouped for --help."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for f in fields(cls):
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
    return cls(**values), parser.prog, given


def run_cli(main: Callable):
    """A script's entry point: a bad input (model.InputError, or a missing file) ends as one line on stderr and exit
    status 2, as a bad flag does; any other exception keeps its traceback."""
    try:
        main()
    except (M.InputError, FileNotFoundError) as e:
        refuse(os.path.basename(sys.argv[0]), str(e).replace("\n", " "))


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
    asked for must exist here (model.InputError otherwise)."""
    if name != "auto":
        try:
            dev = torch.device(name)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda", "mps"):
            raise M.InputError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps")
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()) \
                or dev.type == "mps" and not torch.backends.mps.is_available():
            raise M.InputError(f"--device {name}: no such device here ({torch.cuda.device_count()} CUDA devices, MPS "
                               f"{'' if torch.backends.mps.is_available() else 'not '}available, torch {torch.__version__}); "
                               "use --device auto or cpu")
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
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed + rank)
    if rank == 0 and not quiet:
        print(f"device {dev} ({why_dev}) | dtype {str(dt).replace('torch.', '')} ({why_dt}) | processes {world} | torch {torch.__version__}")
    return Run(dev, dt, rank, world)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
# Optimisation


def trainable(model: torch.nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model, lr: float, betas=(0.9, 0.95), eps: float = 1e-15, weight_decay: float = 0.0):
    """AdamW as BAGEL/CLEAR train: beta (0.9, 0.95), eps 1e-15; decay on matrices only. foreach: one call per group
    and operation instead of one per parameter, as on GPUs (CPU's default loops over the toy's many small tensors);
    the same numbers to the bit."""
    params = trainable(model)
    groups = [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


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


# ----------------------------------------------------------------------------------------------------------------------
# Models for training: whole on every process, or FSDP2-sharded


def full_state(tensors: dict) -> dict:
    """Whole tensors on the CPU from plain or FSDP-sharded ones (a collective call when sharded: every rank calls)."""
    from torch.distributed.tensor import DTensor
    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for n, t in tensors.items()}


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
        return M.load_pretrained(init, run.device, run.dtype)
    if run.world < 2:
        raise SystemExit("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N > 1)")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    cfg = M.config_from_folder(init)
    with torch.device("meta"):
        model = M.Bagel(cfg)
    shard(model, run.dtype)
    model.to_empty(device=run.device)
    weights = M.read_weights(init, cfg, "cpu", torch.float32) if run.main else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def freeze_encoders(model: M.Bagel):
    """Train everything but the ViT, the autoencoder and the fixed sin-cos tables (official: freeze_vit, freeze_vae)."""
    model.requires_grad_(True)
    for frozen in (model.vit_model, model.vae, model.vit_pos_embed, model.latent_pos_embed):
        frozen.requires_grad_(False)


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
        raise M.InputError(f"--out {out} is a file: pass a folder for the checkpoint (a new one, or an earlier checkpoint)")
    if out.is_dir() and any(out.iterdir()) and not (out / "nanoclear.json").exists():
        raise M.InputError(f"--out {out} is a folder that holds no checkpoint, and saving replaces it as a whole: pass "
                           "a new or empty folder (or an earlier checkpoint)")
    if init is not None and out.resolve() == Path(init).resolve():
        raise M.InputError(f"--out {out} is --init: the run would overwrite the checkpoint it starts from; pass another --out")


def save_checkpoint(folder, raw: M.Bagel, ema: EMA | None, optimizer, tokenizer, step: int, meta: dict, run: Run):
    """Write folder atomically: ema.safetensors holds the EMA weights (or the raw ones without EMA). With --fsdp every
    rank takes part in gathering the shards and rank 0 writes; the resume state is written without FSDP only."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    sharded = any(isinstance(p, DTensor) for p in raw.parameters())  # FSDP: gathering is a collective
    if not (run.main or sharded):
        return
    saved = full_state(ema.shadow if ema is not None else dict(raw.named_parameters()))
    if not run.main:
        return

    def write(tmp: Path):
        M.save_pretrained(raw, tmp, tokenizer=tokenizer, meta={**meta, "step": step}, state=saved,
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
        (d / "state.json").write_text(json.dumps({"step": step, "optimizer_scalars": scalars, "stage": meta.get("stage")}))

    atomic_write_folder(folder, write)


def check_resume(folder, stage: str, settings: dict, may_change: tuple, force: bool, run: Run):
    """Before any work of a --resume run: settle `folder` (settle_folder), check that it is a resumable checkpoint of
    `stage`, and compare this run's settings with those it recorded (nanoclear.json "args", and "init" as resolved):
    any difference outside `may_change` is refused in one message listing each, unless `force` (then printed)."""
    folder = Path(folder)
    if run.main:
        settle_folder(folder)
    if run.world > 1:
        dist.barrier()
    if not (folder / "train_state" / "state.json").exists():
        raise FileNotFoundError(f"{folder} has no train_state/: it is not a resumable {stage} checkpoint (start without --resume)")
    state = M.read_json(folder / "train_state" / "state.json")
    if state.get("stage") != stage:
        raise M.InputError(f"{folder} was written by stage {state.get('stage')!r}, not {stage!r}: resume it with that stage")
    saved = M.read_json(folder / "nanoclear.json")
    recorded = {**(saved.get("args") if isinstance(saved.get("args"), dict) else {}), "init": saved.get("init")}
    now = json.loads(json.dumps(settings))  # tuples as the json holds them
    changed = [f"{flag_name(k)} {recorded[k]!r} -> {v!r}" if k in recorded else f"{flag_name(k)} (not recorded) -> {v!r}"
               for k, v in now.items() if k not in may_change and (k not in recorded or recorded[k] != v)]
    if changed and not force:
        raise M.InputError(f"{folder} was trained with other settings: {'; '.join(changed)}. Resume with its values, pass "
                           "--resume-force to continue with these on purpose, or start a fresh --out")
    if changed and run.main:
        print(f"--resume-force: continuing {folder} with changed settings: {'; '.join(changed)}")


def load_resume_state(folder, raw: M.Bagel, ema: EMA | None, optimizer) -> int:
    """Restore raw weights, EMA and optimizer from a checkpoint folder that check_resume accepted; returns the step to
    continue from."""
    from safetensors.torch import load_file
    folder = Path(folder)
    d = folder / "train_state"
    state = M.read_json(d / "state.json")
    saved_cfg = M.read_json(folder / "nanoclear.json").get("model")
    if saved_cfg != json.loads(json.dumps(M.asdict(raw.cfg))):
        raise M.InputError(f"{folder} holds a model of another shape than this run's; use matching flags or a fresh --out")
    try:
        weights = load_file(str(d / "model.safetensors"))
        opt_tensors = load_file(str(d / "optimizer.safetensors"))
    except Exception as e:
        raise M.InputError(f"{d} is corrupt ({e}); delete it or resume from an earlier copy") from None
    missing = set(n for n, _ in raw.named_parameters()) ^ set(weights)
    if missing:
        raise M.InputError(f"{d}/model.safetensors does not match the model: {sorted(missing)[:5]}")
    with torch.no_grad():
        for n, p in raw.named_parameters():
            p.copy_(weights[n])
        if ema is not None:
            for n, t in M.read_weights(folder, raw.cfg, raw.device, raw.dtype).items():
                ema.shadow[n].copy_(t)
    by_name = dict(raw.named_parameters())
    for key, v in opt_tensors.items():
        n, k = key.split("::")
        optimizer.state[by_name[n]][k] = v.to(by_name[n].device)
    for key, v in state["optimizer_scalars"].items():
        n, k = key.split("::")
        optimizer.state[by_name[n]][k] = v
    return int(state["step"])


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


class Log:
    """One line per step with fixed fields on stdout (via tqdm) and the same record in a JSONL file."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if resume_step is not None and self.path.exists():  # drop what the killed run logged after its checkpoint
            keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def __call__(self, record: dict, bar: tqdm | None = None):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        line = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        (bar.write if bar is not None else print)(line)


# ----------------------------------------------------------------------------------------------------------------------
# The training loop (Stage 0's phases, Stages 1 and 2)


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup: int
    min_lr: float
    ema: float
    grad_clip: float
    seed: int
    save_every: int  # 0 = never save (a phase whose result the caller keeps)
    log_every: int


def train_loop(run: Run, raw: M.Bagel, model: torch.nn.Module, optimizer, ema: EMA | None, loop: LoopConfig, out: Path,
               name: str, batch_fn: Callable, loss_fn: Callable, tokenizer, meta: dict, start_step: int = 0,
               log: Log | None = None):
    """Run steps start_step..loop.steps-1: batch_fn(step, np_rng, torch_gen) -> batch; loss_fn(model, batch) ->
    (loss, metrics). `model` is `raw` or its DDP wrapper. Saves to `out` every save_every steps and at the end, with
    `name` as the checkpoint's stage (what --resume checks)."""
    log = log or Log(out.with_name(out.name + ".log.jsonl"), start_step if start_step else None, run.main)
    bar = tqdm(range(start_step, loop.steps), initial=start_step, total=loop.steps, desc=name, disable=not run.main,
               dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, loop.steps, loop.lr, loop.warmup, loop.min_lr)
        rng, gen = step_rngs(loop.seed, step, run.rank)
        model.train()
        loss, metrics = loss_fn(model, batch_fn(step, rng, gen))
        loss.backward()
        gnorm = clip_and_step(raw, optimizer, loop.grad_clip)
        if ema is not None:
            ema.update(raw)
        if run.main and (step % loop.log_every == 0 or step == loop.steps - 1):
            log({"step": step + 1, "loss": float(loss.detach()), **metrics, "lr": optimizer.param_groups[0]["lr"],
                 "gnorm": gnorm, "ms": round(1000 * (time.time() - t0))}, bar)
        if loop.save_every and ((step + 1) % loop.save_every == 0 or step + 1 == loop.steps):
            save_checkpoint(out, raw, ema, optimizer, tokenizer, step + 1, {**meta, "stage": name}, run)
            if run.world > 1:
                dist.barrier()
    bar.close()

"""common.py: flags checked before any work, the optimiser schedule, the EMA, atomic folders that survive a kill at any
instant, --resume, and the scripts' one-line errors."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint as CK
import common as C
import model as M
from common import flag

ROOT = Path(__file__).resolve().parent.parent


def test_lr_schedule_by_hand():
    """Linear warmup to the peak, then cosine down to the floor."""
    assert C.lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert C.lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert C.lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.1 + 0.45)  # half way through the cosine
    assert C.lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_ema_by_hand():
    """shadow <- decay * shadow + (1 - decay) * weight, on trainable weights only."""
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = C.EMA(net, 0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)
    assert float(ema.shadow["weight"]) == pytest.approx(0.1)
    net.weight.requires_grad_(False)
    ema.update(net)
    assert float(ema.shadow["weight"]) == pytest.approx(0.1)


def test_foreach_optimizer_and_ema_equal_the_per_tensor_updates():
    """make_optimizer's foreach AdamW and EMA's one-call lerp give, to the bit, what one update per tensor gives."""
    torch.manual_seed(0)
    nets = [M.Bagel(M.ModelConfig(num_hidden_layers=1, vit_num_hidden_layers=1)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    loop = [{"params": g["params"], "weight_decay": g["weight_decay"]}
            for g in C.make_optimizer(nets[1], 1e-3, weight_decay=0.1).param_groups]
    opts = [C.make_optimizer(nets[0], 1e-3, weight_decay=0.1),
            torch.optim.AdamW(loop, lr=1e-3, betas=(0.9, 0.95), eps=1e-15, foreach=False)]
    assert opts[0].param_groups[0]["foreach"] and not opts[1].param_groups[0]["foreach"]
    emas = [C.EMA(net, 0.9) for net in nets]
    for step in range(3):
        grads = {n: torch.randn_like(p) for n, p in nets[0].named_parameters()}
        for net, opt in zip(nets, opts):
            for n, p in net.named_parameters():
                p.grad = grads[n].clone()
            opt.step()
        emas[0].update(nets[0])
        with torch.no_grad():
            for n, p in nets[1].named_parameters():
                emas[1].shadow[n].lerp_(p, 1 - 0.9)
    for (n, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.equal(a, b) and torch.equal(emas[0].shadow[n], emas[1].shadow[n]), n


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_keep_freed_memory_applies_on_linux():
    assert C.keep_freed_memory() in (True, False)  # False only with another C library than glibc
    if os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") or os.path.exists("/lib/aarch64-linux-gnu/libc.so.6"):
        assert C.keep_freed_memory()


def test_flags_are_checked_before_any_work(capsys):
    """An out-of-range value stops with exit status 2 and one line naming the flag, the value and what is allowed."""
    from dataclasses import dataclass

    @dataclass
    class Demo:
        steps: int = flag(3, "steps", "[1, inf)")
        ema: float = flag(0.9, "decay", "[0, 1)")
        scale: tuple = flag((0.4, 1.0), "interval", "[0, 1]")
        resume: bool = flag(False, "resume")

    cfg, _, given = C.parse_flags(Demo, "", ["--steps", "5", "--no-resume"])
    assert cfg == Demo(steps=5) and given == {"steps", "resume"}
    for argv, words in ((["--steps", "0"], "--steps 0: must be an integer >= 1"),
                        (["--ema", "1.5"], "--ema 1.5: must be a number in [0, 1)"),
                        (["--scale", "0.4", "2"], "--scale 2.0: must be a number in [0, 1]")):
        with pytest.raises(SystemExit) as e:
            C.parse_flags(Demo, "", argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: one line on stderr and exit status 2 from every script


def test_scripts_turn_input_errors_into_one_line(capsys, monkeypatch):
    """InputError and FileNotFoundError end as "<prog>: error: <message>" (one line, status 2); other errors keep their
    traceback; every script's entry point goes through run_cli."""
    monkeypatch.setattr(sys, "argv", ["sft.py"])

    def main():
        raise error

    for error in (CK.InputError("x.json is not valid JSON\nrestore it"), FileNotFoundError("no such file")):
        with pytest.raises(SystemExit) as e:
            C.run_cli(main)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("sft.py: error: ") and err.count("\n") == 1
    error = RuntimeError("a bug")
    with pytest.raises(RuntimeError):
        C.run_cli(main)
    for script in ("sft.py", "bridge.py", "rl.py", "evaluate.py", "pretrain.py", "bench.py"):
        assert "run_cli(main)" in (ROOT / script).read_text().split('if __name__ == "__main__":')[1], script


def test_a_corrupt_checkpoint_is_one_line_from_the_command_line(toy_ckpt, tmp_path):
    """End to end: sft.py on a checkpoint whose tokenizer.json is corrupt says so in one line naming the file."""
    bad = tmp_path / "bad"
    shutil.copytree(toy_ckpt, bad)
    (bad / "tokenizer.json").write_text('{1: "x"}')
    proc = subprocess.run([sys.executable, "sft.py", "--init", str(bad), "--out", str(tmp_path / "o"), "--eval-n", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("sft.py: error: ") and str(bad / "tokenizer.json") in proc.stderr


def test_paired_bootstrap_on_known_inputs():
    """The difference is the mean of a - b in points; the interval is the spread of resampled means
    (about +-1.96 SE)."""
    ones, zeros = [1] * 100, [0] * 100
    assert C.paired_bootstrap(ones, zeros) == {"diff": 100.0, "lo": 100.0, "hi": 100.0, "n": 100}
    assert C.paired_bootstrap(ones, ones)["hi"] == 0.0
    half = C.paired_bootstrap([1] * 50 + [0] * 50, zeros)  # SE of a 0.5 mean over 100 items: 5 points
    assert (half["diff"] == 50.0 and half["lo"] == pytest.approx(40.2, abs=1.5) and
            half["hi"] == pytest.approx(59.8, abs=1.5))
    paired = C.paired_bootstrap([1, 0] * 50, [1, 0] * 50)  # identical per question: no spread at all
    assert paired["lo"] == paired["hi"] == 0.0


def test_device_and_seed_flags_are_checked_before_any_work():
    """--device names a device this machine has (a typo or an absent GPU was a traceback); seeds are non-negative
    32-bit integers (-1 was a traceback from numpy after the run had started)."""
    for name in ("foo", "meta", "cuda:64"):
        with pytest.raises(CK.InputError, match=f"--device {name}: "):
            C.pick_device(name)
    assert C.pick_device("cpu") == (torch.device("cpu"), "asked for")
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        seed: int = flag(0, "seed", C.SEED)
    for bad in ("-1", str(2**70)):
        with pytest.raises(SystemExit):
            C.parse_flags(Cfg, "", ["--seed", bad])
    assert C.parse_flags(Cfg, "", ["--seed", "4294967295"])[0].seed == 4294967295


def test_usage_errors_are_one_line_with_see_help(capsys):
    """argparse errors (unknown flag, a value of the wrong type, a missing value) printed 3 to 26 lines of usage: now
    `prog: error: message (see --help)`, exit status 2, as every flag refusal; bench.py and data.py's CLIs too."""
    from dataclasses import dataclass

    import bench

    @dataclass
    class Demo:
        steps: int = flag(3, "steps", "[1, inf)")
        lr: float = flag(0.1, "lr", "(0, inf)")
    for argv in (["--nope"], ["--steps", "x"], ["--lr"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as e:
            C.parse_flags(Demo, "", argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.rstrip().endswith("(see --help)"), err
    for argv, words in ((["--only", "degrade", "--preset", "tiny"], "--preset has no effect in degrade"),
                        (["--only", "degrade", "--device", "cpu"], "--device has no effect in degrade"),
                        (["--only", "train_overhead", "degrade", "--preset", "tiny"], "--preset has no effect"),
                        (["--only"], "expected at least one argument")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_values_whose_arithmetic_overflows_are_refused(capsys):
    """Values inside a flag's interval but beyond what its arithmetic holds (a temperature of 1e-320 divides logits to
    inf, a weight of 1e300 overflows float32, a count of 2**40 overflows int32 sizes) stop before any work; the seeds'
    finite interval is their own."""
    from dataclasses import dataclass

    @dataclass
    class Demo:
        temperature: float = flag(1.0, "temperature", "(0, inf)")
        weight: float = flag(0.0, "weight", "[0, inf)")
        steps: int = flag(3, "steps", "[1, inf)")
        seed: int = flag(0, "seed", C.SEED)
    assert C.parse_flags(Demo, "", ["--weight", "0", "--temperature", "1e-12", "--steps", str(2**31 - 1),
                                    "--seed", str(2**32 - 1)])[0].steps == 2**31 - 1
    for argv, words in ((["--temperature", "1e-320"], "--temperature 1e-320: too small to compute with"),
                        (["--weight", "1e300"], "--weight 1e+300: too large"),
                        (["--steps", str(2**40)], f"--steps {2**40}: too large")):
        with pytest.raises(SystemExit):
            C.parse_flags(Demo, "", argv)
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    import rl  # a shift of 1e12 collapsed the SDE grid: NaN restorations, then a crash sampling text mid-run
    for argv, words in ((["--timestep-shift", "1e12"], "must be a number in [0.001, 1000]"),
                        (["--timestep-shift", "1000", "--sde-points", "10000"], "two points of the shifted time grid")):
        with pytest.raises(SystemExit):
            rl.parse_config(argv)
        assert words in capsys.readouterr().err


def test_devices_threads_and_options_the_machine_lacks(monkeypatch):
    """--device cpu:1 (blamed on the checkpoint file when the weights failed to load there), more --threads than CPUs,
    and --flex-attention on a CPU (no CPU backward: it failed at the first backward) stop before any work; so does
    --compile on a CPU without the C++ compiler its kernels are built with."""
    import sft
    for name in ("cpu:1", "mps:2"):
        with pytest.raises(CK.InputError, match=f"--device {name}: there is one"):
            C.pick_device(name)
    assert C.pick_device("cpu:0")[0] == torch.device("cpu:0")
    import os
    with pytest.raises(CK.InputError, match=f"--threads {os.cpu_count() + 1}: this machine has"):
        C.setup_run("cpu", "fp32", threads=os.cpu_count() + 1, quiet=True)
    with pytest.raises(SystemExit):
        sft.parse_config(["--flex-attention", "--device", "cpu"])
    monkeypatch.setenv("CXX", "no-such-compiler-here")  # torch.compile's CPU backend would fail at the first step
    with pytest.raises(SystemExit):
        sft.parse_config(["--compile", "--device", "cpu"])
    monkeypatch.setenv("CXX", sys.executable)  # any program on PATH stands for the compiler here
    assert sft.parse_config(["--compile", "--device", "cpu"]).compile


def test_weight_decay_reaches_every_trainable_parameter_as_officially():
    """make_optimizer: one AdamW group over every trainable parameter, biases and norm weights included (official
    AdamW(fsdp_model.parameters(), weight_decay=...)); frozen ones are left out. With zero gradients a step is the
    decay alone: p <- p (1 - lr wd)."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 1))
    net[2].requires_grad_(False)
    opt = C.make_optimizer(net, lr=0.1, weight_decay=0.5)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.5
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in trainable]
    before = [p.detach().clone() for p in net.parameters()]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(net.parameters(), before):
        assert torch.allclose(p, b * (1 - 0.1 * 0.5) if p.requires_grad else b)


def test_bench_train_overhead_measures_one_default_stage1_step(monkeypatch):
    """bench.py's train_overhead times python sft.py's own step: its default token budget packed into rows of at most
    its row length, with the stages' optimizer, against a plain transformer on as many rows and tokens (the timing is
    bench.py's to report, not a test's: each step runs once here)."""
    import bench
    import sft

    def run_once(a, b, device):
        a(), b()
        return 0.2, 0.1, 2.0
    monkeypatch.setattr(bench, "timed_pair", run_once)
    made, make = [], C.make_optimizer
    monkeypatch.setattr(C, "make_optimizer", lambda *a, **k: made.append(make(*a, **k)) or made[-1])
    (row,) = bench.bench_train_overhead(None, torch.device("cpu"), torch.float32)
    cfg = sft.parse_config([])
    assert len(made) == 2 and all(o.defaults["foreach"] and o.state for o in made)  # both stepped the stages' AdamW
    rows, row_len = (int(v) for v in re.search(r"\((\d+) rows x (\d+) tokens\)", row["section"]).groups())
    assert rows * row_len >= cfg.tokens_per_step // 2 and row_len <= cfg.row_tokens and row["tokens"] == rows * row_len
    assert row["of bound"] == "2.00x plain" and row["measured"] == "200 ms"

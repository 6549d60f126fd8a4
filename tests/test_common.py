"""common.py: flags checked before any work, the optimiser schedule, the EMA, atomic folders."""

import pytest
import torch

import common as C
import model as M
from common import flag


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


def test_failed_folder_write_leaves_nothing(tmp_path):
    """An exception while writing a checkpoint leaves neither a half-written folder nor temporary files."""
    def boom(tmp):
        M.save_pretrained(M.Bagel(M.ModelConfig(num_hidden_layers=1, vit_num_hidden_layers=1)), tmp)
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        C.atomic_write_folder(tmp_path / "c", boom)
    assert list(tmp_path.iterdir()) == []


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

"""Research run, off by default: the toy RL with its training forward under the official code's attention mask.

    python tests/official_mask_rl.py [rl.py flags]       # default --out out/rl-official-mask

The official RL trainer scores rollouts with a misaligned mask (rl.official_layout: no mode for VAE splits, zipped
with the split lengths), so completion rows attend to nothing or to the tokens they predict. This script swaps
rl.official_mask in for model.attention_mask (the training forward's mask; rollouts use the KV cache and are
unchanged) and runs rl.main, to measure what that does to RL next to an ordinary `python rl.py` run."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common as C
import model as M
import rl

M.attention_mask = rl.official_mask
C.run_cli(lambda: rl.main(["--out", "out/rl-official-mask", *sys.argv[1:]]))  # a later --out wins

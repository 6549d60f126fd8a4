"""Run by test_sft.py under torchrun (2 CPU processes, gloo): two fine-tuning steps, then check the ranks agree."""

import argparse
import os
import sys

import torch
import torch.distributed as dist

import common as C

p = argparse.ArgumentParser()
C.add_finetune_args(p, steps=2, lr=1e-3, distill_weight=0.0, init=sys.argv[1], out=sys.argv[2])
args = p.parse_args(["--tokens-per-step", "300", "--eval-n", "0", "--warmup", "1", "--threads", "1"])
real_destroy = dist.destroy_process_group
dist.destroy_process_group = lambda: None  # keep the group alive for the check below
_, tuned, _ = C.finetune(args, "sft")
flat = torch.cat([p.detach().flatten() for p in tuned.parameters()])
both = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(both, flat)
assert torch.equal(both[0], both[1]), "the ranks' EMA weights differ"
if dist.get_rank() == 0:
    print("ranks in sync")
real_destroy()
# Exit without interpreter teardown: on CPU, gloo's worker threads occasionally abort a normal exit ('terminate called
# without an active exception', ~1 run in 10 under load, after every check above has passed): a PyTorch teardown race.
sys.stdout.flush()
os._exit(0)

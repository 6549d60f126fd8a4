"""Run by test_sft.py under torchrun (2 CPU processes, gloo): two FSDP2 Stage-2 steps (the distillation on), then the
saved folder must load whole and equal the gathered EMA weights of the sharded model."""

import os
import sys

import torch
import torch.distributed as dist

import bridge
import checkpoint as CK
import sft

args = bridge.parse_config(["--init", sys.argv[1], "--out", sys.argv[2], "--steps", "2", "--lr", "1e-3",
                            "--tokens-per-step", "300", "--eval-n", "0", "--examples", "8", "--warmup", "1",
                            "--threads", "1", "--fsdp", "--distill-weight", "0.4"])
real_destroy = dist.destroy_process_group
dist.destroy_process_group = lambda: None  # keep the group alive for the check below
_, tuned, _ = sft.train(args, "bridge", bridge.step_loss, distill=True)
gathered = CK.full_state(dict(tuned.named_parameters()))
dist.barrier()
if dist.get_rank() == 0:
    saved = CK.load_pretrained(sys.argv[2]).state_dict()
    assert all(torch.equal(saved[k], gathered[k]) for k in saved), "saved weights differ from the sharded model"
    print("fsdp saved and reloaded")
real_destroy()
# Exit without interpreter teardown: on CPU, gloo's worker threads occasionally abort a normal exit ('terminate called
# without an active exception', ~1 run in 10 under load, after every check above has passed): a PyTorch teardown race.
sys.stdout.flush()
os._exit(0)

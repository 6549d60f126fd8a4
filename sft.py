"""
Stage 1 of CLEAR (§3.2): supervised fine-tuning on degradation-aware data teaches generate-then-answer.

Each sample shows a degraded picture (as VAE and ViT tokens) and a question. When the answer-relevant detail did not
survive the corruption, the target is `<think>...</think> <image_restore>`, then the CLEAN picture as the generation
target (flow matching), the clean picture again as context (VAE and ViT tokens), then `<think>...</think><answer>`;
otherwise it is a direct `<think>...</think><answer>...</answer>` (data.py lays both out exactly as the official code).

    loss = ce_weight * CE(assistant text) + mse_weight * MSE(velocity of the restore target) [+ distill_weight * distill]

CPU (toy, no flags; runs Stage 0 first when out/base/ is missing):
    python sft.py                      # -> out/base/ (if needed), out/sft/, then a table on the held-out toy benchmark
    python sft.py --distill-weight 0.4 # the official "one job" form: Stage 1 and the bridge distillation together
GPU:
    python sft.py --device cuda --dtype bf16 --compile
    torchrun --nproc_per_node 8 sft.py --init path/to/BAGEL-7B-MoT --data sft.jsonl --images DIR --fsdp ...

Differences from the official recipe (numbered):
  1. Toy-sized defaults (steps, lr, token budget, EMA window); the official values are in each flag's help.
  2. The restore decision is a rule (data.needs_restore: did the answer-relevant detail survive?), not GPT-4.1.
  3. ViT and VAE are frozen as officially, but in the toy they come from our Stage 0 instead of SigLIP/FLUX.
  4. The data mix adds text-only reasoning samples (the official pure-text set, not in its main mix) so the evaluation
     can compare text-only reasoning with interleaved reasoning on the same model.
"""

from __future__ import annotations

import argparse

import common as C

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_finetune_args(p, steps=600, lr=5e-4, distill_weight=0.0, init=None, out="out/sft")
    args = p.parse_args()
    start, tuned, tok = C.finetune(args, "sft")
    if start is not None:
        modes = {"base": "direct" if args.init is None else "interleave", "sft": "interleave"}
        print(C.summary_table(args, tok, {"base": start, "sft": tuned}, modes))


if __name__ == "__main__":
    main()

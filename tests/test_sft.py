"""Stage 1 (sft.py): CLEAR's sample layout, the objective, the packing budget, resume, flags, DDP/FSDP on gloo."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bridge
import checkpoint as CK
import common as C
import data as D
import model as M
import sft
from test_data import fake_encode, tok, world  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------------------
# CLEAR samples (official parse_row)


def restore_example(world, restore=True):
    ex = next(world.stream(7))
    ex.response = D.think_response(np.random.default_rng(0), restore, ex.answer, "their colour", "the shapes are red",
                                   "motion_blur", 0.9)
    return ex


def test_restore_sample_layout_is_clear_section_1_3(world, tok):
    """Items 1-9 in order: types, loss flags, t > 0 only on the noised clean latent, pairs, teacher grid == VAE grid."""
    ex, calls = restore_example(world), []
    seq = sft.build_batch([ex], tok, fake_encode(calls), torch.Generator().manual_seed(0), distill=True)[0]
    kinds = [type(s).__name__ for s in seq]
    assert kinds == ["Text", "VaeImage", "VitImage", "Text", "Text", "VaeImage", "VaeImage", "VitImage", "Text"]
    assert [s.loss for s in seq if isinstance(s, M.Text)] == [False, False, True, True]
    assert [s.t > 0 for s in seq if isinstance(s, M.VaeImage)] == [False, True, False]
    noised, student, teacher = seq[5], seq[6], seq[7]
    assert noised.target is not None and not noised.droppable and noised.pair is None
    torch.testing.assert_close(noised.tokens,
                               (1 - noised.t) * student.tokens + noised.t * (noised.target + student.tokens))
    assert student.pair == teacher.pair == 0 and seq[1].pair is None and seq[2].pair is None
    P = D.TOY_SIZES.vit[2]
    assert (teacher.pixels.shape[1] // P, teacher.pixels.shape[2] // P) == student.grid
    assert tok.decode(seq[0].ids) == D.TOY_SYSTEM_PROMPT and tok.decode(seq[3].ids) == ex.question.strip()
    assert tok.decode(seq[4].ids).endswith("</think>\n<image_restore>")  # official: parts[0] + token
    assert tok.decode(seq[8].ids).startswith("\n<think>") and tok.decode(seq[8].ids).endswith("</answer>")
    assert calls == [2]  # degraded and clean latents in one encode call


def test_restore_sample_items_in_order(world, tok):
    """Without the distillation pair (Stage 1): items 1-9 in order, loss flags on the two assistant texts only, t > 0
    only on the noised clean latent (its own target, never dropped), the texts split at <image_restore> as the
    official parse_row does, the prompt and question as given, both pictures encoded in one call."""
    ex, calls = restore_example(world), []
    seq = sft.build_batch([ex], tok, fake_encode(calls), torch.Generator().manual_seed(0))[0]
    assert [type(s).__name__ for s in seq] == ["Text", "VaeImage", "VitImage", "Text", "Text", "VaeImage", "VaeImage",
                                              "VitImage", "Text"]
    assert [s.loss for s in seq if isinstance(s, M.Text)] == [False, False, True, True]
    assert [s.t > 0 for s in seq if isinstance(s, M.VaeImage)] == [False, True, False]
    assert seq[5].target is not None and not seq[5].droppable and seq[5].grid == seq[6].grid
    assert tok.decode(seq[0].ids) == D.TOY_SYSTEM_PROMPT and tok.decode(seq[3].ids) == ex.question.strip()
    assert tok.decode(seq[4].ids).endswith("</think>\n<image_restore>")
    assert tok.decode(seq[8].ids).startswith("\n<think>") and tok.decode(seq[8].ids).endswith("</answer>")
    assert tok.decode(seq[4].ids) + tok.decode(seq[8].ids) == ex.response
    assert calls == [2]


def test_direct_sample_layout(world, tok):
    """A direct answer is items 1-4 plus one CE text; no clean-image blocks."""
    ex = restore_example(world, restore=False)
    seq = sft.build_batch([ex], tok, fake_encode([]), torch.Generator().manual_seed(0), system="official")[0]
    assert [type(s).__name__ for s in seq] == ["Text", "VaeImage", "VitImage", "Text", "Text"]
    assert seq[-1].loss and tok.decode(seq[-1].ids) == ex.response
    assert tok.decode(seq[0].ids) == D.INTERLEAVE_REASON_SYSTEM_PROMPT
    with pytest.raises(ValueError, match="system prompt must be one of"):
        sft.build_batch([ex], tok, fake_encode([]), torch.Generator(), system="long")


def test_samples_pack_and_train_in_the_real_model(world, tok):
    """pack + forward accept a mixed batch built with the model's own autoencoder: finite CE and MSE, one pair."""
    torch.manual_seed(0)
    cfg = replace(M.PRESETS["tiny"], **D.config_ids(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, vit_hidden_size=32, vit_intermediate_size=32,
                  vit_num_hidden_layers=1)
    net = M.Bagel(cfg).eval()
    p = cfg.latent_patch_size

    def encode(px):
        z = net.vae.encode(px)
        return torch.stack([M.patchify(x, p) for x in z]), (z.shape[2] // p, z.shape[3] // p)
    batch = sft.build_batch([restore_example(world), restore_example(world, False)], tok, encode,
                            torch.Generator().manual_seed(0), distill=True)
    packed = M.pack(batch, cfg)
    grid = batch[0][5].grid
    n_vit = (D.MODEL_SIZE // cfg.vit_patch_size) ** 2
    assert (len(packed.pairs) == 1 and packed.flow_lens == [grid[0] * grid[1]] and
            packed.vit_lens == [n_vit, grid[0] * grid[1], n_vit])
    with torch.no_grad():
        out = net(packed)
    assert out.mse.shape == (grid[0] * grid[1],) and torch.isfinite(out.ce).all() and torch.isfinite(out.mse).all()
    assert len(out.ce) == sum(len(s.ids) + 1 for b in batch for s in b if isinstance(s, M.Text) and s.loss)


def test_pooled_examples_carry_their_own_latents(tok):
    """The toy's example pool (--examples) hands build_batch each example's (degraded, clean) latents: its samples are
    those of encoding the same examples afresh, block for block (a swapped pair would train restoring backwards)."""
    torch.manual_seed(0)
    cfg = replace(M.PRESETS["tiny"], **D.config_ids(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, vit_hidden_size=32, vit_intermediate_size=32,
                  vit_num_hidden_layers=1)
    net = M.Bagel(cfg).eval()
    draw = sft.pool_draw(sft.toy_pool(D.ToyWorld(0), np.random.default_rng(3), 12, net.encode_pixels))
    rng = np.random.default_rng(0)
    drawn = [draw(rng) for _ in range(12)]
    drawn = [d for d in drawn if d[0].restore][:1] + [d for d in drawn if not d[0].restore][:1]
    assert [ex.restore for ex, _ in drawn] == [True, False]
    examples = [ex for ex, _ in drawn]
    pooled = sft.build_batch(examples, tok, net.encode_pixels, torch.Generator().manual_seed(0),
                             latents=[lat for _, lat in drawn])
    fresh = sft.build_batch(examples, tok, net.encode_pixels, torch.Generator().manual_seed(0))
    for a, b in zip(pooled, fresh):
        assert [type(x) for x in a] == [type(x) for x in b]
        for x, y in zip(a, b):
            if isinstance(x, M.VaeImage):
                torch.testing.assert_close(x.tokens, y.tokens, atol=1e-5, rtol=1e-5)
                assert x.t == y.t and (x.target is None) == (y.target is None)


def test_text_reason_sample_layout(world, tok):
    """Text-only reasoning (official TextReasonIterableDataset): its prompt, ViT image only, question, CoT with CE."""
    seq = sft.text_reason_sample(restore_example(world), tok)
    assert [type(s).__name__ for s in seq] == ["Text", "VitImage", "Text", "Text"]
    assert [s.loss for s in seq if isinstance(s, M.Text)] == [False, False, True]
    assert tok.decode(seq[0].ids) == D.VLM_THINK_SYSTEM_PROMPT
    cot = tok.decode(seq[-1].ids)
    assert cot.startswith("<think>") and cot.endswith("</answer>") and D.RESTORE_TOKEN not in cot


def test_official_response_split_keeps_whitespace():
    """parts[0] + token before the image, parts[1] after it, later tokens dropped, blank continuation omitted."""
    assert sft.split_response("<think>a</think>\n<image_restore>\n<think>b</think>") == (
        "<think>a</think>\n<image_restore>", "\n<think>b</think>")
    assert sft.split_response("x<image_restore>y<image_restore>z") == ("x<image_restore>", "y")
    assert sft.split_response("<think>a</think><answer>b</answer>") is None

def test_restore_sample_noises_its_target_with_the_flow_path(world, tok):
    """The restore target is one noised copy of the clean latent, recovered from the sample itself: with noise = v + x0,
    x_t = (1 - t) x0 + t noise for one t per picture; over 300 samples t follows the shifted logit-normal (shift 3:
    undoing the shift and the sigmoid gives standard normals) and the noise is standard normal; the generator alone
    decides the draws. The clean context (item 7) is x0 itself at t = 0."""
    ex = restore_example(world)
    x0 = torch.linspace(-2, 2, 16 * 64).view(16, 64)
    degraded = (torch.zeros(16, 64), (4, 4))
    ts, noises = [], []
    for seed in range(300):
        seq = sft.clear_sample(ex, tok, degraded, (x0, (4, 4)), torch.Generator().manual_seed(seed), shift=3.0)
        noised, clean = seq[5], seq[6]
        assert noised.target is not None and clean.target is None and clean.t == 0 and torch.equal(clean.tokens, x0)
        t, noise = float(noised.t), noised.target + x0
        torch.testing.assert_close(noised.tokens, (1 - t) * x0 + t * noise, atol=1e-5, rtol=1e-5)
        ts.append(t)
        noises.append(noise)
    t = torch.tensor(ts, dtype=torch.float64)
    z = torch.logit(t / (3 - 2 * t)).sort().values
    cdf = 0.5 * (1 + torch.erf(z / 2 ** 0.5))
    n = len(z)
    assert float(torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()) < 0.12
    noise = torch.stack(noises)
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02
    assert len(set(ts)) == 300  # a fresh t for every sample
    again = sft.clear_sample(ex, tok, degraded, (x0, (4, 4)), torch.Generator().manual_seed(299), shift=3.0)[5]
    assert again.t == ts[-1] and torch.equal(again.tokens, seq[5].tokens)


def test_clear_sample_refuses_what_it_cannot_train_and_drops_a_blank_continuation(world, tok):
    """No response, or a restore without a clean picture (or its latent), is a clear error; a restore turn with nothing
    after <image_restore> but whitespace ends with the clean context (official: a blank parts[1] is not added)."""
    ex = restore_example(world)
    latent = (torch.zeros(16, 64), (4, 4))
    with pytest.raises(ValueError, match="no response"):
        sft.clear_sample(replace(ex, response=""), tok, latent, latent, torch.Generator())
    with pytest.raises(ValueError, match="no clean image"):
        sft.clear_sample(replace(ex, clean=None), tok, latent, latent, torch.Generator())
    with pytest.raises(ValueError, match="no clean image"):
        sft.clear_sample(ex, tok, latent, None, torch.Generator())
    blank = replace(ex, response="<think>lost</think>\n<image_restore>\n  ")
    seq = sft.clear_sample(blank, tok, latent, latent, torch.Generator().manual_seed(0))
    assert [type(s).__name__ for s in seq] == ["Text", "VaeImage", "VitImage", "Text", "Text", "VaeImage", "VaeImage",
                                              "VitImage"]
    assert tok.decode(seq[4].ids) == "<think>lost</think>\n<image_restore>"


def test_without_distillation_the_clean_picture_is_plain_context(world, tok):
    """distill=False (sft.py's default): items 7-8 are the clean latent and the clean picture through the standard ViT
    transform, with no distillation pair."""
    seq = sft.build_batch([restore_example(world)], tok, fake_encode([]), torch.Generator().manual_seed(0))[0]
    student, vit = seq[6], seq[7]
    assert student.pair is None and vit.pair is None and student.t == 0
    assert vit.pixels.shape[1:] == (D.MODEL_SIZE, D.MODEL_SIZE)


def finetune_args(init, out, *extra):
    pool = [] if "--data" in extra else ["--examples", "24"]  # a small toy pool keeps the runs fast
    return sft.parse_config(["--init", str(init), "--out", str(out), "--steps", "4", "--lr", "1e-3",
                             "--tokens-per-step", "400", "--eval-n", "0", "--save-every", "2", "--warmup", "1",
                             "--threads", "1", *pool, *extra])


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.with_name(out.name + ".log.jsonl").read_text().splitlines()]


def test_sft_loss_normalisation():
    """CE and MSE are sums over tokens divided by global counts; weights scale each term."""
    out = M.TrainOutput(ce=torch.tensor([1.0, 3.0]), mse=torch.tensor([2.0]), v=torch.zeros(0), hidden=torch.zeros(0))
    loss, ce, mse = sft.sft_loss(out, 4.0, 2.0, ce_weight=1.0, mse_weight=0.5)
    assert float(ce) == 1.0 and float(mse) == 1.0 and float(loss) == 1.5


def test_sft_loss_by_hand():
    """ce_weight * sum(ce) / n_ce + mse_weight * sum(mse) / n_mse, with the global counts given (here 3 CE tokens over
    all ranks, 2 of them local); the terms come back unweighted, gradients reach both, and a batch without a restore
    target (no MSE tokens anywhere: n_mse 0) has an MSE term of 0, not NaN."""
    ce, mse = torch.tensor([2.0, 4.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    loss, c, m = sft.sft_loss(M.TrainOutput(ce=ce, mse=mse, v=torch.zeros(0), hidden=torch.zeros(0)), 3.0, 1.0,
                              ce_weight=2.0, mse_weight=0.1)
    assert float(c.detach()) == 2.0 and float(m.detach()) == 3.0 and float(loss.detach()) == pytest.approx(4.3)
    loss.backward()
    assert ce.grad.tolist() == pytest.approx([2 / 3, 2 / 3]) and mse.grad.tolist() == pytest.approx([0.1])
    loss, c, m = sft.sft_loss(M.TrainOutput(ce=torch.tensor([1.0, 2.0]), mse=torch.zeros(0), v=torch.zeros(0),
                                            hidden=torch.zeros(0)), 2.0, 0.0, 1.0, 1.0)
    assert float(m) == 0.0 and float(loss) == 1.5


def test_resume_reproduces_the_loss_curve(toy_ckpt, tmp_path, monkeypatch):
    """Killed after its step-2 checkpoint and resumed, a run logs exactly the losses of an uninterrupted run."""
    sft.train(finetune_args(toy_ckpt, tmp_path / "a"))
    straight = [r["loss"] for r in log_of(tmp_path / "a")]

    real = sft.batches

    def dying(*a, **k):
        fn, steps = real(*a, **k), []

        def batch(rng, gen):
            steps.append(len(steps))
            if len(steps) == 4:  # the fourth step, after the step-2 checkpoint
                raise KeyboardInterrupt("simulated kill")
            return fn(rng, gen)
        return batch

    monkeypatch.setattr(sft, "batches", dying)
    with pytest.raises(KeyboardInterrupt):
        sft.train(finetune_args(toy_ckpt, tmp_path / "b"))
    monkeypatch.setattr(sft, "batches", real)
    assert json.loads((tmp_path / "b" / "train_state" / "state.json").read_text())["step"] == 2
    sft.train(finetune_args(toy_ckpt, tmp_path / "b", "--resume"))
    resumed = [r["loss"] for r in log_of(tmp_path / "b")]
    assert resumed == straight and len(straight) == 4, (resumed, straight)
    a, b = CK.load_pretrained(tmp_path / "a"), CK.load_pretrained(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_refuses_wrong_checkpoints(toy_ckpt, tmp_path):
    """--resume on a folder without train_state, or written by another stage, stops with a clear message."""
    with pytest.raises(FileNotFoundError, match="train_state"):
        sft.train(finetune_args(toy_ckpt, toy_ckpt, "--resume"))
    sft.train(finetune_args(toy_ckpt, tmp_path / "a", "--steps", "2"))
    with pytest.raises(ValueError, match="stage 'sft'"):
        sft.train(finetune_args(toy_ckpt, tmp_path / "a", "--resume"), "bridge")


def test_resume_refuses_changed_settings_and_names_each(toy_ckpt, tmp_path, capsys):
    """--resume continues the run saved in --out: changed --seed, --lr, --tokens-per-step and --init are refused in one
    message naming each with its saved and new value; --steps (extending the run), --save-every and --threads may
    change; --resume-force continues on purpose and prints what changed; it means nothing without --resume."""
    out, other = tmp_path / "a", tmp_path / "other"
    sft.train(finetune_args(toy_ckpt, out, "--steps", "2", "--tokens-per-step", "200"))
    with pytest.raises(CK.InputError) as e:
        sft.train(finetune_args(other, out, "--steps", "2", "--resume", "--seed", "1", "--lr", "2e-3"))
    for words in ("--seed 0 -> 1", "--lr 0.001 -> 0.002", "--tokens-per-step 200 -> 400",
                  f"--init {str(toy_ckpt)!r} -> {str(other)!r}"):
        assert words in str(e.value), (words, str(e.value))
    assert "--steps" not in str(e.value) and "--resume-force" in str(e.value)
    capsys.readouterr()
    sft.train(finetune_args(toy_ckpt, out, "--resume", "--steps", "3", "--save-every", "3", "--threads", "2",
                               "--tokens-per-step", "200", "--seed", "1", "--resume-force"))
    printed = [line for line in capsys.readouterr().out.splitlines() if "changed settings" in line]
    assert len(printed) == 1 and printed[0].endswith("changed settings: --seed 0 -> 1"), printed
    assert [r["step"] for r in log_of(out)] == [1, 2, 3]
    with pytest.raises(SystemExit):
        finetune_args(toy_ckpt, out, "--resume-force")


def test_data_goes_with_images(capsys):
    """--data without --images (or the reverse) stops before any work: the JSONL's paths are relative to --images."""
    for argv in (["--data", "d.jsonl"], ["--images", "pictures"]):
        with pytest.raises(SystemExit) as e:
            sft.parse_config(argv)
        assert e.value.code == 2 and "--data and --images go together" in capsys.readouterr().err


def test_sft_on_jsonl_skips_broken_pictures_and_says_so(toy_ckpt, tmp_path, capsys):
    """Rows whose picture is truncated or too small are dropped when the file is read (the old reader let a truncated
    JPEG through to crash the step that drew it) and the run prints how many and why, then trains on the rest."""
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:600])
    Image.new("RGB", (8, 8)).save(tmp_path / "dot.png")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"image": f, "question": "What colour?", "answer": "red"}) + "\n"
                            for f in ("ok.jpg", "cut.jpg", "dot.png", "cut.jpg")))
    sft.train(finetune_args(toy_ckpt, tmp_path / "out", "--data", str(data), "--images", str(tmp_path), "--steps", "2",
                               "--tokens-per-step", "200"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(str(data)))
    assert line.startswith(f"{data}: 1 rows used, 3 skipped (first: line 2: unusable image") and "8x8 pixels" in line
    assert len(log_of(tmp_path / "out")) == 2


def test_resume_after_a_kill_between_the_renames_of_a_save(toy_ckpt, tmp_path, monkeypatch, capsys):
    """Killed after moving its step-2 checkpoint aside and before renaming the step-4 one into place (the old code then
    left no --out, and --resume said to start without it), the run resumes from the newest complete copy, says so, and
    holds the weights of an uninterrupted run."""
    sft.train(finetune_args(toy_ckpt, tmp_path / "a"))
    renames, real = [], os.replace

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 3:  # the step-2 save renames once, the step-4 save moves the old copy aside, then this
            raise KeyboardInterrupt("killed between the renames")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        sft.train(finetune_args(toy_ckpt, tmp_path / "b"))
    monkeypatch.setattr(os, "replace", real)
    assert not (tmp_path / "b").exists()
    capsys.readouterr()
    sft.train(finetune_args(toy_ckpt, tmp_path / "b", "--resume"))
    assert "recovered the newest complete copy" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.log.jsonl", "b", "b.log.jsonl", "cache"]
    a, b = CK.load_pretrained(tmp_path / "a"), CK.load_pretrained(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, ckpt, out, cwd) -> subprocess.CompletedProcess:
    """Launch tests/<script> on 2 CPU processes (gloo) the way torchrun does; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / script), str(ckpt), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_ddp_two_processes_on_gloo(toy_ckpt, tmp_path):
    """torchrun-style launch of 2 CPU processes (gloo): both ranks train on their own data and stay in sync."""
    proc = torchrun("ddp_check.py", toy_ckpt, tmp_path / "ddp", tmp_path)
    assert "ranks in sync" in proc.stdout
    assert (tmp_path / "ddp" / "ema.safetensors").exists()


def test_fsdp_two_processes_on_gloo(toy_ckpt, tmp_path):
    """--fsdp: meta-device build, sharded load from rank 0, FSDP2 steps with distillation, gathered atomic save."""
    proc = torchrun("fsdp_check.py", toy_ckpt, tmp_path / "fsdp", tmp_path)
    assert "fsdp saved and reloaded" in proc.stdout


def test_packing_fills_the_token_budget_in_bounded_rows(toy_ckpt, toy_tok):
    """A step's batch holds at least --tokens-per-step tokens (counted before condition dropout, switched off here),
    each row at most --row-tokens (a longer sample gets its own row), and every sample is packed whole."""
    model = CK.load_pretrained(toy_ckpt)
    cfg = sft.parse_config(["--init", str(toy_ckpt), "--tokens-per-step", "900", "--row-tokens", "300",
                                "--text-dropout", "0", "--vit-dropout", "0"])
    draw = sft.pool_draw(sft.toy_pool(D.ToyWorld(0), np.random.default_rng(0), 24, model.encode_pixels))
    batch = sft.batches(cfg, model.cfg, toy_tok, model.encode_pixels, draw, "cpu")
    packed = batch(np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert sum(packed.sample_lens) >= 900
    for r in range(packed.rows):
        used = sum(n for row, s, _, n, mode in packed.splits if row == r and mode != "pad")
        members = {s for row, s, *_ in packed.splits if row == r and s >= 0}
        assert used <= 300 or len(members) == 1


def test_replay_samples_are_stage0_restore_edits_of_their_own_example(toy_ckpt, toy_tok):
    """--replay (difference 6): the sample is Stage 0's restore edit of the drawn example, its noised target that
    example's clean latent (x0 = x_t - t v); the pool encodes every clean picture for it, not only restoring ones."""
    model = CK.load_pretrained(toy_ckpt)
    pool = [sft.pool_draw(sft.toy_pool(D.ToyWorld(0), np.random.default_rng(0), 12, model.encode_pixels, every_clean=e))
            for e in (False, True)]
    drawn = [[draw(np.random.default_rng(i)) for i in range(12)] for draw in pool]
    assert any(clean is None for _, (_, clean) in drawn[0]) and all(clean is not None for _, (_, clean) in drawn[1])
    ex, ((d0, grid), (c0, _)) = next(d for d in drawn[1] if not d[0].restore)
    seq = sft.replay_sample(ex, ((d0, grid), (c0, grid)), toy_tok, torch.Generator().manual_seed(0), 3.0)
    assert [type(s).__name__ for s in seq] == ["VaeImage", "VitImage", "Text", "VaeImage"]
    assert (torch.equal(seq[0].tokens, d0) and seq[0].target is None and
            toy_tok.decode(seq[2].ids) == "Restore this picture.")
    target = seq[3]
    assert target.target is not None and not target.droppable and 0 < target.t < 1
    torch.testing.assert_close(target.tokens - target.t * target.target, c0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text,replay,ce,mse", [("0", "1", False, True), ("1", "0", True, False)])
def test_each_drawn_example_becomes_one_kind_of_sample(toy_ckpt, toy_tok, text, replay, ce, mse):
    """--text-reason-rate and --replay share the drawn examples: all text-only reasoning trains CE and no velocity,
    all replay trains velocity and no CE (an edit has no answer)."""
    model = CK.load_pretrained(toy_ckpt)
    cfg = sft.parse_config(["--init", str(toy_ckpt), "--tokens-per-step", "300", "--text-reason-rate", text,
                                "--replay", replay, "--text-dropout", "0", "--vit-dropout", "0"])
    pool = sft.toy_pool(D.ToyWorld(0), np.random.default_rng(0), 12, model.encode_pixels, every_clean=True)
    draw = sft.pool_draw(pool)
    packed = sft.batches(cfg, model.cfg, toy_tok, model.encode_pixels, draw, "cpu")(np.random.default_rng(0),
                                                                              torch.Generator().manual_seed(0))
    assert (packed.ce_idx.numel() > 0) == ce and (int(packed.mse_mask.sum()) > 0) == mse


def test_replay_flag_is_checked(capsys):
    """--replay is a toy-world share of the samples: refused with --data, and with --text-reason-rate above 1 in sum."""
    for argv, words in ((["--data", "x.jsonl", "--images", "d", "--replay", "0.1"],
                         "--replay has no effect with --data"),
                        (["--text-reason-rate", "0.5", "--replay", "0.6"], "is above 1")):
        with pytest.raises(SystemExit) as e:
            sft.parse_config(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err


# recorded with data.RESTORE_THRESHOLD 0.5 and six colours
GOLDEN_SFT = [7.688106060028076, 7.665302276611328, 7.529972076416016, 7.50086784362793, 7.5305657386779785]


@pytest.mark.golden
def test_golden_losses_of_a_tiny_sft_run(toy_ckpt, tmp_path):
    """The first five losses of a fixed tiny run equal the recorded ones (llm.c-style): a change that moves them is a
    behaviour change and must say so (and record the new values)."""
    cfg = sft.parse_config(["--init", str(toy_ckpt), "--out", str(tmp_path / "sft"), "--steps", "5",
                            "--tokens-per-step", "600", "--eval-n", "0", "--warmup", "1", "--threads", "1",
                            "--lr", "1e-3", "--examples", "24"])
    sft.train(cfg)
    assert [r["loss"] for r in log_of(tmp_path / "sft")] == pytest.approx(GOLDEN_SFT, rel=1e-4, abs=1e-7)


def test_toy_base_is_cached_by_its_settings(toy_ckpt, tmp_path, monkeypatch):
    """out/base is reused only by a run with the settings it was built with; another --seed / --world-seed /
    --base-steps is refused with both settings named, before any training."""
    import shutil
    monkeypatch.chdir(tmp_path)
    shutil.copytree(toy_ckpt, tmp_path / "out" / "base")
    meta = json.loads((tmp_path / "out" / "base" / "nanoclear.json").read_text())
    meta["args"] = {"seed": 0, "world_seed": 0, "steps": 1300}
    (tmp_path / "out" / "base" / "nanoclear.json").write_text(json.dumps(meta))
    cfg = sft.parse_config(["--world-seed", "1", "--eval-n", "0", "--threads", "1"])
    with pytest.raises(CK.InputError, match="built with --seed 0 --world-seed 0 --base-steps 1300, this run asks for "
                                           "--seed 0 --world-seed 1 --base-steps 1300"):
        sft.train(cfg)


def test_missing_base_is_copied_from_the_shipped_one(tmp_path, monkeypatch):
    """No --init and no out/base: the shipped toy base is copied in, file for file, as a complete checkpoint."""
    import pretrain
    monkeypatch.chdir(tmp_path)
    cfg = sft.parse_config(["--eval-n", "0", "--threads", "1"])
    model, tok, init = sft.load_start(cfg, C.setup_run(threads=1, quiet=True))
    assert init == sft.BASE and CK.has_checkpoint(init) and (Path(init) / CK.MARKER).exists()
    for f in pretrain.SHIPPED.iterdir():
        assert (Path(init) / f.name).read_bytes() == f.read_bytes()
    assert torch.equal(model.state_dict()["vae.encoder.conv_in.weight"],
                       CK.load_pretrained(pretrain.SHIPPED).state_dict()["vae.encoder.conv_in.weight"])


def test_stage2_reads_the_pool_stage1_made(toy_ckpt, tmp_path, monkeypatch):
    """The toy pool is made once and read back by a later run with the same settings and autoencoder (Stage 2 after
    Stage 1); other settings or another autoencoder make their own."""
    model = CK.load_pretrained(toy_ckpt)
    made = []

    def make():
        made.append(1)
        return sft.toy_pool(D.ToyWorld(0), np.random.default_rng([0, 0, 6]), 6, model.encode_pixels)
    key = sft.pool_key(model, 0, 0, 6, False)
    first, hit = C.cached(tmp_path / "pool.pkl", key, make)
    again, hit2 = C.cached(tmp_path / "pool.pkl", key, make)
    assert (hit, hit2, len(made)) == (False, True, 1)
    assert [ex.question for ex, _ in again] == [ex.question for ex, _ in first]
    assert all(torch.equal(a[1][0][0], b[1][0][0]) and np.array_equal(np.asarray(a[0].degraded),
                                                                     np.asarray(b[0].degraded))
               for a, b in zip(first, again))
    keys = {sft.pool_key(model, *settings) for settings in ((0, 1, 6, False), (1, 0, 6, False), (0, 0, 7, False),
                                                            (0, 0, 6, True))}
    with torch.no_grad():
        model.vae.encoder.conv_in.weight[0, 0, 0, 0] += 1
    assert len(keys | {key, sft.pool_key(model, 0, 0, 6, False)}) == 6


def test_cached_makes_again_after_a_new_key_or_a_broken_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pkl"
    assert C.cached(path, "a", lambda: 1) == (1, False)
    assert C.cached(path, "a", lambda: 2) == (1, True)
    assert C.cached(path, "b", lambda: 3) == (3, False)  # a new key replaces the file
    assert C.cached(path, "a", lambda: 4) == (4, False)
    path.write_bytes(b"\x80\x05 not a pickle")  # a file another program or a disk error left
    assert C.cached(path, "a", lambda: 5) == (5, False)
    assert C.cached(path, "a", lambda: 6) == (5, True)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pkl"]  # no temporary file left behind

    def broken_dump(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(C.pickle, "dump", broken_dump)  # a full disk while writing: the error, and no partial file
    with pytest.raises(OSError, match="No space"):
        C.cached(path, "c", lambda: 7)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pkl"] and C.cached(path, "a", lambda: 8) == (5, True)


def test_sft_refuses_an_out_it_would_destroy_and_table_flags_without_a_table(toy_ckpt, tmp_path, capsys):
    """--out holding other files (a save replaced it, deleting them), a file (a traceback after training) or --init
    itself stops before any work and leaves it as it was; a summary-table flag with --eval-n 0 does nothing and is
    refused, and so is --fsdp in a single process."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for out, words in ((tmp_path / "mine", "holds no checkpoint"), (tmp_path / "file", "is a file"),
                       (toy_ckpt, "is --init")):
        with pytest.raises(CK.InputError, match=words):
            sft.train(finetune_args(toy_ckpt, out))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"
    assert not (tmp_path / "mine.log.jsonl").exists() and not (tmp_path / "file.log.jsonl").exists()
    for argv, words in ((["--eval-n", "0", "--denoise-steps", "5"], "--denoise-steps has no effect with --eval-n 0"),
                        (["--fsdp"], "launch with torchrun")):  # --fsdp in one process stopped after the data was read
        with pytest.raises(SystemExit) as e:
            sft.parse_config(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_teacher_patches_align_with_vae_tokens_cell_by_cell(net):
    """In a restore sample, ViT patch n of the teacher covers the same picture cell as latent token n of the student."""
    cfg = net.cfg
    grid = (3, 4)
    side = cfg.latent_downsample
    cells = np.arange(12).reshape(grid) * 20  # a distinct grey level per latent cell
    picture = Image.fromarray(np.kron(cells, np.ones((side, side))).astype(np.uint8)).convert("RGB")
    w, h = sft.teacher_size(grid, cfg.vit_patch_size)
    teacher = M.patchify(D.image_to_tensor(picture, (w, h)), cfg.vit_patch_size)
    assert teacher.shape[0] == grid[0] * grid[1]
    means = (teacher.mean(1) * 0.5 + 0.5) * 255
    assert np.allclose(means.numpy(), cells.flatten(), atol=12)


def test_distill_pair_is_the_clean_picture_twice_on_one_grid(net):
    """The pair: the clean latent itself as a t = 0 VAE block (student) and the clean picture as ViT patches on the
    VAE token grid (teacher), both carrying pair id 0; for a 2 x 3 grid with 8 px patches the teacher is 24 x 16 px,
    and its patch n covers latent cell n."""
    cfg = net.cfg
    assert sft.teacher_size((2, 3), 8) == (24, 16) and sft.teacher_size((5, 1), 14) == (14, 70)
    side = cfg.latent_downsample
    cells = np.arange(6).reshape(2, 3) * 40
    picture = Image.fromarray(np.kron(cells, np.ones((side, side))).astype(np.uint8)).convert("RGB")
    x0 = torch.randn(6, cfg.patch_latent_dim, generator=torch.Generator().manual_seed(0))
    student, teacher = sft.distill_pair(picture, x0, (2, 3), cfg.vit_patch_size)
    assert isinstance(student, M.VaeImage) and isinstance(teacher, M.VitImage)
    assert student.pair == teacher.pair == 0 and student.t == 0 and student.target is None
    assert torch.equal(student.tokens, x0) and student.grid == (2, 3)
    P = cfg.vit_patch_size
    assert teacher.pixels.shape == (3, 2 * P, 3 * P)
    means = (M.patchify(teacher.pixels, P).mean(1) * 0.5 + 0.5) * 255
    assert np.allclose(means.numpy(), cells.flatten(), atol=12)


def test_resume_after_a_full_disk_cut_the_last_log_line(toy_ckpt, tmp_path, capsys):
    """A crash (a full disk) in the middle of a log write leaves a partial last line: --resume drops it with a warning
    and continues (it raised JSONDecodeError), and the log holds whole records only."""
    out = tmp_path / "run"
    sft.train(finetune_args(toy_ckpt, out, "--steps", "1", "--tokens-per-step", "100"))
    log = out.with_name("run.log.jsonl")
    log.write_text(log.read_text() + '{"step": 2, "loss": 1.2')  # the write the crash cut short
    capsys.readouterr()
    sft.train(finetune_args(toy_ckpt, out, "--steps", "2", "--tokens-per-step", "100", "--resume"))
    assert "line 2 was cut short" in capsys.readouterr().err
    assert [r["step"] for r in log_of(out)] == [1, 2]


# ----------------------------------------------------------------------------------------------------------------------
# Real data: the official defaults of --recipe without extra flags


def real(module, *argv):
    return module.parse_config(["--init", "path/to/BAGEL-7B-MoT", "--data", "sft.jsonl", "--images", "pics", *argv])


def test_real_data_takes_the_official_values_of_its_recipe():
    """With --data every default is the official value of --recipe (train_mix.sh at HEAD / the release): prompt,
    steps, warmup, lr and its floor, weight decay, EMA, token budget, no pure-text samples, no toy replay; a flag given
    keeps its value; the toy world keeps its own, and bridge.py takes the recipe's distillation on both."""
    def values(c):
        return (c.system, c.steps, c.warmup, c.lr, c.min_lr, c.weight_decay, c.ema, c.tokens_per_step,
                c.text_reason_rate, c.replay)
    official = ("official", 8000, 500, 1e-5, 1e-7, 0.01, 0.995, 30000, 0.0, 0.0)
    assert values(real(sft)) == official
    assert values(real(sft, "--recipe", "release")) == ("official", 600, 50, 1e-5, 1e-7, 0.0, 0.995, 30000, 0.0, 0.0)
    assert (real(sft, "--steps", "7", "--lr", "2e-5").steps, real(sft, "--lr", "2e-5").lr) == (7, 2e-5)
    assert real(sft, "--text-reason-rate", "0.1").text_reason_rate == 0.1
    toy = sft.parse_config(["--init", "no/such/folder"])
    assert values(toy) == ("official", 600, 30, 5e-4, 5e-5, 0.0, 0.99, 4096, 0.15, 0.2)  # no nanoclear.json there
    head, release = real(bridge), real(bridge, "--recipe", "release")
    assert values(head) == official and (head.distill_weight, head.distill_mode, head.distill_stride) == (
        0.4, "per_layer_kl", 1)
    assert (release.steps, release.distill_weight, release.distill_mode) == (600, 0.1, "final_mse")
    toy = bridge.parse_config(["--init", "no/such/folder", "--recipe", "release"])  # toy world: the distillation only
    assert (toy.steps, toy.lr, toy.distill_weight, toy.distill_mode) == (400, 2e-4, 0.1, "final_mse")


def test_the_prompt_follows_the_data_or_the_checkpoint(toy_ckpt, tmp_path):
    """--system: with --data the official prompt; else the one --init was trained with (the toy base: toy; a folder
    without nanoclear.json, BAGEL or CLEAR: official; one of ours: its args.system); no --init: the toy base's."""
    assert sft.parse_config([]).system == "toy" and sft.parse_config(["--init", str(toy_ckpt)]).system == "toy"
    assert sft.parse_config(["--init", str(tmp_path)]).system == "official"
    (tmp_path / "nanoclear.json").write_text('{"args": {"system": "official"}, "stage": "sft"}')
    assert bridge.parse_config(["--init", str(tmp_path)]).system == "official"
    assert sft.parse_config(["--init", str(toy_ckpt), "--system", "official"]).system == "official"


def test_real_data_refuses_toy_values_and_the_toy_world_a_recipe(capsys):
    """--system toy with --data stops with the reason; sft.py's --recipe picks real-data values only, so the toy world
    refuses it; final_mse reads no stride."""
    for module, argv, words in (
            (sft, ["--data", "d.jsonl", "--images", "p", "--system", "toy"],
             "the toy prompt describes the toy world's tags and rule; real data is trained and rolled out under the "
             "official INTERLEAVE_REASON_SYSTEM_PROMPT"),
            (sft, ["--recipe", "release"], "--recipe has no effect on the toy world"),
            (bridge, ["--recipe", "release", "--distill-stride", "2"], "--distill-stride has no effect with "
                                                                        "--distill-mode final_mse")):
        with pytest.raises(SystemExit) as e:
            module.parse_config(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_sft_help_names_the_official_values(capsys):
    """--help gives the toy and the official value (HEAD and release where they differ) of every scaled flag; bridge.py
    names its own toy defaults."""
    for module, toy_steps, toy_lr in ((sft, "600", "0.0005"), (bridge, "400", "0.0002")):
        with pytest.raises(SystemExit):
            module.parse_config(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for words in (f"optimiser steps (toy {toy_steps}; official 8000 at HEAD, 600 at the release; with --data the "
                      "recipe's)", f"(toy {toy_lr}; official 1e-5)", "(toy lr / 10; official 1e-7)",
                      "(toy 30; official 500 at HEAD, 50 at the release)", "(toy 0; official 0.01 at HEAD, 0 at the "
                      "release)", "(toy 0.99; official 0.995)", "(toy 4096; official 30000", "official 0: its main "
                      "mix corruption_mix.yaml has no pure-text set", "with --data 'official' "
                      "(INTERLEAVE_REASON_SYSTEM_PROMPT", "else the one --init was trained with",
                      "whose distillation is the default" if module is bridge else "the toy world keeps its own"):
            assert words in text, (module.__name__, words)


@pytest.mark.parametrize("script", ["sft", "bridge", "rl"])
def test_table_flags_behave_alike_in_every_stage(script, capsys):
    """The summary table runs on the toy world: --eval-n 0 is accepted everywhere, a table flag with --eval-n 0 or
    with --data is refused everywhere, and --data turns the table off."""
    module = {"sft": sft, "bridge": bridge, "rl": __import__("rl")}[script]
    data = ["--init", "some/folder", "--data", "d.jsonl", "--images", "p"]
    assert module.parse_config(["--eval-n", "0"]).eval_n == 0 and module.parse_config(data).eval_n == 0
    assert module.parse_config([*data, "--eval-n", "0"]).eval_n == 0
    for argv, words in ((["--eval-n", "0", "--eval-seed", "3"], "--eval-seed has no effect with --eval-n 0"),
                        ([*data, "--eval-n", "5"], "--eval-n has no effect with --data"),
                        ([*data, "--eval-seed", "3"], "--eval-seed has no effect with --data")):
        with pytest.raises(SystemExit) as e:
            module.parse_config(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_toy_pool_latents_own_their_memory(toy_ckpt):
    """A pooled latent is not a view into its chunk's batch (pickling one would write the whole batch)."""
    model = CK.load_pretrained(toy_ckpt)
    pool = sft.toy_pool(D.ToyWorld(0), np.random.default_rng(0), 6, model.encode_pixels, every_clean=True)
    for _, latents in pool:
        for tokens, _ in latents:
            assert tokens.untyped_storage().nbytes() == tokens.numel() * tokens.element_size()

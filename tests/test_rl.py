"""Interleaved GRPO (rl.py): rewards, advantages, losses, rollouts and their exact replay."""


import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint as CK
import data as D
import engine as E
import model as M
import rl
from conftest import tiny_cfg


def ex(answer="red", options=None):
    from PIL import Image
    return D.Example(Image.new("RGB", (8, 8)), "What colour?", answer, options=options)


def test_accuracy_reward_exact_letter_and_judge():
    """Exact/normalised match, A-D letters for MC, and a pluggable judge only for open answers."""
    assert rl.accuracy_reward("<think>x</think><answer> Red </answer>", ex()) == 1.0
    assert rl.accuracy_reward("<answer>blue</answer>", ex()) == 0.0
    mc = ex("B", {"A": "red", "B": "blue", "C": "green", "D": "pink"})
    assert rl.accuracy_reward("<answer>B</answer>", mc) == 1.0 and rl.accuracy_reward("<answer>(C)</answer>", mc) == 0.0
    judge = lambda q, pred, truth: 0.7 if pred == "crimson" else 0.0  # noqa: E731
    assert rl.accuracy_reward("<answer>crimson</answer>", ex(), judge) == 0.7
    assert rl.accuracy_reward("<answer>B</answer>", mc, judge) == 1.0  # MC never goes to the judge


def test_format_reward_parts():
    """0.35 think + 0.35 answer + 0.3 order, on the joined completion texts (official format_reward_v2)."""
    assert rl.format_reward(["<think>a</think>", "<answer>b</answer>"]) == pytest.approx(1.0)
    assert rl.format_reward(["<answer>b</answer>"]) == pytest.approx(0.35)
    assert rl.format_reward(["<think>a</think>"]) == pytest.approx(0.35)
    assert rl.format_reward(["<answer>b</answer><think>a</think>"]) == pytest.approx(0.7)
    assert rl.format_reward(["<think></think><answer></answer>"]) == pytest.approx(0.3)
    assert rl.format_reward(["plain"]) == 0.0


def test_decision_reward_table():
    """restored&correct 1.0, direct&correct 0.6, restored&wrong 0.4, direct&wrong -0.2 (smooth 1/.5/.5/-.2)."""
    assert [rl.decision_reward(r, c) for r, c in ((1, 1), (0, 1), (1, 0), (0, 0))] == [1.0, 0.6, 0.4, -0.2]
    assert [rl.decision_reward(r, c, True) for r, c in ((1, 1), (0, 1), (1, 0), (0, 0))] == [1.0, 0.5, 0.5, -0.2]


def test_latent_quality_reward():
    """1 for the clean latent itself, lower for noise, NaN without a generated image; weights 0.3/0.3/0.4."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(6, 8, generator=g)
    assert rl.latent_quality_reward(clean, clean) == pytest.approx(1.0)
    assert math.isnan(rl.latent_quality_reward(None, clean))
    noisy = rl.latent_quality_reward(torch.randn(6, 8, generator=g), clean)
    assert 0 <= noisy < 0.7
    opposite = rl.latent_quality_reward(-clean, clean)
    assert opposite == pytest.approx(0.3 * math.exp(-0.5 * float((2 * clean).pow(2).mean())))


def test_group_advantages_zero_mean():
    """Advantages are centred within each group; with scale they are also divided by the group std."""
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 0.0])
    a = rl.group_advantages(r, 4)
    assert torch.allclose(a.view(2, 4).mean(1), torch.zeros(2))
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, 0.0, 0.0]))
    s = rl.group_advantages(r, 4, scale=True)
    assert torch.allclose(s.view(2, 4).mean(1), torch.zeros(2), atol=1e-6)


def test_restore_gaps_only_where_the_group_disagrees():
    """Per group of 4: restored-minus-not accuracy where the rollouts disagree on restoring; None where they agree."""
    restored = [True, False, False, False, True, True, True, True, False, False, False, False, True, True, False, False]
    accuracy = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    gaps = rl.restore_gaps(restored, accuracy, 4)
    assert gaps[1] is None and gaps[2] is None
    assert [gaps[0], gaps[3]] == pytest.approx([1 - 1 / 3, 0.25 - 1.0])


def test_decision_gaps_split_groups_by_the_reference_answer():
    """A group's gap goes to the side of its question's reference answer: restoring or not (the rule SFT taught)."""
    def rollout(response, restored, acc):
        return rl.Rollout([], SimpleNamespace(restored=restored), SimpleNamespace(response=response),
                          parts={"accuracy": acc})
    ref_restores, ref_keeps = f"<think>a</think>\n{D.RESTORE_TOKEN}", "<think>a</think><answer>b</answer>"
    rollouts = [rollout(ref_restores, True, 1.0), rollout(ref_restores, False, 0.0),  # gap +1
                rollout(ref_keeps, True, 0.0), rollout(ref_keeps, False, 1.0),  # gap -1
                rollout(ref_keeps, True, 1.0), rollout(ref_keeps, True, 0.0)]  # agree: no gap
    assert rl.decision_gaps(rollouts, 2) == {"gaps_ref_restores": [1.0], "gaps_ref_keeps": [-1.0]}


def test_decision_signal_summarises_the_logged_gaps(tmp_path):
    log = tmp_path / "rl.log.jsonl"
    steps = [([1.0], [-0.5]), ([], []), ([0.5], [-1.0])]
    log.write_text("".join(json.dumps({"step": i + 1, "gaps_ref_restores": a, "gaps_ref_keeps": b}) + "\n"
                           for i, (a, b) in enumerate(steps)))
    line = rl.decision_signal(log, prompts=4)
    assert "in 4 of 12 groups" in line and "all (4): +0.0" in line
    assert "reference restores (2): +75.0" in line and "reference does not (2): -75.0" in line
    log.write_text(json.dumps({"step": 1, "gaps_ref_restores": [], "gaps_ref_keeps": []}) + "\n")
    assert "in 0 of 4 groups" in rl.decision_signal(log, prompts=4)


def test_text_loss_at_ratio_one_is_reinforce():
    """At ratio 1 and beta 0 the PPO-clip gradient equals the REINFORCE gradient -A * grad log p."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, generator=g, requires_grad=True)
    tokens = torch.tensor([1, 3, 0, 6, 2])
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3])
    logp = torch.log_softmax(logits, -1)[torch.arange(5), tokens]
    loss, clipped = rl.ppo_clip_loss(logp, logp.detach(), adv)
    (grad_ppo,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    (grad_pg,) = torch.autograd.grad((-adv * logp).sum(), logits)
    assert torch.allclose(grad_ppo, grad_pg) and clipped.sum() == 0
    big = rl.ppo_clip_loss(logp.detach() + 1.0, logp.detach(), torch.ones(5))[0]
    assert torch.allclose(big, torch.full((5,), -1.2))  # clipped at 1 + eps for positive advantages


def test_kl_k3_and_aggregation():
    """k3 is zero at equal log-probs and positive otherwise; grpo and dr_grpo normalise as documented."""
    lp = torch.tensor([-1.0, -2.0])
    assert torch.all(rl.kl_k3(lp, lp) == 0) and torch.all(rl.kl_k3(lp, lp - 0.5) > 0)
    per = torch.tensor([1.0, 3.0, 2.0])
    seq = torch.tensor([0, 0, 1])
    assert float(rl.aggregate(per, seq, 2, "grpo", 10)) == pytest.approx((2.0 + 2.0) / 2)
    assert float(rl.aggregate(per, seq, 2, "dr_grpo", 10)) == pytest.approx(6.0 / 20)


def test_flow_step_logprob_matches_sampler_for_t_above_blend(sde_step):
    """The training log-prob equals the rollout's recorded one for t >= 0.1 when the score stays within +-50."""
    x, v, x_next, mean, t, dt, sigma = sde_step(0.6, batch=1)
    torch.testing.assert_close(rl.flow_step_logprob(x, v, x_next, t, dt, sigma),
                               M.sde_step_logprob(x_next, mean, sigma, dt))


def test_choose_step_strategies():
    """Round robin follows the counter over a completion's candidates; random and weighted pick a valid one."""
    ts = list(np.linspace(1, 0.1, 8))
    assert [rl.choose_step(ts, "round_robin", c, None) for c in range(10)] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    rng = np.random.default_rng(0)
    picks = [rl.choose_step(ts, "weighted", 0, rng) for _ in range(400)]
    assert all(0 <= p < 8 for p in picks) and np.bincount(picks).argmax() in (4, 5)  # t nearest 0.5 is favoured
    assert 0 <= rl.choose_step(ts, "random", 0, rng) < 8


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return M.Bagel(tiny_cfg()).eval()


class ByteTok:
    """One token per character of a 60-letter alphabet; the CLEAR tags are plain text, as in the official tokenizer."""
    ALPHABET = "<>/_ abcdefghijklmnopqrstuvwxyz0123456789.,?!ABCDEFGHIJKLMNOP"

    def encode(self, s):
        return [self.ALPHABET.index(c) for c in s]

    def decode(self, ids):
        return "".join(self.ALPHABET[i] if i < len(self.ALPHABET) else "" for i in ids)


def rollout_args(**kw):
    return rl.RLConfig(max_text_tokens=6, sde_points=4, beta=0.0, loss_type="grpo", **kw)


def forced_restore_rollouts(policy, seed):
    """Rollouts whose first segment restores, so the image path (SDE, bridge, Flow-GRPO) is exercised."""
    cfg = policy.cfg
    g = torch.Generator().manual_seed(seed)
    prefix = [M.Text([5, 6]), M.VaeImage(torch.randn(4, cfg.patch_latent_dim, generator=g), (2, 2)),
              M.VitImage(torch.rand(3, 16, 16, generator=g) * 2 - 1), M.Text([7, 8, 9])]
    icfg = E.InferenceConfig(max_rounds=2, max_text_tokens=5, temperature=1.0, sampler="sde", num_timesteps=4,
                             force_restore=True, vit_transform=(16, 16, 8))
    traces = E.reason(policy, ByteTok(), [prefix] * 4, icfg, torch.Generator().manual_seed(seed))
    return [rl.Rollout(prefix, tr, ex()) for tr in traces]


def test_group_rollouts_differ_and_are_reproducible(policy):
    """The G rollouts of a group differ (own draws), and the same seed reproduces them exactly."""
    a, b = forced_restore_rollouts(policy, 3), forced_restore_rollouts(policy, 3)
    assert all(r.trace.restored for r in a)
    lat = [r.trace.latents[0] for r in a]
    assert not torch.allclose(lat[0], lat[1])
    assert all(torch.equal(x.trace.latents[0], y.trace.latents[0]) and x.trace.ids == y.trace.ids for x, y in zip(a, b))
    assert len({tuple(r.trace.ids[-1]) for r in a}) > 1


def test_replay_reproduces_rollout_logprobs(policy):
    """The training forward on the replayed context gives the sampler's own log-probs (text) and step log-probs
    (image)."""
    rollouts = forced_restore_rollouts(policy, 4)
    masks, samples = [], []
    for r in rollouts:
        seq, mask = rl.replay_sample(r, [[0, 1]], "bridge", policy)
        samples.append(seq)
        masks.append(mask)
    packed = M.pack(samples, policy.cfg)
    out = policy(packed)
    label_mask = torch.tensor([m for ms in masks for m in ms])
    replay = (-out.ce[label_mask]).tolist()
    recorded = rl.rollout_logps(rollouts)
    assert len(replay) == len(recorded) and np.allclose(replay, recorded, atol=1e-4)
    vs = out.v.split(packed.flow_lens)
    for k, (r, s) in enumerate((r, s) for r in rollouts for s in (0, 1)):
        st = r.trace.steps[0][s]
        lp = M.sde_step_logprob(st["x_next"][None],
                                M.sde_step_mean(st["x_t"][None], vs[k][None], st["t"], st["dt"], 0.3), 0.3, st["dt"])
        assert lp.item() == pytest.approx(float(st["logprob"]), abs=1e-3)


def test_grpo_loss_backward_reaches_text_and_denoiser(policy):
    """One Interleaved-GRPO loss: finite, and its gradient reaches lm_head (text) and llm2vae (Flow-GRPO)."""
    rollouts = forced_restore_rollouts(policy, 5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    args = rollout_args()
    policy.zero_grad()
    loss, stats, counter = rl.grpo_loss(policy, None, rollouts, adv, adv, args, 0, np.random.default_rng(0), policy)
    loss.backward()
    assert torch.isfinite(loss) and stats["logp_drift"] < 1e-3
    assert policy.llm2vae.weight.grad.abs().sum() > 0 and policy.language_model.lm_head.weight.grad.abs().sum() > 0
    policy.zero_grad()


# ----------------------------------------------------------------------------------------------------------------------
# Each equation pinned by a value worked out by hand


def test_kl_k3_direction_by_hand():
    """k3 = exp(ref - logp) - (ref - logp) - 1: at logp = -1, ref = -2 it is e^-1 (the other sign would give e - 2)."""
    assert float(rl.kl_k3(torch.tensor([-1.0]), torch.tensor([-2.0]))) == pytest.approx(np.exp(-1.0))


def test_ppo_clip_by_hand_both_signs():
    """-min(rho A, clip(rho, 1 - eps, 1 + eps) A): a negative advantage is clipped from below at 1 - eps."""
    old = torch.zeros(4)
    logp = torch.tensor([0.5, -0.5, 0.5, -0.5])
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    loss, clipped = rl.ppo_clip_loss(logp, old, adv, 0.2)
    assert loss.tolist() == pytest.approx([np.exp(0.5), 0.8, -1.2, -np.exp(-0.5)])
    assert clipped.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_latent_quality_by_hand():
    """0.3 exp(-0.5 MSE) + 0.3 max(cos, 0) + 0.4 mean max(token cos, 0): orthogonal tokens keep only the MSE part."""
    gen, clean = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert rl.latent_quality_reward(gen, clean) == pytest.approx(0.3 * np.exp(-0.5))


def test_rewards_by_hand():
    """accuracy: the judge gets the extracted answer (or the whole reply, stripped, when there is none) and its score is
    clipped to [0, 1]; format: the texts joined, <think> spanning lines counts; latent quality on two tokens:
    gen (1, 0), (1, 1) vs clean (1, 0), (0, 1): MSE 0.25, global cosine 2 / sqrt(6), token cosines 1 and 1 / sqrt(2);
    a token pointing away counts 0 in the token mean (not -1), the global cosine is clipped at 0 too; mse_scale scales
    the MSE; the longer latent is cut to the shorter."""
    asked = []
    judge = lambda q, pred, truth: asked.append((q, pred, truth)) or 1.7  # noqa: E731
    assert rl.accuracy_reward(" the red one \n", ex(), judge) == 1.0
    assert rl.accuracy_reward("<answer> maroon</answer>", ex(), lambda q, p, t: -0.3) == 0.0
    assert asked == [("What colour?", "the red one", "red")]
    assert rl.format_reward(["<think>a\nb</think>\n<image_restore>", "<answer>c</answer>"]) == pytest.approx(1.0)
    assert rl.format_reward(["</think><answer>b</answer>"]) == pytest.approx(0.35)  # no complete think; at 0: no order
    gen, clean = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    want = 0.3 * np.exp(-0.125) + 0.3 * 2 / np.sqrt(6) + 0.4 * (1 + 1 / np.sqrt(2)) / 2
    assert rl.latent_quality_reward(gen, clean) == pytest.approx(want)
    longer = torch.cat([gen, torch.full((3, 2), 9.0)])
    assert rl.latent_quality_reward(longer, clean) == pytest.approx(want)
    assert rl.latent_quality_reward(gen, clean, mse_scale=2.0) == pytest.approx(want - 0.3 * np.exp(-0.125)
                                                                               + 0.3 * np.exp(-0.5))
    away = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert rl.latent_quality_reward(away, torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(
        0.3 * np.exp(-0.5) + 0.4 * 0.5)
    assert rl.latent_quality_reward(-clean, clean) == pytest.approx(0.3 * np.exp(-1.0))
    assert math.isnan(rl.latent_quality_reward(gen, None))


def test_grpo_pieces_by_hand():
    """Advantages per group (rows [1, 0, 0.5, 0.5] and [1, 3, 0, 0]): centred; with scale divided by the unbiased group
    std + 1e-4 (a group of equal rewards gets 0, not NaN); groups of 2 split [1, 3, 0, 0] into [-1, 1] and [0, 0].
    PPO-clip inside the clip range is -rho A (ratio e^0.1, not clipped); k3 at a log-ratio of 1 is e^-1 - (-1) - 1."""
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    std = float(np.sqrt(0.5 / 3))
    assert rl.group_advantages(r, 4, scale=True).tolist() == pytest.approx(
        [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0, 0, 0, 0, 0, 0], abs=1e-6)
    assert rl.group_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2).tolist() == [-1.0, 1.0, 0.0, 0.0]
    loss, clipped = rl.ppo_clip_loss(torch.tensor([0.1, -0.1]), torch.zeros(2), torch.tensor([1.0, 2.0]), 0.2)
    assert loss.tolist() == pytest.approx([-np.exp(0.1), -2 * np.exp(-0.1)]) and clipped.tolist() == [0.0, 0.0]
    assert float(rl.kl_k3(torch.tensor([-2.0]), torch.tensor([-1.0]))) == pytest.approx(np.exp(1.0) - 2)
    per = torch.tensor([1.0, 3.0, 2.0, 4.0], requires_grad=True)
    seq = torch.tensor([0, 0, 1, 2])
    out = rl.aggregate(per, seq, 3, "grpo", 7)  # (2 + 2 + 4) / 3
    assert float(out.detach()) == pytest.approx(8 / 3)
    out.backward()
    assert per.grad.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 3, 1 / 3])
    assert float(rl.aggregate(per.detach(), seq, 3, "dr_grpo", 7)) == pytest.approx(10 / 21)


GOLDEN_RL = [(0.0, 0.5), (0.0039069876074790955, 0.5), (0.025392236188054085, 0.75),  # recorded with the head recipe,
             (0.023439759388566017, 0.75), (0.001954656559973955, 0.5)]  # the 4x4-token toy preset and six colours


@pytest.mark.golden
def test_golden_losses_of_a_tiny_rl_run(toy_ckpt, tmp_path, monkeypatch):
    """The first five (loss, restore rate) of a fixed tiny `python rl.py` run equal the recorded ones. The untrained
    fixture never writes a tag, so a deterministic stand-in reward and restore rule make the groups differ and the
    image path (SDE rollouts, bridge, Flow-GRPO) run."""
    monkeypatch.setattr(D, "requests_restore", lambda text: len(text) % 2 == 0)
    monkeypatch.setattr(rl, "accuracy_reward", lambda reply, example, judge=None: float(len(reply) % 3) / 2)
    rl.main(["--init", str(toy_ckpt), "--out", str(tmp_path / "rl"), "--steps", "5", "--prompts", "2", "--group", "2",
             "--max-text-tokens", "6", "--sde-points", "3", "--eval-n", "0", "--threads", "1", "--lr", "1e-3"])
    log = [json.loads(line) for line in (tmp_path / "rl.log.jsonl").read_text().splitlines()]
    assert [r["restore"] for r in log] == [r for _, r in GOLDEN_RL]
    assert [r["loss"] for r in log] == pytest.approx([loss for loss, _ in GOLDEN_RL], rel=1e-4, abs=1e-7)


def test_flow_step_logprob_head_by_hand():
    """HEAD (trainer.py:1019-1035 @411d6bd): below t = 0.1 the score is blended toward (1 - t) v, then clamped at
    +-50. sigma = 1, dt = 0.5, t = 0.05, so the blend weight is t / 0.1 = 0.5 and the variance sigma^2 dt = 0.5.
      element 1, x = 0.1, v = 1: (x + 0.95 v) / 0.05 = 21, blend 0.5 * 0.95 + 0.5 * 21 = 10.975 (under 50),
        mean = 0.1 - (1 + 10.975 / 2) * 0.5 = -3.14375; x' = mean + 0.5: squared error / variance = 0.5
      element 2, x = v = 10: (10 + 9.5) / 0.05 = 390, blend 0.5 * 9.5 + 0.5 * 390 = 199.75, clamped to 50,
        mean = 10 - (10 + 25) * 0.5 = -7.5; x' = mean + 1: 1 / 0.5 = 2
      log p = -mean(0.5, 2) / 2 = -0.625. (Clamping before the blend gives element 2 a score of 29.75; no blend 390.)"""
    x, v, x_next = torch.tensor([[0.1, 10.0]]), torch.tensor([[1.0, 10.0]]), torch.tensor([[-2.64375, -6.5]])
    head = rl.TRAINING_SCORE["head"]
    assert float(rl.flow_step_logprob(x, v, x_next, 0.05, 0.5, 1.0, **head)) == pytest.approx(-0.625)
    assert float(rl.flow_step_logprob(x, v, x_next, 0.05, 0.5, 1.0)) == pytest.approx(-0.625)  # the default
    # t = 0: weight 0, t' = t_min = 1e-4, and the score uses (1 - t') v: with x = 0, v = 1e-5 it is 0.09999
    # ((1 - t) v would give 0.1); mean = -(1e-5 + 0.09999 / 2) * 0.5 = -0.0250025; x' = mean + 0.5: log p = -0.25
    x, v = torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 1e-5, dtype=torch.float64)
    x_next = torch.full((1, 1), 0.4749975, dtype=torch.float64)
    assert float(rl.flow_step_logprob(x, v, x_next, 0.0, 0.5, 1.0, **head)) == pytest.approx(-0.25, rel=1e-9)


def test_flow_step_logprob_release_by_hand():
    """Release (trainer.py:1017-1022 @a65d61f): no blend, t' = max(t, 1e-6), clamp at +-100. The same x, v, t, sigma,
    dt as the HEAD test: element 1 keeps the score 21, mean = 0.1 - (1 + 10.5) * 0.5 = -5.65, x' = mean + 0.5;
    element 2: 390 clamped to 100, mean = 10 - (10 + 50) * 0.5 = -20, x' = mean + 1; log p = -(0.5 + 2) / 4 = -0.625.
    The HEAD score on these x' gives another value."""
    x, v, x_next = torch.tensor([[0.1, 10.0]]), torch.tensor([[1.0, 10.0]]), torch.tensor([[-5.15, -19.0]])
    release = rl.TRAINING_SCORE["release"]
    assert float(rl.flow_step_logprob(x, v, x_next, 0.05, 0.5, 1.0, **release)) == pytest.approx(-0.625)
    assert float(rl.flow_step_logprob(x, v, x_next, 0.05, 0.5, 1.0)) != pytest.approx(-0.625, abs=0.1)
    # t = 0: t' = 1e-6, score (1 - 1e-6) * 1e-5 / 1e-6 = 9.99999, mean = -(1e-5 + 9.99999 / 2) * 0.5 = -2.5000025
    x, v = torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 1e-5, dtype=torch.float64)
    x_next = torch.full((1, 1), -2.0000025, dtype=torch.float64)
    assert float(rl.flow_step_logprob(x, v, x_next, 0.0, 0.5, 1.0, **release)) == pytest.approx(-0.25, rel=1e-9)


def test_release_recipe_scores_with_the_release_form(policy, monkeypatch):
    """grpo_loss hands flow_step_logprob the preset's score form (--recipe release: t_min 1e-6, no blend, +-100)."""
    seen = []
    real = rl.flow_step_logprob
    monkeypatch.setattr(rl, "flow_step_logprob", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    rollouts = forced_restore_rollouts(policy, 5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rl.grpo_loss(policy, None, rollouts, adv, adv, rollout_args(recipe="release"), 0, np.random.default_rng(0), policy)
    assert seen and all(kw == dict(t_min=1e-6, blend_below=0.0, clamp=100.0) for kw in seen)


def test_image_loss_is_per_completion_over_all_completions(policy):
    """L = L_text + lambda * sum over restoring completions of their one step's term / B (official): doubling the
    batch with completions that never restored halves the image term; one step per completion is trained."""
    rollouts = forced_restore_rollouts(policy, 5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    cfg = rollout_args(image_loss_weight=1.0)
    _, stats, counter = rl.grpo_loss(policy, None, rollouts, adv, adv, cfg, 0, np.random.default_rng(0), policy)
    assert counter == 4  # one chosen step per restoring completion
    text_only = rl.grpo_loss(policy, None, rollouts, adv, adv, replace(cfg, image_loss_weight=0.0), 0,
                             np.random.default_rng(0), policy)[0]
    both = rl.grpo_loss(policy, None, rollouts, adv, adv, cfg, 0, np.random.default_rng(0), policy)[0]
    plain = [rl.Rollout(r.prefix, replace(r.trace, latents=[], steps=[], ids=r.trace.ids[:1], logps=r.trace.logps[:1],
                                          texts=r.trace.texts[:1], stopped=r.trace.stopped[:1]), r.example)
             for r in rollouts]
    zero = torch.zeros(4)
    doubled = rl.grpo_loss(policy, None, rollouts + plain, torch.cat([adv, zero]), torch.cat([adv, zero]), cfg, 0,
                           np.random.default_rng(0), policy)[0]
    text_doubled = rl.grpo_loss(policy, None, rollouts + plain, torch.cat([adv, zero]), torch.cat([adv, zero]),
                                replace(cfg, image_loss_weight=0.0), 0, np.random.default_rng(0), policy)[0]
    assert (doubled - text_doubled).item() == pytest.approx((both - text_only).item() / 2, rel=1e-4, abs=1e-7)


def test_recipes_are_the_official_presets():
    """head: 0.75 acc + 0.1 format, dr_grpo, shared advantages; release: + 0.15 decision, grpo, latent-quality image
    advantages; an explicit flag overrides its preset value."""
    head, release = rl.parse_config([]), rl.parse_config(["--recipe", "release"])
    assert (head.w_accuracy, head.w_format, head.w_decision, head.w_latent, head.loss_type,
            head.separate_image_rewards) == (0.75, 0.10, 0.0, 0.0, "dr_grpo", False)
    assert (release.w_decision, release.loss_type, release.separate_image_rewards) == (0.15, "grpo", True)
    assert rl.parse_config(["--recipe", "release", "--loss-type", "dr_grpo"]).loss_type == "dr_grpo"
    assert head.image_loss_weight == release.image_loss_weight == 0.5


def test_rl_flags_and_resume_refuse_before_any_work(toy_ckpt, tmp_path, capsys):
    """--data needs --images, --resume-force needs --resume; --resume refuses changed settings (here --lr and --seed)
    in one message before loading anything."""
    for argv, words in ((["--data", "d.jsonl"], "go together"), (["--images", "p"], "go together"),
                        (["--resume-force"], "no effect without --resume")):
        with pytest.raises(SystemExit):
            rl.parse_config(argv)
        assert words in capsys.readouterr().err
    out = tmp_path / "rl"
    args = ["--init", str(toy_ckpt), "--out", str(out), "--eval-n", "0"]
    (out / "train_state").mkdir(parents=True)  # what save_checkpoint records, without the weights
    (out / "train_state" / "state.json").write_text(json.dumps({"stage": "rl", "step": 1}))
    (out / "nanoclear.json").write_text(json.dumps({"args": vars(rl.parse_config(args)), "init": str(toy_ckpt)}))
    with pytest.raises(CK.InputError, match=r"other settings: --seed 0 -> 3; --lr 2e-05 -> 0.001\. "):
        rl.main([*args, "--resume", "--lr", "1e-3", "--seed", "3", "--steps", "9"])


def test_rl_refuses_flags_without_effect_and_its_own_init_as_out(toy_ckpt, tmp_path, capsys):
    """--max-completion-length only divides dr_grpo's loss, --eval-seed only seeds the final table: refused where they
    do nothing. --out equal to --init overwrote the start checkpoint, and the final table then compared RL with itself;
    a tagged answer without <answer> gave the accuracy reward the whole text as truth. Each stops before any work."""
    for argv, words in ((["--loss-type", "grpo", "--max-completion-length", "9"],
                         "--max-completion-length has no effect"),
                        (["--recipe", "release", "--max-completion-length", "9"], "with --loss-type grpo"),
                        (["--eval-n", "0", "--eval-seed", "3"], "--eval-seed has no effect with --eval-n 0")):
        with pytest.raises(SystemExit):
            rl.parse_config(argv)
        assert words in capsys.readouterr().err
    with pytest.raises(CK.InputError, match="is --init"):
        rl.main(["--init", str(toy_ckpt), "--out", str(toy_ckpt), "--eval-n", "0", "--threads", "1"])
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "question": "Q?",
                                                  "answer": "<think>x</think><image_restore>"}))
    with pytest.raises(CK.InputError, match="line 1, a tagged answer without <answer>"):
        rl.main(["--init", str(toy_ckpt), "--out", str(tmp_path / "rl"), "--data", str(tmp_path / "d.jsonl"),
                 "--images", str(tmp_path), "--threads", "1", "--steps", "1", "--prompts", "1", "--group", "2",
                 "--max-text-tokens", "2", "--sde-points", "2"])
    assert not (tmp_path / "rl").exists() and not (tmp_path / "rl.log.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Research: the official training forward's attention mask (rl.official_mask)


def replay_masks(policy, rollout, steps):
    """Our mask and the official one on one replayed rollout, and its splits by name."""
    seq, _ = rl.replay_sample(rollout, steps, "bridge", policy)
    packed = M.pack([seq], policy.cfg)
    ours = M.attention_mask(packed.splits, 1, packed.row_len)[0]
    official = rl.official_mask(packed.splits, 1, packed.row_len)[0]
    names = ["system", "vae", "vit", "question", "text1", "x_t", "reentry", "text2"]
    return ours, official, {n: slice(sp[2], sp[2] + sp[3]) for n, sp in zip(names, packed.splits)}, packed


def test_official_mask_without_restoration_blinds_every_completion_row(policy):
    """No restoration: splits system, VAE, ViT, question, text1 but only four modes (causal, full, causal, causal),
    zipped: the VAE block gets "full" (as ours), the ViT "causal", the question "causal" and text1 none, so every
    scored row attends to nothing. Nothing else differs."""
    r = forced_restore_rollouts(policy, 6)[0]
    plain = rl.Rollout(r.prefix, replace(r.trace, latents=[], steps=[], ids=r.trace.ids[:1], logps=r.trace.logps[:1],
                                         texts=r.trace.texts[:1], stopped=r.trace.stopped[:1]), r.example)
    ours, official, at, packed = replay_masks(policy, plain, [])
    layout = [(4, "causal"), (6, "full"), (6, "causal"), (5, "causal"), (len(plain.trace.ids[0]) + 2, None)]
    assert [(n, m) for n, m in rl.official_layout(packed.splits)] == layout
    assert not official[packed.ce_idx].any() and ours[packed.ce_idx].any(1).all()
    vit = at["vit"]
    assert ours[vit, vit].all() and torch.equal(official[vit, vit], torch.ones(6, 6, dtype=torch.bool).tril())
    expected = torch.zeros_like(ours)
    expected[vit, vit] = ~torch.ones(6, 6, dtype=torch.bool).tril()
    expected[at["text1"]] = ours[at["text1"]]
    assert torch.equal(ours ^ official, expected)


def test_official_mask_with_restoration(policy):
    """One restoration: eight splits, six modes (the two VAE blocks have none). Zipped: text1 becomes "full", so its
    scored rows see the tokens they predict; the x_t block becomes "causal" (ours: full inside, hidden from later
    rows); the re-entered picture and text2 get none and attend to nothing; the ViT block is causal, as without."""
    r = forced_restore_rollouts(policy, 6)[0]
    ours, official, at, packed = replay_masks(policy, r, [[0]])
    n1 = len(r.trace.ids[0]) + 2
    assert [m for _, m in rl.official_layout(packed.splits)] == ["causal", "full", "causal", "causal", "full", "causal",
                                                                 None, None]
    text1, x_t, vit = at["text1"], at["x_t"], at["vit"]
    assert official[text1, text1].all() and torch.equal(ours[text1, text1], torch.ones(n1, n1, dtype=torch.bool).tril())
    assert ours[x_t, x_t].all() and torch.equal(official[x_t, x_t], torch.ones(6, 6, dtype=torch.bool).tril())
    blind = slice(at["reentry"].start, packed.row_len)
    assert not official[blind].any() and ours[blind].any(1).all()
    expected = torch.zeros_like(ours)
    expected[vit, vit] = expected[x_t, x_t] = ~torch.ones(6, 6, dtype=torch.bool).tril()
    expected[text1, text1] = ~torch.ones(n1, n1, dtype=torch.bool).tril()
    expected[blind] = ours[blind]
    assert torch.equal(ours ^ official, expected)


def affected_rows(ours: torch.Tensor, official: torch.Tensor, layers: int) -> torch.Tensor:
    """Positions whose hidden state the official mask can change: their own mask row differs, or (in a later layer)
    they attend under it to a position already changed."""
    changed = (ours != official).any(1)
    for _ in range(layers - 1):
        changed = changed | (official & changed[None, :]).any(1)
    return changed


@pytest.mark.parametrize("restored", [False, True])
def test_official_mask_switch_changes_exactly_the_rows_the_official_mask_changes(policy, restored):
    """--official-mask: grpo_loss hands the policy and the frozen reference rl.official_mask of the packed rollouts
    (the only change), and the hidden states then differ from ours exactly on the rows that mask reaches (every scored
    row: the ViT block already attends causally; without a restoration they attend to nothing); the others stay."""
    rollouts = forced_restore_rollouts(policy, 6)[:1]
    if not restored:
        r = rollouts[0]
        rollouts = [rl.Rollout(r.prefix, replace(r.trace, latents=[], steps=[], ids=r.trace.ids[:1],
                                                 logps=r.trace.logps[:1], texts=r.trace.texts[:1],
                                                 stopped=r.trace.stopped[:1]), r.example)]
    seen = []

    def spy(name):
        return lambda packed, **kw: seen.append((name, packed, kw["mask"])) or policy(packed, **kw)
    adv = torch.ones(1)
    cfg = replace(rollout_args(official_mask=True), beta=0.04)
    rl.grpo_loss(spy("policy"), spy("ref"), rollouts, adv, adv, cfg, 0, np.random.default_rng(0), policy)
    (_, packed, official), (name, _, ref_mask) = seen
    assert name == "ref" and torch.equal(ref_mask, official)
    assert torch.equal(official, rl.official_mask(packed.splits, packed.rows, packed.row_len))
    ours = M.attention_mask(packed.splits, packed.rows, packed.row_len)
    with torch.no_grad():
        a, b = policy(packed, mask=official), policy(packed)
    reached = affected_rows(ours[0], official[0], policy.cfg.num_hidden_layers)
    assert reached[packed.ce_idx].all() and not reached.all()  # every scored row; not the prompt's first rows
    assert (a.ce != b.ce).all() and (a.hidden[reached] != b.hidden[reached]).any(1).all()
    assert torch.allclose(a.hidden[~reached], b.hidden[~reached], atol=1e-6)
    seen.clear()
    rl.grpo_loss(spy("policy"), spy("ref"), rollouts, adv, adv, replace(cfg, official_mask=False), 0,
                 np.random.default_rng(0), policy)
    assert [m for _, _, m in seen] == [None, None]  # off: the packing's own rules


def test_a_given_mask_equal_to_the_packing_rules_changes_nothing(policy):
    """Bagel.forward(mask=...) replaces the packing's rules and nothing else: their own mask gives the same output."""
    seq, _ = rl.replay_sample(forced_restore_rollouts(policy, 6)[0], [[0]], "bridge", policy)
    packed = M.pack([seq, seq[:4]], policy.cfg)
    with torch.no_grad():
        a, b = policy(packed), policy(packed, mask=M.attention_mask(packed.splits, packed.rows, packed.row_len))
    assert torch.equal(a.ce, b.ce) and torch.equal(a.v, b.v)
    with pytest.raises(ValueError, match="dense"):
        policy(packed, mask=M.attention_mask(packed.splits, packed.rows, packed.row_len), flex=True)


def test_toy_rl_runs_under_the_official_mask(toy_ckpt, tmp_path, monkeypatch):
    """The research switch (--official-mask): the toy RL trains under rl.official_mask, stays finite, and no longer
    reproduces the sampler's log-probs (ours does, to 1e-3)."""
    monkeypatch.setattr(D, "requests_restore", lambda text: len(text) % 2 == 0)  # as in the golden run above
    monkeypatch.setattr(rl, "accuracy_reward", lambda reply, example, judge=None: float(len(reply) % 3) / 2)
    argv = ["--init", str(toy_ckpt), "--steps", "1", "--prompts", "2", "--group", "2", "--max-text-tokens", "6",
            "--sde-points", "3", "--eval-n", "0", "--threads", "1"]
    rl.main([*argv, "--out", str(tmp_path / "ours")])
    rl.main([*argv, "--out", str(tmp_path / "official"), "--official-mask"])
    ours, official = (json.loads((tmp_path / f"{n}.log.jsonl").read_text()) for n in ("ours", "official"))
    assert ours["logp_drift"] < 1e-4 < 0.01 < official["logp_drift"]
    assert math.isfinite(official["loss"]) and 0 < official["gnorm"] < math.inf


def test_rl_starts_from_a_settled_bridge_and_fits_rows_to_the_positions(toy_ckpt, tmp_path, monkeypatch, capsys):
    """Without --init, rl.py starts from out/bridge: when its save was killed between the renames, rl.py puts the
    complete copy back and says so (it started from out/sft without a word). Rows longer than the model's positions
    (prefix and every round; --max-text-tokens was only compared with one segment, elsewhere not at all) stop before
    the model is loaded."""
    import shutil
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    shutil.copytree(toy_ckpt, tmp_path / "out" / "sft")
    saved = CK.sibling(tmp_path / "out" / "bridge", "tmp")  # a complete save, killed before its second rename
    shutil.copytree(toy_ckpt, saved)
    (saved / CK.MARKER).touch()
    loaded = []

    def load_pretrained(folder, *_, **__):
        loaded.append(folder)
        raise KeyboardInterrupt("the checks are done: stop before the work")
    monkeypatch.setattr(CK, "load_pretrained", load_pretrained)
    with pytest.raises(CK.InputError, match="a row takes up to .* positions end at 2048"):
        rl.main(["--out", str(tmp_path / "rl"), "--max-text-tokens", "700", "--threads", "1", "--eval-n", "0"])
    assert "out/bridge: recovered the newest complete copy" in capsys.readouterr().out
    assert (tmp_path / "out" / "bridge" / "ema.safetensors").exists() and not loaded
    with pytest.raises(KeyboardInterrupt):  # 3 rounds of 600 tokens and the prefix fit: it goes on to load
        rl.main(["--out", str(tmp_path / "rl"), "--max-text-tokens", "600", "--threads", "1", "--eval-n", "0"])
    assert loaded == ["out/bridge"]


def test_a_resumed_counter_is_checked(tmp_path):
    """The round-robin counter a resumed run continues from is a scalar of the resume state: a missing or bad one is
    an InputError naming it (a KeyError, or a string in the step arithmetic)."""
    for bad in ({}, {"counter": "3"}, {"counter": -1}, {"counter": True}):
        (tmp_path / "nanoclear.json").write_text(json.dumps(bad))
        with pytest.raises(CK.InputError, match="counter is"):
            rl.resumed_counter(tmp_path)
    (tmp_path / "nanoclear.json").write_text(json.dumps({"counter": 7}))
    assert rl.resumed_counter(tmp_path) == 7


# ----------------------------------------------------------------------------------------------------------------------
# Real data: the official defaults without extra flags


def real(*argv):
    return rl.parse_config(["--data", "rl.jsonl", "--images", "pics", *argv])


def test_real_data_takes_the_official_values_of_its_recipe(monkeypatch):
    """With --data every default is the official value of --recipe (prompt, G, lr, SDE grid, lengths, questions per
    step over the processes, steps); a flag given keeps its value; the toy world keeps its own."""
    head, release = real(), real("--recipe", "release")
    assert (head.system, head.group, head.lr, head.sde_points, head.max_completion_length, head.prompts,
            head.steps) == ("official", 8, 5e-6, 20, 16384, 32, 400)
    assert (release.prompts, release.steps, release.group, release.loss_type) == (16, 200, 8, "grpo")
    assert E.inference_config(head, toy=False).max_text_tokens == 4096  # max_think_token_n, as collect asks
    monkeypatch.setenv("WORLD_SIZE", "8")  # the official 8 processes: each rolls out its share of the questions
    assert (real().prompts, real("--recipe", "release").prompts) == (4, 2)
    assert (real("--lr", "1e-5", "--group", "2", "--steps", "7").lr, real("--group", "2").group,
            real("--steps", "7").steps) == (1e-5, 2, 7)
    monkeypatch.delenv("WORLD_SIZE")
    toy = rl.parse_config([])
    assert (toy.system, toy.group, toy.lr, toy.sde_points, toy.max_completion_length, toy.prompts, toy.steps) == (
        "toy", 4, 2e-5, 10, 144, 4, 150)


def test_real_data_refuses_the_toy_prompt_and_an_uneven_split(monkeypatch, capsys):
    """--system toy with --data, and the official questions per step that do not divide over the processes, stop
    with the reason (the latter unless --prompts says how many per process)."""
    with pytest.raises(SystemExit):
        real("--system", "toy")
    assert "the toy prompt describes the toy world's tags and rule" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        real()
    assert "32 questions per optimiser step do not divide over 3 processes" in capsys.readouterr().err
    assert real("--prompts", "5").prompts == 5


def test_rl_help_names_the_official_values(capsys):
    """--help gives the toy and the official value (HEAD and release where they differ) of every scaled flag."""
    with pytest.raises(SystemExit):
        rl.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("questions per step and process (toy 4; official 32 questions x G 8 per optimiser step at HEAD, 16 "
                  "x 8 at the release; with --data the official total divided over the processes)",
                  "optimiser steps (toy 150; official 400 at HEAD, 200 at the release; with --data the recipe's)",
                  "(toy 4; official 8)", "(toy 2e-5; official 5e-6)", "(toy 10; official 20)",
                  "(toy 144; official 16384)", "with --data 'official' (INTERLEAVE_REASON_SYSTEM_PROMPT",
                  "else the one --init was trained with", "research, off by default"):
        assert words in text, words

"""Behaviour of model.py beyond the official reference: cache vs full forward, expert routing, masks, I/O, errors."""


import numpy as np
import pytest
import torch

import model as M
from conftest import tiny_cfg


def sample_segments(cfg, g):
    D = cfg.patch_latent_dim
    return [M.Text([5, 6, 7]), M.VitImage(torch.rand(3, 16, 24, generator=g) * 2 - 1),
            M.VaeImage(torch.randn(6, D, generator=g), (2, 3)), M.Text([8, 9, 10, 11], loss=True)]


def test_training_forward_equals_cached_inference(net):
    """The packed training forward and the incremental KV-cache path give the same hidden states."""
    g = torch.Generator().manual_seed(1)
    segs = sample_segments(net.cfg, g)
    out = net(M.pack([segs], net.cfg))
    cache = net.new_cache(capacity=4)  # tiny capacity: also exercises cache growth
    hs = [net.add_text(cache, [segs[0].ids])[0], net.add_vit_image(cache, segs[1].pixels)[0],
          net.add_latent(cache, segs[2].tokens[None], segs[2].grid)[0], net.add_text(cache, [segs[3].ids])[0]]
    torch.testing.assert_close(torch.cat(hs), out.hidden, atol=2e-5, rtol=0)


def test_cached_decode_equals_full_forward(net):
    """Greedy tokens from the KV cache equal argmax of a full causal forward over the same text."""
    prompt = [3, 4, 5, 6]
    cache = net.new_cache()
    net.add_text(cache, [prompt])
    ids, logps, stops = net.decode_text(cache, max_new_tokens=6, stop_ids=())
    full = net(M.pack([[M.Text(prompt), M.Text(ids[0], loss=True)]], net.cfg))  # labels are the decoded ids
    logits = net.logits(full.hidden)
    start = len(prompt) + 2  # <bos> prompt <eos>, then the decoded block's <bos>
    assert logits[start:start + 6].argmax(-1).tolist() == ids[0]
    assert stops == [None] and int(cache.lens[0]) == len(prompt) + 2 + 1 + 6 + 1  # closed with <eos>


def test_batched_rows_equal_single_rows(net):
    """Rows of different lengths in one padded cache behave exactly like separate caches (CFG / RL batching)."""
    texts = [[3, 4, 5], [6, 7, 8, 9, 10, 11]]
    batch = net.new_cache(batch=2)
    net.add_text(batch, texts)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, net.cfg.patch_latent_dim, generator=g)
    v_batch = net.velocity(batch, x, 0.6, (2, 2))
    for i, t in enumerate(texts):
        single = net.new_cache()
        net.add_text(single, [t])
        torch.testing.assert_close(net.velocity(single, x[i:i + 1], 0.6, (2, 2))[0], v_batch[i], atol=2e-5, rtol=0)
    ids_b, lp_b, _ = net.decode_text(batch.copy(), 5, temperature=0.0, stop_ids=())
    for i, t in enumerate(texts):
        single = net.new_cache()
        net.add_text(single, [t])
        assert net.decode_text(single, 5, stop_ids=())[0][0] == ids_b[i]


def test_und_tokens_never_touch_gen_weights(net):
    """Text + ViT tokens give zero gradient to every *_moe_gen weight; latent tokens give zero to und MLPs."""
    g = torch.Generator().manual_seed(3)
    segs = sample_segments(net.cfg, g)
    net.zero_grad()
    net(M.pack([[segs[0], segs[1], segs[3]]], net.cfg)).ce.sum().backward()
    gen = {n: p.grad for n, p in net.named_parameters() if "moe_gen" in n}
    assert gen and all(gr is None or gr.abs().max() == 0 for gr in gen.values())
    und = [p.grad for n, p in net.named_parameters() if ".mlp.gate_proj" in n]
    assert all(gr is not None and gr.abs().max() > 0 for gr in und)
    net.zero_grad()
    target = torch.randn(6, net.cfg.patch_latent_dim, generator=g)
    noised = M.VaeImage(segs[2].tokens, (2, 3), t=0.5, target=target)
    out = net(M.pack([[noised]], net.cfg))  # markers (und) + latents (gen); the loss reads only latent rows
    out.mse.sum().backward()
    layer = net.language_model.model.layers[-1]
    assert layer.mlp_moe_gen.gate_proj.weight.grad.abs().max() > 0
    assert layer.mlp.gate_proj.weight.grad is None or layer.mlp.gate_proj.weight.grad.abs().max() == 0
    net.zero_grad()


def test_attention_rule_matrix():
    """Causal text, full image, noised block seen by nobody after it, samples never see each other."""
    cfg = tiny_cfg()
    D = cfg.patch_latent_dim
    s1 = [M.Text([1]), M.VaeImage(torch.zeros(1, D), (1, 1), t=0.5, target=torch.zeros(1, D)),
          M.VaeImage(torch.zeros(1, D), (1, 1)), M.Text([2])]
    s2 = [M.Text([])]
    p = M.pack([s1, s2], cfg, row_tokens=100)  # both samples in one row, then padding
    # sample 0: text [0,1,2] causal, noise [3,4,5], clean [6,7,8], text [9,10,11]; sample 1: text [12,13]
    assert p.rows == 1 and p.row_len == 14
    assert [s[1:] for s in p.splits] == [(0, 0, 3, "causal"), (0, 3, 3, "noise"), (0, 6, 3, "full"),
                                         (0, 9, 3, "causal"), (1, 12, 2, "causal")]
    allowed = set()
    for q in range(12):
        for k in range(12):
            same_split = [s for s in p.splits if s[2] <= q < s[2] + s[3] and s[2] <= k < s[2] + s[3]]
            if same_split:
                ok = same_split[0][4] != "causal" or k <= q
            else:
                ok = k < q and not 3 <= k < 6
            if ok:
                allowed.add((q, k))
    allowed |= {(12, 12), (13, 12), (13, 13)}
    expected = torch.zeros(14, 14, dtype=torch.bool)
    for q, k in allowed:
        expected[q, k] = True
    assert torch.equal(M.attention_mask(p.splits, p.rows, p.row_len)[0], expected)
    # RoPE: text 0..2, noise block at 3 (not advancing), clean block at 3, text 4..6; sample 1 restarts at 0
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 4, 5, 6, 0, 1]
    q = M.pack([s1, s2], cfg)  # default: one sample per row, the shorter row padded
    assert q.rows == 2 and q.splits[-1] == (1, -1, 2, 10, "pad")
    mask = M.attention_mask(q.splits, q.rows, q.row_len)
    assert torch.equal(mask[0], expected[:12, :12]) and mask[1, 5].tolist() == [i == 5 for i in range(12)]


def loop_split_tables(splits, rows, row_len):
    """The rule split_tables vectorises, written as one slice assignment per split."""
    t = {"sample": torch.full((rows, row_len), -1), "split": torch.zeros(rows, row_len, dtype=torch.long)}
    t.update({k: torch.zeros(rows, row_len, dtype=torch.bool) for k in ("noise", "causal", "pad")})
    for i, (r, s, start, n, mode) in enumerate(splits):
        t["sample"][r, start:start + n], t["split"][r, start:start + n] = s, i
        for k in ("noise", "causal", "pad"):
            t[k][r, start:start + n] = mode == k
    return t


def test_split_tables_and_mask_equal_the_per_split_rule():
    """On random layouts (rows of causal / full / noise / pad splits of random lengths): the vectorised tables equal
    the per-split loop, the mask equals may_attend asked pair by pair, and the additive mask is 0 / -inf on it."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows, T = int(rng.integers(1, 4)), int(rng.integers(1, 30))
        splits, sample = [], 0
        for r in range(rows):
            start = 0
            while start < T:
                n, mode = int(rng.integers(1, T - start + 1)), str(rng.choice(["causal", "full", "noise", "pad"]))
                splits.append((r, -1 if mode == "pad" else sample, start, n, mode))
                start, sample = start + n, sample + int(rng.random() < 0.5)
        t = M.split_tables(splits, rows, T)
        ref = loop_split_tables(splits, rows, T)
        assert all(torch.equal(t[k], ref[k]) for k in ref)
        mask, i = M.attention_mask(splits, rows, T), torch.arange(T)
        b_i = torch.arange(rows)[:, None, None]
        assert torch.equal(mask, M.may_attend(ref, b_i, i[None, :, None], i[None, None, :]))
        b, q, k = (int(v) for v in (rng.integers(rows), rng.integers(T), rng.integers(T)))
        assert bool(mask[b, q, k]) == bool(M.may_attend(ref, b, q, k))
        add = M.additive_mask(mask, torch.float32)
        assert torch.equal(add == 0, mask) and torch.isinf(add[~mask]).all()


def packed_splits(rng, rows: int, T: int) -> list:
    """Random splits laid out as pack lays them: each sample's splits contiguous in one row, sample ids unique, then
    the row's padding."""
    splits, sample = [], 0
    for r in range(rows):
        start = 0
        while start < T and rng.random() < 0.8:
            for _ in range(int(rng.integers(1, 4))):
                if start < T:
                    n = int(rng.integers(1, T - start + 1))
                    splits.append((r, sample, start, n, str(rng.choice(["causal", "full", "noise"]))))
                    start += n
            sample += 1
        if start < T:
            splits.append((r, -1, start, T - start, "pad"))
    return splits


def test_attention_groups_allow_exactly_the_rows_pairs():
    """AttentionGroups re-packs the samples into short rows: every token gets one slot, L is the longest sample, a
    sample keeps its tokens together and in order, and the groups' mask allows exactly the token pairs the rows' mask
    allows; a padding slot sees only itself."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows, T = int(rng.integers(1, 4)), int(rng.integers(1, 30))
        splits = packed_splits(rng, rows, T)
        groups = M.AttentionGroups(splits, rows, T, torch.float32)
        G, L = groups.shape
        token, slot = groups.token.reshape(-1), groups.slot
        valid = slot[token] == torch.arange(G * L)  # the slots that hold a token (the others are padding)
        assert sorted(token[valid].tolist()) == list(range(rows * T))
        spans = {}
        for r, s, start, n, _ in splits:
            spans.setdefault((r, s), []).append(range(r * T + start, r * T + start + n))
        assert L == max([sum(map(len, v)) for (_, s), v in spans.items() if s != -1], default=1)
        for parts in (v for (_, s), v in spans.items() if s != -1):  # together, in order: one short row's slots
            where = slot[torch.tensor([i for p in parts for i in p])]
            assert torch.equal(where, torch.arange(len(where)) + where[0]) and len(set((where // L).tolist())) == 1
        rows_mask = M.attention_mask(splits, rows, T)
        tokens_mask = torch.block_diag(*rows_mask)  # [B*T, B*T]: rows never see each other
        allowed = groups.mask[:, 0] == 0  # [G, L, L]
        for g in range(G):
            v = valid.view(G, L)[g]
            t = groups.token[g][v]
            assert torch.equal(allowed[g][v][:, v], tokens_mask[t][:, t])
            assert torch.equal(allowed[g][~v], torch.eye(L, dtype=torch.bool)[~v])
            assert not allowed[g][v][:, ~v].any()  # no token sees a padding slot
        covered = sum(int(tokens_mask[groups.token[g][valid.view(G, L)[g]]][:, groups.token[g][valid.view(G, L)[g]]]
                          .sum()) for g in range(G))
        assert covered == int(tokens_mask.sum())  # no allowed pair is split between two short rows


def test_grouped_attention_equals_the_rows_mask(net):
    """The training forward (attention over AttentionGroups) gives the rows' dense-mask forward's outputs and
    gradients on rows that hold several samples of every split kind."""
    g = torch.Generator().manual_seed(7)
    D = net.cfg.patch_latent_dim
    segs = sample_segments(net.cfg, g) + [M.VaeImage(torch.randn(6, D, generator=g), (2, 3), t=0.4,
                                                     target=torch.zeros(6, D))]
    packed = M.pack([segs, segs[:2], [M.Text([4, 5], loss=True)], segs[1:]], net.cfg, row_tokens=60)
    assert packed.rows > 1 and len(packed.sample_lens) > packed.rows
    outs, grads = [], []
    for mask in (None, M.attention_mask(packed.splits, packed.rows, packed.row_len)):
        net.zero_grad(set_to_none=True)
        out = net(packed, mask=mask)
        (out.ce.sum() + out.mse.sum() + out.hidden.square().mean()).backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None]))
    net.zero_grad(set_to_none=True)
    torch.testing.assert_close(outs[0].hidden, outs[1].hidden, atol=2e-5, rtol=0)
    torch.testing.assert_close(outs[0].v, outs[1].v, atol=2e-5, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=2e-5, rtol=1e-4)


def test_expert_order_routing_equals_routing_every_call():
    """Route keeps the stream in expert order and returns to token order for attention only: the same values as
    gathering, applying each expert and scattering back around every call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g)
    gen = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    route = M.Route(gen)
    und, gen_f = (lambda h: 2 * h + 1), (lambda h: -h)
    expected = torch.where(gen[:, None], gen_f(x), und(x))
    assert torch.equal(route.to_tokens(route(route.to_experts(x), und, gen_f)), expected)
    plain = M.Route(torch.zeros(10, dtype=torch.bool))
    assert plain.to_experts(x) is x and torch.equal(plain(x, und, gen_f), und(x))


def test_rows_equal_one_long_packed_row(net):
    """Samples in separate padded rows give the same outputs as the same samples packed into one row."""
    g = torch.Generator().manual_seed(6)
    segs = sample_segments(net.cfg, g)
    samples = [segs, [segs[0], segs[3]]]
    a, b = net(M.pack(samples, net.cfg)), net(M.pack(samples, net.cfg, row_tokens=1000))
    torch.testing.assert_close(a.ce, b.ce, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.v, b.v, atol=1e-5, rtol=0)


def test_dropout_keeps_rope_for_images():
    """A dropped image still takes its RoPE id, a dropped text does not (BAGEL pack_sequence)."""
    cfg = tiny_cfg()
    segs = [M.Text([1, 2]), M.VitImage(torch.zeros(3, 8, 8)), M.Text([3], droppable=False)]
    p = M.pack([segs], cfg, dropout=(0.0, 1.0, 0.0))
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 5, 6, 7]
    p = M.pack([segs], cfg, dropout=(1.0, 0.0, 0.0))
    assert p.position_ids[0].tolist() == [0, 0, 0, 1, 2, 3] and p.row_len == 6


def test_cfg_batched_equals_branch_by_branch(net):
    """generate_image's batched CFG rows equal three separate velocity calls combined by cfg_combine."""
    g = torch.Generator().manual_seed(4)
    full, txt, img = net.new_cache(), net.new_cache(), net.new_cache()
    net.add_text(full, [[3, 4, 5]])
    net.add_text(img, [[3, 4, 5]])
    net.add_text(full, [[6, 7]])
    noise = torch.randn(1, 4, net.cfg.patch_latent_dim, generator=g)
    _, steps = net.generate_image(full, (2, 2), noise, num_timesteps=3, shift=3.0, cfg_text_cache=txt,
                                  cfg_img_cache=img, cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_interval=(0.0, 1.0))
    x, t, v = steps[0]["x_t"], steps[0]["t"], steps[0]["v"]
    vs = [net.velocity(c, x, t, (2, 2)) for c in (full, txt, img)]
    torch.testing.assert_close(v, M.cfg_combine(*vs, 4.0, 1.5, "global"), atol=2e-5, rtol=0)


def test_bad_inputs(net):
    """Too-large grids, positions past the limit and mis-sized images raise clear errors."""
    cfg = net.cfg
    with pytest.raises(ValueError, match="exceeds the position table"):
        M.pack([[M.VaeImage(torch.zeros(25, cfg.patch_latent_dim), (5, 5))]], cfg)
    with pytest.raises(ValueError, match="multiples of the patch"):
        M.pack([[M.VitImage(torch.zeros(3, 12, 16))]], cfg)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        M.pack([[M.Text(list(range(3)) * 2000)]], cfg)
    with pytest.raises(ValueError, match="multiples of"):
        net.encode_pixels(torch.zeros(1, 3, 10, 16))
    with pytest.raises(ValueError, match="num_attention_heads"):
        tiny_cfg(num_attention_heads=3)


def test_patchify_roundtrip():
    """unpatchify inverts patchify."""
    x = torch.rand(3, 16, 24) * 2 - 1
    assert torch.equal(M.unpatchify(M.patchify(x, 8), (2, 3), 8), x)


def test_sde_logprob_is_gaussian_density(sde_step):
    """The recorded SDE step log-prob equals the Gaussian log-density (mean over elements, constants dropped)."""
    x, v, x_next, mean, t, dt, sigma = sde_step(0.7)
    dist = torch.distributions.Normal(mean, sigma * dt ** 0.5)
    const = -torch.log(torch.tensor(sigma * dt ** 0.5)) - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    expected = (dist.log_prob(x_next) - const).flatten(1).mean(1)
    torch.testing.assert_close(M.sde_step_logprob(x_next, mean, sigma, dt), expected)


def test_sde_step_by_hand():
    """mean = x - (v + sigma^2 / 2 * s) dt with the score s = (x + (1 - t) v) / max(t, 1e-6), clamped to +-score_clamp:
      x = 1, v = 2, t = 0.5, dt = 0.1, sigma = 1: s = (1 + 1) / 0.5 = 4, mean = 1 - (2 + 2) * 0.1 = 0.6;
      x = v = 1 at t = 0.001: s = 1999 -> 100, mean = 1 - (1 + 50) * 0.1 = -4.1 (and mirrored: 4.1);
      x = 0, v = 1e-5 at t = 0: s = 1e-5 / 1e-6 = 10, mean = -(1e-5 + 5) * 0.1 = -0.500001.
    log p = -mean over elements of (x' - mean)^2 / (2 sigma^2 dt): offsets 0.1, -0.2 with sigma 0.5, dt 0.04 (variance
    0.01) give -(0.5 + 2) / 2 = -1.25 for row one; a row exactly at its mean gives 0."""
    one = lambda x: torch.tensor([[x]], dtype=torch.float64)  # noqa: E731
    assert float(M.sde_step_mean(one(1.0), one(2.0), 0.5, 0.1, 1.0)) == pytest.approx(0.6)
    assert float(M.sde_step_mean(one(1.0), one(1.0), 0.001, 0.1, 1.0)) == pytest.approx(-4.1)
    assert float(M.sde_step_mean(one(-1.0), one(-1.0), 0.001, 0.1, 1.0)) == pytest.approx(4.1)
    assert float(M.sde_step_mean(one(1.0), one(1.0), 0.001, 0.1, 1.0, score_clamp=1000.0)) == pytest.approx(-49.1)
    assert float(M.sde_step_mean(one(0.0), one(1e-5), 0.0, 0.1, 1.0)) == pytest.approx(-0.500001, rel=1e-9)
    mean = torch.zeros(2, 1, 2)
    x_next = torch.tensor([[[0.1, -0.2]], [[0.0, 0.0]]])
    assert M.sde_step_logprob(x_next, mean, 0.5, 0.04).tolist() == pytest.approx([-1.25, 0.0])


def test_flex_attention_equals_dense_mask(net):
    """The FlexAttention block-mask path gives the dense-mask path's outputs on packed rows with every split kind."""
    g = torch.Generator().manual_seed(7)
    D = net.cfg.patch_latent_dim
    segs = sample_segments(net.cfg, g) + [M.VaeImage(torch.randn(6, D, generator=g), (2, 3), t=0.4,
                                                     target=torch.zeros(6, D))]
    packed = M.pack([segs, segs[:2], [M.Text([4, 5], loss=True)]], net.cfg, row_tokens=200)
    with torch.no_grad():  # FlexAttention has no CPU backward; the path is meant for GPU training
        dense = net(packed)
        flex = net(packed, flex=True)
    torch.testing.assert_close(flex.hidden, dense.hidden, atol=2e-5, rtol=0)
    torch.testing.assert_close(flex.v, dense.v, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Each equation pinned by a value worked out by hand (a bare clone has no official reference to compare with)


def test_timestep_shift_and_flow_path_by_hand():
    """t' = s t / (1 + (s - 1) t); x_t = (1 - t) x0 + t noise; v = noise - x0; the loss averages over channels."""
    assert float(M.shift_time(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    assert float(M.shift_time(torch.tensor(0.25), 3.0)) == pytest.approx(0.5)
    assert M.flow_timesteps(3, 3.0).tolist() == pytest.approx([1.0, 0.75, 0.0])
    assert M.flow_timesteps(5, 1.0).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    x_t, v = M.flow_interpolate(torch.tensor([2.0]), torch.tensor([-1.0]), 0.25)
    assert float(x_t) == pytest.approx(1.25) and float(v) == pytest.approx(-3.0)
    assert M.flow_matching_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])).tolist() == [5.0]
    x0, noise = torch.tensor([[1.0, -2.0], [0.0, 4.0]]), torch.tensor([[3.0, 0.0], [-1.0, 1.0]])
    x_t, v = M.flow_interpolate(x0, noise, torch.tensor([[0.5], [1.0]]))  # one t per token, broadcast over channels
    assert x_t.tolist() == [[2.0, -1.0], [-1.0, 1.0]] and v.tolist() == [[2.0, 2.0], [-1.0, -3.0]]
    loss = M.flow_matching_loss(torch.tensor([[1.0, 1.0], [2.0, -2.0]], dtype=torch.float16), torch.zeros(2, 2))
    assert loss.dtype == torch.float32 and loss.tolist() == [1.0, 4.0]  # per token, in float32


def test_sample_flow_time_is_shifted_logit_normal():
    """t = shift(sigmoid(z)), z ~ N(0, 1), drawn from the given generator: undoing the shift (u = t / (s - (s - 1) t))
    and the sigmoid of 4000 draws gives back standard normals (mean, spread and Kolmogorov-Smirnov distance), whatever
    the order of the draws; the same generator state gives the same times, the global seed does not matter."""
    for shift in (1.0, 3.0):
        t = M.sample_flow_time(4000, shift, torch.Generator().manual_seed(0)).double()
        assert t.shape == (4000,) and bool(((t > 0) & (t < 1)).all())
        u = t / (shift - (shift - 1) * t)
        z = torch.log(u / (1 - u)).sort().values
        assert abs(float(z.mean())) < 0.08 and abs(float(z.std()) - 1) < 0.06, (shift, z.mean(), z.std())
        cdf = 0.5 * (1 + torch.erf(z / 2 ** 0.5))
        ks = float(torch.maximum(torch.arange(1, 4001) / 4000 - cdf, cdf - torch.arange(4000) / 4000).max())
        assert ks < 0.035, (shift, ks)
    torch.manual_seed(1)
    a = M.sample_flow_time(5, 3.0, torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    assert torch.equal(a, M.sample_flow_time(5, 3.0, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, M.sample_flow_time(5, 3.0, torch.Generator().manual_seed(8)))


@pytest.mark.golden
def test_sample_flow_time_draws_as_bagel():
    """The reference draws z with one torch.randn(n) call (BAGEL's order): runs stay bit-identical to the recorded ones.
    Not an exercise test: another correct implementation may draw differently."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    u = torch.sigmoid(torch.randn(4, generator=g2))
    torch.testing.assert_close(M.sample_flow_time(4, 3.0, g1), 3 * u / (1 + 2 * u))


def test_rope_by_hand():
    """Split-halves RoPE: frequencies theta^(-2i/d), and rotate_half = [-x2, x1] (a +angle rotation of (x1, x2))."""
    cos, sin = M.rope_cos_sin(torch.tensor([[2]]), 4, 10000.0, torch.float32)
    assert cos[0, 0].tolist() == pytest.approx([np.cos(2), np.cos(0.02), np.cos(2), np.cos(0.02)])
    assert sin[0, 0].tolist() == pytest.approx([np.sin(2), np.sin(0.02), np.sin(2), np.sin(0.02)])
    first = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4)  # [B, T, heads, hd]
    second = torch.tensor([0, 0, 1.0, 0]).view(1, 1, 1, 4)
    assert M.apply_rope(first, cos, sin).flatten().tolist() == pytest.approx([np.cos(2), 0, np.sin(2), 0])
    assert M.apply_rope(second, cos, sin).flatten().tolist() == pytest.approx([-np.sin(2), 0, np.cos(2), 0])


def test_cfg_scales_go_with_their_branches_by_hand():
    """v' = v_text + s_t (v - v_text), then v_img + s_i (v' - v_img); renorm caps the norm at |v| (never raises it)."""
    v, vt, vi = (torch.full((1, 1, 3), x) for x in (1.0, 0.5, 0.2))
    for renorm in ("global", "channel", "text_channel"):
        out = M.cfg_combine(v, vt, vi, 4.0, 1.5, renorm, renorm_min=1.0)  # renorm_min 1: no rescaling
        torch.testing.assert_close(out, torch.full((1, 1, 3), 0.2 + 1.5 * (0.5 + 4 * 0.5 - 0.2)))
    a = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])  # renorm: global rescales by |v| / |v_guided| over the whole image
    out = M.cfg_combine(a, torch.zeros_like(a), None, 2.0, 1.0, "global")
    torch.testing.assert_close(out, a)  # guided = 2a, rescaled by |a| / |2a|
    out = M.cfg_combine(a, a / 2, None, 3.0, 1.0, "text_channel")  # per token: each row is guided to 2a, then capped
    torch.testing.assert_close(out, a)


def test_sincos_and_time_embedding_by_hand():
    """Row r * grid + c = [sin c w, cos c w, sin r w, cos r w]; the time embedding is [cos t f, sin t f], cos first."""
    table = M.sincos_2d(4, 2)  # dim 4: one frequency w = 1 per axis
    assert table[2].tolist() == pytest.approx([0.0, 1.0, np.sin(1), np.cos(1)])  # r = 1, c = 0
    assert table[1].tolist() == pytest.approx([np.sin(1), np.cos(1), 0.0, 1.0])  # r = 0, c = 1
    emb = M.TimestepEmbedder(8)
    emb.mlp = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False))  # identity, to read the sinusoids
    torch.nn.init.eye_(emb.mlp[0].weight)
    out = emb(torch.tensor([0.5]))[0]
    f = torch.exp(-float(np.log(10000)) * torch.arange(128, dtype=torch.float32) / 128)
    torch.testing.assert_close(out, torch.cat([torch.cos(0.5 * f), torch.sin(0.5 * f)]))


def test_cfg_renorm_by_hand():
    """No guidance unless the text scale exceeds 1; image guidance only above 1; the renorm rescales the guided v to at
    most |v| (at least renorm_min times it), over each row's whole image (global), per token (channel), or, for
    text_channel, per token of the text-guided v only, before the image guidance."""
    v, vt, vi = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    assert torch.equal(M.cfg_combine(v, vt, vi, 1.0, 2.0), v)  # text scale 1: v as it is, image scale ignored
    out = M.cfg_combine(v, vt, vi, 2.0, 1.0, "global", renorm_min=1.0)  # no image guidance at scale 1
    torch.testing.assert_close(out, torch.tensor([[[5.0, 8.0]]]))
    out = M.cfg_combine(v, vt, None, 2.0, 0.5, "global", renorm_min=1.0)  # none below 1 either (vi unused)
    torch.testing.assert_close(out, torch.tensor([[[5.0, 8.0]]]))
    # global, per row: row 0 is guided to 2 v (rescaled by 1/2), row 1 stays v (rescaled by 1): two rows, two factors
    v2 = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 0.0], [0.0, 0.0]]])
    vt2 = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(M.cfg_combine(v2, vt2, None, 2.0, 1.0, "global"), v2)
    # channel: per token; guided [[6, 8], [1, 0]] has token norms 10 and 1 against 5 and 1
    vc, vtc = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]]), torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    torch.testing.assert_close(M.cfg_combine(vc, vtc, None, 2.0, 1.0, "channel"), vc)
    # renorm_min: guided 4 v is rescaled by max(1/4, 0.5) = 0.5; a guided v shorter than v is never scaled up
    torch.testing.assert_close(M.cfg_combine(v, torch.zeros_like(v), None, 4.0, 1.0, "global", renorm_min=0.5), 2 * v)
    torch.testing.assert_close(M.cfg_combine(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0, 0.0]]]), None, 1.5,
                                             1.0, "channel"), torch.tensor([[[0.5, 0.0]]]))
    # text_channel: the text-guided [6, 8] is renormed to [3, 4], then image guidance 1 + 1.5 (3 - 1), 1 + 1.5 (4 - 1)
    out = M.cfg_combine(v, torch.zeros_like(v), torch.tensor([[[1.0, 1.0]]]), 2.0, 1.5, "text_channel")
    torch.testing.assert_close(out, torch.tensor([[[4.0, 5.5]]]))
    # global with both scales: 0 + 1.5 (2 v - 0) = 3 v, rescaled to v
    torch.testing.assert_close(M.cfg_combine(v, torch.zeros_like(v), torch.zeros_like(v), 2.0, 1.5, "global"), v)
    with pytest.raises(ValueError, match="renorm"):
        M.cfg_combine(v, vt, vi, 2.0, 1.5, "per_token")


def test_route_by_hand():
    """Route's expert order is the und rows then the gen rows, each in token order; an expert is called once on its
    own slice; to_tokens undoes to_experts; without gen rows everything goes to `und` in token order; gradients
    flow."""
    seen = []

    def expert(name, f):
        return lambda h: seen.append((name, h.flatten(1)[:, 0].tolist())) or f(h)
    und, gen = expert("und", lambda h: h * 10), expert("gen", lambda h: -h)
    x = torch.arange(5.0)[:, None, None].repeat(1, 2, 3).requires_grad_()  # [N, heads, hd], as in MoTAttention
    route = M.Route(torch.tensor([True, False, False, True, False]))  # und rows 1, 2, 4; gen rows 0, 3
    assert route.to_experts(x)[:, 0, 0].tolist() == [1.0, 2.0, 4.0, 0.0, 3.0]
    y_experts = route(route.to_experts(x), und, gen)
    assert y_experts[:, 0, 0].tolist() == [10.0, 20.0, 40.0, -0.0, -3.0] and y_experts.shape == x.shape
    assert sorted(seen) == [("gen", [0.0, 3.0]), ("und", [1.0, 2.0, 4.0])]
    y = route.to_tokens(y_experts)
    assert y[:, 0, 0].tolist() == [0.0, 10.0, 20.0, -3.0, 40.0]
    assert route.to_tokens(route.to_experts(x))[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    y.sum().backward()
    assert x.grad[:, 0, 0].tolist() == [-1.0, 10.0, 10.0, -1.0, 10.0]
    for mask in (None, torch.zeros(5, dtype=torch.bool)):
        seen.clear()
        plain = M.Route(mask)
        assert plain.to_experts(x)[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert plain(x, und, gen)[:, 0, 0].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
        assert seen == [("und", [0.0, 1.0, 2.0, 3.0, 4.0])]
    seen.clear()
    every = M.Route(torch.ones(5, dtype=torch.bool))
    assert every.to_tokens(every(every.to_experts(x), und, gen))[:, 0, 0].tolist() == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert [s for s in seen if s[1]] == [("gen", [0.0, 1.0, 2.0, 3.0, 4.0])]


def test_rmsnorm_by_hand():
    norm = M.RMSNorm(2, eps=0.0)
    assert norm(torch.tensor([3.0, 4.0])).tolist() == pytest.approx([3 / 12.5 ** 0.5, 4 / 12.5 ** 0.5])


"""Behaviour of model.py beyond the official reference: cache vs full forward, expert routing, masks, I/O, errors."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import model as M


def tiny_cfg(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vit_hidden_size=32, vit_intermediate_size=48, vit_num_hidden_layers=2,
                vit_num_attention_heads=2, vit_patch_size=8, vit_image_size=32, vit_max_num_patch_per_side=4,
                max_latent_size=4, ae_ch=32, ae_ch_mult=(1, 1), ae_num_res_blocks=1,
                bos_token_id=60, eos_token_id=61, start_of_image_id=62, end_of_image_id=63)
    base.update(kw)
    return M.ModelConfig(**base)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = M.Bagel(tiny_cfg())
    with torch.no_grad():  # random norms and an untrained-looking llm2vae make routing mistakes visible
        for name, p in m.named_parameters():
            if p.requires_grad and p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
            if name.startswith("llm2vae"):
                p.normal_(0, 0.3)
    return m.eval()


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
    assert [s[1:] for s in p.splits] == [(0, 0, 3, "causal"), (0, 3, 3, "noise"), (0, 6, 3, "full"), (0, 9, 3, "causal"), (1, 12, 2, "causal")]
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
        assert torch.equal(mask, M.may_attend(ref, torch.arange(rows)[:, None, None], i[None, :, None], i[None, None, :]))
        b, q, k = (int(v) for v in (rng.integers(rows), rng.integers(T), rng.integers(T)))
        assert bool(mask[b, q, k]) == bool(M.may_attend(ref, b, q, k))
        add = M.additive_mask(mask, torch.float32)
        assert torch.equal(add == 0, mask) and torch.isinf(add[~mask]).all()


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
    _, steps = net.generate_image(full, (2, 2), noise, num_timesteps=3, shift=3.0, cfg_text_cache=txt, cfg_img_cache=img,
                                  cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_interval=(0.0, 1.0))
    x, t, v = steps[0]["x_t"], steps[0]["t"], steps[0]["v"]
    vs = [net.velocity(c, x, t, (2, 2)) for c in (full, txt, img)]
    torch.testing.assert_close(v, M.cfg_combine(*vs, 4.0, 1.5, "global"), atol=2e-5, rtol=0)


def test_save_load_roundtrip_bit_identical(net, tmp_path):
    """A saved folder has the official key names and loads back bit-identically."""
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(60)} | {t: 60 + i for i, t in enumerate(M.SPECIAL_TOKENS.values())}, unk_token="w0"))
    M.save_pretrained(net, tmp_path / "ckpt", tokenizer=tok, meta={"stage": "test"})
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["ae.safetensors", "ema.safetensors", "llm_config.json", "nanoclear.json", "tokenizer.json", "vit_config.json"]
    back = M.load_pretrained(tmp_path / "ckpt")
    assert back.cfg == net.cfg
    a, b = net.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ckpt" / "ema.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.layers.1.self_attn.q_proj_moe_gen.weight" in keys and "latent_pos_embed.pos_embed" in keys
    assert json.loads((tmp_path / "ckpt" / "vit_config.json").read_text())["num_hidden_layers"] == net.cfg.vit_num_hidden_layers + 1


def test_bad_checkpoints_are_refused_clearly(net, tmp_path):
    """Wrong folder, missing file, corrupt safetensors and config/weight mismatch give messages naming the problem."""
    with pytest.raises(FileNotFoundError, match="not a folder"):
        M.load_pretrained(tmp_path / "nope")
    M.save_pretrained(net, tmp_path / "c")
    (tmp_path / "c" / "ae.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        M.load_pretrained(tmp_path / "c")
    M.save_pretrained(net, tmp_path / "c")
    (tmp_path / "c" / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema.safetensors is missing"):
        M.load_pretrained(tmp_path / "c")
    M.save_pretrained(net, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "llm_config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "c" / "llm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mis-shaped .*mlp"):
        M.load_pretrained(tmp_path / "c")


def rewrite(path, change):
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def test_the_vit_layer_the_official_loader_drops_and_no_other(net, tmp_path, capsys):
    """BAGEL builds vit_config.json's num_hidden_layers - 1 ViT layers and loads non-strictly: a BAGEL-format folder
    (no nanoclear.json) whose file holds all num_hidden_layers loses the last one, with one printed line. A nanoCLEAR
    folder whose vit_config.json says one layer too few (the old loader dropped a trained layer without a word), or
    an extra layer that is not one complete last layer, is an error naming the tensors."""
    from safetensors.torch import load_file, save_file
    M.save_pretrained(net, tmp_path / "ours")
    rewrite(tmp_path / "ours" / "vit_config.json", lambda c: c.update(num_hidden_layers=2))
    with pytest.raises(M.InputError, match=r"unexpected ema.safetensors:vit_model.vision_model.encoder.layers.1.mlp.fc1.weight .*"
                                           r"holds more ViT layers than the 1 .*must say one more"):
        M.load_pretrained(tmp_path / "ours")

    official = tmp_path / "official"  # SigLIP's whole tower in the file, as the json counts it
    M.save_pretrained(net, official)
    (official / "nanoclear.json").unlink()
    ema = load_file(str(official / "ema.safetensors"))
    last = {k.replace("layers.1.", "layers.2."): v + 1 for k, v in ema.items() if k.startswith(M.VIT_LAYERS + "1.")}
    save_file({**ema, **last}, str(official / "ema.safetensors"))
    code = {k: getattr(net.cfg, k) for k in M.CODE_KEYS}
    capsys.readouterr()
    back = M.load_pretrained(official, overrides=code)
    assert capsys.readouterr().out.count("dropped ViT layer 2 (16 tensors)") == 1
    assert len(back.vit_model.vision_model.encoder.layers) == 2
    assert torch.equal(back.state_dict()[M.VIT_LAYERS + "1.mlp.fc1.weight"], net.state_dict()[M.VIT_LAYERS + "1.mlp.fc1.weight"])
    save_file({**ema, **dict(list(last.items())[:-1])}, str(official / "ema.safetensors"))  # an incomplete extra layer
    with pytest.raises(M.InputError, match="unexpected ema.safetensors:vit_model.vision_model.encoder.layers.2"):
        M.load_pretrained(official, overrides=code)


def test_a_tensor_in_two_files_is_an_error(net, tmp_path):
    """A `vae.*` tensor in ema.safetensors that ae.safetensors holds too is named, not silently replaced."""
    from safetensors.torch import load_file, save_file
    M.save_pretrained(net, tmp_path / "c")
    ema = load_file(str(tmp_path / "c" / "ema.safetensors"))
    save_file({**ema, "vae.decoder.conv_out.bias": torch.zeros(3)}, str(tmp_path / "c" / "ema.safetensors"))
    with pytest.raises(M.InputError, match="duplicate vae.decoder.conv_out.bias: ema.safetensors:vae.decoder.conv_out.bias "
                                           "and ae.safetensors:decoder.conv_out.bias"):
        M.load_pretrained(tmp_path / "c")


def test_a_folder_without_nanoclear_json_gets_bagel_7b_code_values_and_is_told(net, tmp_path):
    """Without nanoclear.json the values no json holds (latent size, AE shape, ...) are BAGEL-7B-MoT's: a folder of
    another geometry hears that, which file would fix it, and what it needs."""
    M.save_pretrained(net, tmp_path / "c")
    (tmp_path / "c" / "nanoclear.json").unlink()
    with pytest.raises(M.InputError) as e:
        M.load_pretrained(tmp_path / "c")
    assert "has no nanoclear.json" in str(e.value) and "max_latent_size" in str(e.value) and "BAGEL-7B-MoT" in str(e.value)
    assert "\n" not in str(e.value)


def test_wrong_json_values_are_named(net, tmp_path):
    """A json value of the wrong type or size stops at load naming the folder's files and the key, never a TypeError
    deep in the model; a corrupt tokenizer.json is named too."""
    M.save_pretrained(net, tmp_path / "c")
    for file, key, value, words in (("llm_config.json", "hidden_size", "32", "hidden_size is '32'"),
                                    ("llm_config.json", "num_attention_heads", 0, "num_attention_heads is 0"),
                                    ("vit_config.json", "num_hidden_layers", [3], "num_hidden_layers is [3]"),
                                    ("nanoclear.json", "model", [], "nanoclear.json lacks our config's ['model']")):
        path = tmp_path / "c" / file
        saved = path.read_text()
        rewrite(path, lambda c: c.update({key: value}))
        with pytest.raises(M.InputError, match=re.escape(words)):
            M.load_pretrained(tmp_path / "c")
        path.write_text(saved)
    (tmp_path / "c" / "tokenizer.json").write_text('{1: "x"}')
    with pytest.raises(M.InputError, match="tokenizer.json is not a readable tokenizer.json .*key must be a string"):
        M.load_pretrained(tmp_path / "c")


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


def test_sde_logprob_is_gaussian_density():
    """The recorded SDE step log-prob equals the Gaussian log-density (mean over elements, constants dropped)."""
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    t, dt, sigma = 0.7, 0.05, 0.3
    mean = M.sde_step_mean(x, v, t, dt, sigma)
    x_next = mean + sigma * dt ** 0.5 * torch.randn(2, 4, 8, generator=g)
    dist = torch.distributions.Normal(mean, sigma * dt ** 0.5)
    const = -torch.log(torch.tensor(sigma * dt ** 0.5)) - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    expected = (dist.log_prob(x_next) - const).flatten(1).mean(1)
    torch.testing.assert_close(M.sde_step_logprob(x_next, mean, sigma, dt), expected)
    eps_hat = x + (1 - t) * v
    torch.testing.assert_close(mean, x - (v + 0.5 * sigma ** 2 * eps_hat / t) * dt)


def test_flex_attention_equals_dense_mask(net):
    """The FlexAttention block-mask path gives the dense-mask path's outputs on packed rows with every split kind."""
    g = torch.Generator().manual_seed(7)
    D = net.cfg.patch_latent_dim
    segs = sample_segments(net.cfg, g) + [M.VaeImage(torch.randn(6, D, generator=g), (2, 3), t=0.4, target=torch.zeros(6, D))]
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
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    u = torch.sigmoid(torch.randn(4, generator=g2))
    torch.testing.assert_close(M.sample_flow_time(4, 3.0, g1), 3 * u / (1 + 2 * u))
    x_t, v = M.flow_interpolate(torch.tensor([2.0]), torch.tensor([-1.0]), 0.25)
    assert float(x_t) == pytest.approx(1.25) and float(v) == pytest.approx(-3.0)
    assert M.flow_matching_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])).tolist() == [5.0]


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


def test_rmsnorm_by_hand():
    norm = M.RMSNorm(2, eps=0.0)
    assert norm(torch.tensor([3.0, 4.0])).tolist() == pytest.approx([3 / 12.5 ** 0.5, 4 / 12.5 ** 0.5])


def test_saved_folder_works_in_the_official_app(net, tmp_path):
    """Safetensors carry {"format": "pt"} as the official files do; the tokenizer files of the source folder are kept,
    and a BPE tokenizer without them gets the vocab.json + merges.txt that Qwen2Tokenizer.from_pretrained reads."""
    from safetensors import safe_open
    from tokenizers import Tokenizer, models, trainers
    bpe = Tokenizer(models.BPE())
    bpe.train_from_iterator(["a b c ab bc abc"] * 10, trainers.BpeTrainer(special_tokens=list(M.SPECIAL_TOKENS.values())))
    M.save_pretrained(net, tmp_path / "toy", tokenizer=bpe)
    with safe_open(str(tmp_path / "toy" / "ema.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "toy" / "vocab.json").read_text()) == bpe.get_vocab(with_added_tokens=False)
    assert (tmp_path / "toy" / "merges.txt").exists()
    (tmp_path / "toy" / "tokenizer_config.json").write_text('{"model_max_length": 32768}')
    M.save_pretrained(net, tmp_path / "tuned", tokenizer=bpe, tokenizer_source=tmp_path / "toy")
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (tmp_path / "tuned" / name).read_bytes() == (tmp_path / "toy" / name).read_bytes()

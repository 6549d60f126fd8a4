"""engine.py: the re-entry switch that inference and RL's replay share (CLEAR §3.3), and where gradients flow through
it."""

import pytest
import torch

import data as D
import engine as E
import model as M
from conftest import tiny_cfg

VIT = (16, 8, 8)  # the tiny model's re-encoded ViT picture: at most 16 px, at least 8, patch 8


def test_bridge_reentry_is_the_clean_vae_input(net):
    """b(x0) = vae2llm(x0) + time_embedder(0) + latent_pos_embed: the bridge re-enters x0 as a clean (t = 0) VAE block,
    so it adds no parameter (CLEAR §3.3)."""
    x0 = torch.randn(6, net.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(1))
    (seg,) = E.reentry_segments(net, x0, (2, 3), "bridge", VIT)
    assert isinstance(seg, M.VaeImage) and seg.t == 0 and torch.equal(seg.tokens, x0)
    packed = M.pack([[seg]], net.cfg)
    b = net.embed_latent(packed.vae_tokens, packed.vae_t, packed.vae_pos)
    side = net.cfg.max_latent_size  # by hand: row-major ids on the max_latent_size table, time embedding of t = 0
    ids = [0, 1, 2, side, side + 1, side + 2]
    by_hand = net.vae2llm(x0) + net.time_embedder(torch.zeros(6)) + net.latent_pos_embed.pos_embed[ids]
    torch.testing.assert_close(b, by_hand)


@pytest.mark.parametrize("reentry", E.REENTRY)
def test_inference_and_the_training_replay_see_the_same_context(net, reentry):
    """One switch: text after a restoration re-entered into the KV cache (inference) has the hidden states of the same
    text after reentry_segments in a packed training forward (RL's replay), for every re-entry path; rows not selected
    are left as they were."""
    g = torch.Generator().manual_seed(3)
    grid = (2, 2)
    x0 = torch.randn(2, 4, net.cfg.patch_latent_dim, generator=g)
    cache = net.new_cache(2)
    with torch.no_grad():
        net.add_text(cache, [[5, 6, 7], [5, 6, 7]])
        lens = cache.lens.clone()
        E.reenter(net, cache, x0, grid, torch.tensor([True, False]), reentry, VIT)
        assert cache.lens[1] == lens[1] and cache.lens[0] > lens[0]
        cached = net.add_text(cache, [[8, 9], [8, 9]])[0]
        segs = E.reentry_segments(net, x0[0], grid, reentry, VIT)
        packed = M.pack([[M.Text([5, 6, 7])] + segs + [M.Text([8, 9])]], net.cfg)
        hidden = net(packed).hidden[-4:]  # <|im_start|> 8 9 <|im_end|>, the sample's last four tokens
    torch.testing.assert_close(cached, hidden, atol=2e-5, rtol=0)


def answer_loss_after_restore(net, reentry: str):
    """Denoise one step with gradients on, re-enter the result, and score an answer: returns the loss."""
    cfg = net.cfg
    g = torch.Generator().manual_seed(2)
    grid = (2, 2)
    prompt = [M.Text([5, 6, 7])]
    cache = net.new_cache()
    net.add_text(cache, [prompt[0].ids])
    x_t = torch.randn(1, 4, cfg.patch_latent_dim, generator=g)
    x0 = x_t - net.velocity(cache, x_t, 1.0, grid)  # one Euler step from t=1 to t=0, differentiable
    out = net(M.pack([prompt + E.reentry_segments(net, x0[0], grid, reentry, VIT) + [M.Text([8, 9], loss=True)]], cfg))
    return out.ce.sum()


def test_answer_gradient_reaches_the_denoiser_only_through_the_bridge(net):
    """The answer loss reaches the denoiser's output head (llm2vae) through the bridge, not through decode-reencode
    (8-bit pixels in between)."""
    net.zero_grad()
    answer_loss_after_restore(net, "bridge").backward()
    assert net.llm2vae.weight.grad is not None and net.llm2vae.weight.grad.abs().sum() > 0
    for reentry in ("decode_reencode", "decode_reencode_vae"):
        net.zero_grad()
        answer_loss_after_restore(net, reentry).backward()
        assert net.llm2vae.weight.grad is None or net.llm2vae.weight.grad.abs().sum() == 0
    net.zero_grad()


def test_decode_reencode_sees_the_decoded_picture(net):
    """decode_reencode re-enters the 8-bit decoded picture as ViT pixels at the re-encode size; decode_reencode_vae
    puts the same picture's latent before it."""
    x0 = torch.randn(4, net.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(4))
    picture = E.decode_image(net, x0, (2, 2))
    (vit,) = E.reentry_segments(net, x0, (2, 2), "decode_reencode", VIT)
    assert torch.equal(vit.pixels, D.image_to_tensor(D.resize_image(picture, *VIT)))
    vae, vit2 = E.reentry_segments(net, x0, (2, 2), "decode_reencode_vae", VIT)
    assert torch.equal(vit2.pixels, vit.pixels)
    assert torch.equal(vae.tokens, net.encode_pixels(D.image_to_tensor(picture)[None])[0][0])


def test_decode_reencode_resizes_the_picture_for_the_vit(net):
    """The decoded picture of a 2 x 3 grid is 12 x 8 px; the ViT sees it at vit_sizes (max, min, stride): (16, 8, 8)
    rounds the long side to 16 px, (32, 16, 8) doubles it to 24 x 16 px. The VAE block keeps the latent grid."""
    x0 = torch.randn(6, net.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(7))
    assert E.decode_image(net, x0, (2, 3)).size == (12, 8)
    for sizes, shape in (((16, 8, 8), (3, 8, 16)), ((32, 16, 8), (3, 16, 24))):
        (vit,) = E.reentry_segments(net, x0, (2, 3), "decode_reencode", sizes)
        assert tuple(vit.pixels.shape) == shape, sizes
    vae, vit = E.reentry_segments(net, x0, (2, 3), "decode_reencode_vae", (32, 16, 8))
    assert vae.grid == (2, 3) and tuple(vae.tokens.shape) == (6, net.cfg.patch_latent_dim)
    assert tuple(vit.pixels.shape) == (3, 16, 24)


def test_embed_latent_at_any_t(net):
    """embed_latent is how every latent token enters the LLM: vae2llm of the token, plus the timestep embedding of its
    own t, plus the latent position embedding of its own id (each token's t and id are used, none shared)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(6, net.cfg.patch_latent_dim, generator=g, dtype=torch.float64)  # cast to the model's dtype
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.1])
    ids = torch.tensor([0, 1, 2, 4, 5, 6])
    out = net.embed_latent(tokens, t, ids)
    assert out.dtype == torch.float32 and out.shape == (6, net.cfg.hidden_size)
    for i in range(6):
        row = net.vae2llm(tokens[i].float()) + net.time_embedder(t[i:i + 1])[0] + net.latent_pos_embed.pos_embed[ids[i]]
        torch.testing.assert_close(out[i], row)


def test_reentry_segments_are_fixed_context_and_named(net):
    """Every re-entered segment is context that condition dropout must not remove (droppable False), the bridge block
    is clean (t = 0, no target, no pair), and an unknown path is refused with the choices named."""
    x0 = torch.randn(4, net.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(6))
    for reentry in E.REENTRY:
        segs = E.reentry_segments(net, x0, (2, 2), reentry, VIT)
        assert segs and all(not s.droppable and s.pair is None for s in segs), reentry
        assert all(s.t == 0 and s.target is None and s.grid == (2, 2) for s in segs if isinstance(s, M.VaeImage))
    with pytest.raises(ValueError, match="decode_reencode_vae"):
        E.reentry_segments(net, x0, (2, 2), "pixels", VIT)


def prefix(grid, vit_side, g):
    """System text, a VAE picture of `grid` tokens, a ViT picture vit_side px wide, a question."""
    tokens = torch.randn(grid[0] * grid[1], tiny_cfg().patch_latent_dim, generator=g)
    return [M.Text([5, 6]), M.VaeImage(tokens, grid), M.VitImage(torch.rand(3, 16, vit_side, generator=g) * 2 - 1),
            M.Text([7, 8, 9])]


def test_rows_with_pictures_of_other_sizes_run_as_separate_batches():
    """Real data mixes picture sizes in one step: rows are grouped by prefix structure (first appearance first) and
    each group runs as its own batch, so traces come back in the rows' order, each with its own grid, exactly as
    running the groups one after the other with the same generator (stacking them crashed)."""
    from test_rl import ByteTok
    torch.manual_seed(0)
    model = M.Bagel(tiny_cfg()).eval()
    g = torch.Generator().manual_seed(0)
    a, b = prefix((2, 2), 16, g), prefix((2, 3), 24, g)
    assert E.structure(a) != E.structure(b) and E.structure(a) == E.structure(prefix((2, 2), 16, g))
    cfg = E.InferenceConfig(max_rounds=2, max_text_tokens=4, temperature=1.0, sampler="sde", num_timesteps=3,
                            force_restore=True, vit_transform=VIT)
    mixed = E.reason(model, ByteTok(), [a, b, a, b], cfg, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    alone_a, alone_b = E.reason(model, ByteTok(), [a, a], cfg, gen), E.reason(model, ByteTok(), [b, b], cfg, gen)
    assert [tr.grid for tr in mixed] == [(2, 2), (2, 3), (2, 2), (2, 3)]
    assert [tuple(tr.latents[0].shape) for tr in mixed] == [(4, 64), (6, 64), (4, 64), (6, 64)]
    for got, want in zip(mixed, [alone_a[0], alone_b[0], alone_a[1], alone_b[1]]):
        assert got.ids == want.ids and torch.equal(got.latents[0], want.latents[0])

"""Conformance against the official BAGEL implementation (shared/conformance/bagel_tiny and folders of that layout).

Every size, token id, image shape and sampler option is read from the folder ($NANOCLEAR_CONFORMANCE, default
../shared/conformance/bagel_tiny), so the same test runs against reference folders of other shapes.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as CK
import data as D
import model as M

REF = Path(os.environ.get("NANOCLEAR_CONFORMANCE", "../shared/conformance/bagel_tiny"))
pytestmark = pytest.mark.skipif(not (REF / "cases.safetensors").exists(),
                                reason=f"no conformance folder at {REF} (set NANOCLEAR_CONFORMANCE to run these tests)")
TOL = 1e-4  # cases.json: floats of O(1), float32, different kernels
TOL_LOGITS = 2e-5  # README: a wrong RMSNorm eps moves LM logits by ~5e-5, so compare well below 1e-4


def close(a, b, tol=TOL):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3g} > {tol:g}"


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file
    cases = load_file(str(REF / "cases.safetensors"))
    meta = json.loads((REF / "cases.json").read_text())
    tiny = json.loads((REF / "bagel_tiny_config.json").read_text())
    return cases, meta, tiny


def overrides_from(tiny: dict) -> dict:
    """Values the official code passes in code rather than in llm/vit json (bagel_tiny_config.json)."""
    b, ae, ids = tiny["bagel_config"], tiny["ae_params"], tiny["special_token_ids"]
    assert not b.get("interpolate_pos", False), "only interpolate_pos=False (BAGEL's setting) is implemented"
    assert ae["downsample"] == 2 ** (len(ae["ch_mult"]) - 1) and ae["in_channels"] == ae["out_ch"] == 3
    return dict(latent_patch_size=b["latent_patch_size"], max_latent_size=b["max_latent_size"],
                vit_max_num_patch_per_side=b["vit_max_num_patch_per_side"], connector_act=b["connector_act"],
                timestep_shift=b["timestep_shift"], ae_ch=ae["ch"], ae_ch_mult=tuple(ae["ch_mult"]),
                ae_num_res_blocks=ae["num_res_blocks"], ae_z_channels=ae["z_channels"],
                ae_scale_factor=ae["scale_factor"], ae_shift_factor=ae["shift_factor"],
                bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                start_of_image_id=ids["start_of_image"], end_of_image_id=ids["end_of_image"])


@pytest.fixture(scope="module")
def bagel(ref):
    torch.manual_seed(0)
    return CK.load_pretrained(REF, overrides=overrides_from(ref[2]))


def resize(img: Image.Image, kw: dict) -> Image.Image:
    return D.resize_image(img, kw["max_image_size"], kw["min_image_size"], kw["image_stride"])


def transform(raw_u8: torch.Tensor, kw: dict) -> torch.Tensor:
    """BAGEL's ImageTransform(max, min, stride) on a uint8 HxWx3 image."""
    return D.image_to_tensor(resize(Image.fromarray(raw_u8.numpy()), kw))


def test_text_lm_and_packed_rows(bagel, ref):
    """c1/c1b: und-expert causal LM; two packed sequences restart positions and never see each other."""
    c, _, _ = ref
    cache = bagel.new_cache()
    h = bagel.add_text(cache, [c["c1_input_ids"].tolist()], wrap=False)[0]
    close(h, c["c1_final_hidden"], TOL_LOGITS)
    close(bagel.logits(h), c["c1_logits"], TOL_LOGITS)
    lens = c["c1b_query_lens"].tolist()
    ids = c["c1b_input_ids"].split(lens)
    cache2 = bagel.new_cache(batch=len(lens))
    h2 = bagel.add_text(cache2, [x.tolist() for x in ids], wrap=False)
    got = torch.cat([h2[i, :n] for i, n in enumerate(lens)])
    close(bagel.logits(got), c["c1b_logits"], TOL_LOGITS)
    assert cache2.ropes.tolist() == [int(p) + 1 for p in (c["c1b_position_ids"].split(lens)[i][-1]
                                                          for i in range(len(lens)))]


def test_chunked_prefill_equals_one_shot(bagel, ref):
    """A prefill split in two chunks against the KV cache gives the one-shot logits."""
    c, _, _ = ref
    ids = c["c1_input_ids"].tolist()
    cache = bagel.new_cache()
    h1 = bagel.add_text(cache, [ids[: len(ids) * 2 // 3]], wrap=False)
    h2 = bagel.add_text(cache, [ids[len(ids) * 2 // 3:]], wrap=False)
    close(bagel.logits(torch.cat([h1, h2], 1)[0]), c["c1_logits"], TOL_LOGITS)


def test_image_transforms(ref):
    """c2/c2b/c4: resize rule (stride, min/max edge, PIL bicubic) and [-1, 1] normalisation."""
    c, _, tiny = ref
    t = tiny["image_transforms_used_by_cases"]
    close(transform(c["c2_raw_image_uint8"], t["vit_transform"]), c["c2_pixel_values"], 1e-6)
    close(transform(c["c2b_raw_image_uint8"], t["vit_transform"]), c["c2b_pixel_values"], 2 / 255 + 1e-6)
    close(transform(c["c4_raw_image_uint8"], t["vae_transform"]), c["c4_pixel_values"], 1e-6)


def test_vit_path_understanding_and_greedy(bagel, ref):
    """c2: patchify, SigLIP, connector, sin-cos pos, text + ViT block + text logits, greedy decode."""
    c, _, _ = ref
    cfg = bagel.cfg
    P = cfg.vit_patch_size
    pix = c["c2_pixel_values"]
    h, w = pix.shape[1] // P, pix.shape[2] // P
    close(M.patchify(pix, P), c["c2_vit_patch_tokens"], 1e-6)
    pos = M.vit_position_ids(h, w, cfg.vit_max_num_patch_per_side)
    assert pos.tolist() == c["c2_vit_position_ids"].tolist()
    vit = bagel.vit_model.vision_model(c["c2_vit_patch_tokens"], pos, [h * w])
    close(vit, c["c2_vit_last_hidden"])
    close(bagel.connector(vit), c["c2_connector_out"])
    close(bagel.vit_pos_embed(pos), c["c2_vit_pos_emb"])
    close(bagel.embed_vit(c["c2_vit_patch_tokens"], pos, [h * w]), c["c2_image_llm_embeds"])

    seq, splits = c["c2_seq_token_ids"], c["c2_split_lens"].tolist()
    a, img_n, b = splits
    cache = bagel.new_cache()
    hs = [bagel.add_text(cache, [seq[1:a - 1].tolist()])[0], bagel.add_vit_image(cache, pix)[0],
          bagel.add_text(cache, [seq[a + img_n + 1:a + img_n + b - 1].tolist()])[0]]
    close(torch.cat(hs), c["c2_final_hidden_all"])
    close(bagel.logits(torch.cat(hs)), c["c2_logits_all"], TOL_LOGITS)
    assert int(cache.ropes[0]) == int(c["c2_greedy_start_position"][0])

    greedy = c["c2_greedy_tokens"].tolist()
    assert greedy[0] == cfg.bos_token_id
    ids, _, _ = bagel.decode_text(cache.copy(), max_new_tokens=len(greedy) - 1, stop_ids=())
    assert ids[0] == greedy[1:]
    step_logits, tok = [], greedy[0]
    for i in range(len(greedy)):
        step_logits.append(bagel.logits(bagel.add_text(cache, [[tok]], wrap=False)[0, -1]))
        tok = greedy[i + 1] if i + 1 < len(greedy) else None
    close(torch.stack(step_logits), c["c2_greedy_step_logits"], TOL_LOGITS)


def test_generation_forward_and_text_cfg(bagel, ref):
    """c3: markers through und, latents through gen, one RoPE id, velocity; text CFG against the empty context."""
    c, _, _ = ref
    cfg = bagel.cfg
    H, W = c["c3_image_hw"].tolist()
    grid = (H // cfg.latent_downsample, W // cfg.latent_downsample)
    assert M.vit_position_ids(*grid, cfg.max_latent_size).tolist() == c["c3_latent_position_ids"].tolist()
    t = float(c["c3_t"][0])
    x_t, _ = M.flow_interpolate(c["c3_x0_tokens"], c["c3_noise_tokens"], t)
    close(x_t, c["c3_x_t_tokens"], 1e-6)
    cache = bagel.new_cache()
    bagel.add_text(cache, [c["c3_prompt_ids"].tolist()], wrap=False)
    assert (int(cache.ropes[0]) == int(c["c3_query_position_ids"][0]) and
            int(cache.lens[0]) == int(c["c3_query_kv_indexes"][0]))
    v = bagel.velocity(cache, c["c3_x_t_tokens"][None], t, grid)[0]
    close(v, c["c3_velocity"])
    vu = bagel.velocity(bagel.new_cache(), c["c3_x_t_tokens"][None], t, grid)[0]
    close(vu, c["c3b_velocity_uncond"])
    key = next(k for k in c if k.startswith("c3b_velocity_cfg_text"))
    scale, renorm = re.match(r"c3b_velocity_cfg_text([\d.]+)_(\w+)", key).groups()
    close(M.cfg_combine(v[None], vu[None], None, float(scale), 1.0, renorm)[0], c[key])


def test_autoencoder(bagel, ref):
    """c4: FLUX encoder moments, posterior-mean latent, decode, and BAGEL's latent patchify."""
    c, _, _ = ref
    x = c["c4_pixel_values"][None]
    close(bagel.vae.encoder(x), c["c4_encoder_moments"])
    z = bagel.vae.encode(x)
    close(z, c["c4_latent"])
    close(bagel.vae.decode(c["c4_latent"]), c["c4_recon"])
    close(bagel.vae.decode(c["c4_decode_input_latent"]), c["c4_decoded"])
    close(M.patchify(c["c4_latent"][0], bagel.cfg.latent_patch_size), c["c4_latent_tokens"], 1e-6)
    grid = (x.shape[2] // bagel.cfg.latent_downsample, x.shape[3] // bagel.cfg.latent_downsample)
    close(M.unpatchify(c["c4_latent_tokens"], grid, bagel.cfg.latent_patch_size), c["c4_latent"][0], 0)


def check_generation(bagel, c, name, variant, cache, text_cache, img_cache, grid):
    a = variant["generate_image_scalar_args"]
    x0, traj = bagel.generate_image(cache, grid, c[f"{name}_init_noise"][None], a["num_timesteps"], a["timestep_shift"],
                              cfg_text_cache=text_cache, cfg_img_cache=img_cache, cfg_text_scale=a["cfg_text_scale"],
                              cfg_img_scale=a["cfg_img_scale"], cfg_interval=a["cfg_interval"],
                              cfg_renorm_type=a["cfg_renorm_type"], cfg_renorm_min=a["cfg_renorm_min"])
    close(torch.tensor([s["t"] for s in traj]), c[f"{name}_step_timesteps"], 1e-6)
    lo, hi = a["cfg_interval"]
    gated = [lo < t <= hi for t in c[f"{name}_step_timesteps"].tolist()]
    assert [a["cfg_text_scale"] if g else 1.0 for g in gated] == c[f"{name}_step_cfg_text_scale"].tolist()
    assert [a["cfg_img_scale"] if g else 1.0 for g in gated] == c[f"{name}_step_cfg_img_scale"].tolist()
    close(torch.stack([s["x_t"][0] for s in traj]), c[f"{name}_step_x_t"])
    close(torch.stack([s["v"][0] for s in traj]), c[f"{name}_step_velocity"])
    close(x0[0], c[f"{name}_final_latent_tokens"])
    img = bagel.decode_latent(x0[0], grid)
    close(img[None], c[f"{name}_decoded_float"])
    u8 = np.asarray(D.tensor_to_image(img), dtype=np.int16)
    assert np.abs(u8 - c[f"{name}_image_uint8"].numpy().astype(np.int16)).max() <= 1


def test_text_to_image_generation(bagel, ref):
    """c5a-d: Euler sampler with timestep shift, CFG gating by interval, text/image scales, renorm variants."""
    c, meta, _ = ref
    cfg = bagel.cfg
    for name, variant in meta["cases"]["c5"]["variants"].items():
        H, W = variant["image_shapes"]
        grid = (H // cfg.latent_downsample, W // cfg.latent_downsample)
        cache, img_cache = bagel.new_cache(), bagel.new_cache()
        for ctx in (cache, img_cache):  # t2i: the image-unconditional context is the same text context
            bagel.add_text(ctx, [c["c5_prompt_ids"].tolist()], wrap=False)
        assert (int(cache.lens[0]) == int(c["c5_key_values_lens"][0]) and
                int(cache.ropes[0]) == int(c["c5_packed_position_ids"][0]))
        check_generation(bagel, c, name, variant, cache, bagel.new_cache(), img_cache, grid)


def test_editing_generation(bagel, ref):
    """c6: VAE conditioning (gen expert, t=0) + re-resized ViT block + text; text- and image-unconditional contexts."""
    c, meta, tiny = ref
    cfg = bagel.cfg
    t = tiny["image_transforms_used_by_cases"]
    vae_img = resize(Image.fromarray(c["c6_raw_image_uint8"].numpy()), t["vae_transform"])
    vae_pix = D.image_to_tensor(vae_img)
    close(vae_pix[None], c["c6_vae_padded_images"], 1e-6)
    vit_pix = D.image_to_tensor(resize(vae_img, t["vit_transform"]))  # BAGEL: ViT re-resizes the VAE-sized image
    close(M.patchify(vit_pix, cfg.vit_patch_size), c["c6_vit_pixel_tokens"], 2 / 255 + 1e-6)
    cache = bagel.new_cache()
    bagel.add_latent(cache, *bagel.encode_pixels(vae_pix[None]))
    bagel.add_vit_image(cache, vit_pix)
    text_cache = cache.copy()  # context before the last text
    img_cache = bagel.new_cache()  # texts only, no images
    for ctx in (cache, img_cache):
        bagel.add_text(ctx, [c["c6_prompt_ids"].tolist()], wrap=False)
    for ctx, kv, pos in ((cache, "c6_key_values_lens", "c6_packed_position_ids"),
                         (text_cache, "c6_cfg_text_key_values_lens", "c6_cfg_text_packed_position_ids"),
                         (img_cache, "c6_cfg_img_key_values_lens", "c6_cfg_img_packed_position_ids")):
        assert (int(ctx.lens[0]), int(ctx.ropes[0])) == (int(c[kv][0]), int(c[pos][0]))
    grid = (vae_pix.shape[1] // cfg.latent_downsample, vae_pix.shape[2] // cfg.latent_downsample)
    check_generation(bagel, c, "c6", meta["cases"]["c6"]["variants"]["c6"], cache, text_cache, img_cache, grid)


def test_sincos_table_matches_official(bagel, ref):
    """The 2-D sin-cos tables we compute equal the official stored ones (first half = column index)."""
    c, _, _ = ref
    cfg = bagel.cfg
    close(M.sincos_2d(cfg.hidden_size, cfg.max_latent_size), bagel.latent_pos_embed.pos_embed, 1e-6)
    close(M.sincos_2d(cfg.hidden_size, cfg.vit_max_num_patch_per_side), bagel.vit_pos_embed.pos_embed, 1e-6)
    if "ref_sincos_latent_pos_embed" in c:
        close(M.sincos_2d(c["ref_sincos_latent_pos_embed"].shape[1],
                          int(c["ref_sincos_latent_pos_embed"].shape[0] ** 0.5)),
              c["ref_sincos_latent_pos_embed"], 1e-6)


def test_training_forward_matches_inference(bagel, ref):
    """The packed training forward (causal text, full image, noise block) gives the inference-path numbers (c2, c3)."""
    c, _, _ = ref
    seq, (a, n_img, b) = c["c2_seq_token_ids"], c["c2_split_lens"].tolist()
    sample = [M.Text(seq[1:a - 1].tolist()), M.VitImage(c["c2_pixel_values"]),
              M.Text(seq[a + n_img + 1:a + n_img + b - 1].tolist())]
    packed = M.pack([sample], bagel.cfg)
    assert packed.position_ids[0].tolist() == c["c2_seq_position_ids"].tolist()
    out = bagel(packed)
    close(bagel.logits(out.hidden), c["c2_logits_all"], TOL)
    H, W = c["c3_image_hw"].tolist()
    grid = (H // bagel.cfg.latent_downsample, W // bagel.cfg.latent_downsample)
    t = float(c["c3_t"][0])
    prompt = c["c3_prompt_ids"].tolist()
    target = c["c3_noise_tokens"] - c["c3_x0_tokens"]
    packed = M.pack([[M.Text(prompt[1:-1]), M.VaeImage(c["c3_x_t_tokens"], grid, t=t, target=target)]], bagel.cfg)
    out = bagel(packed)
    close(out.v, c["c3_velocity"])
    close(out.mse, M.flow_matching_loss(c["c3_velocity"], target))

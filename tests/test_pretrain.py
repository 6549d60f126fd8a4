"""Stage 0 (pretrain.py): what the toy base model is shown, and how its vision encoder is taught."""

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

import data as D
import model as M
import pretrain as P


def pooled_encode(pixels):
    """A stand-in autoencoder: 8x8 average pooling, so a latent tells which picture it came from."""
    return F.avg_pool2d(pixels, 8).flatten(2).transpose(1, 2).contiguous(), (8, 8)


def test_stage0_understanding_sees_clean_pictures_only_and_restoration_maps_degraded_to_clean(toy_tok):
    pool = P.example_pool(D.ToyWorld(0), np.random.default_rng(3), 40, pooled_encode)
    examples = [ex for ex, _ in pool]
    samples = P.base_samples(pool, toy_tok, np.random.default_rng(0), torch.Generator().manual_seed(0), 3.0)
    assert len(samples) == len(examples)
    kinds = Counter()
    for ex, sample in zip(examples, samples):
        clean, degraded = D.image_to_tensor(ex.clean), D.image_to_tensor(ex.degraded)
        noised = [s for s in sample if isinstance(s, M.VaeImage) and s.t > 0]
        shown = [s.pixels for s in sample if isinstance(s, M.VitImage)]
        if any(isinstance(s, M.Text) and s.loss for s in sample):  # understanding: text answers are trained
            assert not noised and all(torch.equal(p, clean) for p in shown)
            latents = [s.tokens for s in sample if isinstance(s, M.VaeImage)]
            assert all(torch.equal(z, pooled_encode(clean[None])[0][0]) for z in latents)
            kinds["understanding"] += 1
            continue
        assert len(noised) == P.NOISED_COPIES and len({s.t for s in noised}) == P.NOISED_COPIES  # own t each
        for target in noised:  # generation: the clean picture is always what is drawn
            x0 = target.tokens - target.t * target.target  # x_t = (1 - t) x0 + t n and v = n - x0
            assert torch.allclose(x0, pooled_encode(clean[None])[0][0], atol=1e-5)
        if shown and torch.equal(shown[0], degraded):
            kinds["restore"] += 1
    assert kinds["understanding"] >= 6 and kinds["restore"] >= 10, kinds


def test_vision_probe_reads_shape_and_colour_from_occupied_quadrants_only():
    probe = P.VisionProbe(dim=4, grid=8)
    with torch.no_grad():
        for head in probe.heads.values():
            head.weight.zero_()
            head.bias.zero_()
        probe.heads["shape"].weight[0, 0] = probe.heads["shape"].weight[1, 1] = 1.0
        probe.heads["colour"].weight[2, 0] = probe.heads["colour"].weight[3, 1] = 1.0
    h = torch.zeros(1, 64, 4)
    h[0, probe.quadrant == 0, 0] = 1.0  # the object's quadrant says shape 0, colour 2
    h[0, probe.quadrant != 0, 1] = 10.0  # the empty quadrants say shape 1, colour 3, louder
    labels = {"count": torch.tensor([1]), "occupied": torch.tensor([[1.0, 0, 0, 0]]),
              "shape": torch.tensor([0]), "colour": torch.tensor([2])}
    _, acc = probe(h, labels)
    assert acc["shape"] == 1.0 and acc["colour"] == 1.0
    labels["occupied"] = torch.tensor([[0.0, 1, 1, 1]])  # the same features read through the other quadrants
    _, acc = probe(h, labels)
    assert acc["shape"] == 0.0 and acc["colour"] == 0.0


def test_scene_labels_match_the_scene():
    scene = D.sample_scene(np.random.default_rng(5), 3)
    labels = P.scene_labels([scene])
    assert labels["count"].tolist() == [3]
    assert labels["occupied"].sum().item() == 3
    assert all(labels["occupied"][0, o[2]] == 1 for o in scene.objects)
    assert D.SHAPES[labels["shape"][0]] == scene.objects[0][0]
    assert list(D.COLOURS)[labels["colour"][0]] == scene.objects[0][1]


def test_shipped_base_is_what_pretrain_builds_at_its_defaults():
    """assets/toy_base was built by `python pretrain.py` at today's defaults and loads strictly into today's model
    code: changing a Stage 0 default or the architecture without rebuilding it fails here."""
    import checkpoint as CK
    built = CK.read_json(P.SHIPPED / "nanoclear.json")
    assert built["stage"] == "pretrain" and P.shipped_settings(built["args"]) == P.shipped_settings(P.PretrainConfig())
    tok = D.Tokenizer.from_folder(P.SHIPPED)
    model = CK.load_pretrained(P.SHIPPED)
    expected = P.toy_config(tok)
    for field in ("ae_shift_factor", "ae_scale_factor"):  # measured by Stage 0's phase 1, so set by the build
        assert getattr(model.cfg, field) != getattr(expected, field)
        setattr(expected, field, getattr(model.cfg, field))
    assert model.cfg == expected


def test_shipped_base_serves_only_the_settings_it_was_built_with():
    """sft.py starts from the shipped base only where Stage 0 would have built the same one."""
    defaults = P.PretrainConfig()
    assert P.shipped_base(defaults.seed, defaults.world_seed, defaults.steps) == P.SHIPPED
    for other in ((1, 0, defaults.steps), (0, 1, defaults.steps), (0, 0, defaults.steps - 1)):
        assert P.shipped_base(*other) is None

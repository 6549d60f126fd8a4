"""Shared fixtures: a tiny model config and network, a tiny toy checkpoint (random weights, the toy tokenizer) that the
stage tests start from, and one recorded SDE step. `--exercise A3.2` (or `A3`) runs only the tests course/manifest.py
lists for that exercise (or assignment)."""

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import checkpoint as CK
import data as D
import model as M
import pretrain


def pytest_addoption(parser):
    parser.addoption("--exercise", action="append", default=[],
                     help="run only the tests of this course exercise or assignment (course/manifest.py), e.g. A3.2")


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--exercise")
    if not wanted:
        return
    spec = importlib.util.spec_from_file_location("manifest", Path(__file__).parent.parent / "course" / "manifest.py")
    manifest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(manifest)
    known = {ex["id"] for ex in manifest.EXERCISES} | set(manifest.ASSIGNMENTS)
    if set(wanted) - known:
        raise pytest.UsageError(f"--exercise {sorted(set(wanted) - known)[0]}: not in course/manifest.py")
    tests = {t for ex in manifest.EXERCISES if {ex["id"], ex["id"].split(".")[0]} & set(wanted) for t in ex["tests"]}
    keep = [item for item in items if item.nodeid in tests or item.nodeid.split("[")[0] in tests]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vit_hidden_size=32, vit_intermediate_size=64, vit_num_hidden_layers=1, vit_num_attention_heads=2)


@pytest.fixture(scope="session")
def toy_tok():
    return D.train_toy_tokenizer(D.toy_corpus(n=300))


@pytest.fixture(scope="session")
def toy_ckpt(tmp_path_factory, toy_tok):
    """A BAGEL-format folder holding a randomly initialised, toy-shaped (64 px pictures) but very narrow model."""
    torch.manual_seed(0)
    model = M.Bagel(replace(pretrain.toy_config(toy_tok), **TINY))
    pretrain.init_weights(model)
    folder = tmp_path_factory.mktemp("ckpt") / "base"
    CK.save_pretrained(model, folder, tokenizer=toy_tok.tk, meta={"stage": "pretrain"})  # a toy base, as Stage 0 writes
    return folder


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


@pytest.fixture
def sde_step():
    """sde_step(t, batch) -> (x_t, v, x_next, mean, t, dt, sigma): one step of the rollout sampler (model.sde_step_mean)
    from seeded random x_t and v, with dt 0.05 and sigma 0.3."""
    def make(t: float, batch: int = 2):
        g = torch.Generator().manual_seed(5)
        x, v = torch.randn(batch, 4, 8, generator=g), torch.randn(batch, 4, 8, generator=g)
        dt, sigma = 0.05, 0.3
        mean = M.sde_step_mean(x, v, t, dt, sigma)
        return x, v, mean + sigma * dt ** 0.5 * torch.randn(batch, 4, 8, generator=g), mean, t, dt, sigma
    return make

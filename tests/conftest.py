"""Shared fixtures: a tiny toy checkpoint (random weights, the toy tokenizer) that the stage tests start from."""

from dataclasses import replace

import pytest
import torch

import data as D
import model as M
import pretrain

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
    M.save_pretrained(model, folder, tokenizer=toy_tok.tk, meta={"stage": "test"})
    return folder

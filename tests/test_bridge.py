"""Stage 2 (bridge.py): the distillation losses and their training step, and the re-entry latency probe."""

import numpy as np
import pytest
import torch

import bridge
import checkpoint as CK
import data as D
import engine as E
import model as M
import sft


def test_layer_weights_sum_to_one_and_grow():
    """(l + 1) / sum over the chosen layers; the last layer is always included, whatever the stride."""
    w = bridge.distill_layer_weights(28, 1)
    assert len(w) == 28 and sum(w.values()) == pytest.approx(1.0) and w[27] == pytest.approx(28 / 406)
    w3 = bridge.distill_layer_weights(8, 3)
    assert sorted(w3) == [2, 5, 7] and sum(w3.values()) == pytest.approx(1.0)


def test_kl_zero_iff_student_equals_teacher():
    """KL(softmax(teacher) || softmax(student)) is 0 for equal hidden states, positive otherwise, and the teacher is
    detached."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 16, generator=g, requires_grad=True)
    assert float(bridge.distill_kl(t, t.detach().clone())) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(5, 16, generator=g, requires_grad=True)
    kl = bridge.distill_kl(t, s)
    assert kl.item() > 0
    kl.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert bridge.distill_final_mse(t, t.detach() + 0).item() == 0 and bridge.distill_final_mse(t, s).item() > 0


def test_per_layer_distillation_in_the_training_step(toy_ckpt):
    """A Stage-2 step on real restore samples has one pair per sample and a positive term that trains the student."""
    model = CK.load_pretrained(toy_ckpt)
    tok = D.Tokenizer.from_folder(toy_ckpt)
    world = D.ToyWorld(0)
    stream = world.stream(np.random.default_rng(3))
    examples = [ex for ex in (next(stream) for _ in range(40)) if ex.restore][:2]
    assert examples, "the toy stream yields restore samples"
    samples = sft.build_batch(examples, tok, model.encode_pixels, torch.Generator().manual_seed(0), distill=True)
    packed = M.pack(samples, model.cfg)
    assert len(packed.pairs) == len(examples)
    for v, a in packed.pairs:
        assert len(v) == len(a)
    hook, finish = bridge.distill_loss(packed.pairs, model.cfg.num_hidden_layers, "per_layer_kl", 1)
    out = model(packed, hidden_hook=hook)
    d = finish(out)
    assert d.item() > 0
    model.zero_grad()
    d.backward()
    assert model.vae2llm.weight.grad.abs().sum() > 0  # the student (latent input path) learns
    assert model.llm2vae.weight.grad is None or model.llm2vae.weight.grad.abs().sum() == 0  # no velocity is involved


def test_reentry_latency_measures_all_paths(net):
    """The latency probe times every re-entry path on the same context."""
    lat = bridge.reentry_latency(net, (2, 2), context=12, repeats=2)
    assert set(lat) == set(E.REENTRY) and all(v > 0 for v in lat.values())


def test_distill_kl_direction_by_hand():
    """KL(P_teacher || Q_student) for P = (1/2, 1/2), Q = (1/4, 3/4): 0.5 ln 2 + 0.5 ln(2/3) (the reverse is 0.1308)."""
    teacher, student = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, float(np.log(3.0))]])
    assert float(bridge.distill_kl(teacher, student)) == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3), abs=1e-6)
    assert float(bridge.distill_final_mse(torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
                                          torch.zeros(1, 2))) == pytest.approx((4 + 9) / 2)


def test_distill_weights_and_kl_by_hand():
    """Layer weights: 4 layers, stride 1: 1, 2, 3, 4 tenths; 8 layers, stride 3: layers 2, 5, 7 with 3, 6, 8
    seventeenths; 5 layers, stride 2: layers 1, 3, 4 with 2, 4, 5 elevenths. KL is averaged over tokens: a second token
    with equal rows halves it; the final MSE's teacher is detached."""
    assert bridge.distill_layer_weights(4, 1) == pytest.approx({0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4})
    assert bridge.distill_layer_weights(8, 3) == pytest.approx({2: 3 / 17, 5: 6 / 17, 7: 8 / 17})
    assert bridge.distill_layer_weights(5, 2) == pytest.approx({1: 2 / 11, 3: 4 / 11, 4: 5 / 11})
    k = 0.5 * np.log(2) + 0.5 * np.log(2 / 3)
    teacher, student = torch.zeros(2, 2), torch.tensor([[0.0, float(np.log(3.0))], [0.0, 0.0]])
    assert float(bridge.distill_kl(teacher, student)) == pytest.approx(k / 2, abs=1e-6)
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    s = torch.zeros(1, 2, requires_grad=True)
    bridge.distill_final_mse(t, s).backward()
    assert t.grad is None and s.grad[0].tolist() == pytest.approx([-2.0, -3.0])  # d/ds of ((2 - s)^2 + (3 - s)^2) / 2


def test_distill_loss_by_hand():
    """per_layer_kl: the hook, called after every layer with all hidden rows, adds weight(l) * the sum over pairs of
    KL(teacher rows || student rows); finish() returns the total. Three layers, stride 1 (weights 1/6, 2/6, 3/6): pair
    one differs by KL k at layers 0 and 2, pair two never: (1/6 + 3/6) k. Stride 2: layers 1, 2 (2/5, 3/5): 3/5 k.
    final_mse: no hook; finish(out) sums each pair's MSE of mean-pooled final rows: teacher rows (1, 2) and (5, 5)
    pool to (3, 3.5) against (0, 0): (9 + 12.25) / 2, plus 0 for the second pair. Unknown modes are refused."""
    k = 0.5 * np.log(2) + 0.5 * np.log(2 / 3)
    pairs = [(torch.tensor([0]), torch.tensor([1])), (torch.tensor([2]), torch.tensor([3]))]
    apart = torch.tensor([[0.0, 0.0], [0.0, float(np.log(3.0))], [1.0, 2.0], [1.0, 2.0]])
    alike = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 2.0], [1.0, 2.0]])
    for stride, total in ((1, 4 / 6 * k), (2, 3 / 5 * k)):
        hook, finish = bridge.distill_loss(pairs, 3, "per_layer_kl", stride)
        for layer, h in enumerate((apart, alike, apart)):
            hook(layer, h)
        assert float(finish(None)) == pytest.approx(total, abs=1e-6), stride
    hidden = torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0]])
    pairs2 = [(torch.tensor([0, 2]), torch.tensor([1])), (torch.tensor([3]), torch.tensor([2]))]
    hook, finish = bridge.distill_loss(pairs2, 3, "final_mse", 1)
    assert hook is None and float(finish(M.TrainOutput(ce=None, mse=None, v=None, hidden=hidden))) == pytest.approx(
        (9 + 12.25) / 2)
    with pytest.raises(ValueError, match="per_layer_kl"):
        bridge.distill_loss(pairs, 3, "cosine", 1)

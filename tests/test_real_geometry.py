"""Real checkpoints and real data through every stage: a folder with BAGEL's geometry (ViT patch 14, VAE stride 16,
special tokens at the end of a Qwen2-style vocabulary, tiny widths) built here, photos of real shapes and modes, a
LLaVA-style JSONL with plain and official CLEAR interleaved answers, and a VLMEvalKit TSV: sft.py -> bridge.py ->
rl.py -> evaluate.py each run through their command lines, as the README's real-weights commands do."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import bridge
import checkpoint as CK
import data as D
import evaluate
import model as M
import rl
import sft

WIDTHS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              vit_hidden_size=32, vit_intermediate_size=64, vit_num_hidden_layers=1, vit_num_attention_heads=2,
              vit_patch_size=14, vit_image_size=224, vit_max_num_patch_per_side=16, max_latent_size=16,
              ae_ch=8, ae_ch_mult=(1, 2, 2, 2), ae_num_res_blocks=1, ae_norm_groups=4, timestep_shift=1.0)


def qwen_style_tokenizer(texts) -> Tokenizer:
    """Byte-level BPE whose BAGEL special tokens are added after training (high ids, as in Qwen2's vocabulary)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(D.TOY_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tk.add_special_tokens(list(CK.SPECIAL_TOKENS.values()))
    return tk


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The folder, the photos, the JSONL and the TSV."""
    root = tmp_path_factory.mktemp("real")
    texts = [D.INTERLEAVE_REASON_SYSTEM_PROMPT, D.VLM_THINK_SYSTEM_PROMPT, "What is in the picture? A red car. <think>"
             "The image is blurred.</think> <image_restore> <think>Clear now.</think><answer>A red car.</answer>"] * 3
    tk = qwen_style_tokenizer(texts)
    ids = CK.special_token_ids(tk, "test tokenizer")
    assert min(ids.values()) >= 256  # not the toy's 0..3: every id must be read from the file
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=tk.get_vocab_size() + 8, **ids, **WIDTHS)  # padded vocabulary, as Qwen2's
    CK.save_pretrained(M.Bagel(cfg), root / "bagel", tokenizer=tk, meta={"note": "code-only values of this geometry"})
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    shapes = {"wide.jpg": ((960, 1280, 3), None), "odd.png": ((250, 333, 3), None), "grey.png": ((200, 180), "L"),
              "alpha.png": ((240, 320, 4), "RGBA"), "portrait.png": ((500, 300, 3), None)}
    for name, (shape, mode) in shapes.items():
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(photos / name, quality=90)
    plain = {"image": "wide.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                                     {"from": "gpt", "value": "A red car."}]}
    clear = {"image": "portrait.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the car?"},
        {"from": "gpt", "value": "<think>The image is heavily blurred.</think>\n<image_restore>\n<think>The restored "
                                 "image is clear.</think><answer>Red.</answer>"}]}
    rows = [plain, clear] + [{"image": n, "question": "What is shown?", "answer": "A car."}
                             for n in ("odd.png", "grey.png", "alpha.png")]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tsv = ["index\timage\tquestion\tA\tB\tanswer\tcategory"]
    for i, name in enumerate(("wide.jpg", "grey.png", "portrait.png")):
        buf = io.BytesIO()
        Image.open(photos / name).convert("RGB").save(buf, format="JPEG")
        tsv.append(f"{i}\t{base64.b64encode(buf.getvalue()).decode()}\tWhat is shown?\ta car\ta dog\tA\tcars")
    (root / "bench.tsv").write_text("\n".join(tsv) + "\n")
    return root


def test_sizes_come_from_the_checkpoint(world):
    """The official transforms with strides from the model and caps from its position tables."""
    cfg = CK.config_from_folder(world / "bagel")
    assert D.image_sizes(cfg) == D.ImageSizes(vae=(256, 256, 16), vit=(224, 224, 14))  # 16 latent tokens, 16 patches
    assert D.image_sizes(M.PRESETS["bagel-7b-mot"]) == D.ImageSizes(vae=(1024, 512, 16), vit=(518, 224, 14))
    big = D.image_sizes(cfg, (1024, 512), (518, 224))
    for w, h in ((1280, 960), (333, 250), (300, 500)):
        for stride_max in (big.vae, big.vit):
            size = D.fit_size(w, h, *stride_max)
            assert all(s % stride_max[2] == 0 and s <= stride_max[0] for s in size)


def test_every_stage_runs_on_real_geometry(world, tmp_path):
    """sft.py -> bridge.py -> rl.py -> evaluate.py on the BAGEL-geometry folder, real photos, JSONL and TSV."""
    data = ["--data", str(world / "train.jsonl"), "--images", str(world / "photos"), "--threads", "1"]  # no --system
    sft.main(["--init", str(world / "bagel"), "--out", str(tmp_path / "sft"), "--steps", "2",
              "--tokens-per-step", "600", *data])
    bridge.main(["--init", str(tmp_path / "sft"), "--out", str(tmp_path / "bridge"), "--steps", "1",
                 "--tokens-per-step", "600", *data])
    rl.main(["--init", str(tmp_path / "bridge"), "--out", str(tmp_path / "rl"), "--steps", "1", "--prompts", "1",
             "--group", "2", "--max-text-tokens", "4", "--sde-points", "3", *data])
    for stage in ("sft", "bridge", "rl"):
        assert CK.checkpoint_system(tmp_path / stage, D.SYSTEM_PROMPTS) == "official"
        model = CK.load_pretrained(tmp_path / stage)
        assert model.cfg.vit_patch_size == 14 and model.cfg.latent_downsample == 16
        assert D.Tokenizer.from_folder(tmp_path / stage).bos_id == CK.config_from_folder(world / "bagel").bos_token_id
        assert (tmp_path / stage / "vocab.json").exists()
    evaluate.main(["--init", str(tmp_path / "rl"), "--tsv", str(world / "bench.tsv"), "--max-text-tokens", "4",
                   "--denoise-steps", "3", "--out", str(tmp_path / "eval"), "--threads", "1"])
    report = json.loads((tmp_path / "eval" / "bench.json").read_text())
    assert report["rows"] == 3 and report["scored"] == 3 and not report["problems"]

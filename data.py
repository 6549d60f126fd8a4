"""
nanoCLEAR data: tokenizer, a procedurally generated toy VQA world, readers for real data, and the builders that turn
(image, question, answer, corruption) into CLEAR's Stage-1 samples (CLEAR §3.1-3.2;
shared/research/clear_method.md §1; official data/interleave_datasets/interleave_reason.py,
corruption_datasets_create/generate_interleave_datasets_by_gpt.py).

A sample is a list of model.py segments (Text / VitImage / VaeImage with loss flags) that `model.pack` flattens.
Restore sample (pattern B), exactly as the official parse_row builds it:
  1 system prompt | 2 degraded image as VAE latent (t=0) | 3 degraded image as ViT | 4 question
  5 "<think>...</think>\\n<image_restore>" (CE) | 6 clean image, noised latent x_t (flow-matching MSE)
  7 clean image, latent at t=0 (distillation student) | 8 clean image as ViT, grid = VAE grid (distillation teacher)
  9 "\\n<think>...</think>\\n<answer>...</answer>" (CE)
Direct sample (pattern A): 1-4, then "<think>...</think>\\n<answer>...</answer>" (CE).

The toy world (why it is built this way):
  * No download, CPU-sized: 64x64 RGB scenes (4x4 ViT patches of 16 px, 4x4 latent tokens of 64 numbers in the tiny
    model; model.PRESETS says why 16 tokens: the generator must restore, and at 64 tokens it did not) with exact
    answers from a small fixed vocabulary: the colour (6) and the count (1-4) of the objects by default (TOY_QTYPES);
    shape (5) and quadrant (4) questions are built too, but the tiny model answers them near chance after its minutes
    of training, so they only added noise to the tables. Open questions (A-D multiple choice in the official
    VLMEvalKit layout is built too, mc_rate > 0, but a CPU-minutes model does not learn the letter indirection).
  * Degradation must hurt: objects are small (18-26 px) and the six colours 51-74 degrees of hue apart (closer
    hue neighbours were what the toy generator could not redraw, see COLOURS); blur, noise, darkness,
    desaturation, shuffled blocks and occluders destroy exactly the hue and the separate blobs a count needs. A
    perception proxy (small CNNs per quadrant) trained on clean scenes loses much of its accuracy at "hard" (more than
    the paper's backbone loses; `python data.py --calibrate` prints it, docs/toy_design.md quotes it).
  * Restoration must be able to help: scenes come from a small generative model (this file), so a learned prior can
    redraw a plausible clean scene from a damaged one; the proxy trained on hard images still answers most of them.
  * A picture holds one kind of object (1-4 copies of one shape in one colour), so every question is
    answered by a pooled look and a tiny model trained from scratch learns the world in minutes on a CPU: what the
    questions need is the detail the corruptions destroy, not object binding (a first version that named objects by
    quadrant stayed at chance after 10 CPU-minutes of Stage 0).
  * Photo-like backgrounds (soft gradients plus faint low-frequency texture) so the 16 corruptions act as on photos
    (JPEG blocks on texture, blur mixing object and background, darkness crushing contrast). The texture is faint
    (amplitudes 7 and 3 of 255): at 3x that, in an earlier version, it was what restorations got most wrong, and a
    restoration spent on drawing background texture is not spent on the colour and count the questions ask.
  * One think template per kind, the decision first ("Their colour is lost to hard noise. I need to restore the
    image." / "The number of shapes survives the low blur: I count 3."): with three phrasings each that named the
    corruption before deciding, the tiny model restored about as often at low as at hard.
  * Scenes are rendered 4x supersampled, degraded at DEGRADE_SIZE and resized to 64 px (see the note there).
  * Train and evaluation scenes are disjoint by construction: a hash of the scene layout picks its split.

CPU usage:
    python data.py --show 8 --out sheet.png     # toy samples at clean / low / mid / hard, with questions and answers
    python data.py --calibrate                  # proxy-CNN accuracy per severity and question type (a few minutes)
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tokenizers import Regex, Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

import checkpoint as CK
import model as M
from degrade import CORRUPTIONS, MAX_PIXELS, MIN_SIZE, SEVERITIES, degrade, sample_corruption, to_rgb

# ----------------------------------------------------------------------------------------------------------------------
# Pictures <-> tensors (BAGEL: data/transforms.py ImageTransform, inferencer.decode_image; RGB by degrade.to_rgb)


def open_image(path) -> Image.Image:
    """A picture file, fully decoded (a truncated file fails here, not at the step that draws it), as RGB; one of more
    than degrade.MAX_PIXELS pixels is refused before it is decoded."""
    path = CK.regular_file(path, "a picture file (JPEG, PNG, ...)")
    try:
        with warnings.catch_warnings(), Image.open(path) as im:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the limit
            too_large = pixels_problem(*im.size)
            if too_large is None:
                im.load()
                return to_rgb(im)
    except Exception as e:  # Pillow raises several types for foreign or truncated files
        raise CK.InputError(f"{path} is not a readable picture ({type(e).__name__}: {e}); pass a complete JPEG, PNG, "
                            "... file") from None
    raise CK.InputError(f"{path} is {too_large}")


def pixels_problem(w: int, h: int) -> str | None:
    if w * h > MAX_PIXELS:
        return (f"{w}x{h} = {w * h:,} pixels, over the limit of {MAX_PIXELS:,} (degrade.MAX_PIXELS: each draw "
                "degrades it at full size); downscale it")
    return None


def fit_size(w: int, h: int, max_size: int, min_size: int, stride: int, max_pixels: int = 14 * 14 * 9 * 1024):
    """Target (w, h): long edge <= max, short edge >= min, both multiples of stride
    (BAGEL: MaxLongEdgeMinShortEdgeResize)."""
    def apply(w, h, s):
        return tuple(max(stride, int(round(round(d * s) / stride) * stride)) for d in (w, h))  # Python round: half-even

    w2, h2 = apply(w, h, max(min(max_size / max(w, h), 1.0), min_size / min(w, h)))
    if w2 * h2 > max_pixels:  # BAGEL applies the area ratio as a linear factor; reproduced as is
        w2, h2 = apply(w2, h2, max_pixels / (w2 * h2))
    if max(w2, h2) > max_size:
        w2, h2 = apply(w2, h2, max_size / max(w2, h2))
    return w2, h2


def resize_image(image: Image.Image, max_size: int, min_size: int, stride: int) -> Image.Image:
    """RGB image resized by fit_size with PIL bicubic (antialiased), as BAGEL's ImageTransform resizes."""
    image = to_rgb(image)
    size = fit_size(*image.size, max_size, min_size, stride)
    return image if image.size == size else image.resize(size, Image.BICUBIC)


def image_to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] in [-1, 1], resized (PIL bicubic, antialiased) to size=(w, h) if given."""
    image = to_rgb(image)
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> uint8 PIL image, truncating like BAGEL's decode_image."""
    x = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and tags (official prompts.py; strings reproduced verbatim, whitespace included)

RESTORE_TOKEN = "<image_restore>"  # official: ordinary text, not a special token
CLEAR_TAGS = ("<think>", "</think>", RESTORE_TOKEN, "<answer>", "</answer>")

INTERLEAVE_REASON_SYSTEM_PROMPT = """You are a specialized multimodal assistant. Your purpose is to solve visual \
question answering tasks by thinking step-by-step and utilizing an image restoration tool when necessary.

# Skills

You can trigger image restoration by generating the following special token sequence:
<image_restore>

This tool performs enhancement operations (e.g., deblurring, denoising) on the input image to reveal details that are \
currently obscured.

# Instruction

1. **Reasoning (`<think>`):** In each turn, you must start with a <think> tag. Inside, conduct a step-by-step \
reasoning process:
   - **Analyze Image Quality:** Identify degradations (blur, noise, low resolution, etc.).
   - **Assess Sufficiency:** Determine if the current image quality allows you to answer the question confidently.

2. **Tool Usage:**
   - If the degradation prevents you from seeing critical details required for the answer, you MUST trigger the \
restoration tool by outputting: <image_restore>.
   - If the answer is visible despite the degradation, do NOT use the tool.

3. **Answering (`<answer>`):**
   - After reasoning (and potential restoration), provide your final response in the <answer> tag.
   - The answer should be natural, concise, and direct.

4. **Format:** Keep your output compact. Avoid unnecessary newlines between tags.

The structure of your response should follow these patterns:

**Scenario 1: Restoration Needed**
<think>The image is heavily blurred, making the text unreadable. I need to restore it to extract the \
information.</think> <image_restore> <think>The restored image is clear. The text says "EXIT".</think><answer>The \
text on the sign is "EXIT".</answer>

**Scenario 2: Direct Answer**
<think>Although there is some noise, the red car is clearly visible in the foreground.</think><answer>The car is \
red.</answer>
"""

VLM_THINK_SYSTEM_PROMPT = ("You should first think about the reasoning process in the mind and then provide the user "
                           "with the answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. "
                           "<think> reasoning process here </think> answer here")

TEXT_REASON_SYSTEM_PROMPT = """You are a specialized multimodal language model. Your purpose is to solve visual \
question answering tasks by thinking step-by-step.

# Instruction

1. You should first think with <think> tag. In this tag, you need to conduct a step-by-step reasoning process about \
the image and question.
2. If you think that you could find the right answer, you can answer in <answer> tag. You need to provide a concise \
summary of your reasoning process that leads to the final answer.

The structure of your response should be like this:
<think> thinking process satisfying the Instruction 1 </think>
<answer> answer satisfying the Instruction 2 </answer>
"""

TOY_SYSTEM_PROMPT = ("Think inside <think></think>. If degradation hides what the question needs, output "
                     "<image_restore> to restore the image. Answer inside <answer></answer>.")

SYSTEM_PROMPTS = {"toy": TOY_SYSTEM_PROMPT, "official": INTERLEAVE_REASON_SYSTEM_PROMPT}

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer (BAGEL: Qwen2 tokenizer.json + add_special_tokens; the toy: a small byte-level BPE trained here)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the four BAGEL special tokens, looked up by text (never hard-coded)."""

    def __init__(self, tk: RawTokenizer, source: str = "<in memory>"):
        self.tk = tk
        ids = CK.special_token_ids(tk, f"tokenizer {source}")
        self.bos_id, self.eos_id = ids["bos_token_id"], ids["eos_token_id"]
        self.soi_id, self.eoi_id = ids["start_of_image_id"], ids["end_of_image_id"]

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        path = CK.regular_file(path, "a tokenizer.json (BAGEL-7B-MoT's, or a nanoCLEAR checkpoint's)")
        return cls(CK.read_tokenizer(path), str(path))

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        CK.settle_folder(folder)  # as every reader of a checkpoint folder
        path = Path(folder) / "tokenizer.json"
        if CK.file_problem(path) == "does not exist":
            raise FileNotFoundError(f"{folder} has no tokenizer.json: pass a BAGEL-format checkpoint folder, "
                                    "or train the toy tokenizer with data.train_toy_tokenizer")
        return cls.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)


def config_ids(tokenizer: Tokenizer) -> dict:
    """Token fields of model.ModelConfig (for real weights llm_config.json's padded vocab_size wins instead)."""
    return dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, start_of_image_id=tokenizer.soi_id,
                end_of_image_id=tokenizer.eoi_id, vocab_size=tokenizer.vocab_size)


# GPT-2/Qwen2-style word split, except that the CLEAR tags stay whole, so BPE can learn each as one ordinary token
TAGS_RE = "|".join(re.escape(t) for t in CLEAR_TAGS)
TOY_SPLIT = TAGS_RE + (rf"""|'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}+| ?\p{{N}}| ?(?:(?!{TAGS_RE})[^\s\p{{L}}\p{{N}}])+"""
                       r"""|\s+(?!\S)|\s+""")


def train_toy_tokenizer(corpus_texts: list[str], vocab_size: int = 768) -> Tokenizer:
    """Byte-level BPE trained in-process; the four BAGEL special tokens are its only special tokens (ids 0-3)."""
    tk = RawTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TOY_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    specials = [CK.SPECIAL_TOKENS[k] for k in ("bos_token_id", "eos_token_id", "start_of_image_id", "end_of_image_id")]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus_texts, trainer=trainer)
    return Tokenizer(tk)


# ----------------------------------------------------------------------------------------------------------------------
# Answer helpers (official: extract_tag_content, has_image_restore_token; VLMEvalKit answer extraction)

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def extract_answer(text: str) -> str | None:
    m = ANSWER_RE.search(text)  # official inferencer: <answer>(.*?)</answer>, DOTALL
    return m.group(1).strip() if m else None


def has_image_restore_token(text: str) -> bool:
    """The official (GPT data) rule: <image_restore> standing alone on a line."""
    return re.search(r"(^|\n)\s*<image_restore>\s*(\n|$)", text) is not None


def requests_restore(text: str) -> bool:
    """The rollout rule: the text contains <image_restore> (the model stops right after it)."""
    return RESTORE_TOKEN in text


def normalize_answer(s: str) -> str:
    """Lower case, '-' and '_' as spaces, no punctuation, no leading article, number words as digits."""
    s = re.sub(r"[^\w\s]", "", s.lower().replace("-", " ").replace("_", " "))
    words = s.split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


def mc_letter(text: str, options: dict | None = None) -> str | None:
    """The option letter a reply picks: 'B', 'B.', '(B)', 'B) red', 'The answer is B', the text of one option, or
    the only standalone option letter; None if there is none or several."""
    letters = "".join(sorted(options)) if options else "ABCD"
    s = text.strip()
    m = re.match(rf"\(?([{letters}])(?:\)|[.:,]|$)", s) or re.search(rf"answer(?: is|:)\s*\(?([{letters}])\b", s, re.I)
    if m:
        return m.group(1)
    if options:
        hits = [k for k, v in options.items() if normalize_answer(v) == normalize_answer(s)]
        if len(hits) == 1:
            return hits[0]
    found = {m.group(1) for m in re.finditer(rf"\b([{letters}])\b", s)
             if not (m.group(1) == "A" and re.match(" [a-z]", s[m.end():]))}  # "A red circle": an article, not A
    return found.pop() if len(found) == 1 else None


def is_correct(pred: str, example: "Example") -> bool:
    """Is the model's reply right? The <answer> content, or the whole reply without one (official VLMEvalKit)."""
    ans = extract_answer(pred)
    ans = pred.strip() if ans is None else ans
    if example.options:
        return mc_letter(ans, example.options) == example.answer
    return normalize_answer(ans) == normalize_answer(example.answer)


def mc_prompt(row: dict) -> str:
    """VLMEvalKit ImageMCQDataset.build_prompt (used by BAGEL's wrapper): hint, question, options, instruction."""
    prompt = f"Hint: {row['hint']}\n" if row.get("hint") else ""
    prompt += f"Question: {row['question']}\n"
    if row.get("options"):
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in row["options"].items())
        prompt += "Please select the correct answer from the options above. \n"  # official: trailing space kept
    return prompt


# ----------------------------------------------------------------------------------------------------------------------
# Examples and the think texts of the responses


@dataclass
class Example:
    """One VQA item ready for CLEAR: the picture the model sees, its clean original, the question and the response."""
    degraded: Image.Image  # what the model sees (RGB)
    question: str  # the user text, formatted (mc_prompt for multiple choice)
    answer: str  # ground truth; the letter for multiple choice
    response: str = ""  # the assistant text to train on; contains <image_restore> for a restore sample
    clean: Image.Image | None = None  # the restore target (None for benchmark rows)
    options: dict | None = None  # {"A": "red", ...} for multiple choice
    corruption: str | None = None
    severity: float | None = None
    qtype: str = "open"  # toy: colour / shape / count / position
    id: str = ""
    caption: str = ""  # toy: a full description of the clean picture (Stage 0 captioning and text-to-image)
    scene: "Scene | None" = None  # toy: the scene itself (Stage 0 trains the vision encoder on its attributes)

    @property
    def restore(self) -> bool:
        return RESTORE_TOKEN in self.response


CORRUPTION_PHRASES = {
    "lens_blur": "lens blur", "lens_flare": "lens flare", "motion_blur": "motion blur", "dirty_lens": "lens dirt",
    "hsv_saturation": "desaturation", "jpeg_compression": "JPEG artifacts", "block_exchange": "block shuffling",
    "mean_shift": "mean-shift smearing", "scan_lines": "scan lines", "dark_illumination": "darkness",
    "atmospheric_turbulence": "turbulence", "gaussian_noise": "noise", "color_diffusion": "colour bleeding",
    "sharpness_change": "oversharpening", "graffiti": "graffiti", "watermark_damage": "watermark damage"}
# One template per kind, and the decision comes first: after the question's detail ("Their colour", "The number of
# shapes"), "is lost" restores and "survives" answers. (A first version had three phrasings each, naming the corruption
# before deciding; the tiny model then restored about as often at low as at hard.)
RESTORE_THINK = ("<think>{Detail} is lost to {sev} {corr}. I need to restore the image.</think>",)
RESTORED_THINK = ("<think>The restored image is clear: {fact}.</think>",)
DIRECT_THINK = ("<think>{Detail} survives the {sev} {corr}: {fact}.</think>",)
CLEAN_THINK = ("<think>{Detail} is clear: {fact}.</think>",)


def severity_word(severity: float) -> str:
    return min(((0.23, "mild"), (0.45, "moderate"), (0.9, "heavy")), key=lambda p: abs(p[0] - severity))[1]


def think_response(rng: np.random.Generator, restore: bool, answer: str, detail: str, fact: str,
                   corruption: str | None, severity: float | None) -> str:
    """A short templated response naming the corruption, in the official GPT layout: pattern A
    '<think>..</think>\\n<answer>..</answer>', pattern B resp1 + '\\n' + resp2 with resp1 ending on its own
    '<image_restore>' line (official: merged_value = f"{resp1}\\n{resp2}")."""
    pick = lambda templates: templates[rng.integers(len(templates))]  # noqa: E731
    words = dict(detail=detail, Detail=detail[:1].upper() + detail[1:], fact=fact)
    if corruption is not None:
        sev = severity_word(severity)
        words.update(sev=sev, Sev=sev.capitalize(), corr=CORRUPTION_PHRASES[corruption])
    final = f"\n<answer>{answer}</answer>"
    if not restore:
        return pick(DIRECT_THINK if corruption else CLEAN_THINK).format(**words) + final
    return pick(RESTORE_THINK).format(**words) + f"\n{RESTORE_TOKEN}\n" + pick(RESTORED_THINK).format(**words) + final


# ----------------------------------------------------------------------------------------------------------------------
# The adaptive restore decision


# Restore when less than half of the question's detail survived: where restoring did not cost the answer, measured
# against text-only reasoning by the detail kept (docs/toy_design.md, "The restore decision").
RESTORE_THRESHOLD = 0.5


def detail_kept(clean: np.ndarray, degraded: np.ndarray, box: tuple, colour: bool) -> float:
    """How much of the clean detail in box (x0, y0, x1, y1) is still in the degraded image:
    cov(c, d) / (s_c max(s_c, s_d)).

    That is the normalised cross-correlation, scaled down by the contrast ratio when contrast was lost: 1 for an
    intact region, 0.2 for one darkened to 20%, low for noise, blur, occlusion or displacement. Structure questions
    compare luminance, colour questions the two opponent-colour channels.
    """
    x0, y0, x1, y1 = box

    def channels(img):
        r, g, b = np.moveaxis(img[y0:y1, x0:x1].astype(np.float64), -1, 0)
        feats = [r - g, b - (r + g) / 2] if colour else [0.299 * r + 0.587 * g + 0.114 * b]
        return np.stack([f - f.mean() for f in feats])

    a, b = channels(clean), channels(degraded)
    sa, sb = math.sqrt((a * a).sum()), math.sqrt((b * b).sum())
    return float((a * b).sum() / (sa * max(sa, sb))) if sa > 1e-6 else 1.0  # a flat region has nothing to lose


def needs_restore(clean: np.ndarray, degraded: np.ndarray, boxes: list, colour: bool = False,
                  threshold: float = RESTORE_THRESHOLD) -> bool:
    """Restore when the answer-relevant detail did not survive: in the worst region less than `threshold` is kept.

    Stands in for the official decision (GPT-4.1 looked at the degraded image; samples were kept when correct).
    Images are uint8 [H, W, 3] at model resolution. The rule is blind to meaning (it restores a picture that turbulence
    merely shifted) but rises with severity as the paper's adaptive decisions do.
    """
    return min(detail_kept(clean, degraded, b, colour) for b in boxes) < threshold


# ----------------------------------------------------------------------------------------------------------------------
# The toy world

MODEL_SIZE = 64  # the tiny model's image side: 4x4 ViT patches of 16 px, 4x4 latent tokens
SUPERSAMPLE = 256  # scenes are drawn at this side and box-filtered down (antialiasing)
# Corruptions run at DEGRADE_SIZE, then the picture is resized to MODEL_SIZE. degrade.py applies the official pixel
# constants at every size, so the size decides how much of the scene a corruption covers, and the downsample afterwards
# averages per-pixel damage away; 128 keeps both kinds of damage (docs/toy_design.md, "Where pictures are degraded").
DEGRADE_SIZE = 128
EVAL_EVERY = 10  # one scene layout in EVAL_EVERY belongs to the held-out split

# Six hues 51-74 degrees apart: the toy generator redraws a hue only to within a few tens of degrees, so with closer
# hue neighbours its restorations were read as the neighbouring colour (docs/toy_design.md, "The palette"). Darkness,
# desaturation, colour diffusion, flare and occluders still destroy these hues.
COLOURS = {"red": (215, 35, 35), "yellow": (235, 215, 35), "green": (40, 160, 55), "cyan": (30, 200, 200),
           "blue": (40, 40, 215), "purple": (180, 45, 205)}
SHAPES = ("circle", "square", "triangle", "star", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant cells 0..3, row-major
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": ("1", "2", "3", "4"), "position": POSITIONS}
QUESTIONS = {  # (questions, what restoring would reveal, the fact stated in the think text). A picture holds one kind
    # of object (1-4 copies of one shape in one colour), so a pooled look answers every question and the
    # tiny model learns them in minutes; what they need is the detail the corruptions destroy
    "colour": (("What colour are the shapes?", "Which colour do the shapes have?"), "their colour",
               "the shapes are {colour}"),
    "shape": (("What shape is shown?", "Which shape do you see?"), "their outline", "the shapes are {shape}s"),
    "count": (("How many shapes are there?", "How many objects are in the image?"), "the number of shapes",
              "I count {count}"),
    "position": (("In which quadrant is the {shape}?", "Where is the {colour} shape?"), "the {colour} {shape}",
                 "the {colour} {shape} is in the {position}"),
}


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one picture; lengths are in MODEL_SIZE pixels."""
    background: tuple  # (rgb0, rgb1, gradient angle, texture seed)
    objects: tuple = ()  # ((shape, colour, cell, x, y, r, rotation), ...) at most one per quadrant

    def key(self) -> str:
        """The layout, quantised to whole pixels: equal keys look the same to the model."""
        q = lambda v: round(v) if isinstance(v, float) else v  # noqa: E731
        return repr((tuple(tuple(q(v) for v in o) for o in self.objects),
                     tuple(q(c) for c in self.background[0] + self.background[1])))

    def boxes(self) -> list:
        return [_box(o[3], o[4], 1.3 * o[5], 1.3 * o[5]) for o in self.objects]


def _box(x, y, rx, ry):
    clip = lambda v: int(min(max(v, 0), MODEL_SIZE))  # noqa: E731
    return (clip(x - rx), clip(y - ry), clip(math.ceil(x + rx)), clip(math.ceil(y + ry)))


def _hsv(rng, s_range, v_range) -> tuple:
    h, s, v = rng.uniform(0, 1), rng.uniform(*s_range), rng.uniform(*v_range)
    rgb = Image.new("HSV", (1, 1), (int(h * 255), int(s * 255), int(v * 255))).convert("RGB").getpixel((0, 0))
    return tuple(int(c) for c in rgb)


def sample_scene(rng: np.random.Generator, n: int | None = None) -> Scene:
    """n (default 1-4) copies of one shape in one colour, one per quadrant, on a photo-like background."""
    bg = (_hsv(rng, (0.05, 0.3), (0.3, 0.85)), _hsv(rng, (0.05, 0.3), (0.3, 0.85)), float(rng.uniform(0, 360)),
          int(rng.integers(2 ** 31)))
    n = int(rng.integers(1, 5)) if n is None else n
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    objects = []
    for cell in rng.permutation(4)[:n]:
        r = float(rng.uniform(9, 13))
        x0, y0 = 32 * (cell % 2), 32 * (cell // 2)
        objects.append((shape, colour, int(cell), float(x0 + rng.uniform(r + 1, 31 - r)),
                        float(y0 + rng.uniform(r + 1, 31 - r)), r, float(rng.uniform(-20, 20))))
    return Scene(bg, objects=tuple(objects))


def _outline(shape, x, y, r, rot):
    if shape == "square":
        pts = [(-.85, -.85), (.85, -.85), (.85, .85), (-.85, .85)]
    elif shape == "triangle":
        pts = [(1.15 * math.cos(math.radians(a)), 1.15 * math.sin(math.radians(a)) + .15) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = [((1.2 if i % 2 == 0 else .5) * math.cos(math.radians(-90 + 36 * i)),
                (1.2 if i % 2 == 0 else .5) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)]
    else:  # cross
        a, b = .36, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
               (-a, -a)]
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    return [(x + r * (px * c - py * s), y + r * (px * s + py * c)) for px, py in pts]


def render(scene: Scene, size: int = DEGRADE_SIZE) -> Image.Image:
    """Draw the scene at SUPERSAMPLE px and box-filter it to size x size."""
    S, k, B = SUPERSAMPLE, SUPERSAMPLE / MODEL_SIZE, MODEL_SIZE  # the smooth background is made at B px, then upsampled
    rgb0, rgb1, angle, tex_seed = scene.background
    u = np.linspace(-0.5, 0.5, B, dtype=np.float32)
    ramp = np.clip(u[None, :] * math.cos(math.radians(angle)) + u[:, None] * math.sin(math.radians(angle)) + 0.5, 0, 1)
    img = np.float32(rgb0) + (np.float32(rgb1) - np.float32(rgb0)) * ramp[..., None]
    tex_rng = np.random.default_rng(tex_seed)
    for cells, amp in ((4, 7.0), (12, 3.0)):  # faint blotches and texture: a photo-like background the toy's generator
        # can draw (at 3x these amplitudes, in an earlier version, the texture was what restorations got most wrong)
        noise = (tex_rng.normal(0, amp, (cells, cells, 1))
                 + tex_rng.normal(0, amp / 3, (cells, cells, 3)))  # mostly brightness
        lo = np.clip(128 + noise, 0, 255).astype(np.uint8)
        img += np.asarray(Image.fromarray(lo).resize((B, B), Image.BICUBIC), np.float32) - 128
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((S, S), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for shape, colour, _, x, y, r, rot in scene.objects:
        jitter = tex_rng.normal(0, 10, 3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
        if shape == "circle":
            draw.ellipse([k * (x - r), k * (y - r), k * (x + r), k * (y + r)], fill=fill)
        else:
            draw.polygon([(k * px, k * py) for px, py in _outline(shape, x, y, r, rot)], fill=fill)
    return im.reduce(S // size) if S % size == 0 else im.resize((size, size), Image.BOX)


def ask(scene: Scene, qtype: str, rng: np.random.Generator, mc: bool) -> tuple:
    """(question text, answer, options or None, what restoring reveals, the fact, relevant boxes) for the scene."""
    templates, detail, fact = QUESTIONS[qtype]
    boxes = scene.boxes()
    shape, colour, cell = scene.objects[0][:3]
    words = dict(shape=shape, colour=colour, position=POSITIONS[cell], count=str(len(scene.objects)))
    answer = words[qtype]
    question = templates[rng.integers(len(templates))].format(**words)
    detail, fact = detail.format(**words), fact.format(**words)
    if not mc:
        return question, answer, None, detail, fact, boxes
    others = [a for a in ANSWERS[qtype] if a != answer]
    choices = [answer] + [others[j] for j in rng.permutation(len(others))[:3]]
    options = {"ABCD"[j]: choices[c] for j, c in enumerate(rng.permutation(4))}
    letter = next(k for k, v in options.items() if v == answer)
    return (mc_prompt(dict(question=question, options=options)), letter, options, detail, f"{fact}, option {letter}",
            boxes)


# What the toy asks by default. Shape and quadrant questions are built and tested too, but the tiny model answers
# them near chance after its CPU-minutes of training, clean or degraded (an LLM of width 128 that reads 64 ViT tokens
# does not learn to pick one object's outline or place in minutes), so they would only add noise to every table.
TOY_QTYPES = ("colour", "count")


def toy_questions(qtypes: tuple = TOY_QTYPES) -> list[str]:
    """Every question text the toy world asks in open form (what a length check needs)."""
    return [t.format(shape=s, colour=c) for q in qtypes for t in QUESTIONS[q][0] for s in SHAPES for c in COLOURS]


class ToyWorld:
    """The toy VQA world. `seed` salts the train / held-out split of scene layouts; same seed, same world.
    `qtypes`: the question types asked (any of QUESTIONS)."""

    def __init__(self, seed: int = 0, mc_rate: float = 0.0, qtypes: tuple = TOY_QTYPES):
        unknown = [q for q in qtypes if q not in QUESTIONS]
        if not qtypes or unknown:
            raise ValueError(f"qtypes must be a non-empty subset of {tuple(QUESTIONS)}, got {tuple(qtypes)}")
        self.seed, self.mc_rate, self.qtypes = seed, mc_rate, tuple(qtypes)

    def is_eval(self, scene: Scene) -> bool:
        digest = hashlib.blake2b(f"{self.seed}:{scene.key()}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % EVAL_EVERY == 0

    def scene(self, rng: np.random.Generator, held_out: bool) -> tuple[str, Scene]:
        qtype = self.qtypes[rng.integers(len(self.qtypes))]
        while True:  # rejection keeps the two splits disjoint by construction
            scene = sample_scene(rng, 1 if qtype == "position" else None)
            if self.is_eval(scene) == held_out:
                return qtype, scene

    def examples(self, rng: np.random.Generator, held_out: bool, corruption: str | None,
                 severities: list) -> list[Example]:
        """One scene and question, degraded with one corruption at each severity (None = the clean picture)."""
        qtype, scene = self.scene(rng, held_out)
        question, answer, options, detail, fact, boxes = ask(scene, qtype, rng, rng.random() < self.mc_rate)
        big = render(scene, DEGRADE_SIZE)
        clean = big.resize((MODEL_SIZE, MODEL_SIZE), Image.BICUBIC)
        clean_np = np.asarray(clean)
        out = []
        for sev in severities:
            if sev is None:
                degraded, restore, kind = clean, False, None
            else:
                degraded = degrade(big, corruption, sev, rng).resize((MODEL_SIZE, MODEL_SIZE), Image.BICUBIC)
                restore, kind = needs_restore(clean_np, np.asarray(degraded), boxes,
                                              colour=qtype == "colour"), corruption
            response = think_response(rng, restore, answer, detail, fact, kind, sev)
            out.append(Example(degraded, question, answer, response, clean, options, kind, sev, qtype,
                               caption=caption(scene), scene=scene))
        return out

    def pictures(self, rng: np.random.Generator | int) -> Iterator[tuple[Scene, Image.Image]]:
        """Endless clean training pictures at MODEL_SIZE with their scenes (no question, no corruption)."""
        rng = np.random.default_rng(rng)
        while True:
            scene = self.scene(rng, held_out=False)[1]
            yield scene, render(scene, DEGRADE_SIZE).resize((MODEL_SIZE, MODEL_SIZE), Image.BICUBIC)

    def stream(self, rng: np.random.Generator | int) -> Iterator[Example]:
        """Endless training examples: corruption and severity drawn with the official training weights."""
        rng = np.random.default_rng(rng)
        while True:
            corruption, severity = sample_corruption(rng, "train")
            yield self.examples(rng, False, corruption, [severity])[0]

    def eval_split(self, n: int, seed: int = 0) -> dict[str, list[Example]]:
        """The fixed held-out set, built like MMD-Bench: one corruption per item (benchmark weights), the same
        corruption at low / mid / hard. Returns {"clean" | "low" | "mid" | "hard": n aligned examples}."""
        rng = np.random.default_rng([self.seed, seed, 1])
        levels = {"clean": None, **SEVERITIES}
        split = {name: [] for name in levels}
        for i in range(n):
            for name, ex in zip(levels, self.examples(rng, True, sample_corruption(rng, "benchmark")[0],
                                                      list(levels.values()))):
                ex.id = f"toy-{self.seed}-{seed}-{i}"
                split[name].append(ex)
        return split


def caption(scene: Scene) -> str:
    """Everything the questions can ask: colour, shape and count, and the quadrant of a single object."""
    shape, colour, cell = scene.objects[0][:3]
    n = len(scene.objects)
    return f"One {colour} {shape} in the {POSITIONS[cell]}." if n == 1 else f"{n} {colour} {shape}s."


def toy_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """The texts the toy model reads and writes (system prompts, questions, responses), without rendering images."""
    rng = np.random.default_rng(seed)
    texts = [TOY_SYSTEM_PROMPT, INTERLEAVE_REASON_SYSTEM_PROMPT, TEXT_REASON_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT]
    for i in range(n):
        qtype = list(QUESTIONS)[i % len(QUESTIONS)]
        scene = sample_scene(rng, 1 if qtype == "position" else None)
        question, answer, _, detail, fact, _ = ask(scene, qtype, rng, mc=i % 2 == 1)
        corruption = list(CORRUPTIONS)[i % len(CORRUPTIONS)] if i % 7 else None  # and a few clean pictures
        texts += [question, caption(scene), think_response(rng, corruption is not None and i % 3 == 0, answer, detail,
                                                           fact, corruption, list(SEVERITIES.values())[i % 3])]
    return texts


# ----------------------------------------------------------------------------------------------------------------------
# What the model is shown: picture sizes and CLEAR's prefix (sft.py builds the rest of a training sample)


@dataclass(frozen=True)
class ImageSizes:
    """(max side, min side, stride) of the VAE and ViT resizes (BAGEL: ImageTransform)."""
    vae: tuple
    vit: tuple


BAGEL_SIDES = ((1024, 512), (518, 224))  # official corruption_mix.yaml: VAE max / min side, ViT max / min side
TOY_SIDES = ((MODEL_SIZE, MODEL_SIZE), (MODEL_SIZE, MODEL_SIZE))  # every toy picture is MODEL_SIZE square


def image_sizes(cfg: M.ModelConfig, vae_sides: tuple = BAGEL_SIDES[0], vit_sides: tuple = BAGEL_SIDES[1]) -> ImageSizes:
    """The one place picture sizes are decided: strides from the model (latent_downsample for the VAE, the ViT patch),
    max sides capped by its position tables (max_latent_size and vit_max_num_patch_per_side tokens per side), min
    sides capped by the max. BAGEL-7B-MoT: VAE (1024, 512, 16), ViT (518, 224, 14); the toy passes TOY_SIDES."""
    s_vae, s_vit = cfg.latent_downsample, cfg.vit_patch_size
    vae_max = min(vae_sides[0], cfg.max_latent_size * s_vae)
    vit_max = min(vit_sides[0], cfg.vit_max_num_patch_per_side * s_vit)
    return ImageSizes(vae=(vae_max, min(vae_sides[1], vae_max), s_vae),
                      vit=(vit_max, min(vit_sides[1], vit_max), s_vit))


TOY_SIZES = image_sizes(M.PRESETS["tiny"], *TOY_SIDES)


def encode_images(pixels: list[torch.Tensor], encode: Callable) -> list[tuple]:
    """Call encode([N, 3, H, W]) -> (tokens [N, h*w, D], grid) once per distinct image size; one (tokens, grid) each."""
    out, groups = [None] * len(pixels), {}
    for i, p in enumerate(pixels):
        groups.setdefault(tuple(p.shape), []).append(i)
    for idx in groups.values():
        tokens, grid = encode(torch.stack([pixels[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = (tokens[j], tuple(grid))
    return out


def clear_prefix(ex: Example, tok: Tokenizer, latent: tuple, system: str, sizes: ImageSizes) -> list:
    """CLEAR's prefix (official parse_row items 1-4): system prompt, degraded picture as VAE latent and as ViT,
    question."""
    if system not in SYSTEM_PROMPTS:
        raise ValueError(f"system prompt must be one of {sorted(SYSTEM_PROMPTS)}, not {system!r}")
    tokens, grid = latent
    return [M.Text(tok.encode(SYSTEM_PROMPTS[system])),  # official parse_row items 1-4, no loss
            M.VaeImage(tokens, grid),  # official: the corrupted image is given as a clean VAE latent (t=0) ...
            M.VitImage(image_to_tensor(resize_image(ex.degraded, *sizes.vit))),  # ... and as ViT patches
            M.Text(tok.encode(ex.question.replace("<image>", "").strip()))]  # official: <image> removed, stripped


def vae_pixels(image: Image.Image, sizes: ImageSizes) -> torch.Tensor:
    """A picture resized for the autoencoder (BAGEL vae_transform) as [3, H, W] in [-1, 1]."""
    return image_to_tensor(resize_image(image, *sizes.vae))


def inference_prefix(examples: list[Example], tok: Tokenizer, encode: Callable, system: str = "toy",
                     sizes: ImageSizes = TOY_SIZES) -> list[list]:
    """What the model is given at test time: system prompt, degraded image as VAE + ViT, question (no loss)."""
    latents = encode_images([vae_pixels(ex.degraded, sizes) for ex in examples], encode)
    return [clear_prefix(ex, tok, lat, system, sizes) for ex, lat in zip(examples, latents)]


# ----------------------------------------------------------------------------------------------------------------------
# Real data: LLaVA-style JSONL (training) and VLMEvalKit TSV (MMD-Bench evaluation)

TAG_RE = re.compile(r"<think>.*?</think>|<answer>.*?</answer>", re.DOTALL)
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
             "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}  # VLMEvalKit reads TSVs with pandas: these become NaN


def image_problem(source) -> str | None:
    """Why a picture (a path or an in-memory file) cannot be trained or evaluated on, or None: it must be a regular
    file, have at most degrade.MAX_PIXELS pixels, decode fully (Image.verify passes truncated files, which then fail at
    the step that draws them) and have a short side of at least degrade.MIN_SIZE."""
    if isinstance(source, (str, Path)) and CK.file_problem(source):
        return CK.file_problem(source)
    try:
        with warnings.catch_warnings(), Image.open(source) as im:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the limit
            w, h = im.size
            if pixels_problem(w, h):
                return pixels_problem(w, h)
            im.load()
    except Image.UnidentifiedImageError:  # its message holds the repr of an in-memory file
        return "not a picture file Pillow can read (JPEG, PNG, ...)"
    except Exception as e:  # truncated, not an image, a decompression bomb
        return f"{type(e).__name__}: {e}"
    return f"{w}x{h} pixels, under degrade's minimum side {MIN_SIZE}" if min(w, h) < MIN_SIZE else None


def skip_report(path, rows: list, problems: list, where: str, first: int = 5) -> str:
    """The line the scripts print for a data file: rows used, rows skipped and the first reasons."""
    reasons = "; ".join(f"{where} {n}: {why}" for n, why in problems[:first])
    return f"{path}: {len(rows)} rows used, {len(problems)} skipped" + (f" (first: {reasons})" if problems else "")


MAX_JSONL_LINE = 16 << 20  # bytes of one JSONL record: a LLaVA row is a few KB (its picture is a file, not inline)


def jsonl_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of a file, None for a line over MAX_JSONL_LINE bytes (skipped unread, never held whole)."""
    try:
        with open(path, "rb") as f:
            n = 0
            while raw := f.readline(MAX_JSONL_LINE + 1):
                n += 1
                if len(raw) <= MAX_JSONL_LINE or raw.endswith(b"\n"):
                    yield n, raw
                    continue
                while (rest := f.readline(MAX_JSONL_LINE)) and not rest.endswith(b"\n"):
                    pass
                yield n, None
    except OSError as e:  # no permission, an I/O error
        raise CK.InputError(f"{path} cannot be read ({e.strerror}); pass a readable JSONL file") from None


def outside(image: str) -> bool:
    """Does an image path leave its folder (absolute, or through '..')? degrade.py refuses the same paths."""
    return Path(image).is_absolute() or ".." in Path(image).parts


def read_jsonl(path, images_dir, anywhere: bool = False) -> tuple[list[dict], list[tuple]]:
    """LLaVA-style rows -> ([{line, image, question, response}], [(line, reason)] for the rows that were skipped).

    Accepts {"image", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]} and {"image", "question",
    "answer"}; the first human and gpt turns are used; image paths are relative to images_dir, and must stay inside it
    (no absolute path, no '..') unless `anywhere` (--images-anywhere).
    """
    path, images_dir = CK.regular_file(path, "a JSONL file with one LLaVA-style record per line"), Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir} is not a folder: pass the folder the image paths of {path} are "
                                "relative to")
    rows, problems = [], []
    for n, raw in jsonl_lines(path):
        if raw is None:
            problems.append((n, f"longer than {MAX_JSONL_LINE:,} bytes"))
            continue
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a UTF-8 byte-order mark is allowed
        except UnicodeDecodeError as e:
            raise CK.InputError(f"{path} line {n} is not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as "
                                "UTF-8") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:  # nested too deep, an integer of 4300+ digits: not JSON we read
            problems.append((n, f"not JSON ({e.msg if isinstance(e, json.JSONDecodeError) else str(e)[:80]})"))
            continue
        if not isinstance(rec, dict) or "image" not in rec:
            problems.append((n, "no 'image' key"))
            continue
        if not isinstance(rec["image"], str) or not rec["image"].strip():
            problems.append((n, f"'image' is {json.dumps(rec['image'])[:60]}, not one picture path"))
            continue
        if outside(rec["image"]) and not anywhere:
            problems.append((n, f"image path {rec['image'][:80]!r} is absolute or has '..': pictures come from inside "
                                "--images (pass --images-anywhere to allow others)"))
            continue
        if "conversations" in rec:
            turns = rec["conversations"] if isinstance(rec["conversations"], list) else []
            human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
            gpt = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
        else:
            human, gpt = rec.get("question"), rec.get("answer")
        if not isinstance(human, str) or not isinstance(gpt, str) or not human.strip() or not gpt.strip():
            problems.append((n, "no human question and gpt answer"))
            continue
        image = images_dir / rec["image"]
        why = image_problem(image)
        if why:
            problems.append((n, f"unusable image {image} ({why})"))
            continue
        rows.append(dict(line=n, image=image, question=human.replace("<image>", "").strip(), response=gpt))
    if not rows and not problems:
        raise CK.InputError(f"{path} is empty: pass a JSONL file with one LLaVA-style record per line")
    if not rows:
        raise CK.InputError(f"{path}: none of its {len(problems)} rows is usable"
                            + (f" (first: line {problems[0][0]}, {problems[0][1]})" if problems else "")
                            + "; is it LLaVA-style JSONL with --images its image folder?")
    return rows, problems


def jsonl_example(row: dict, rng: np.random.Generator) -> Example:
    """Load a JSONL row and degrade it on the fly (official training weights and severities).

    An answer with <image_restore> (official CLEAR SFT data) or with <think>/<answer> tags is trained as is; a
    plain answer gets templated think texts and the restore rule, measured on the whole image at 64 px.
    """
    clean = to_rgb(Image.open(row["image"]))
    corruption, severity = sample_corruption(rng, "train")
    degraded = degrade(clean, corruption, severity, rng)
    response = row["response"]  # official: the gpt value is trained verbatim
    answer = extract_answer(response) or response.strip()
    if RESTORE_TOKEN not in response and not TAG_RE.search(response):
        small = [np.asarray(im.resize((MODEL_SIZE, MODEL_SIZE), Image.BICUBIC)) for im in (clean, degraded)]
        restore = needs_restore(*small, [(0, 0, MODEL_SIZE, MODEL_SIZE)])
        response = think_response(rng, restore, answer, "the relevant detail", "I can answer the question", corruption,
                                  severity)
    return Example(degraded, row["question"], answer, response, clean, None, corruption, severity,
                   id=f"{Path(row['image']).name}:{row['line']}")


def read_tsv(path) -> tuple[list[dict], list[tuple]]:
    """VLMEvalKit TSV -> ([{index, image (base64), question, options, answer, hint, category}], [(index, reason)]).

    Rows whose image holds another row's index (MMBench circular copies) get that row's image (official:
    ImageBaseDataset). Options are the non-empty A, B, ... columns; malformed rows are reported and skipped.
    """
    path = CK.regular_file(path, "a VLMEvalKit TSV (e.g. MMBench_DEV_EN_LOW_LEVEL_HIGH.tsv)")
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default field limit
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a UTF-8 byte-order mark is allowed (as pandas does)
            reader = csv.DictReader(f, delimiter="\t")
            header, table, ends = reader.fieldnames or [], [], []
            start = reader.line_num
            for r in reader:
                table.append(r)
                ends.append(reader.line_num)  # the physical line each row ends on
            columns = set(header)
    except csv.Error as e:
        raise CK.InputError(f"{path} is not a readable TSV ({e}): is it a VLMEvalKit TSV?") from None
    except UnicodeDecodeError as e:
        raise CK.InputError(f"{path} is not UTF-8 text ({e.reason}, byte 0x{e.object[e.start]:02x}); save it as "
                            "UTF-8") from None
    except OSError as e:  # no permission, an I/O error
        raise CK.InputError(f"{path} cannot be read ({e.strerror}); pass a readable TSV") from None
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise CK.InputError(f"{path}: its header names the columns {twice} more than once, and only one of each "
                            "would be read; rename or remove the others")
    for r, first, last in zip(table, [start, *ends], ends):
        if last > first + 1 and any("\t" in v and "\n" in v for v in r.values() if isinstance(v, str)):
            raise CK.InputError(f"{path} line {first + 1}: a quote (\") opens a cell that runs on to line {last}, "
                                "taking the rows between into it; close the quote, or remove it")
    missing = {"index", "image", "question", "answer"} - columns
    if missing:
        raise CK.InputError(f"{path} lacks the columns {sorted(missing)}: is it a VLMEvalKit TSV (tab-separated, "
                            "with a header)?")
    if not table:
        raise CK.InputError(f"{path} has a header but no rows: nothing to evaluate")
    images = {}
    for r in table:
        images.setdefault(r["index"], r["image"])
    letters = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c in columns]
    rows, problems, decoded, seen = [], [], {}, set()
    for r in table:
        value = lambda k: None if (r.get(k) or "").strip() in PANDAS_NA else r[k]  # noqa: E731
        image = r["image"] or ""
        if len(image) <= 64:  # official: a short value is the index of the row that holds the image
            image = images.get(image.strip(), "") or ""
        cells = sum(v is not None for k, v in r.items() if k is not None) + len(r.get(None, ()))
        reason = (f"{cells} cells where the header has {len(header)}" if cells != len(header)
                  else "no index" if not (r["index"] or "").strip()
                  else "its index repeats an earlier row's" if r["index"] in seen
                  else "no image" if not (r["image"] or "").strip()
                  else f"undecodable image ({r['image'].strip()!r} is no row's index, "
                       "nor a picture in base64)" if not image
                  else None)
        seen.add(r["index"])
        if reason:
            problems.append((r["index"], reason))
            continue
        if image not in decoded:  # circular copies share one image: decode it once
            try:
                decoded[image] = image_problem(io.BytesIO(base64.b64decode(image, validate=False)))
            except ValueError as e:  # not base64
                decoded[image] = f"not base64: {e}"
        if decoded[image]:
            problems.append((r["index"], f"undecodable image ({decoded[image]})"))
            continue
        options = {k: value(k) for k in letters if value(k) is not None}
        gaps = [k for k in letters[:len(options)] if k not in options]
        answer = (value("answer") or "").strip()
        reason = ("no question" if value("question") is None else "no answer" if not answer
                  else f"option {gaps[0]} missing while later options exist" if gaps
                  else f"answer {answer!r} is not among the "
                       f"options {sorted(options)}" if options and answer not in options
                  else None)
        if reason:
            problems.append((r["index"], reason))
            continue
        rows.append(dict(index=r["index"], image=image, question=r["question"], options=options or None, answer=answer,
                         hint=value("hint"), category=value("category")))
    if not rows:
        raise CK.InputError(f"{path}: none of its {len(problems)} rows is usable (first: index {problems[0][0]}, "
                           f"{problems[0][1]})")
    return rows, problems


def tsv_example(row: dict) -> Example:
    """A benchmark row as an Example: its (already degraded) image, the official MC prompt, the answer letter."""
    image = to_rgb(Image.open(io.BytesIO(base64.b64decode(row["image"]))))
    question = mc_prompt(row) if row["options"] else row["question"]
    return Example(image, question, row["answer"], options=row["options"], qtype="mc" if row["options"] else "open",
                   id=str(row["index"]))


# ----------------------------------------------------------------------------------------------------------------------
# Command line: a contact sheet of toy samples, and the proxy calibration of the clean -> hard gap


def contact_sheet(split: dict, n: int) -> Image.Image:
    """One row per item: clean / low / mid / hard at 2x, question and answer underneath, restores marked."""
    cell, font = 2 * MODEL_SIZE, ImageFont.load_default()
    sheet = Image.new("RGB", (4 * cell + 300, n * (cell + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        y = i * (cell + 8)
        for j, level in enumerate(split):
            ex = split[level][i]
            sheet.paste(ex.degraded.resize((cell, cell), Image.NEAREST), (j * cell, y))
            if ex.restore:
                draw.rectangle([j * cell, y, j * cell + cell - 1, y + cell - 1], outline="red", width=2)
        ex = split["hard"][i]
        lines = [ex.question.splitlines()[0].removeprefix("Question: ")[:48],
                 f"answer: {ex.answer}" + (f" ({ex.options[ex.answer]})" if ex.options else ""), ex.corruption]
        draw.multiline_text((4 * cell + 6, y + 6), "\n".join(lines), fill="black", font=font)
    return sheet


def probe_net() -> torch.nn.Module:
    """The perception probe: a small CNN reading one quadrant crop -> empty-or-shape logits, colour logits."""
    c = torch.nn
    return c.Sequential(c.Conv2d(3, 32, 3, 1, 1), c.ReLU(), c.MaxPool2d(2),
                        c.Conv2d(32, 64, 3, 1, 1), c.ReLU(), c.MaxPool2d(2),
                        c.Conv2d(64, 64, 3, 1, 1), c.ReLU(), c.AdaptiveMaxPool2d(1), c.Flatten(),
                        c.Linear(64, 1 + len(SHAPES) + len(COLOURS)))


def quadrants(x: torch.Tensor) -> torch.Tensor:
    """[3, S, S] -> [4, 3, S/2, S/2] in POSITIONS order."""
    h = x.shape[-1] // 2
    return x.reshape(3, 2, h, 2, h).permute(1, 3, 0, 2, 4).reshape(4, 3, h, h)


def probe_set(world: ToyWorld, rng: np.random.Generator, n: int, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrant crops of n training scenes (clean, or degraded at hard with the benchmark weights) and their labels
    (0 = empty or 1 + shape index; colour index or -100 for an empty quadrant)."""
    crops, labels, cols = [], [], list(COLOURS)
    for _ in tqdm(range(n), desc="perception probe pictures", leave=False, dynamic_ncols=True):
        scene = world.scene(rng, held_out=False)[1]
        big = render(scene)
        if hard:  # degraded at DEGRADE_SIZE, then resized, as the held-out pictures are
            big = degrade(big, sample_corruption(rng, "benchmark")[0], SEVERITIES["hard"], rng)
        crops.append(quadrants(image_to_tensor(big.resize((MODEL_SIZE, MODEL_SIZE), Image.BICUBIC))))
        cells = {o[2]: o for o in scene.objects}
        labels += [(SHAPES.index(cells[c][0]) + 1, cols.index(cells[c][1])) if c in cells else (0, -100)
                   for c in range(4)]
    return torch.cat(crops), torch.tensor(labels)


@torch.enable_grad()
def train_probe(crops: torch.Tensor, labels: torch.Tensor, steps: int = 500, seed: int = 0) -> torch.nn.Module:
    """The probe trained on quadrant crops and their labels (AdamW, batches of 128 crops)."""
    torch.manual_seed(seed)
    net, ce, k = probe_net(), torch.nn.functional.cross_entropy, 1 + len(SHAPES)
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    for _ in tqdm(range(steps), desc="perception probe", leave=False):
        i = torch.randint(len(crops), (128,))
        out = net(crops[i])
        loss = ce(out[:, :k], labels[i, 0]) + ce(out[:, k:], labels[i, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def probe_answers(net: torch.nn.Module, images: list[Image.Image], examples: list[Example]) -> list[str]:
    """The probe's answer to each example's question, read off its picture quadrant by quadrant."""
    k, cols, answers = 1 + len(SHAPES), list(COLOURS), []
    for im, ex in zip(images, examples):
        out = net(quadrants(image_to_tensor(im, (MODEL_SIZE, MODEL_SIZE))))
        shape_p, colour_p = out[:, :k].softmax(-1), out[:, k:].softmax(-1)
        words = ex.question.rstrip("?").split()
        cell = int(shape_p[:, 0].argmin())  # the most surely occupied quadrant (one kind per picture)
        answers.append({"count": lambda: str(int((shape_p[:, 0] < 0.5).sum().clamp(1, 4))),
                        "colour": lambda: cols[int(colour_p[cell].argmax())],
                        "shape": lambda: SHAPES[int(shape_p[cell, 1:].argmax())],
                        "position": lambda: POSITIONS[int((colour_p[:, cols.index(words[3])] if words[3] in COLOURS else
                                                           shape_p[:, 1 + SHAPES.index(words[-1])]).argmax())]
                        }[ex.qtype]())
    return answers


def perception_probe(world: ToyWorld, folder: Path | None = None, n_train: int = 3000, steps: int = 500,
                     seed: int = 0) -> torch.nn.Module:
    """The fixed probe trained on clean pictures only (a clean-trained perception model, like BAGEL's understanding),
    cached in `folder` (probe.safetensors + probe.json, keyed by its settings, written as one set) so every evaluation
    reads the same one."""
    key = dict(world_seed=world.seed, qtypes=list(world.qtypes), size=MODEL_SIZE, n_train=n_train, steps=steps,
               seed=seed)
    net = shipped_probe(key) or (cached_probe(folder, key) if folder is not None else None)
    if net is not None:
        return net
    net = train_probe(*probe_set(world, np.random.default_rng([world.seed, seed, 3]), n_train, hard=False), steps, seed)
    if folder is not None:
        def write(tmp: Path):
            CK.save_tensors(net.state_dict(), tmp / "probe.safetensors")
            (tmp / "probe.json").write_text(json.dumps(key))
        try:
            CK.atomic_write_folder(folder, write)  # both files from one write, or neither
        except CK.FolderInUse as e:
            print(f"{e}; the probe is not cached this time")
    return net


SHIPPED_PROBE = Path(__file__).resolve().parent / "assets" / "toy_probe"  # perception_probe at evaluate.py's defaults


def shipped_probe(key: dict) -> torch.nn.Module | None:
    """The probe shipped with the repository (perception_probe's training at evaluate.py's defaults for world 0, as a
    measuring instrument is shipped, not rebuilt) if it was trained with the settings `key`, else None."""
    try:
        if json.loads((SHIPPED_PROBE / "probe.json").read_text()) != key:
            return None
    except FileNotFoundError:
        return None
    return read_probe(SHIPPED_PROBE)


def read_probe(folder: Path) -> torch.nn.Module:
    net = probe_net()
    net.load_state_dict(CK.read_tensors(folder / "probe.safetensors"))
    return net.eval()


def cached_probe(folder: Path, key: dict) -> torch.nn.Module | None:
    """The probe cached in `folder` if it holds a complete set (checkpoint.MARKER: both files from one write) trained
    with the settings `key`; None otherwise, said in one line when a cache was there but unreadable."""
    try:
        CK.settle_folder(folder)
        if not (folder / CK.MARKER).exists() or CK.read_json(folder / "probe.json") != key:
            return None  # none yet, written before caches were sets, or other settings: trained again
        return read_probe(folder)
    except (CK.InputError, FileNotFoundError, RuntimeError) as e:  # RuntimeError: tensors of other names or shapes
        print(f"{folder}: the cached perception probe is unusable ({str(e)[:200]}); training it again")
        return None


def calibrate_world(world: ToyWorld, n_train: int = 3000, n_eval: int = 400, steps: int = 500, seed: int = 0) -> dict:
    """Does degradation hurt, and is the signal still there? The perception probe trained on clean or on hard
    pictures answers the held-out questions at each severity, so only perception is measured. Returns accuracy %
    per (trained on, level, qtype)."""
    split, results = world.eval_split(n_eval, seed), {}
    for cond in ("clean", "hard"):
        net = train_probe(*probe_set(world, np.random.default_rng([seed, cond == "hard"]), n_train, cond == "hard"),
                          steps, seed)
        for level, exs in split.items():
            hits = [a == ex.answer for a, ex in zip(probe_answers(net, [ex.degraded for ex in exs], exs), exs)]
            for q in [*world.qtypes, "all"]:
                results[(cond, level, q)] = 100 * float(np.mean([h for h, ex in zip(hits, exs)
                                                                 if q in ("all", ex.qtype)]))
    return results


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, `data.py: error: message (see --help)` (common.Parser's twin: common
    imports this file)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main():
    ap = Parser(description="The toy VQA world of nanoCLEAR: contact sheet and calibration.")
    ap.add_argument("--seed", type=int, default=0, help="world seed (salts the train / held-out split)")
    ap.add_argument("--show", type=int, default=0,
                    help="held-out items to draw at clean / low / mid / hard (at most 32 rows) and to count restores "
                         "over")
    ap.add_argument("--out", default="toy_sheet.png", help="where --show writes the contact sheet")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=False,
                    help="train proxy CNNs on clean and on hard images and print accuracy per level and question type")
    args = ap.parse_args()
    if not args.show and not args.calibrate:
        ap.error("nothing to do: pass --show N and/or --calibrate")
    for name in ("seed", "show"):
        if getattr(args, name) < 0:
            ap.error(f"--{name} {getattr(args, name)}: must be an integer >= 0")
    if args.show and (Path(args.out).suffix.lower() not in Image.registered_extensions() or
                      not Path(args.out).parent.is_dir()):
        ap.error(f"--out {args.out}: must name a picture file (.png, .jpg, ...) in an existing folder")
    world = ToyWorld(args.seed)
    if args.show:
        split = world.eval_split(args.show, args.seed)
        contact_sheet(split, min(args.show, 32)).save(args.out)
        rates = {k: sum(e.restore for e in v) / len(v) for k, v in split.items()}
        print(f"wrote {args.out}; restore rate " + ", ".join(f"{k} {100 * r:.0f}%" for k, r in rates.items()))
    if args.calibrate:
        t0 = time.time()
        res = calibrate_world(world, seed=args.seed)
        print(f"proxy CNN accuracy % (open questions, held-out split), {time.time() - t0:.0f}s")
        print(f"{'trained on':<11}{'level':<7}" + "".join(f"{q:>9}" for q in [*world.qtypes, "all"]))
        for trained_on in ("clean", "hard"):
            for level in ("clean", "low", "mid", "hard"):
                print(f"{trained_on:<11}{level:<7}"
                      + "".join(f"{res[(trained_on, level, q)]:9.1f}" for q in [*world.qtypes, "all"]))
        print("chance     " + " " * 7 + "".join(f"{100 / len(ANSWERS[q]):9.1f}" for q in world.qtypes))


if __name__ == "__main__":
    main()

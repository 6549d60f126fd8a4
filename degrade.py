"""The 16 MMD-Bench corruptions of CLEAR at three severities, seeded and OpenCV-free.

CLEAR (arXiv 2604.04780) builds MMD-Bench by applying one of 16 corruptions, in 4 categories, at intensity
I = 0.23 / 0.45 / 0.9 (low / mid / hard) to every image of six VQA benchmarks, and corrupts its SFT/RL images
the same way. This file re-implements the official `data/corruption_datasets_create/add_degradation.py`
(commit 411d6bd) with numpy, pillow and torch: the same formulas of I give the same kernel sizes, sigmas, blend
weights, counts and JPEG qualities. Ops take and return RGB uint8 arrays; all randomness comes from one
numpy Generator. Paper notes: shared/research/paper_notes.md §5; official code: clear_method.md §4.

    python degrade.py photo.jpg --out sheet.png                              # 16 × (clean, low, mid, hard)
    python degrade.py --jsonl data.jsonl --images imgs --out degraded        # MMD-Bench-style dataset copy

Differences from the official code (each op's docstring says more):
1. Seeded: one numpy Generator per call. The official ops use unseeded global RNGs (not reproducible).
2. RGB instead of OpenCV's BGR; colour constants are mapped so they look the same (lens-flare BGR (255,255,235)
   is RGB (235,255,255); graffiti text stays red).
3. Any PIL mode is accepted; see `to_rgb` for the rule (alpha composited on white).
4. Small images: where the official op raises (and its benchmark then silently keeps the clean image) ours
   shrinks its sizes: block_exchange blocks are at most half the short side, watermark_damage rectangles scale
   by short_side/50 below 50 px. The other ops never fail and run the official formula at every size, so
   from 64 px up every op is the official one.
5. OpenCV routines replaced by compact equivalents, checked against OpenCV 4.6: filter2D, GaussianBlur, remap,
   cvtColor HSV, warpAffine of the motion kernel, addWeighted, circles and Canny-on-rectangles match it to ±1
   level or exactly; thick lines, ellipses and the Hershey font are look-alikes (same ink within ±8%); the JPEG
   codec is Pillow's libjpeg. mean_shift is pyrMeanShiftFiltering step by step with every window read in full,
   bit for bit OpenCV's (5.0 and 5.1), and slower than OpenCV (times depend on the machine: docs/corruptions.md).
   watermark_damage's inpaint (TELEA) is a faster approximation; its docstring gives the bounds.
6. lens_blur keeps the HEAD cap of 101 on its kernel size; the release before it had none (273/139/73).
"""
import argparse
import fcntl
import glob
import io
import json
import os
import shutil
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFont
from tqdm import tqdm

CORRUPTIONS = {  # name → category, in MMD-Bench order
    "lens_blur": "capture", "motion_blur": "capture", "lens_flare": "capture", "dirty_lens": "capture",
    "hsv_saturation": "capture",
    "jpeg_compression": "transmission", "block_exchange": "transmission", "mean_shift": "transmission",
    "scan_lines": "transmission",
    "dark_illumination": "environment", "atmospheric_turbulence": "environment", "gaussian_noise": "environment",
    "color_diffusion": "environment",
    "sharpness_change": "post-processing", "graffiti": "post-processing", "watermark_damage": "post-processing",
}
SEVERITIES = {"low": 0.23, "mid": 0.45, "hard": 0.9}
METHOD_WEIGHTS = {  # official: generate_degradation_benchmark.py and process_degradation_images.py
    "benchmark": dict(zip(CORRUPTIONS, [20] * 5 + [25] * 8 + [33, 33, 34])),  # each category 100 of 400
    "train": dict(zip(CORRUPTIONS, [30, 30, 15, 15, 10, 15, 40, 15, 30, 40, 30, 15, 15, 10, 45, 45])),
}
TRAIN_SEVERITY_PROBS = {0.23: 0.2, 0.45: 0.3, 0.9: 0.5}  # official: process_degradation_images.py
MIN_SIZE = 16
# The largest picture read (width x height): every corruption runs on the picture at full size, so a draw's time grows
# with its pixels (issue 31 timed over a minute a draw at 100 MP); 64 MP holds a 50 MP camera photo and stays below
# Pillow's decompression-bomb warning
MAX_PIXELS = 64_000_000


# ----------------------------------------------------------------------------------------------------------
# OpenCV-equivalent building blocks


def _round_u8(x):
    """OpenCV saturate_cast<uchar>: round half to even, then saturate."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _trunc_u8(x):
    """numpy `clip(x, 0, 255).astype(uint8)`, as the official code writes it: truncates."""
    return np.clip(x, 0, 255).astype(np.uint8)


def _add_weighted(a, wa, b, wb):
    """cv2.addWeighted(a, wa, b, wb, 0) on uint8: float32 sum, rounded and saturated (weights may exceed 1)."""
    return _round_u8(np.float32(wa) * a + np.float32(wb) * b)


def _reflect101(i, n):
    """OpenCV's BORDER_REFLECT_101 index map (…cb|abcd|cb…) for any overshoot."""
    if n == 1:
        return np.zeros_like(i)
    i = np.abs(i) % (2 * n - 2)
    return np.where(i >= n, 2 * n - 2 - i, i)


def _gaussian_kernel(k, sigma):
    """cv2.getGaussianKernel(k, sigma): normalised exp(-x²/2σ²); σ ≤ 0 means OpenCV's default σ for k."""
    if sigma <= 0 and k == 3:
        return np.array([0.25, 0.5, 0.25])  # OpenCV's fixed table for small kernels
    if sigma <= 0:
        sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    g = np.exp(-((np.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def _filter_matrix(n, kernel):
    """(n, n) matrix A such that A @ x is x correlated with `kernel` (centre anchor, reflect-101 border)."""
    k = len(kernel)
    cols = _reflect101(np.arange(n)[:, None] + np.arange(k) - k // 2, n)
    return np.bincount(np.repeat(np.arange(n), k) * n + cols.ravel(), np.tile(kernel, n), n * n).reshape(n, n)


def _sep_filter(img, ky, kx):
    """Separable correlation of every channel (filter2D with ky·kxᵀ, GaussianBlur) as two matmuls: float32 HWC."""
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)
    ay = torch.from_numpy(_filter_matrix(img.shape[0], ky).astype(np.float32))
    ax = torch.from_numpy(_filter_matrix(img.shape[1], kx).astype(np.float32))
    return (ay @ x @ ax.T).permute(1, 2, 0).numpy()


def _filter2d(img, kernel):
    """cv2.filter2D in float32 (correlation, anchor at the kernel centre, reflect-101 border), computed by FFT."""
    (kh, kw), (h, w) = kernel.shape, img.shape[:2]
    ys = _reflect101(np.arange(h + kh - 1) - kh // 2, h)
    xs = _reflect101(np.arange(w + kw - 1) - kw // 2, w)
    pad = torch.from_numpy(img.astype(np.float32)[ys][:, xs]).permute(2, 0, 1)
    size = pad.shape[1:]
    flipped = torch.from_numpy(np.ascontiguousarray(kernel[::-1, ::-1], dtype=np.float32))  # correlation
    out = torch.fft.irfft2(torch.fft.rfft2(pad) * torch.fft.rfft2(flipped, s=size), s=size)
    return out[:, kh - 1:, kw - 1:].permute(1, 2, 0).numpy()


def _disc(canvas, x, y, r, value):
    """Filled circle as OpenCV draws it (thickness -1, LINE_8): every pixel with dx² + dy² ≤ r²."""
    h, w = canvas.shape[:2]
    y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, h), max(x - r, 0), min(x + r + 1, w)
    if y0 < y1 and x0 < x1:
        yy, xx = np.ogrid[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = value


def _ellipse_polygon(cx, cy, a, b, angle):
    """cv2.ellipse2Poly for a full filled ellipse with semi-axes a, b: 73 vertices, 5° apart."""
    t, rot = np.deg2rad(np.arange(0, 361, 5)), np.deg2rad(angle)
    x, y = a * np.cos(t), b * np.sin(t)
    return list(zip(cx + x * np.cos(rot) - y * np.sin(rot), cy + x * np.sin(rot) + y * np.cos(rot)))


def _line(canvas, p0, p1, thickness, value):
    """cv2.line (LINE_8) look-alike. 1 px: 8-connected steps. Thicker: the pixels within t/2 (+0.5 if t is odd)
    + 0.45 of the segment, i.e. OpenCV's polygon with round caps, whose drawn outline adds about half a pixel
    (checked against OpenCV 4.6: same ink within ±5%, IoU ≈ 0.93)."""
    (x0, y0), (x1, y1), (h, w) = p0, p1, canvas.shape[:2]
    if thickness <= 1:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs, ys = np.rint(np.linspace(x0, x1, n)).astype(int), np.rint(np.linspace(y0, y1, n)).astype(int)
        inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        canvas[ys[inside], xs[inside]] = value
        return
    r = thickness / 2 + 0.5 * (thickness % 2) + 0.45
    top, bottom = max(int(min(y0, y1) - r), 0), min(int(max(y0, y1) + r) + 1, h)
    left, right = max(int(min(x0, x1) - r), 0), min(int(max(x0, x1) + r) + 1, w)
    if top < bottom and left < right:
        yy, xx = np.ogrid[top:bottom, left:right]
        (dx, dy), (ex, ey) = (x1 - x0, y1 - y0), (xx - x0, yy - y0)
        u = np.clip((ex * dx + ey * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)  # nearest point on the segment
        canvas[top:bottom, left:right][(ex - u * dx) ** 2 + (ey - u * dy) ** 2 <= r * r] = value


def _pyr_down(img):
    """cv2.pyrDown: 5-tap binomial blur (reflect-101), keep even rows and columns, round half up."""
    k = np.array([1, 4, 6, 4, 1]) / 16
    return _trunc_u8(_sep_filter(img, k, k)[::2, ::2] + 0.5)


def _pyr_up(img, h, w):
    """cv2.pyrUp of a uint8 HxWx3 image to (h, w): zero-insert, 5-tap binomial ×2 per axis (reflect-101), round
    half up."""
    k = np.array([1, 4, 6, 4, 1]) / 8
    ay = torch.from_numpy(_filter_matrix(2 * img.shape[0], k)[:h, ::2].astype(np.float32))
    ax = torch.from_numpy(_filter_matrix(2 * img.shape[1], k)[:w, ::2].astype(np.float32))
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)
    return _trunc_u8((ay @ x @ ax.T).permute(1, 2, 0).contiguous().numpy() + 0.5)


# Hershey-Simplex-like stroke glyphs for the graffiti words: advance width | strokes of "x,y" points on the
# Hershey grid (y = 0 at the cap line, 21 at the baseline). Shapes are redrawn by hand, widths are Hershey's.
_GLYPHS = {
    "A": "18|9,0 1,21|9,0 17,21|4,14 14,14",
    "C": "21|18,5 16,2 13,0 9,0 6,2 4,5 3,9 3,12 4,16 6,19 9,21 13,21 16,19 18,16",
    "D": "21|4,0 4,21|4,0 11,0 15,2 17,5 18,9 18,12 17,16 15,19 11,21 4,21",
    "E": "19|4,0 4,21|4,0 17,0|4,10 12,10|4,21 17,21",
    "F": "18|4,0 4,21|4,0 17,0|4,10 12,10",
    "G": "21|18,5 16,2 13,0 9,0 6,2 4,5 3,9 3,12 4,16 6,19 9,21 13,21 16,19 18,16 18,13|13,13 18,13",
    "H": "22|4,0 4,21|18,0 18,21|4,10 18,10",
    "I": "8|4,0 4,21",
    "K": "21|4,0 4,21|18,0 4,14|9,9 18,21",
    "O": "22|9,0 6,2 4,5 3,9 3,12 4,16 6,19 9,21 13,21 16,19 18,16 19,12 19,9 18,5 16,2 13,0 9,0",
    "P": "21|4,0 4,21|4,0 13,0 16,1 18,4 18,7 16,10 13,11 4,11",
    "R": "21|4,0 4,21|4,0 13,0 16,1 18,4 18,6 16,9 13,10 4,10|11,10 18,21",
    "T": "16|8,0 8,21|1,0 15,0",
    "V": "18|1,0 9,21 17,0",
    "X": "20|3,0 17,21|17,0 3,21",
    "Y": "18|1,0 9,10 9,21|17,0 9,10",
    "0": "20|9,0 6,1 4,4 3,9 3,12 4,17 6,20 9,21 11,21 14,20 16,17 17,12 17,9 16,4 14,1 11,0 9,0",
    "1": "20|6,4 8,3 11,0 11,21",
    "2": "20|4,5 5,2 8,0 12,0 15,2 16,5 15,8 3,21 17,21",
    "3": "20|5,0 16,0 10,8 13,8 16,10 17,14 16,18 13,21 8,21 5,20 3,17",
    "4": "20|13,0 3,14 18,14|13,0 13,21",
    "5": "20|15,0 5,0 4,9 8,7 11,7 15,9 17,13 16,18 13,21 8,21 5,20 3,17",
    "6": "20|16,3 12,0 10,0 6,2 4,6 4,14 6,19 10,21 13,21 16,18 17,14 16,11 13,8 10,8 6,10 4,14",
    "7": "20|17,0 7,21|3,0 17,0",
    "8": "20|8,0 4,2 4,6 8,9 13,10 17,13 17,18 13,21 8,21 3,18 3,13 7,10 12,9 16,6 16,2 12,0 8,0",
    "9": "20|16,7 14,11 10,13 6,12 3,8 4,3 9,0 12,1 15,3 16,7 16,12 15,17 12,20 8,21 5,20 4,18",
}


def _hershey_size(text, scale, thickness):
    """cv2.getTextSize(FONT_HERSHEY_SIMPLEX): (advances·scale + thickness, 21·scale + (thickness+1)//2)."""
    width = sum(int(_GLYPHS[c].split("|")[0]) for c in text) * scale + thickness
    return round(width), round(21 * scale + (thickness + 1) // 2)


def _draw_hershey(canvas, text, x, y, scale, color, thickness):
    """cv2.putText(FONT_HERSHEY_SIMPLEX) stand-in: stroke the glyph polylines with the baseline at y."""
    for c in text:
        advance, *strokes = _GLYPHS[c].split("|")
        for stroke in strokes:
            pts = [[int(v) for v in p.split(",")] for p in stroke.split()]
            pts = [(x + px * scale, y - (21 - py) * scale) for px, py in pts]
            for p0, p1 in zip(pts, pts[1:]):
                _line(canvas, p0, p1, thickness, color)
        x += int(advance) * scale


# ----------------------------------------------------------------------------------------------------------
# The 16 ops: (RGB uint8 HxWx3 array, intensity I in [0, 1], numpy Generator) -> new RGB uint8 array


def lens_blur(img, intensity, rng):
    """Defocus: a wide Gaussian blur blended back with weights summing to 1 + 0.2I (brightens, saturates)."""
    k = min(101, int(3 + intensity * 300)) | 1  # official [HEAD]: kernel size capped at 101; the release had no cap
    g = _gaussian_kernel(k, intensity * 20)
    blurred = _trunc_u8(_sep_filter(img, g, g))  # official: per-channel float32 filter2D with g·gᵀ, astype(uint8)
    return _add_weighted(img, 1 - intensity * 0.7, blurred, intensity * 0.9)  # official: addWeighted, saturating


def motion_blur(img, intensity, rng):
    """Linear camera shake: a line kernel of length d = max(5, int(30I)) at a uniform random angle."""
    d = max(5, int(intensity * 30))
    kernel = _line_kernel(d, rng.uniform(0, 360))  # official: random.uniform(0, 360) degrees
    return _round_u8(_filter2d(img, kernel / kernel.sum()))  # official: filter2D(img, -1, kernel / sum)


def _line_kernel(d, degrees):
    """np.diag(ones(d)) rotated about (d/2, d/2) as cv2.warpAffine(getRotationMatrix2D) does it, bit for bit:
    inverse affine map in 1/1024-px fixed point, rounded to 1/32 px, bilinear weights, zero outside."""
    a, b = np.cos(degrees * (np.pi / 180)), np.sin(degrees * (np.pi / 180))
    m02, m12 = (1 - a) * (d / 2) - b * (d / 2), b * (d / 2) + (1 - a) * (d / 2)  # getRotationMatrix2D
    det = 1 / (a * a + b * b)  # invertAffineTransform
    i00, i01, i10, i11 = a * det, -b * det, b * det, a * det
    i02, i12 = -i00 * m02 - i01 * m12, -i10 * m02 - i11 * m12
    y, x = np.mgrid[:d, :d]
    sx = (np.rint(i00 * x * 1024) + np.rint((i01 * y + i02) * 1024) + 16).astype(np.int64) >> 5  # 1/32 px
    sy = (np.rint(i10 * x * 1024) + np.rint((i11 * y + i12) * 1024) + 16).astype(np.int64) >> 5
    (x0, fx), (y0, fy) = (sx >> 5, (sx & 31) / 32), (sy >> 5, (sy & 31) / 32)
    kernel = np.zeros((d, d))
    for r, c, weight in [(y0, x0, (1 - fy) * (1 - fx)), (y0, x0 + 1, (1 - fy) * fx), (y0 + 1, x0, fy * (1 - fx)),
                         (y0 + 1, x0 + 1, fy * fx)]:
        kernel += weight * ((r == c) & (r >= 0) & (r < d))  # the source is the identity matrix
    return kernel


def lens_flare(img, intensity, rng):
    """3 + int(30I) bright discs (r 10-50) with 2-px streaks (length 30-150), 3×3-blurred and added at 0.9I."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    for _ in range(3 + int(30 * intensity)):
        x, y = int(rng.integers(0, w + 1)), int(rng.integers(0, h + 1))  # official: random.randint(0, w), inclusive
        _disc(mask, x, y, int(rng.integers(10, 51)), 1)
        angle, length = rng.uniform(0, 2 * np.pi), int(rng.integers(30, 151))
        _line(mask, (x, y), (int(x + length * np.cos(angle)), int(y + length * np.sin(angle))), 2, 1)  # thickness 2
    g = _gaussian_kernel(3, 20 * intensity)  # official: GaussianBlur((3, 3), 20I)
    flare = _sep_filter(mask[..., None], g, g) * np.float32([235, 255, 255])  # official: BGR (255, 255, 235)
    return _trunc_u8(img + np.float32(0.9 * intensity) * flare)  # official: float addWeighted(img, 1, flare, 0.9I)


def dirty_lens(img, intensity, rng):
    """Grey smudges (big ellipses, small spots, ring blobs) blurred with σ=30, blended with weights summing to 1+0.1I.

    Sizes are the official pixels at every image size: on images much smaller than the 150-300 px ellipses the
    blurred dirt is a near-uniform grey haze, as in the official op (which never fails)."""
    h, w = img.shape[:2]
    layer = Image.new("L", (w, h))
    draw = ImageDraw.Draw(layer)
    if intensity > 0.1:
        for _ in range(int(10 * intensity)):  # official: cv2.ellipse, semi-axes U[150,300]×U[100,200], grey 50
            cx, cy, a, b, angle = rng.integers([0, 0, 150, 100, 0], [w + 1, h + 1, 301, 201, 181])
            draw.polygon(_ellipse_polygon(cx, cy, a, b, angle), fill=50)
    dirt = np.array(layer)
    for _ in range(int(300 * intensity)):  # official: spots r U[4,20], grey U[50,100]
        x, y, r, grey = (int(v) for v in rng.integers([0, 0, 4, 50], [w + 1, h + 1, 21, 101]))
        _disc(dirt, x, y, r, grey)
    if intensity > 0.5:
        for _ in range(int(5 * intensity)):  # official: grey-80 disc r U[20,50] with a grey-120 disc r U[10,30]
            x, y, r1, r2 = (int(v) for v in rng.integers([0, 0, 20, 10], [w + 1, h + 1, 51, 31]))
            _disc(dirt, x, y, r1, 80)
            _disc(dirt, x, y, r2, 120)
    g = _gaussian_kernel(241, 30)  # official: GaussianBlur(float32 dirt, (0, 0), 30) → ksize round(8σ+1)|1 = 241
    dirt = _trunc_u8(_sep_filter(dirt[..., None], g, g))  # official: .astype(uint8)
    return _add_weighted(img, 1 - 0.7 * intensity, dirt, 0.8 * intensity)  # official: addWeighted, saturating


def hsv_saturation(img, intensity, rng):
    """Washed-out colour: S ×= 1-I through OpenCV's 8-bit HSV (hue in 2° steps); V = max is kept, so it brightens."""
    r, g, b = (img[..., i].astype(np.int32) for i in range(3))
    v, diff = img.max(-1).astype(np.int32), np.ptp(img, -1).astype(np.int32)
    n = np.arange(1, 256)
    sdiv = np.r_[0, np.rint(255 * 4096 / n)].astype(np.int32)  # cvtColor BGR2HSV on uint8: 12-bit division tables
    hdiv = np.r_[0, np.rint(180 * 4096 / (6 * n))].astype(np.int32)
    s = (diff * sdiv[v] + 2048) >> 12
    hue = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    hue = (hue * hdiv[diff] + 2048) >> 12
    hue += 180 * (hue < 0)
    s = _trunc_u8(s.astype(np.float32) * np.float32(1 - intensity))  # official: hsv[..., 1] *= (1 - I), truncate
    # cvtColor HSV2BGR on uint8: float32 sector formula, then ×255
    h6, sf = hue.astype(np.float32) * np.float32(6 / 180), s * np.float32(1 / 255)
    vf = v.astype(np.float32) * np.float32(1 / 255)
    sector = np.floor(h6).astype(np.int32) % 6
    f = h6 - np.floor(h6)
    tab = np.stack([vf, vf * (1 - sf), vf * (1 - sf * f), vf * (1 - sf * (1 - f))])
    order = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])  # (r, g, b) per sector
    rgb = np.take_along_axis(tab, order[sector].transpose(2, 0, 1), 0)
    return _trunc_u8(rgb.transpose(1, 2, 0) * np.float32(255))  # OpenCV (checked on 4.6) truncates here


def jpeg_compression(img, intensity, rng):
    """JPEG round trip at quality clamp(int(100 - 95I), 5, 100), 4:2:0 chroma (libjpeg's default, as OpenCV's)."""
    quality = max(5, min(100, int(100 - intensity * 95)))  # official
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=quality)  # official: cv2.imencode('.jpg', quality)
    return np.asarray(Image.open(buffer).convert("RGB")).copy()


def block_exchange(img, intensity, rng):
    """int(35I) swaps of two random grid-aligned b×b blocks, b = min(32, int(5 + 30I)).

    Small images: b is also capped at half the short side (at least 2 blocks per side); the official op raises
    when the image is smaller than one block and swaps nothing when it holds one. Official from 64 px up."""
    h, w = img.shape[:2]
    b = max(1, min(32, int(5 + intensity * 30), min(h, w) // 2))
    out = img.copy()
    for _ in range(int(intensity * 35)):
        (i1, j1), (i2, j2) = rng.integers(0, [h // b, w // b], size=(2, 2))  # official: random.randint(0, h//b - 1)
        block = out[i1 * b:(i1 + 1) * b, j1 * b:(j1 + 1) * b].copy()
        out[i1 * b:(i1 + 1) * b, j1 * b:(j1 + 1) * b] = out[i2 * b:(i2 + 1) * b, j2 * b:(j2 + 1) * b]
        out[i2 * b:(i2 + 1) * b, j2 * b:(j2 + 1) * b] = block
    return out


def mean_shift(img, intensity, rng):
    """Edge-preserving flattening (posterised, cartoon look) with spatial and colour radius sp = sr = int(40I).

    cv2.pyrMeanShiftFiltering(img, sp, sr) step by step: (1) every pixel of the half-size pyrDown image walks to
    its colour mode with window radius sp/2; (2) the result comes back with pyrUp; (3) pixels near its edges (a
    level-1 neighbour differs by ≥ max(sr, 4) in colour, dilated 3×3) walk again at full size with radius sp.
    Every window is read in full, as OpenCV does, so the output is OpenCV's bit for bit: tests pin OpenCV 5.1's at
    low, mid and hard (5.0's are the same at mid and hard), and so it was on four real photos (scikit-image's
    astronaut, coffee, chelsea and rocket at 128 px, 256 px and native size, three severities). An earlier version
    read each window at 25 or 17 sampled pixels: much faster, but its walks ended at scattered modes, a speckle the
    full windows average away (it added high-frequency energy where OpenCV removes it). Full windows cost more CPU
    time than OpenCV, relatively most at low, whose small windows leave `_shift_to_mode`'s blocks mostly unused;
    times depend on the machine, so they live in docs/corruptions.md (speed, difference 6), not here."""
    sp = sr = int(intensity * 40)  # official: pyrMeanShiftFiltering(img, int(40I), int(40I)), maxLevel 1
    h, w = img.shape[:2]
    small = _pyr_down(img)
    h1, w1 = small.shape[:2]
    half = _shift_to_mode(small, np.arange(h1 * w1), max(sp / 2, 1), sr).reshape(h1, w1, 3)  # OpenCV: sp / 2^level
    out = _pyr_up(half, h, w)
    colour = half.astype(np.int32)
    near_edge = np.zeros((h1 - 2, w1 - 2), bool)  # OpenCV: only interior level-1 pixels are tested
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            diff = colour[1 + dy:h1 - 1 + dy, 1 + dx:w1 - 1 + dx] - colour[1:-1, 1:-1]
            near_edge |= (diff**2).sum(-1) >= max(round(sr * sr), 16)
    mask = np.zeros((h + 2, w + 2), bool)  # OpenCV marks full-size pixel (2i+1, 2j-1) of level-1 (i, j)...
    mask[4:2 * h1 - 1:2, 2:2 * w1 - 3:2] = near_edge
    mask = np.any([mask[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], 0)  # ...and dilates 3×3
    refine = np.flatnonzero(mask)
    out.reshape(-1, 3)[refine] = _shift_to_mode(img, refine, max(sp, 1), sr)
    return out


def _shift_to_mode(src, starts, sp, sr, tile=16):  # tile 16: faster than 8, 32, sp or 2sp at every severity
    """OpenCV's mean shift from each pixel `starts` (flat indices) of the uint8 HxWx3 `src`: up to 5 times, the
    colour and the position both move to the rounded mean of the window pixels whose colour is within sr of the
    current colour; the window spans round(x - sp) .. round(x + sp) in each axis (half to even, as cvRound: at
    sp = 4.5 it is 9 or 11 wide by parity), clipped to the image; stop when the position stays or moves with the
    colour by ≤ 1 in all (|Δx| + |Δy| + |Δcolour|²). Returns the final colours (uint8).

    Each step groups the walkers by the tile x tile square they stand in; a group reads one block of the image (the
    union of its windows). A matmul of [2c, 1] against the block's [r, g, b, -|colour|²] gives 2·sample·c -
    |sample|², which plus limit - |c|² is ≥ 0 exactly where |sample - c|² ≤ round(sr²); pixels outside a walker's
    window get -1e9. A second matmul sums count, position and colour. Every value is an integer below 2^24: exact in
    float32."""
    h, w = src.shape[:2]
    colour = torch.from_numpy(src.astype(np.float32))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    tests = torch.cat([colour, -(colour**2).sum(-1, keepdim=True)], -1)  # per pixel: r, g, b, -|colour|²
    moments = torch.cat([torch.ones(h, w, 1), ys[..., None], xs[..., None], colour], -1)  # 1, y, x, r, g, b
    limit = round(sr * sr) + 1  # official: |Δcolour|² ≤ round(sr²)
    tiles_x = -(-w // tile)
    yx = torch.from_numpy(np.stack(np.divmod(starts, w), 1).astype(np.float32))
    c = torch.from_numpy(src.reshape(-1, 3)[starts].astype(np.float32))
    result, todo = torch.empty_like(c), torch.arange(len(starts))
    for step in range(5):  # official: TermCriteria(MAX_ITER | EPS, 5, 1)
        key = (yx[:, 0] // tile * tiles_x + yx[:, 1] // tile).long()
        order = torch.argsort(key, stable=True)
        new_c, new_yx = torch.empty_like(c), torch.empty_like(yx)
        for group in torch.split(order, torch.bincount(key).tolist()):
            if not len(group):
                continue
            cg, at = c[group], yx[group]
            lo, hi = (at - sp).round(), (at + sp).round()  # official: cvRound(x0 ± sp), half to even
            (y0, x0), (y1, x1) = lo.amin(0).clamp(min=0).int().tolist(), (hi.amax(0) + 1).int().tolist()
            y1, x1 = min(y1, h), min(x1, w)  # the block: every window of the group, clipped to the image
            rows, cols = torch.arange(y0, y1, dtype=torch.float32), torch.arange(x0, x1, dtype=torch.float32)
            off_rows = torch.where((rows >= lo[:, :1]) & (rows <= hi[:, :1]), 0.0, -1e9)
            off_rows += (limit - (cg * cg).sum(1))[:, None]
            off_cols = torch.where((cols >= lo[:, 1:]) & (cols <= hi[:, 1:]), 0.0, -1e9)
            inside = torch.cat([2 * cg, torch.ones(len(group), 1)], 1) @ tests[y0:y1, x0:x1].reshape(-1, 4).T
            inside = inside.view(len(group), y1 - y0, x1 - x0).add_(off_rows[:, :, None]).add_(off_cols[:, None, :])
            sums = (inside.clamp_(0, 1).view(len(group), -1) @ moments[y0:y1, x0:x1].reshape(-1, 6)).double()
            means = (sums[:, 1:] * (1 / sums[:, :1])).round_().float()  # official: cvRound(sum * (1. / count))
            found = sums[:, :1] > 0  # official: with none in range the walk stops where it is
            new_yx[group], new_c[group] = torch.where(found, means[:, :2], at), torch.where(found, means[:, 2:], cg)
        moved = (new_yx - yx).abs_().sum(1)
        stop = (moved == 0) | (moved + ((new_c - c) ** 2).sum(1) <= 1)  # official: eps 1
        if step == 4 or stop.all():
            result[todo] = new_c
            break
        result[todo[stop]] = new_c[stop]
        todo, yx, c = todo[~stop], new_yx[~stop], new_c[~stop]
    return result.numpy().astype(np.uint8)


def scan_lines(img, intensity, rng):
    """Every max(3, int(20/(I+0.1))) rows, max(5, int(7I)) rows are multiplied by 0.01 (truncated: near black)."""
    period, width = max(3, int(20 / (intensity + 0.1))), max(5, int(7 * intensity))  # official
    out = img.copy()
    rows = np.arange(img.shape[0]) % period < width
    out[rows] = (out[rows] * 0.01).astype(np.uint8)  # official: result[i:i+width] *= 0.01 on uint8 → 0, 1 or 2
    return out


def dark_illumination(img, intensity, rng):
    """Underexposure: img × (1 - I²), truncated."""
    return _trunc_u8(img * (1 - intensity**2))  # official


def atmospheric_turbulence(img, intensity, rng):
    """Heat-haze wobble: rows shift by d(y) = 40I·sin(y/30 + 5I) in x and 0.7·d(y) in y, bilinear.

    cv2.remap(INTER_LINEAR) exactly: positions snapped to 1/32 px, integer weights, rounded (bit-exact)."""
    h, w = img.shape[:2]
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    d = intensity * 40 * np.sin(y / 30 + intensity * 5)  # official: depends on the row only
    mx = np.round(np.clip(x + d, 0, w - 1).astype(np.float32) * 32).astype(np.int32)  # official: clipped float32
    my = np.round(np.clip(y + d * 0.7, 0, h - 1).astype(np.float32) * 32).astype(np.int32)  # maps; 1/32-px units
    (x0, fx), (y0, fy) = (mx >> 5, (mx & 31)[..., None]), (my[:, 0] >> 5, (my & 31)[..., None])
    x1 = np.minimum(x0 + 1, w - 1)[..., None]
    rows = [img[y0].astype(np.int32), img[np.minimum(y0 + 1, h - 1)].astype(np.int32)]  # source rows per output row
    top, bottom = (np.take_along_axis(r, x0[..., None], 1) * (32 - fx) + np.take_along_axis(r, x1, 1) * fx
                   for r in rows)
    return ((top * (32 - fy) + bottom * fy + 512) >> 10).astype(np.uint8)


def gaussian_noise(img, intensity, rng):
    """Sensor noise: + N(0, (75I)²) per pixel and channel, clipped and truncated."""
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(intensity * 75)  # official: np.random.normal
    # (float64 there; float32 normals here, the same distribution)
    return _trunc_u8(img + noise)


def color_diffusion(img, intensity, rng):
    """Colour bleeding: Gaussian smear (size 3 + 2·int(20I), σ = 50I) scaled by I², blended at 0.9I; darkens.

    For I > 0.9 only (never at the three severities) int(100I) random grey discs are painted on the smear."""
    g = _gaussian_kernel(3 + 2 * int(intensity * 20), intensity * 50) * intensity  # official: g·gᵀ·I²
    diffused = _sep_filter(img, g, g)
    if intensity > 0.9:
        h, w = img.shape[:2]
        for _ in range(int(100 * intensity)):  # official: np.random.randint, exclusive upper bounds
            x, y, r, grey = (int(v) for v in rng.integers([0, 0, 5, 0], [w, h, 20, 255]))
            _disc(diffused, x, y, r, grey)
    # official: addWeighted(img, max(0.1, 1 - 0.9I), diffused.astype(uint8), min(0.9, 0.9I))
    return _add_weighted(img, max(0.1, 1 - intensity * 0.9), _trunc_u8(diffused), min(0.9, intensity * 0.9))


def sharpness_change(img, intensity, rng):
    """Over-sharpening: 3×3 sharpen kernel ×80I (sum 80I, so it mostly saturates to 255), mixed in at 0.3.

    The result is washed out and bright with dark edge halos. At I = 0 the official op blurs (3×3 Gaussian)."""
    if intensity > 0:
        kernel = np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]]) * (intensity * 80)
        result = _round_u8(_filter2d(img, kernel))  # official: filter2D(uint8) saturates
    else:
        g = _gaussian_kernel(3, 0)  # official: GaussianBlur((3, 3), 0); OpenCV's fixed point rounds half up
        result = _trunc_u8(_sep_filter(img, g, g) + 0.5)
    return _add_weighted(img, 0.7, result, 0.3)  # official


def graffiti(img, intensity, rng):
    """int(10I) random-colour lines (thickness 1..int(5I)); for I > 0.55 a red word (X, FAKE, VOID, …).

    The word is drawn with a hand-made Hershey-like stroke font with Hershey Simplex metrics (cap height
    21·scale, scale 5I, stroke int(scale)); against OpenCV 4.6 its ink is within ±8% and its box within 1 px.
    As in the official op, the word is skipped when the image is too short for it and may run off the right."""
    h, w = img.shape[:2]
    out = img.copy()
    for _ in range(int(10 * intensity)):  # official: uniform BGR colour, endpoints in the image, random thickness
        color, (x1, y1, x2, y2) = rng.integers(0, 256, 3), rng.integers(0, [w, h, w, h])
        _line(out, (x1, y1), (x2, y2), int(rng.integers(1, max(1, int(5 * intensity)) + 1)), color)
    if intensity > 0.55:
        words = ["X", "FAKE", "COPY", "VOID", "COPYRIGHT", str(rng.integers(1, 101))]
        word = words[rng.integers(len(words))]
        scale = max(0.5, intensity * 5)
        thickness = max(1, int(scale))
        tw, th = _hershey_size(word, scale, thickness)
        if h - 10 > th + 10:  # official: otherwise no text
            x, y = int(rng.integers(0, max(1, w - tw - 10) + 1)), int(rng.integers(th + 10, h - 10 + 1))
            _draw_hershey(out, word, x, y, scale, (255, 0, 0), thickness)  # official: (0, 0, 255) BGR = red
    return out


def _inpaint(img, mask, radius=3):
    """cv2.inpaint(INPAINT_TELEA, radius 3) stand-in: fill the mask in 1-px rings ordered by city-block distance
    to the known pixels (Telea orders by fast-marching distance T); a ring pixel gets the weighted mean of the
    pixels within `radius` that are known or in earlier rings, weight 1/(|r|²·(1 + ΔT)) (Telea's distance and
    level factors). Telea's direction factor |cos| and gradient term are dropped. With no known pixel at all,
    the mask gets the image's mean colour."""
    if mask.all():
        return np.broadcast_to(_round_u8(img.reshape(-1, 3).mean(0)), img.shape).copy()
    h, w = mask.shape
    padded = (h + 2 * radius, w + 2 * radius)  # a border that is never filled keeps neighbour indices in range
    inside = np.zeros(padded, bool)
    inside[radius:-radius, radius:-radius] = True
    table = np.zeros((*padded, 4), np.float32)  # r, g, b and fill order T: 0 known, k ring k, inf not yet
    table[..., 3] = np.inf
    table[inside] = np.concatenate([img.reshape(-1, 3), np.where(mask.reshape(-1, 1), np.inf, 0)], 1)
    todo = np.flatnonzero(inside & np.isinf(table[..., 3]))
    ring = _l1_distance(table[..., 3] == 0).ravel()[todo]
    order = np.argsort(ring, kind="stable")
    todo, ring = todo[order], ring[order]
    dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    within = (dy**2 + dx**2 <= radius**2) & ((dy != 0) | (dx != 0))
    offsets = torch.from_numpy((dy * padded[1] + dx)[within])
    dist2 = torch.from_numpy((dy**2 + dx**2)[within]).float()
    flat, todo = torch.from_numpy(table.reshape(-1, 4)), torch.from_numpy(todo)
    starts = np.flatnonzero(np.diff(ring, prepend=-1))
    for k, start, stop in zip(ring[starts], starts, [*starts[1:], len(ring)]):  # rings in order
        pixels = todo[start:stop]
        near = flat.index_select(0, (pixels[:, None] + offsets).reshape(-1)).view(len(pixels), -1, 4)
        weight = 1 / (dist2 * (1 + k - near[..., 3]))  # 0 where the neighbour is not filled yet (T = inf)
        flat[pixels, :3] = (weight[:, None, :] @ near[..., :3]).squeeze(1) / weight.sum(1, keepdim=True)
        flat[pixels, 3] = float(k)
    return _round_u8(table[inside][:, :3].reshape(img.shape))


def _l1_distance(source):
    """City-block distance from every pixel to the nearest True pixel: separable 1-D passes of running minima."""
    d = np.where(source, 0.0, np.inf)
    for axis in (0, 1):
        i = np.arange(d.shape[axis]).reshape((-1, 1) if axis == 0 else (1, -1))
        forward = np.minimum.accumulate(d - i, axis=axis) + i
        backward = np.flip(np.minimum.accumulate(np.flip(d + i, axis), axis=axis), axis) - i
        d = np.minimum(forward, backward)
    return d


def watermark_damage(img, intensity, rng):
    """int(1 + 15I) rectangles (50-200 × 20-80 px) inpainted and blended in at I; if I > 0.5 their outlines ×0.8.

    Inpainting: see `_inpaint`. Canny(mask) is replaced by its result on an axis-aligned binary mask: the
    pixel before each 0/1 step (left or above), where Canny's non-maximum suppression keeps the edge. Small
    images: the official op needs 50 px (random.randint(0, w - 50)); below that all four sizes scale by
    short_side/50."""
    h, w = img.shape[:2]
    s = min(1.0, min(h, w) / 50)
    margin, (w_lo, w_hi, h_lo, h_hi) = round(50 * s), (max(1, round(v * s)) for v in (50, 200, 20, 80))
    mask = np.zeros((h, w), bool)
    for _ in range(int(1 + intensity * 15)):
        x, y = int(rng.integers(0, w - margin + 1)), int(rng.integers(0, h - margin + 1))
        rw, rh = int(rng.integers(w_lo, w_hi + 1)), int(rng.integers(h_lo, h_hi + 1))
        mask[y:y + rh + 1, x:x + rw + 1] = True  # official: cv2.rectangle, filled, both corners inclusive
    out = _add_weighted(img, 1 - intensity, _inpaint(img, mask), intensity)  # official: addWeighted, weights 1-I, I
    if intensity > 0.5:
        edge = np.zeros_like(mask)
        edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
        edge[:-1] |= mask[:-1] != mask[1:]
        out[edge] = (out[edge] * 0.8).astype(np.uint8)  # official: result[edges > 0] *= 0.8, truncated
    return out


_OPS = {name: globals()[name] for name in CORRUPTIONS}


# ----------------------------------------------------------------------------------------------------------
# Public API


def to_rgb(image):
    """Any PIL image → 8-bit RGB, by this rule: alpha (LA, La, PA, RGBA, RGBa, or a "transparency" key as in P
    images) is composited on white; I;16* → value >> 8; I → value >> 8 if any value > 255, else as is, clipped
    to [0, 255]; F → ×255 when its maximum is ≤ 1, then rounded and clipped to [0, 255]; every other mode (1, L,
    P, CMYK, YCbCr, …) goes through PIL's convert("RGB")."""
    mode = image.mode
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        a = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if mode == "F":
            a = np.rint(a * 255 if a.max() <= 1 else a)
        elif mode != "I" or a.max() > 255:
            a = np.floor(a / 256)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _generator(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be an int or a numpy.random.Generator, got {type(seed).__name__}")


def _intensity(severity):
    if isinstance(severity, str) and severity in SEVERITIES:
        return SEVERITIES[severity]
    number = isinstance(severity, (int, float, np.integer, np.floating)) and not isinstance(severity, bool)
    if number and 0 <= severity <= 1:
        return float(severity)
    raise ValueError(f"severity must be one of {', '.join(SEVERITIES)} or a number in [0, 1], got {severity!r}")


def degrade(image, kind, severity, seed):
    """Corrupt a PIL image with one MMD-Bench corruption; returns a new RGB image of the same size.

    kind: a key of CORRUPTIONS. severity: "low" | "mid" | "hard" or an intensity in [0, 1]. seed: an int or a
    numpy Generator; the same inputs and seed give bit-identical output."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of: {', '.join(CORRUPTIONS)}")
    intensity, rng = _intensity(severity), _generator(seed)
    rgb = to_rgb(image)
    if min(rgb.size) < MIN_SIZE:
        raise ValueError(f"image is {rgb.width}x{rgb.height}; degrade needs at least {MIN_SIZE}x{MIN_SIZE} pixels")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one picture is many small torch calls: one thread is faster, and the same on any machine
    try:
        return Image.fromarray(_OPS[kind](np.asarray(rgb), intensity, rng), "RGB")
    finally:
        torch.set_num_threads(threads)


def sample_corruption(rng, weights="benchmark"):
    """Draw (kind, severity) with the official probabilities.

    "benchmark": each category 1/4, equal within it (post-processing 33/33/34 as official); severity is None,
    since MMD-Bench applies the drawn kind at all three severities. "train": the official training weights and
    severity 0.23 / 0.45 / 0.9 with probability 0.2 / 0.3 / 0.5."""
    if weights not in METHOD_WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(METHOD_WEIGHTS)}, got {weights!r}")
    rng, table = _generator(rng), METHOD_WEIGHTS[weights]
    kind = list(table)[rng.choice(len(table), p=np.array(list(table.values())) / sum(table.values()))]
    if weights == "benchmark":
        return kind, None
    return kind, list(TRAIN_SEVERITY_PROBS)[rng.choice(3, p=list(TRAIN_SEVERITY_PROBS.values()))]


def demo_image(size=256):
    """A procedural photo-like RGB image (sky, sun, hills, textured field, a house) for tests and benchmarks."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size] / size
    img = np.stack([90 + 120 * y, 140 + 90 * y, 235 - 20 * y], -1)  # sky gradient
    img[(x - 0.75) ** 2 + (y - 0.2) ** 2 < 0.006] = (255, 230, 120)  # sun
    hills = y > 0.55 + 0.08 * np.sin(7 * x) + 0.04 * np.sin(23 * x + 1)
    texture = np.repeat(np.kron(rng.normal(0, 1, (size // 4 + 1,) * 2), np.ones((4, 4)))[:size, :size, None], 3, -1)
    img[hills] = np.array([60, 130, 50]) + 25 * texture[hills] + 40 * (y[hills, None] - 0.6)
    house = (x > 0.2) & (x < 0.45) & (y > 0.5) & (y < 0.75)
    img[house] = (200, 60, 50)
    img[(y > 0.35) & (y <= 0.5) & (np.abs(x - 0.325) < (y - 0.35) * 0.9)] = (90, 50, 40)  # roof
    img[(x > 0.26) & (x < 0.31) & (y > 0.56) & (y < 0.63)] = (250, 240, 200)  # window
    img += rng.normal(0, 3, img.shape)  # sensor grain
    return Image.fromarray(_round_u8(img), "RGB")


# ----------------------------------------------------------------------------------------------------------
# CLI


class BadInput(ValueError):
    """An input the CLI cannot use; the message names the file (and line), the problem and what to do."""


def _file_problem(path):
    """Why `path` is no regular file to read, or None (checkpoint.file_problem's twin: degrade.py imports nothing of
    the project). Reading a FIFO or a device would block for ever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder"
    return None if stat.S_ISREG(mode) else "is not a regular file (a FIFO, a socket or a device)"


def _open_image(path):
    """Open and fully decode an image file: truncated files fail whatever ImageFile.LOAD_TRUNCATED_IMAGES says, and
    one of more than MAX_PIXELS pixels is refused before it is decoded."""
    problem = _file_problem(path)
    if problem:
        raise BadInput(f"{path} {problem}; give an image file")
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the limit
            if image.width * image.height <= MAX_PIXELS:
                image.load()
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise BadInput(f"{path} is not a readable image ({e}); replace it with a complete PNG/JPEG/... file") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    if image.width * image.height > MAX_PIXELS:
        raise BadInput(f"{path} is {image.width}x{image.height} = {image.width * image.height:,} pixels, over the "
                       f"limit of {MAX_PIXELS:,} (MAX_PIXELS); downscale it")
    if min(image.size) < MIN_SIZE:
        raise BadInput(f"{path} is {image.width}x{image.height} px, under the {MIN_SIZE} px minimum side; "
                       "use a larger image")
    return image


def contact_sheet(image, seed=0, size=512, row_height=96):
    """16 rows (name, category) × 4 columns (clean, low, mid, hard); degraded at `size` px long side, then shrunk."""
    clean = to_rgb(image)
    if size:
        clean.thumbnail((size, size), Image.LANCZOS)
        if min(clean.size) < MIN_SIZE:
            raise BadInput(f"the image shrunk to --size {size} is {clean.width}x{clean.height} px, under the "
                           f"{MIN_SIZE} px minimum side; pass a larger --size, or --size 0 to keep its size")
    cell = (max(1, round(row_height * clean.width / clean.height)), row_height)
    label_w, header = 170, 22
    sheet = Image.new("RGB", (label_w + 4 * cell[0], header + len(CORRUPTIONS) * row_height), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for c, title in enumerate(["clean"] + [f"{name} ({value})" for name, value in SEVERITIES.items()]):
        draw.text((label_w + c * cell[0] + 4, 5), title, fill="black", font=font)
    for r, (kind, category) in enumerate(CORRUPTIONS.items()):
        top = header + r * row_height
        draw.text((6, top + row_height // 2 - 14), f"{kind}\n{category}", fill="black", font=font)
        cells = [clean] + [degrade(clean, kind, value, seed) for value in SEVERITIES.values()]
        for c, im in enumerate(cells):
            sheet.paste(im.resize(cell, Image.LANCZOS), (label_w + c * cell[0], top))
    return sheet


def _image_format(path):
    """The PIL format that writes `path` (from its extension); BadInput if Pillow cannot write such files."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    try:
        Image.new("RGB", (MIN_SIZE, MIN_SIZE)).save(io.BytesIO(), format=fmt)  # an RGB copy must be writable
    except Exception:
        raise BadInput(f"cannot write {path.suffix or 'extension-less'!r} images ({path}); "
                       "name it .png or .jpg") from None
    return fmt


def _save(image, path, **save_args):
    """Write `image` in the format of its extension (JPEG at quality 95, OpenCV's default) and fsync it."""
    fmt = _image_format(path)
    with open(path, "wb") as f:
        image.save(f, format=fmt, **(dict(quality=95) if fmt == "JPEG" else {}), **save_args)
        f.flush()
        os.fsync(f.fileno())


def _save_atomic(image, path, **save_args):
    """Write to a temporary name beside `path`, then rename: no half-written file survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        _save(image, tmp, **save_args)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_jsonl(path):
    """{image path: first line} of a JSONL file; BadInput if it is unreadable, not UTF-8, empty or has bad rows."""
    problem = _file_problem(path)
    if problem:
        raise BadInput(f"{path} {problem}; give an existing JSONL file")
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is allowed
    except OSError as e:
        raise BadInput(f"cannot read {path} ({e.strerror}); give an existing JSONL file") from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise BadInput(f"{path} line {line} is not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    images, problems = {}, []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 and the like
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # also nested too deep, an integer of 4300+ digits
            problems.append(f"line {n} is not JSON ({e.msg if isinstance(e, json.JSONDecodeError) else str(e)[:80]})")
            continue
        image = row.get("image") if isinstance(row, dict) else None
        if not isinstance(image, str) or not image:
            problems.append(f'line {n} has no "image" string')
        elif Path(image).is_absolute() or ".." in Path(image).parts:
            problems.append(f"line {n}: image path {image!r} is absolute or has '..'")
        else:
            images.setdefault(image, n)
    if problems:
        raise BadInput(f"{path}: {len(problems)} bad row(s), {'; '.join(problems[:3])}{'; ...' * (len(problems) > 3)}; "
                       'every row must be a JSON object like {"image": "relative/path.jpg", ...}')
    if not images:
        raise BadInput(f'{path} has no rows; give one JSON object per line with an "image" path')
    return images


def _check_images(images, images_dir, jsonl):
    """Decode every listed image in full (and check its size and output format) before anything is written."""
    if not images_dir.is_dir():
        raise BadInput(f"--images {images_dir} is not a folder; give the folder the {jsonl} image paths start from")
    problems = []
    for rel, n in tqdm(images.items(), desc="check", unit="img"):
        try:
            problem = _file_problem(images_dir / rel)
            if problem:
                raise BadInput(f"{images_dir / rel} {problem} (check --images and the path)")
            _open_image(images_dir / rel)
            _image_format(images_dir / rel)
        except BadInput as e:
            problems.append(f"{jsonl} line {n}: {e}")
    if problems:
        raise BadInput(f"{len(problems)} of {len(images)} images unusable, nothing written: {'; '.join(problems[:3])}"
                       f"{'; ...' * (len(problems) > 3)}")


def _check_out(out_dir, images_dir):
    """--out is replaced as a whole, so it must be new, empty or an earlier output (and not hold the inputs)."""
    for inside, what in [(images_dir.resolve(), f"--images {images_dir}"), (Path.cwd(), "the current folder")]:
        if out_dir.resolve() in [inside, *inside.parents]:
            raise BadInput(f"{what} is inside --out {out_dir}, which is replaced; write elsewhere")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise BadInput(f"--out {out_dir} exists and is not a folder; give a folder path")
    other = sorted(set(os.listdir(out_dir)) - {"manifest.jsonl", *SEVERITIES}) if out_dir.is_dir() else []
    if other:
        raise BadInput(f"--out {out_dir} holds {other[0]!r}, which degrade.py did not write and replacing the folder "
                       "would delete; give a new folder or an earlier degrade.py output")


def _fsync(path):
    """Flush a folder's entries (or a file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(out_dir):
    """Settle what a killed run left beside --out, as checkpoint.settle_folder does for checkpoints: the newest complete
    copy (a `.new-` folder, written and flushed in full; the kill came before or between the renames) becomes --out,
    else an `.old-` copy goes back when the kill came between the two renames and left no --out; the rest goes. Runs
    under the lock only, so whatever it removes belongs to no live run."""
    pattern, parent = glob.escape(f".{out_dir.name}"), out_dir.parent
    newest = lambda kind: max(parent.glob(f"{pattern}.{kind}-*"), key=lambda p: p.stat().st_mtime_ns,  # noqa: E731
                              default=None)
    best = newest("new") or (None if out_dir.exists() else newest("old"))
    if best is not None:
        if out_dir.exists():
            os.rename(out_dir, out_dir.with_name(f".{out_dir.name}.old-{os.urandom(4).hex()}"))
        os.rename(best, out_dir)
        _fsync(parent)
        print(f"{out_dir}: recovered the newest complete output from {best.name}, left by an interrupted run")
    for kind in ("tmp", "new", "old"):
        for stale in parent.glob(f"{pattern}.{kind}-*"):
            shutil.rmtree(stale)


def _swap_in(tmp, out_dir):
    """Rename the finished folder `tmp` to --out; an earlier --out is renamed aside first, then deleted."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old.exists():
            os.rename(old, out_dir)
        raise
    _fsync(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _lock(out_dir):
    """One run per --out: an flock on `.{name}.lock` beside it, holding the PID (POSIX; checkpoint.folder_lock's small
    twin). The OS drops it when its process dies, so a killed run never blocks the next; a second live run stops."""
    path = out_dir.with_name(f".{out_dir.name}.lock")
    while True:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # read-only, no permission, a file in the way
            raise BadInput(f"--out {out_dir} cannot be written ({e.strerror}: {e.filename}); give a folder you can "
                           "write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BadInput(f"--out {out_dir} is in use by process {pid}, another degrade.py run: wait for it to end, "
                           "or give another --out") from None
        if os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
            break
        os.close(fd)  # its holder removed the file as we waited on it: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def degrade_dataset(jsonl, images_dir, out_dir, severities=tuple(SEVERITIES), seed=0):
    """MMD-Bench-style copy: one corruption per image (benchmark weights), the same one at every severity.

    Writes OUT/<severity>/<image path> and OUT/manifest.jsonl ({image, output, corruption, category, severity,
    intensity, seed}); `degrade(Image.open(image), corruption, intensity, seed)` reproduces each output.
    All-or-nothing: every row and image is checked first (BadInput names the first few problems, nothing is
    written); the copy is built in a hidden sibling folder, synced, then renamed to OUT, so OUT is always a
    complete earlier or new copy and a failed or interrupted run leaves it as it was (a kill between the renames leaves
    the new copy beside it, which the next run puts in place first). One run per OUT at a time: a second one stops at
    once (a lock beside OUT)."""
    images_dir, out_dir = Path(images_dir), Path(os.path.abspath(out_dir))  # abspath: "out/" and "." have names
    with _lock(out_dir):
        _remove_stale(out_dir)  # first: an interrupted swap of an earlier run leaves no --out until settled
        return _write_dataset(jsonl, images_dir, out_dir, severities, seed)


def _write_dataset(jsonl, images_dir, out_dir, severities, seed):
    images = _read_jsonl(jsonl)
    _check_out(out_dir, images_dir)
    _check_images(images, images_dir, jsonl)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    done = out_dir.with_name(f".{out_dir.name}.new-{os.getpid()}")
    os.mkdir(tmp)  # permissions from the umask (tempfile.mkdtemp would make it 0700)
    try:
        rows = []
        for i, rel in enumerate(tqdm(images, desc="degrade", unit="img")):
            rng = np.random.default_rng([seed, i])
            kind, _ = sample_corruption(rng, "benchmark")
            seeds = rng.integers(0, 2**31, size=len(SEVERITIES))  # all three drawn, so outputs do not
            image = _open_image(images_dir / rel)  # depend on which severities are asked for
            for (name, value), s in zip(SEVERITIES.items(), seeds):
                if name in severities:
                    path = tmp / name / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _save(degrade(image, kind, value, int(s)), path)
                    rows.append({"image": rel, "output": f"{name}/{rel}", "corruption": kind,
                                 "category": CORRUPTIONS[kind], "severity": name, "intensity": value, "seed": int(s)})
        with open(tmp / "manifest.jsonl", "w") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())
        for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:  # their entries, too, must reach the disk
            _fsync(folder)
        os.rename(tmp, done)  # complete: from here a kill leaves this copy to the next run (_remove_stale)
        _fsync(out_dir.parent)
        _swap_in(done, out_dir)
    except BaseException:  # an error or Ctrl-C: --out stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(done, ignore_errors=True)
        raise
    return out_dir / "manifest.jsonl"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, `degrade.py: error: message (see --help)` (common.Parser's twin)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
    parser = _Parser(prog="degrade.py", description="MMD-Bench corruptions: draw a contact sheet of "
                                     "one image, or write a degraded copy of a JSONL dataset.")
    parser.add_argument("image", nargs="?", help="image for a contact sheet (16 corruptions × clean/low/mid/hard)")
    parser.add_argument("--out", required=True,
                        help="contact-sheet file (.png gets a 256-colour palette, .jpg), or output folder with --jsonl "
                             "(replaced as a whole: a new folder or an earlier output of this command)")
    parser.add_argument("--jsonl", help="dataset rows, one JSON object per line with an \"image\" path")
    parser.add_argument("--images", help="folder the jsonl image paths are relative to (needed with --jsonl)")
    parser.add_argument("--severity", choices=[*SEVERITIES, "all"], help="severity to write (--jsonl; default all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same outputs")
    parser.add_argument("--size", type=int,
                        help="contact sheet: shrink the image to this long side before degrading "
                             "(default 512; 0: keep size)")
    args = parser.parse_args(argv)
    if (args.image is None) == (args.jsonl is None):
        parser.error("give either IMAGE (contact sheet) or --jsonl with --images (dataset)")
    if args.jsonl and not args.images:
        parser.error("--jsonl needs --images, the folder its image paths are relative to")
    if args.image and (args.images or args.severity):
        parser.error(f"{'--images' if args.images else '--severity'} has no effect on a contact sheet "
                     "(it goes with --jsonl)")
    if args.jsonl and args.size is not None:
        parser.error("--size has no effect with --jsonl (it shrinks the contact sheet's image)")
    if args.seed < 0 or (args.size or 0) < 0:
        parser.error(f"--seed {args.seed}: must be >= 0" if args.seed < 0
                     else f"--size {args.size}: must be >= 0 (0 keeps the size)")
    args.severity, args.size = args.severity or "all", 512 if args.size is None else args.size
    try:
        if args.jsonl:
            severities = tuple(SEVERITIES) if args.severity == "all" else (args.severity,)
            print(f"wrote {degrade_dataset(args.jsonl, args.images, args.out, severities, args.seed)}")
            return
        _image_format(Path(args.out))
        sheet = contact_sheet(_open_image(args.image), args.seed, args.size)
        if Path(args.out).suffix.lower() == ".png":  # a dithered 256-colour palette keeps the file small
            palette = sheet.quantize(256, method=Image.Quantize.FASTOCTREE)
            sheet = sheet.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
        _save_atomic(sheet, Path(args.out), optimize=True)
        print(f"wrote {args.out}")
    except BadInput as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except OSError as e:  # e.g. a full disk: the dataset's --out (or the sheet) is left as it was
        parser.exit(1, f"{parser.prog}: error: writing {args.out} failed ({e}); it is unchanged\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted; {args.out} is unchanged\n")


if __name__ == "__main__":
    main()

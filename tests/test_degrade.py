"""Tests for degrade.py: the 16 MMD-Bench corruptions, their official quirks, sampling weights and the CLI."""
import errno
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import degrade
from degrade import CORRUPTIONS, SEVERITIES, degrade as corrupt

OPS = list(CORRUPTIONS)
RANDOM_OPS = ["motion_blur", "lens_flare", "dirty_lens", "block_exchange", "gaussian_noise", "graffiti",
              "watermark_damage"]
# PSNR does not fall monotonically with severity in the official formulas of these two ops:
# color_diffusion blends 0.19·img + 0.81·(0.81-scaled smear) at hard, which is closer to the image than mid's
# 0.595·img + 0.405·(0.2-scaled smear); atmospheric_turbulence's sine phase 5I moves with I, so the pattern is
# not nested and its PSNR on a given image can rise or fall.
NOT_MONOTONE = {"color_diffusion", "atmospheric_turbulence"}


@pytest.fixture(scope="module")
def photo():
    return degrade.demo_image(64)


def psnr(a, b):
    mse = ((np.asarray(a, float) - np.asarray(b, float)) ** 2).mean()
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def flat(value, size=(48, 40)):
    return Image.new("RGB", size, (value,) * 3)


def test_registry_names_order_categories():
    """Guards the public names: other files index CORRUPTIONS/SEVERITIES by the official strings."""
    assert list(CORRUPTIONS) == [
        "lens_blur", "motion_blur", "lens_flare", "dirty_lens", "hsv_saturation",
        "jpeg_compression", "block_exchange", "mean_shift", "scan_lines",
        "dark_illumination", "atmospheric_turbulence", "gaussian_noise", "color_diffusion",
        "sharpness_change", "graffiti", "watermark_damage"]
    assert [CORRUPTIONS[k] for k in ("lens_blur", "jpeg_compression", "gaussian_noise", "graffiti")] == [
        "capture", "transmission", "environment", "post-processing"]
    assert SEVERITIES == {"low": 0.23, "mid": 0.45, "hard": 0.9}


@pytest.mark.parametrize("kind", OPS)
def test_deterministic_for_a_seed(photo, kind):
    """Same image, kind, severity and seed must give bit-identical output (int seed or Generator alike)."""
    a = np.asarray(corrupt(photo, kind, "hard", 7))
    assert np.array_equal(a, np.asarray(corrupt(photo, kind, "hard", 7)))
    assert np.array_equal(a, np.asarray(corrupt(photo, kind, 0.9, np.random.default_rng(7))))


@pytest.mark.parametrize("kind", RANDOM_OPS)
def test_different_seeds_draw_differently(kind):
    """A random op must not ignore its seed (e.g. a global RNG or a fixed draw)."""
    img = degrade.demo_image(128)  # big enough that flares and dirt do not cover everything
    outs = {np.asarray(corrupt(img, kind, "low", seed)).tobytes() for seed in range(3)}
    assert len(outs) == 3


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("severity", list(SEVERITIES) + [0.0, 1.0])
def test_output_is_new_rgb_uint8_same_size(photo, kind, severity):
    """Output must be a new RGB image of the input's size, and the input must stay untouched."""
    before = np.asarray(photo).copy()
    out = corrupt(photo, kind, severity, 0)
    assert out is not photo and out.mode == "RGB" and out.size == photo.size
    assert np.asarray(out).dtype == np.uint8
    assert np.array_equal(np.asarray(photo), before)


@pytest.mark.parametrize("kind", [k for k in OPS if k not in NOT_MONOTONE])
def test_damage_grows_with_severity(photo, kind):
    """PSNR to the clean image must not rise from low to mid to hard (mean of 3 seeds for random ops)."""
    seeds = range(3) if kind in RANDOM_OPS else [0]
    scores = [np.mean([psnr(photo, corrupt(photo, kind, s, seed)) for seed in seeds]) for s in SEVERITIES]
    assert scores[0] >= scores[1] >= scores[2], scores


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("size", [(16, 16), (17, 23)])
def test_small_images_work(kind, size):
    """Ops that assume big images (blocks, 50-px rectangles, big ellipses, text) must not crash on tiny ones."""
    img = degrade.demo_image(32).resize(size)
    for severity in SEVERITIES:
        out = corrupt(img, kind, severity, 1)
        assert out.size == size and out.mode == "RGB"
    if kind in ("block_exchange", "watermark_damage"):  # the official op fails here; ours must still degrade
        assert not np.array_equal(np.asarray(corrupt(img, kind, "hard", 1)), np.asarray(img))


def _odd_modes(img):
    rgba = img.convert("RGBA")
    p_transparent = img.convert("P")
    p_transparent.info["transparency"] = 0
    gray16 = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    return {"L": img.convert("L"), "LA": img.convert("LA"), "P": img.convert("P"), "P+transparency": p_transparent,
            "RGBA": rgba, "CMYK": img.convert("CMYK"), "1": img.convert("1"), "YCbCr": img.convert("YCbCr"),
            "I;16": gray16, "I": img.convert("I"), "F": img.convert("F")}


@pytest.mark.parametrize("kind", OPS)
def test_odd_modes_work(photo, kind):
    """Every PIL mode a dataset may hold (alpha, palette, CMYK, 16-bit, float) must be accepted."""
    for mode, img in _odd_modes(photo).items():
        out = corrupt(img, kind, "mid", 0)
        assert out.mode == "RGB" and out.size == photo.size, mode


def test_to_rgb_rules():
    """Guards the documented conversion rule: alpha on white, I;16 >> 8, F scaled, others via convert('RGB')."""
    rgba = Image.new("RGBA", (16, 16), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(degrade.to_rgb(rgba))
    assert out[0, 0].tolist() == [10, 20, 30] and out[5, 5].tolist() == [255, 255, 255]
    assert np.asarray(degrade.to_rgb(Image.fromarray(np.full((16, 16), 51400, np.uint16))))[0, 0].tolist() == [200] * 3
    assert np.asarray(degrade.to_rgb(Image.fromarray(np.full((16, 16), 0.5, np.float32))))[0, 0].tolist() == [128] * 3
    assert np.asarray(degrade.to_rgb(Image.fromarray(np.full((16, 16), 300.0, np.float32))))[0, 0].tolist() == [255] * 3
    assert np.asarray(degrade.to_rgb(Image.new("I", (16, 16), 100)))[0, 0].tolist() == [100] * 3
    assert degrade.to_rgb(Image.new("CMYK", (16, 16))).mode == "RGB"


def test_unknown_kind_lists_choices(photo):
    """A typo in the corruption name must fail loudly and say what the valid names are."""
    with pytest.raises(ValueError, match="lens_blur.*watermark_damage"):
        corrupt(photo, "lens-blur", "hard", 0)


@pytest.mark.parametrize("severity", [1.5, -0.1, float("nan"), "extreme", True, None])
def test_bad_severity_lists_choices(photo, severity):
    """A severity outside [0, 1] or an unknown name must raise and list low/mid/hard."""
    with pytest.raises(ValueError, match="low, mid, hard"):
        corrupt(photo, "lens_blur", severity, 0)


def test_bad_seed_and_tiny_image_raise(photo):
    """A seed that is not an int/Generator, or an image under 16×16, must raise a clear error."""
    with pytest.raises(TypeError, match="seed"):
        corrupt(photo, "lens_blur", "hard", 1.5)
    with pytest.raises(ValueError, match="16x16"):
        corrupt(photo.resize((15, 40)), "lens_blur", "hard", 0)


def test_sample_corruption_benchmark_weights():
    """Benchmark draws: each category 1/4, equal within it (post-processing 33/33/34), no severity."""
    rng = np.random.default_rng(0)
    draws = [degrade.sample_corruption(rng, "benchmark") for _ in range(20000)]
    assert {severity for _, severity in draws} == {None}
    kinds = [kind for kind, _ in draws]
    for category in ("capture", "transmission", "environment", "post-processing"):
        share = np.mean([CORRUPTIONS[k] == category for k in kinds])
        assert abs(share - 0.25) < 0.015, (category, share)
    for kind, weight in degrade.METHOD_WEIGHTS["benchmark"].items():
        p = weight / 400
        assert abs(kinds.count(kind) / len(kinds) - p) < 4 * np.sqrt(p * (1 - p) / len(kinds)), kind


def test_sample_corruption_train_weights_and_severities():
    """Training draws: the official method weights (e.g. graffiti 45/400) and severity 0.2/0.3/0.5."""
    rng = np.random.default_rng(1)
    draws = [degrade.sample_corruption(rng, "train") for _ in range(20000)]
    assert degrade.METHOD_WEIGHTS["train"]["graffiti"] == 45 and sum(degrade.METHOD_WEIGHTS["train"].values()) == 400
    for kind, weight in degrade.METHOD_WEIGHTS["train"].items():
        p, f = weight / 400, np.mean([k == kind for k, _ in draws])
        assert abs(f - p) < 4 * np.sqrt(p * (1 - p) / len(draws)), kind
    for severity, p in {0.23: 0.2, 0.45: 0.3, 0.9: 0.5}.items():
        assert abs(np.mean([s == severity for _, s in draws]) - p) < 0.015
    with pytest.raises(ValueError, match="benchmark, train"):
        degrade.sample_corruption(rng, "eval")


def test_lens_blur_kernel_capped_at_101_and_brightens(monkeypatch):
    """Kernel size min(101, int(3+300I))|1 (73, 101, 101), and weights 1-0.7I + 0.9I > 1 brighten and saturate."""
    sizes, original = [], degrade._gaussian_kernel
    monkeypatch.setattr(degrade, "_gaussian_kernel", lambda k, sigma: sizes.append((k, sigma)) or original(k, sigma))
    for s in SEVERITIES:
        corrupt(flat(100), "lens_blur", s, 0)
    assert sizes == [(73, 0.23 * 20), (101, 0.45 * 20), (101, 0.9 * 20)]
    monkeypatch.undo()
    assert np.asarray(corrupt(flat(100), "lens_blur", "hard", 0)).min() > 110
    assert np.asarray(corrupt(flat(240), "lens_blur", "hard", 0)).min() == 255


@pytest.mark.parametrize("value", [1, 77, 200, 255])
def test_dark_illumination_is_one_minus_i_squared(value):
    """dark_illumination multiplies by 1 - I² and truncates (0.9 → ×0.19)."""
    for s, i in SEVERITIES.items():
        assert np.asarray(corrupt(flat(value), "dark_illumination", s, 0))[0, 0, 0] == int(value * (1 - i**2))


def test_jpeg_quality_formula(photo):
    """JPEG quality is clamp(int(100 - 95I), 5, 100): 78 / 57 / 14 at low / mid / hard."""
    for s, quality in zip(SEVERITIES, [78, 57, 14]):
        encoded = io.BytesIO()
        photo.save(encoded, "JPEG", quality=quality)
        assert np.array_equal(np.asarray(corrupt(photo, "jpeg_compression", s, 0)), np.asarray(Image.open(encoded)))


def test_scan_lines_pattern():
    """scan_lines darkens the first max(5, int(7I)) of every max(3, int(20/(I+0.1))) rows: 6 of 20 at hard."""
    out = np.asarray(corrupt(flat(250, (40, 64)), "scan_lines", "hard", 0))[:, 0, 0]
    assert out[0:6].tolist() == [2] * 6 and out[6:20].tolist() == [250] * 14 and out[20:26].tolist() == [2] * 6
    low = np.asarray(corrupt(flat(250, (40, 64)), "scan_lines", "low", 0))[:, 0, 0]
    assert np.flatnonzero(low == 2).tolist() == [0, 1, 2, 3, 4, 60, 61, 62, 63]  # period 60, width 5


def test_block_exchange_permutes_32px_blocks():
    """block_exchange only moves whole b×b grid blocks (b = 32 at hard), so pixel values are a permutation."""
    a = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)  # every block distinct
    b = np.asarray(corrupt(Image.fromarray(a), "block_exchange", "hard", 3))
    assert sorted(map(tuple, a.reshape(-1, 3))) == sorted(map(tuple, b.reshape(-1, 3)))
    changed = np.any(a != b, -1)
    assert changed.any() and all(changed[i:i + 32, j:j + 32].all() or not changed[i:i + 32, j:j + 32].any()
                                 for i in range(0, 128, 32) for j in range(0, 128, 32))


def test_saturating_quirks():
    """sharpness_change (kernel sum 80I saturates to 255, mixed at 0.3) and color_diffusion (I²-scaled smear)."""
    assert set(np.unique(np.asarray(corrupt(flat(100), "sharpness_change", "low", 0)))) <= {146, 147}
    assert np.asarray(corrupt(flat(200), "color_diffusion", "mid", 0))[5, 5, 0] == 135  # 0.595·200 + 0.405·40
    assert np.asarray(corrupt(flat(200), "hsv_saturation", 1.0, 0)).std() == 0


def test_colour_constants_are_rgb():
    """BGR constants must keep their look in RGB: the flare is (235,255,255)-tinted, graffiti text is red."""
    flare = np.asarray(corrupt(flat(0, (128, 128)), "lens_flare", "hard", 0)).astype(int)
    lit = flare.sum(-1) > 0
    assert lit.any() and (flare[lit, 0] <= flare[lit, 1]).all() and (flare[..., 1] == flare[..., 2]).all()
    graffiti = np.asarray(corrupt(flat(128, (256, 256)), "graffiti", "hard", 0))
    assert (np.all(graffiti == (255, 0, 0), -1)).sum() > 500


def test_watermark_outline_darkening_and_small_image_scaling():
    """watermark_damage darkens rectangle outlines ×0.8 above I = 0.5, and scales rectangles below 50 px."""
    out = np.asarray(corrupt(flat(200, (120, 90)), "watermark_damage", "hard", 0))
    assert set(np.unique(out)) == {160, 200}
    assert set(np.unique(np.asarray(corrupt(flat(200, (120, 90)), "watermark_damage", "mid", 0)))) == {200}


def test_mean_shift_keeps_edges_and_flattens_noise():
    """mean_shift must not blend colours further apart than sr across an edge, and must smooth what is within sr."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 200
    out = np.asarray(corrupt(Image.fromarray(img), "mean_shift", "hard", 0))
    # as in OpenCV, the outer rows keep a pyrUp blend; elsewhere black is lifted by 1 level at most, where a window
    # reaches the pyrDown blend of the edge (a colour within sr of black)
    assert np.abs(out[2:-2].astype(int) - img[2:-2]).max() <= 1
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    out = np.asarray(corrupt(Image.fromarray(noisy), "mean_shift", "hard", 0)).astype(float)
    assert out[8:-8, 14:26].std() < noisy[8:-8, 14:26].std() / 2 and abs(out[8:-8, 40:56].mean() - 200) < 3
    assert out[8:-8, :26].max() <= 3  # the same lift, on noise


@pytest.mark.parametrize("severity, tiny, larger", [
    ("low", "248f52f37cab763523da3f1e1e5992b9bbe3d014a353d85b716f6b3ee47f8b12",
     "da9c7a1ee87ca4405a30f320c48cbc48d8d2eaf13e2b2baef5cc8ee7d15c6de2"),
    ("mid", "e3cbfc7f335743b6455cfb147d92cdca30ebeafb48fad6d2ca8f2d0ca2c1ef2c",
     "a16950e1a395152d7d2a331665227240a1995e8fe352e5c71a25e59e6965f99d"),
    ("hard", "44cb2100d172c240015484bd87b63411d004b25e48f3cd76d1af54a8493b9826",
     "440cccdbfbd34edb2271c235a3ba90f208333f6bcc6523ac495d22859c34d1de")])
def test_mean_shift_is_opencv(severity, tiny, larger):
    """mean_shift gives cv2.pyrMeanShiftFiltering bit for bit: pyramid, full windows (cvRound bounds, 9 or 11 wide
    by parity at low's half-size radius 4.5), walks, stopping rule, edge mask and rounding are OpenCV's. Digests:
    sha256 of OpenCV 5.1's output (5.0 gives the same at mid and hard) for two odd-sized crops of the demo image, the
    second larger than a 16-pixel tile so walkers cross tiles."""
    demo = np.asarray(degrade.demo_image(64))
    for img, digest in ((demo[::2, ::2][:23, :31], tiny), (demo[:, :57], larger)):
        out = np.asarray(corrupt(Image.fromarray(img), "mean_shift", severity, 0))  # degrade(): one torch thread
        assert hashlib.sha256(out.tobytes()).hexdigest() == digest


def _write_dataset(tmp_path):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    degrade.demo_image(48).save(images / "a.png")
    degrade.demo_image(40).convert("L").save(images / "sub" / "b.jpg")
    rows = [{"image": "a.png", "q": 1}, {"image": "sub/b.jpg"}, {"image": "a.png", "q": 2}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return images


def _dataset_args(tmp_path, out="out", jsonl="data.jsonl", *extra):
    return ["--jsonl", str(tmp_path / jsonl), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / out), *extra]


def _files(folder):
    """Every file under `folder`, hidden ones included, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest_matches_files(out):
    outputs = [json.loads(line)["output"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    return set(_files(out)) == {"manifest.jsonl", *outputs}


def _fails(capsys, argv, code=2):
    """main(argv) must exit with `code` and a one-line message on stderr, without a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        degrade.main(argv)
    err = capsys.readouterr().err
    message = err.rstrip("\n").split("\n")[-1]  # after the progress bars
    assert exit_info.value.code == code and message.startswith("degrade.py: ") and "Traceback" not in err, err
    return message


def test_dataset_cli_writes_all_severities_and_manifest(tmp_path):
    """The dataset CLI must write every image at every severity with one corruption each, and a manifest."""
    images = _write_dataset(tmp_path)
    out = tmp_path / "out"
    degrade.main(_dataset_args(tmp_path, "out", "data.jsonl", "--seed", "3"))
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["image"] for r in rows} == {"a.png", "sub/b.jpg"}
    for name in ("a.png", "sub/b.jpg"):
        mine = [r for r in rows if r["image"] == name]
        assert len({r["corruption"] for r in mine}) == 1 and {r["severity"] for r in mine} == set(SEVERITIES)
    for r in rows:
        written = Image.open(out / r["output"])
        assert written.size == Image.open(images / r["image"]).size
        if r["output"].endswith(".png"):  # lossless: the manifest reproduces it exactly
            again = corrupt(Image.open(images / r["image"]), r["corruption"], r["intensity"], r["seed"])
            assert np.array_equal(np.asarray(written), np.asarray(again))
    assert _manifest_matches_files(out)
    umask = os.umask(0)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in [out, *out.rglob("*")] if p.is_dir()} == {0o777 & ~umask}
    degrade.main(_dataset_args(tmp_path, "low", "data.jsonl", "--seed", "3", "--severity", "low"))
    low_rows = [json.loads(line) for line in (tmp_path / "low" / "manifest.jsonl").read_text().splitlines()]
    assert low_rows == [r for r in rows if r["severity"] == "low"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "imgs", "low", "out"]  # no temporary left


def _truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: (d / "imgs" / "sub" / "b.jpg").unlink(), ["data.jsonl line 2", "sub/b.jpg", "does not exist"]),
    (lambda d: (d / "imgs" / "a.png").write_text("not an image"), ["data.jsonl line 1", "a.png", "not a readable"]),
    (lambda d: _truncate(d / "imgs" / "a.png"), ["data.jsonl line 1", "a.png", "truncated"]),
    (lambda d: _truncate(d / "imgs" / "sub" / "b.jpg"), ["data.jsonl line 2", "b.jpg", "truncated"]),
    (lambda d: degrade.demo_image(48).resize((15, 40)).save(d / "imgs" / "a.png"), ["a.png", "15x40", "16 px"]),
    (lambda d: (d / "data.jsonl").write_bytes(b'{"image": "a.png"}\n{"image": "caf\xe9.png"}\n'),
     ["data.jsonl line 2", "not UTF-8", "0xe9"]),
    (lambda d: (d / "data.jsonl").write_text("\n  \n"), ["data.jsonl has no rows"]),
    (lambda d: (d / "data.jsonl").write_text('{"image": "a.png"}\n{"image": \n'), ["data.jsonl", "line 2 is not JSON"]),
    (lambda d: (d / "data.jsonl").write_text('{"image": "a.png"}\n["a.png"]\n{"q": 1}\n'),
     ["2 bad row(s)", 'line 2 has no "image"', 'line 3 has no "image"']),
    (lambda d: (d / "data.jsonl").write_text('{"image": "../a.png"}\n'), ["line 1", "'..'"]),
], ids=["missing", "not an image", "truncated PNG", "truncated JPEG", "tiny", "not UTF-8", "empty", "bad JSON",
        "no image", "outside"])
def test_dataset_cli_rejects_bad_input_before_writing(tmp_path, capsys, breakage, expected):
    """Every bad row or image is found before anything is written: exit 2, one line naming file and line."""
    _write_dataset(tmp_path)
    breakage(tmp_path)
    err = _fails(capsys, _dataset_args(tmp_path))
    assert all(part in err for part in expected), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "imgs"]


def test_dataset_cli_catches_truncation_even_when_pil_allows_it(tmp_path, capsys, monkeypatch):
    """A truncated JPEG must be rejected even if some other import set ImageFile.LOAD_TRUNCATED_IMAGES."""
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _write_dataset(tmp_path)
    _truncate(tmp_path / "imgs" / "sub" / "b.jpg")
    assert "truncated" in _fails(capsys, _dataset_args(tmp_path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_dataset_cli_failed_rerun_keeps_earlier_output(tmp_path, capsys):
    """A re-run that fails on bad input must leave the earlier output and its manifest exactly as they were."""
    _write_dataset(tmp_path)
    degrade.main(_dataset_args(tmp_path))
    before = _files(tmp_path / "out")
    _truncate(tmp_path / "imgs" / "a.png")
    _fails(capsys, _dataset_args(tmp_path, "out", "data.jsonl", "--seed", "5"))
    assert _files(tmp_path / "out") == before and _manifest_matches_files(tmp_path / "out")


@pytest.mark.parametrize("error, code", [(OSError(errno.ENOSPC, "No space left on device"), 1),
                                         (KeyboardInterrupt(), 130)])
def test_dataset_cli_failure_mid_write_keeps_earlier_output(tmp_path, capsys, monkeypatch, error, code):
    """A full disk (or Ctrl-C) after the first written image leaves the earlier output as it was and no temporary
    folder; the message says so."""
    _write_dataset(tmp_path)
    degrade.main(_dataset_args(tmp_path))
    before = _files(tmp_path / "out")
    save, calls = degrade._save, []

    def save_once(*args, **kwargs):
        if calls:
            raise error
        calls.append(save(*args, **kwargs))
    monkeypatch.setattr(degrade, "_save", save_once)
    assert "unchanged" in _fails(capsys, _dataset_args(tmp_path, "out", "data.jsonl", "--seed", "5"), code)
    assert calls and _files(tmp_path / "out") == before and _manifest_matches_files(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "imgs", "out"]


def test_dataset_cli_clears_stale_folders_of_a_killed_run(tmp_path):
    """Leftovers of a killed run are removed by the next run; an output set aside mid-swap is put back."""
    _write_dataset(tmp_path)
    (tmp_path / ".out.tmp-999999" / "low").mkdir(parents=True)
    (tmp_path / ".out.old-999999").mkdir()
    (tmp_path / ".out.old-999999" / "manifest.jsonl").write_text("")
    degrade._remove_stale(tmp_path / "out")  # killed between the two renames: no "out", its old copy beside it
    assert (tmp_path / "out" / "manifest.jsonl").exists() and not (tmp_path / ".out.old-999999").exists()
    (tmp_path / ".out.tmp-999998").mkdir()
    degrade.main(_dataset_args(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "imgs", "out"]


def test_dataset_cli_will_not_replace_a_foreign_folder(tmp_path, capsys, monkeypatch):
    """--out is replaced as a whole: a folder holding anything degrade.py did not write, the inputs or the current
    folder is refused, untouched."""
    _write_dataset(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "notes.txt" in _fails(capsys, _dataset_args(tmp_path))
    assert _files(tmp_path / "out") == {"notes.txt": b"mine"}
    assert "--images" in _fails(capsys, _dataset_args(tmp_path, "."))  # the inputs are inside --out
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert "current folder" in _fails(capsys, _dataset_args(tmp_path, "here"))


def test_contact_sheet_cli(tmp_path, capsys):
    """The contact-sheet CLI must draw 16 rows × 4 columns and reject an unreadable image."""
    degrade.demo_image(48).save(tmp_path / "in.png")
    degrade.main([str(tmp_path / "in.png"), "--out", str(tmp_path / "sheet.png"), "--size", "48"])
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (170 + 4 * 96, 22 + 16 * 96)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert "broken.png is not a readable image" in _fails(capsys, [str(tmp_path / "broken.png"), "--out",
                                                                   str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_cli_flags_checked_before_any_work(tmp_path, capsys):
    """A negative --seed or --size, an image too thin for its --size (a traceback from degrade), and a flag of the other
    mode (--size with --jsonl, --severity or --images with a contact sheet) stop in one line, writing nothing."""
    degrade.demo_image(48).save(tmp_path / "in.png")
    Image.new("RGB", (400, 20)).save(tmp_path / "thin.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "in.png"}) + "\n")
    sheet = [str(tmp_path / "in.png"), "--out", str(tmp_path / "sheet.png")]
    dataset = ["--jsonl", str(tmp_path / "data.jsonl"), "--images", str(tmp_path), "--out", str(tmp_path / "out")]
    for argv, words in (([*sheet, "--seed", "-1"], "--seed -1"), ([*sheet, "--size", "-4"], "--size -4"),
                        ([str(tmp_path / "thin.png"), "--out", str(tmp_path / "sheet.png"), "--size", "64"], "64x3 px"),
                        ([*sheet, "--severity", "low"], "--severity has no effect"),
                        ([*dataset, "--size", "64"], "--size has no effect"),
                        ([*dataset, "--seed", "-3"], "--seed -3")):
        assert words in _fails(capsys, argv), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "in.png", "thin.png"]


def test_dataset_cli_kill_between_renames_leaves_the_new_copy_to_the_next_run(tmp_path, capsys):
    """A kill between the two renames of the swap left no output folder until a later run succeeded: the next run,
    even one that then stops on bad input, first puts the newest complete copy in place (as checkpoints are settled)
    and says so."""
    _write_dataset(tmp_path)
    degrade.main(_dataset_args(tmp_path))
    before = _files(tmp_path / "out")
    os.rename(tmp_path / "out", tmp_path / ".out.new-123")  # complete copy set aside, killed before the second rename
    (tmp_path / ".out.tmp-124").mkdir()  # and an unfinished copy of another killed run
    (tmp_path / "data.jsonl").write_text("not json\n")
    with pytest.raises(SystemExit):
        degrade.main(_dataset_args(tmp_path))
    said = capsys.readouterr()
    assert "line 1 is not JSON" in said.err and "recovered the newest complete output" in said.out
    assert _files(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "imgs", "out"]


def test_dataset_cli_one_run_per_out(tmp_path, capsys):
    """A second run on the same --out stops at once in one line naming the first (POSIX flock beside the folder); a
    lock file left by a killed run blocks nothing."""
    import fcntl
    _write_dataset(tmp_path)
    lock = tmp_path / ".out.lock"
    with open(lock, "w") as f:
        f.write("4242\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        assert "in use by process 4242" in _fails(capsys, _dataset_args(tmp_path))
    degrade.main(_dataset_args(tmp_path))  # the lock file remains, unlocked: as after a kill
    assert (tmp_path / "out" / "manifest.jsonl").exists() and not lock.exists()


def test_cli_refuses_fifos_huge_pictures_and_python_limits_in_one_line(tmp_path, capsys):
    """A FIFO as image or JSONL is named as such (it was "does not exist"; reading one blocks), a picture over
    MAX_PIXELS is refused with the limit, JSON nested too deep or with a 5000-digit integer is a bad row, and an
    argparse error is one line ending in (see --help) instead of the usage text."""
    _write_dataset(tmp_path)
    os.mkfifo(tmp_path / "imgs" / "pipe.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "pipe.png"}) + "\n")
    assert "pipe.png is not a regular file" in _fails(capsys, _dataset_args(tmp_path))
    assert "is not a regular file" in _fails(capsys, [str(tmp_path / "imgs" / "pipe.png"), "--out",
                                                      str(tmp_path / "s.png")])
    Image.new("1", (8001, 8001)).save(tmp_path / "imgs" / "huge.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "huge.png"}) + "\n")
    assert "over the limit of 64,000,000" in _fails(capsys, _dataset_args(tmp_path))
    (tmp_path / "data.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n" + '{"image": ' + "1" * 5000 + "}\n")
    err = _fails(capsys, _dataset_args(tmp_path))
    assert "line 1 is not JSON" in err and "line 2 is not JSON" in err
    assert _fails(capsys, ["--bogus"]).endswith("(see --help)")


# ----------------------------------------------------------------------------------------------------------------------
# Each corruption pinned by values worked out by hand, with the random draws under the test's control (a stub
# Generator answers the ways an op may ask for them), so a wrong formula cannot pass and the draw order does not matter


class StubRng:
    """A numpy Generator stand-in whose normals are `z` (standard_normal, or normal(loc, scale)) and whose uniforms are
    `u` (random(), or uniform(low, high))."""

    def __init__(self, z=None, u=0.0):
        self.z, self.u = z, u

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        return np.broadcast_to(self.z, size).astype(dtype)

    def normal(self, loc=0.0, scale=1.0, size=None):
        return loc + scale * np.broadcast_to(self.z, size)

    def random(self, size=None, dtype=np.float64, out=None):
        return self.u

    def uniform(self, low=0.0, high=1.0, size=None):
        return low + self.u * (high - low)


def test_gaussian_noise_by_hand():
    """img + 75 I z, clipped to [0, 255], truncated: 100 + 0.23 * 75 * (-1.19) = 79.475 -> 79; 255 + 0.2 * 67.5 -> 255
    (no wrap); 0 - 0.1 * 17.25 -> 0; 128 + 2.9 * 33.75 = 225.875 -> 225 (not 226: truncated, not rounded)."""
    img = np.array([[[10, 100, 250], [0, 255, 128]], [[50, 60, 70], [200, 201, 202]]], np.uint8)
    z = np.array([[[0.5, -1.19, 0.3], [-0.1, 0.2, 2.9]], [[-1.3, 1.1, -2.2], [0.7, -0.02, -3.3]]])
    expected = {0.23: [[[18, 79, 255], [0, 255, 178]], [[27, 78, 32], [212, 200, 145]]],
                0.45: [[[26, 59, 255], [0, 255, 225]], [[6, 97, 0], [223, 200, 90]]],
                0.9: [[[43, 19, 255], [0, 255, 255]], [[0, 134, 0], [247, 199, 0]]]}
    for intensity, want in expected.items():
        out = degrade.gaussian_noise(img.copy(), intensity, StubRng(z))
        assert out.dtype == np.uint8 and out.tolist() == want, intensity


def test_gaussian_noise_spread_by_severity():
    """Seeded draws: on flat grey 128 at low the noise has standard deviation 75 * 0.23 = 17.25 and, truncated, mean
    -0.5 (rounding would give 0); on flat 250 at hard, 255 is reached with probability P(z > 5 / 67.5) = 0.47."""
    out = degrade.gaussian_noise(np.full((192, 192, 3), 128, np.uint8), 0.23, np.random.default_rng(0))
    d = out.astype(float) - 128
    assert abs(d.std() - 17.25) < 0.25 and abs(d.mean() + 0.5) < 0.25, (d.std(), d.mean())
    out = degrade.gaussian_noise(np.full((96, 96, 3), 250, np.uint8), 0.9, np.random.default_rng(1))
    assert abs((out == 255).mean() - 0.4705) < 0.02 and out.min() < 60


@pytest.mark.parametrize("severity, u, expected", [
    ("low", 0.0, {(32 + 3 - i, 32 + 3 - i): 40 for i in range(6)}),  # d = 6, the diagonal, 240 / 6
    ("low", 0.25, {(32 + 3 - i, 32 - 3 + i): 48 for i in range(1, 6)}),  # 90 degrees: 5 cells in the kernel, 240 / 5
    ("mid", 0.0, {(32 + 6 - i, 32 + 6 - i): 18 for i in range(13)}),  # d = 13: 240 / 13 = 18.5 -> 18
    ("hard", 0.0, {(32 + 13 - i, 32 + 13 - i): 9 for i in range(27)})])  # d = 27: 240 / 27 = 8.9 -> 9
def test_motion_blur_impulse_response_by_hand(severity, u, expected):
    """One lit pixel (240) blurred shows the kernel: d = max(5, int(30 I)) cells of the line drawn at the angle
    u * 360 degrees (rotated about its centre), each weighing 1 / (the kernel's sum), rounded; zero elsewhere."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[32, 32] = 240
    out = degrade.motion_blur(img, SEVERITIES[severity], StubRng(u=u))
    want = np.zeros((64, 64), np.uint8)
    for (y, x), value in expected.items():
        want[y, x] = value
    assert out.dtype == np.uint8 and all(np.array_equal(out[..., c], want) for c in range(3))


def test_sample_corruption_takes_a_seed_and_returns_names():
    """An int seed works like a Generator seeded with it; the kinds are CORRUPTIONS' names, severities the three
    training intensities."""
    draws = [degrade.sample_corruption(seed, "train") for seed in range(40)]
    assert draws == [degrade.sample_corruption(np.random.default_rng(seed), "train") for seed in range(40)]
    assert {k for k, _ in draws} <= set(CORRUPTIONS) and {s for _, s in draws} == {0.23, 0.45, 0.9}
    kind, severity = degrade.sample_corruption(3)  # benchmark weights by default
    assert kind in CORRUPTIONS and severity is None

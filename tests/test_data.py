"""Inputs: decoding of every format and mode, preprocessing identical to timm's, crop boxes, discovery, seeds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from saliency_cli.data import crop_geometry, decode, discover, file_digest, image_seed, preprocess
from saliency_cli.errors import ImageError, UsageError


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def pattern() -> Image.Image:
    """A 40 x 24 RGB image of four flat colour blocks (survives lossy codecs and palettes)."""
    arr = np.zeros((24, 40, 3), dtype=np.uint8)
    arr[:12, :20] = (220, 30, 30)
    arr[:12, 20:] = (30, 200, 40)
    arr[12:, :20] = (20, 40, 210)
    arr[12:, 20:] = (240, 240, 30)
    return Image.fromarray(arr, "RGB")


def rgb(data: bytes) -> np.ndarray:
    img = decode(data)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# -- decoding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "params", "tolerance"), [
    ("JPEG", {"quality": 95}, 12),
    ("PNG", {}, 0),
    ("WEBP", {"lossless": True}, 0),
    ("WEBP", {"quality": 90}, 12),
    ("BMP", {}, 0),
    ("TIFF", {}, 0),
    ("GIF", {}, 0),
])
def test_every_listed_format_decodes_to_the_same_rgb_pixels(fmt, params, tolerance):
    """JPEG, PNG, WebP, BMP, TIFF and GIF decode to 8-bit RGB of the original size and colours (block centres)."""
    original = pattern()
    out = rgb(encode(original, fmt, **params))
    assert out.shape == (24, 40, 3)
    ref = np.asarray(original).astype(int)
    for y, x in [(6, 10), (6, 30), (18, 10), (18, 30)]:
        assert np.abs(out[y, x] - ref[y, x]).max() <= tolerance, (fmt, y, x)


def test_grayscale_becomes_equal_rgb_channels():
    """An L image decodes to RGB with R = G = B = the grey value."""
    grey = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    out = rgb(encode(Image.fromarray(grey, "L"), "PNG"))
    assert (out == grey[..., None]).all()


def test_rgba_is_flattened_on_white():
    """RGBA: transparent pixels become white, opaque ones keep their colour, half-transparent ones blend."""
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 0] = (10, 20, 30, 0)  # fully transparent: white, whatever its colour
    arr[0, 1] = (10, 20, 30, 255)  # opaque
    arr[0, 2] = (0, 100, 200, 128)  # half: c * a + 255 * (1 - a)
    out = rgb(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    a = 128 / 255
    expected = [round(c * a + 255 * (1 - a)) for c in (0, 100, 200)]
    assert np.abs(out[0, 2] - expected).max() <= 1


def test_la_is_flattened_on_white():
    """LA: a transparent pixel becomes white, an opaque one keeps its grey."""
    arr = np.array([[[40, 0], [40, 255]]], dtype=np.uint8)
    out = rgb(encode(Image.fromarray(arr, "LA"), "PNG"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [40, 40, 40]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_flattened_on_white(fmt):
    """A palette image whose index 0 is transparent shows white there and its palette colour elsewhere."""
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 0, 200, 30, 60] + [0, 0, 0] * 254)
    img.putpixel((1, 0), 1)
    out = rgb(encode(img, fmt, transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 30, 60]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_converted_to_rgb(fmt):
    """CMYK (0,0,0,0) is white and (0,255,255,0) is red."""
    arr = np.zeros((8, 16, 4), dtype=np.uint8)
    arr[:, 8:] = (0, 255, 255, 0)
    out = rgb(encode(Image.fromarray(arr, "CMYK"), fmt))
    assert np.abs(out[4, 2] - [255, 255, 255]).max() <= 8
    assert np.abs(out[4, 13] - [255, 0, 0]).max() <= 8


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_by_65535(fmt):
    """16-bit grey v decodes to round(v / 65535 * 255), also for a dark image whose values are all below 256."""
    values = np.array([[0, 200, 257 * 100, 40000, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = rgb(encode(img, fmt))
    assert out[0, :, 0].tolist() == [0, 1, 100, 156, 255]
    dark = np.array([[0, 100, 255]], dtype=np.uint16)  # near black in 16 bits, not a full-range 8-bit image
    assert rgb(encode(Image.fromarray(dark), fmt))[0, :, 0].tolist() == [0, 0, 1]


def test_exif_orientation_is_applied():
    """A JPEG stored 40 x 24 with EXIF orientation 6 (rotate 90 degrees clockwise) decodes as 24 x 40, with the
    stored top-left block at the top right."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(pattern(), "JPEG", quality=95, exif=exif.tobytes())
    img = decode(data)
    assert img.size == (24, 40)
    out = np.asarray(img).astype(int)
    assert np.abs(out[5, 18] - [220, 30, 30]).max() <= 12  # stored top-left (red) -> top-right
    assert np.abs(out[35, 18] - [30, 200, 40]).max() <= 12  # stored top-right (green) -> bottom-right


@pytest.mark.parametrize(("data", "words"), [
    (b"", "empty"),
    (b"this is not an image, just text\n" * 20, "not an image"),
    (bytes(range(256)) * 8, "not an image"),
    (encode(pattern(), "PNG")[:60], "broken image data"),  # truncated
])
def test_unreadable_bytes_raise_a_one_line_image_error(data, words):
    """Empty files, garbage and truncated images raise ImageError with a short one-line reason."""
    with pytest.raises(ImageError) as info:
        decode(data)
    message = str(info.value)
    assert words in message
    assert "\n" not in message and 0 < len(message) < 250


# -- preprocessing ----------------------------------------------------------------------------------------
def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


TINY_NONSQUARE = {"input_size": (3, 48, 64), "interpolation": "bilinear", "mean": (0.5, 0.4, 0.3),
                  "std": (0.2, 0.25, 0.3), "crop_pct": 0.9, "crop_mode": "center"}


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (224, 224), (301, 157), (90, 61)])
@pytest.mark.parametrize("variant", ["bundled", "squash", "nonsquare-input"])
def test_preprocess_equals_timms_eval_transform(bundled, size, variant):
    """preprocess() gives exactly what timm's create_transform(**data_config) gives (within 1e-5), for the
    bundled model's config, its crop_mode squash variant and a non-square input size, for images of both
    orientations, square, and smaller than the input."""
    cfg = dict(bundled.data_config)
    if variant == "squash":
        cfg["crop_mode"] = "squash"
    elif variant == "nonsquare-input":
        cfg = dict(TINY_NONSQUARE)
    img = noise_image(*size)
    x, _ = preprocess(img, cfg)
    expected = timm.data.create_transform(**cfg)(img)
    assert x.shape == expected.shape == cfg["input_size"]
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)


def test_crop_box_of_a_landscape_image_by_hand(bundled):
    """500 x 375 with the bundled config (224 px, crop_pct 0.875): shorter side to 256, so 341 x 256; the
    224 crop starts at (58, 16); scaled back by 500/341 and 375/256 that is [85.04, 23.44, 413.49, 351.56]."""
    assert bundled.data_config["input_size"] == (3, 224, 224) and bundled.data_config["crop_pct"] == 0.875
    _, box = preprocess(noise_image(500, 375), bundled.data_config)
    assert box == pytest.approx([58 * 500 / 341, 16 * 375 / 256, 282 * 500 / 341, 240 * 375 / 256], abs=0.006)
    assert box == pytest.approx([85.04, 23.44, 413.49, 351.56], abs=0.006)


def test_crop_box_of_a_portrait_image_and_of_squash_by_hand(bundled):
    """375 x 500 is the transpose of the landscape case; squash resizes 500 x 375 to 256 x 256 and crops
    (16, 16, 240, 240), which is [31.25, 23.44, 468.75, 351.56] in the original."""
    _, box = preprocess(noise_image(375, 500), bundled.data_config)
    assert box == pytest.approx([23.44, 85.04, 351.56, 413.49], abs=0.006)
    _, box = preprocess(noise_image(500, 375), {**bundled.data_config, "crop_mode": "squash"})
    assert box == pytest.approx([31.25, 23.44, 468.75, 351.56], abs=0.006)


def test_crop_box_shows_what_the_model_saw(bundled):
    """Cropping the original at the box and resizing it to the input size reproduces the model's input."""
    img = Image.fromarray(np.kron(np.random.default_rng(1).integers(0, 256, (30, 40, 3)), np.ones((10, 10, 1)))
                          .astype(np.uint8), "RGB")  # 400 x 300, smooth enough to survive resampling
    cfg = bundled.data_config
    x, box = preprocess(img, cfg)
    region = img.crop(tuple(round(v) for v in box)).resize((224, 224), Image.Resampling.BICUBIC)
    pixels = torch.tensor(np.array(region)).permute(2, 0, 1).float() / 255
    again = (pixels - torch.tensor(cfg["mean"]).view(3, 1, 1)) / torch.tensor(cfg["std"]).view(3, 1, 1)
    assert float((again - x).abs().mean()) < 0.1 * float(x.abs().mean())  # a 3 px shift gives 0.45


def test_crop_geometry_covers_the_target():
    """The resized image always contains the crop (no padding) for center crops of any aspect ratio."""
    for w, h in [(500, 375), (375, 500), (64, 1000), (1000, 64), (33, 33)]:
        for cfg in (TINY_NONSQUARE, {**TINY_NONSQUARE, "input_size": (3, 56, 56)}):
            (rw, rh), (left, top, right, bottom) = crop_geometry(w, h, cfg)
            assert 0 <= left and 0 <= top and right <= rw and bottom <= rh
            assert (right - left, bottom - top) == (cfg["input_size"][2], cfg["input_size"][1])


# -- discovery --------------------------------------------------------------------------------------------
def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folders_are_recursive_sorted_and_keep_only_images(tmp_path):
    """A folder yields its image files at any depth, sorted by relative path, keyed relative to the folder;
    other files are ignored and image suffixes match case-insensitively."""
    for rel in ["z.png", "b/d/e.JPG", "a.webp", "b/c.tiff", "notes.txt", "b/d/readme.md", "b/x.gif"]:
        touch(tmp_path / "in" / rel)
    items = discover([str(tmp_path / "in")])
    assert [i.key for i in items] == ["a.webp", "b/c.tiff", "b/d/e.JPG", "b/x.gif", "z.png"]
    assert all(i.path.is_file() for i in items)


def test_same_named_files_in_different_folders_get_different_keys(tmp_path):
    """Keys are relative to the inputs' common root, so a/cat.png and b/cat.png do not collide."""
    touch(tmp_path / "a" / "cat.png")
    touch(tmp_path / "b" / "cat.png")
    touch(tmp_path / "b" / "sub" / "cat.png")
    items = discover([str(tmp_path / "a"), str(tmp_path / "b")])
    assert [i.key for i in items] == ["a/cat.png", "b/cat.png", "b/sub/cat.png"]
    files = discover([str(tmp_path / "a" / "cat.png"), str(tmp_path / "b" / "cat.png")])
    assert [i.key for i in files] == ["a/cat.png", "b/cat.png"]


def test_dash_reads_paths_from_stdin_lines(tmp_path):
    """`-` takes one path per stdin line (blank lines ignored), whatever the suffix, in the given order."""
    one = touch(tmp_path / "one.png")
    two = touch(tmp_path / "two.data")
    items = discover(["-"], stdin_lines=[f"{two}\n", "\n", f"  {one}  \n"])
    assert [i.path for i in items] == [two, one]
    assert [i.key for i in items] == ["two.data", "one.png"]


def test_a_missing_input_is_a_usage_error(tmp_path):
    """A path that does not exist raises UsageError naming it."""
    touch(tmp_path / "here.png")
    with pytest.raises(UsageError, match="nowhere.png"):
        discover([str(tmp_path / "here.png"), str(tmp_path / "nowhere.png")])


def test_duplicates_are_dropped(tmp_path):
    """A file named twice, or named and inside a named folder, is explained once."""
    f = touch(tmp_path / "d" / "x.png")
    items = discover([str(f), str(tmp_path / "d"), str(f)])
    assert len(items) == 1


def test_image_seed_depends_only_on_run_seed_and_bytes(tmp_path):
    """The same bytes at two paths give the same seed; another run seed or one changed byte gives another."""
    data = encode(pattern(), "PNG")
    a = touch(tmp_path / "a" / "one.png", data)
    b = touch(tmp_path / "b" / "renamed.png", data)
    seed = image_seed(0, file_digest(a.read_bytes()))
    assert seed == image_seed(0, file_digest(b.read_bytes()))
    assert isinstance(seed, int) and 0 <= seed < 2**63
    assert seed != image_seed(1, file_digest(data))
    changed = bytearray(data)
    changed[-5] ^= 1
    assert seed != image_seed(0, file_digest(bytes(changed)))

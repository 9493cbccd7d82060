"""Issue #11, items 4, 5, 6, 10 (listing) and 11: faithful decoding, hidden files, masks, listings, huge images.

Every test builds its own tiny images in ``tmp_path`` (no downloads, no training).
"""

from __future__ import annotations

import csv
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dxmi_ad.data.images import (IMAGE_SUFFIXES, ImageReadError, decode_pil, find_images, load_image, load_mask,
                                 read_mask, read_rgb)
from dxmi_ad.data.mvtec import ImageSample, list_folder, list_labelled_dir, list_mvtec, list_normal_dir

ORIENTATION = 0x0112
# EXIF orientation -> the PIL transpose that turns the *displayed* picture into the *stored* pixels (the inverse of
# what a viewer applies: ImageOps.exif_transpose uses ROTATE_270 for 6 and ROTATE_90 for 8; the others are their
# own inverses).
STORE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}


def picture(h: int = 24, w: int = 36, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric RGB picture (uint8 ``(h, w, 3)``) with values inside 30..220 (never the full range)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    base = np.stack([xx, yy, 0.5 * (xx + yy) ** 2], -1) + 0.05 * rng.random((h, w, 3))
    return (30 + 190 * base / base.max()).round().astype(np.uint8)


def save_with_orientation(displayed: Image.Image, path, orientation: int, **kw) -> None:
    stored = displayed.transpose(STORE[orientation])
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(path, exif=exif, **kw)


# ---------------------------------------------------------------- item 4: decoding is faithful (images and masks)

@pytest.mark.parametrize("orientation", sorted(STORE))
def test_exif_orientation_gives_the_displayed_picture(tmp_path, orientation):
    displayed = Image.fromarray(picture())
    displayed.save(tmp_path / "upright.png")
    save_with_orientation(displayed, tmp_path / "tagged.png", orientation)
    upright, size_u = load_image(tmp_path / "upright.png", 32)
    tagged, size_t = load_image(tmp_path / "tagged.png", 32)
    assert size_t == size_u == (24, 36)  # the displayed height and width
    assert torch.equal(tagged, upright)
    np.testing.assert_array_equal(read_rgb(tmp_path / "tagged.png"), picture() / np.float32(255))
    # an in-memory PIL image (ImageDetector.predict) is decoded the same way
    with Image.open(tmp_path / "tagged.png") as im:
        np.testing.assert_array_equal(decode_pil(im), read_rgb(tmp_path / "upright.png"))


def test_exif_rotated_jpeg_matches_the_pre_rotated_jpeg(tmp_path):
    displayed = Image.fromarray(picture(48, 64))
    displayed.save(tmp_path / "upright.jpg", quality=95)
    save_with_orientation(displayed, tmp_path / "phone.jpg", 3, quality=95)  # 180 degrees: same shape either way
    save_with_orientation(displayed, tmp_path / "side.jpg", 6, quality=95)
    upright = read_rgb(tmp_path / "upright.jpg")
    for name in ("phone.jpg", "side.jpg"):
        got = read_rgb(tmp_path / name)
        assert got.shape == upright.shape
        assert np.abs(got - upright).mean() < 0.01  # JPEG tolerance; unrotated it is ~0.3 away


def test_masks_follow_the_exif_orientation(tmp_path):
    mask = np.zeros((24, 36), np.uint8)
    mask[2:8, 3:20] = 255  # off-centre: any wrong turn moves it
    Image.fromarray(mask).save(tmp_path / "upright.png")
    for o in (3, 6, 8):
        save_with_orientation(Image.fromarray(mask), tmp_path / f"m{o}.png", o)
        np.testing.assert_array_equal(read_mask(tmp_path / f"m{o}.png"), mask > 0)
        assert torch.equal(load_mask(tmp_path / f"m{o}.png", 16), load_mask(tmp_path / "upright.png", 16))


def gray_encodings(g: np.ndarray, tmp_path) -> dict[str, object]:
    """One grayscale picture ``g`` (uint8) in every lossless encoding PIL writes."""
    out = {}
    Image.fromarray(g).save(out.setdefault("L.png", tmp_path / "L.png"))
    Image.fromarray(g.astype(np.uint16) * 257).save(out.setdefault("I16.png", tmp_path / "I16.png"))
    Image.fromarray(g.astype(np.uint16) * 257).save(out.setdefault("I16.tif", tmp_path / "I16.tif"))
    Image.fromarray(g.astype(np.int32) * 257, "I").save(out.setdefault("I32.tif", tmp_path / "I32.tif"))
    Image.fromarray(g.astype(np.float32) / 255).save(out.setdefault("F01.tif", tmp_path / "F01.tif"))
    Image.fromarray(g.astype(np.float32)).save(out.setdefault("F255.tif", tmp_path / "F255.tif"))
    pal = Image.fromarray(g, "P")
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.save(out.setdefault("P.png", tmp_path / "P.png"))
    Image.fromarray(np.dstack([g, np.full_like(g, 255)]), "LA").save(out.setdefault("LA.png", tmp_path / "LA.png"))
    Image.fromarray(np.dstack([g, g, g])).convert("CMYK").save(out.setdefault("CMYK.tif", tmp_path / "CMYK.tif"))
    Image.fromarray(g).save(out.setdefault("L.gif", tmp_path / "L.gif"))
    Image.fromarray(g).save(out.setdefault("L.webp", tmp_path / "L.webp"), lossless=True)
    return out


def test_every_encoding_of_one_picture_decodes_to_the_same_pixels(tmp_path):
    g = picture()[..., 0]  # values 30..220: a min/max stretch of 16-bit or float data would change them
    expected = np.repeat((g / np.float32(255))[..., None], 3, axis=2)
    files = gray_encodings(g, tmp_path)
    with Image.open(files["I16.png"]) as im:
        assert im.mode.startswith("I;16")  # the 16-bit path is really exercised
    for name, path in files.items():
        got = read_rgb(path)
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=name)
        assert torch.allclose(load_image(path, 16)[0], load_image(files["L.png"], 16)[0], atol=1e-6), name


def test_transparency_is_composited_over_black_whatever_hides_under_it(tmp_path):
    rgb = picture()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :10] = 0  # fully transparent strip
    alpha[:, 10:14] = 128  # half transparent
    garbage = np.random.default_rng(1).integers(0, 256, rgb.shape, dtype=np.uint8)
    hidden_a = np.where(alpha[..., None] == 0, garbage, rgb)
    hidden_b = np.where(alpha[..., None] == 0, 255 - garbage, rgb)
    Image.fromarray(np.dstack([hidden_a, alpha])).save(tmp_path / "a.png")
    Image.fromarray(np.dstack([hidden_b, alpha])).save(tmp_path / "b.png")
    a, b = read_rgb(tmp_path / "a.png"), read_rgb(tmp_path / "b.png")
    np.testing.assert_array_equal(a, b)  # the colours nobody can see do not matter
    expected = rgb / np.float32(255) * (alpha / np.float32(255))[..., None]
    np.testing.assert_allclose(a, expected, atol=1e-6)
    assert a[:, :10].max() == 0
    # a palette image with a transparent index, and a grayscale one with a tRNS colour: the same rule
    g = picture()[..., 1].copy()
    g[:, :10] = 7
    pal = Image.fromarray(g, "P")
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.info["transparency"] = 7
    pal.save(tmp_path / "p.png", transparency=7)
    Image.fromarray(g).save(tmp_path / "l.png", transparency=7)
    for name in ("p.png", "l.png"):
        got = read_rgb(tmp_path / name)
        assert got[:, :10].max() == 0, name
        np.testing.assert_allclose(got[:, 10:, 0], g[:, 10:] / np.float32(255), atol=1e-6, err_msg=name)


def test_non_finite_or_out_of_range_float_images_are_unreadable_with_the_reason(tmp_path):
    a = np.full((8, 8), 0.5, np.float32)
    a[3, 5] = np.nan
    Image.fromarray(a).save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match=r"nan.tif: 1 non-finite pixel value.*row 3, column 5"):
        load_image(tmp_path / "nan.tif", 8)
    a[3, 5] = np.inf
    Image.fromarray(a).save(tmp_path / "inf.tif")
    with pytest.raises(ImageReadError, match="non-finite"):
        read_rgb(tmp_path / "inf.tif")
    with pytest.raises(ImageReadError, match="non-finite"):
        decode_pil(Image.fromarray(a), "image 0")
    Image.fromarray(np.full((8, 8), -3.0, np.float32)).save(tmp_path / "neg.tif")
    with pytest.raises(ImageReadError, match=r"float pixel values span \[-3, -3\]"):
        read_rgb(tmp_path / "neg.tif")
    with pytest.raises(ImageReadError, match="non-finite"):
        read_mask(tmp_path / "nan.tif")  # masks are decoded by the same rules


# ---------------------------------------------------------------- item 5: hidden files and folders are not data

def write_folder(root, good=3, junk=True):
    """``root/train/good``, ``root/test/{good,scratch}``, ``root/ground_truth/scratch`` plus the hidden junk users
    have: a Jupyter checkpoint copy of a good image, macOS ``._`` resource forks, ``.DS_Store``."""
    img = picture(16, 16)
    for sub in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k in range(good):
        Image.fromarray(img).save(root / "train/good" / f"{k:03d}.png")
    Image.fromarray(img).save(root / "test/good/000.png")
    Image.fromarray(255 - img).save(root / "test/scratch/000.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(root / "ground_truth/scratch/000_mask.png")
    if junk:
        (root / "test/.ipynb_checkpoints").mkdir()
        Image.fromarray(img).save(root / "test/.ipynb_checkpoints/000-checkpoint.png")
        (root / "train/good/._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
        (root / "train/good/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (root / "test/scratch/._000.png").write_bytes(b"junk")
        (root / "ground_truth/scratch/._000_mask.png").write_bytes(b"junk")
    return root


def test_hidden_folders_and_files_are_never_listed(tmp_path):
    samples = list_folder(write_folder(tmp_path / "parts"))
    assert {s.defect for s in samples} == {"good", "scratch"}  # .ipynb_checkpoints is not a defect type
    assert not any(part.startswith(".") for s in samples for part in s.path.relative_to(tmp_path / "parts").parts)
    assert sum(s.split == "train" for s in samples) == 3 and sum(s.label for s in samples) == 1
    assert [s.mask_path.name for s in samples if s.label] == ["000_mask.png"]
    # the same in the MVTec layout, where a hidden folder beside the categories is not a category either
    root = tmp_path / "mvtec"
    write_folder(root / "bottle")
    write_folder(root / ".ipynb_checkpoints", junk=False)
    assert {s.category for s in list_mvtec(root)} == {"bottle"}
    # a hidden root itself is fine: only names below the given folder count
    hidden_root = write_folder(tmp_path / ".data" / "parts")
    assert len(list_folder(hidden_root)) == len(samples)


def test_calibration_validation_and_score_listings_skip_hidden_names(tmp_path):
    root = write_folder(tmp_path / "parts")
    cal = list_normal_dir(root / "train")
    assert [s.path.name for s in cal] == ["000.png", "001.png", "002.png"]
    val = list_labelled_dir(root / "test")
    assert sorted((s.defect, s.label) for s in val) == [("good", 0), ("scratch", 1)]
    listing = find_images([root])
    assert all(not p.name.startswith(".") and ".ipynb_checkpoints" not in p.parts for p in listing.files)
    assert len(listing.files) == 3 + 2 + 1  # train, test (good + scratch), the mask
    assert {p.name for p in listing.hidden} == {".ipynb_checkpoints", "._000.png", ".DS_Store", "._000_mask.png"}
    assert len(listing.hidden) == 5 and listing.describe_skipped().startswith("skipped 5 hidden (")
    # an explicitly named file is always kept (the user asked for it)
    assert find_images([root / "train/good/._000.png"]).files == [root / "train/good/._000.png"]


# ---------------------------------------------------------------- item 6: masks

def test_jpeg_mask_is_binarized_at_half_range(tmp_path):
    truth = np.zeros((64, 64), np.uint8)
    truth[20:44, 16:40] = 255
    Image.fromarray(truth).save(tmp_path / "m.jpg", quality=50)
    raw = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert (raw > 0).sum() > 1.1 * (truth > 0).sum()  # the ringing that "any non-zero" would count
    np.testing.assert_array_equal(read_mask(tmp_path / "m.jpg"), truth > 0)
    assert load_mask(tmp_path / "m.jpg", 64).sum() == (truth > 0).sum()


def test_mask_half_range_per_bit_depth_and_label_maps(tmp_path):
    m8 = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(m8).save(tmp_path / "m8.png")
    assert read_mask(tmp_path / "m8.png").tolist() == [[False, False, True, True]]
    m16 = np.array([[0, 32767, 32768, 65535]], np.uint16)
    Image.fromarray(m16).save(tmp_path / "m16.png")
    assert read_mask(tmp_path / "m16.png").tolist() == [[False, False, True, True]]
    Image.fromarray(np.array([[0.0, 0.49, 0.5, 1.0]], np.float32)).save(tmp_path / "mf.tif")
    assert read_mask(tmp_path / "mf.tif").tolist() == [[False, False, True, True]]
    # 0/1 label maps (a common export) stay masks, they are not "all below half range"
    Image.fromarray(np.array([[0, 1, 1, 0]], np.uint8)).save(tmp_path / "m01.png")
    assert read_mask(tmp_path / "m01.png").tolist() == [[False, True, True, False]]
    # a coloured annotation counts by its strongest channel; a transparent background is normal
    red = np.zeros((1, 4, 4), np.uint8)
    red[0, 2:] = (255, 0, 0, 255)
    red[0, :2] = (255, 255, 255, 0)  # invisible white under alpha 0
    Image.fromarray(red, "RGBA").save(tmp_path / "red.png")
    assert read_mask(tmp_path / "red.png").tolist() == [[False, False, True, True]]


def test_masks_named_differently_are_reported(tmp_path):
    root = write_folder(tmp_path / "parts", junk=False)
    (root / "ground_truth/scratch/000_mask.png").rename(root / "ground_truth/scratch/000_gt.png")
    with pytest.warns(UserWarning) as record:
        samples = list_folder(root)
    text = " ".join(str(w.message) for w in record)
    assert "test/scratch (000.png)" in text and "000_mask.png or 000.png" in text and "000_gt.png" in text
    assert "pixel metrics are undefined" in text
    assert all(s.mask_path is None for s in samples)
    # no ground-truth folder at all: said too
    import shutil

    shutil.rmtree(root / "ground_truth")
    with pytest.warns(UserWarning, match="does not exist"):
        list_folder(root)
    # correctly named masks: no warning
    ok = write_folder(tmp_path / "ok", junk=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list_folder(ok)


# ---------------------------------------------------------------- item 10 (listing): say what was found and skipped

def test_category_all_names_the_skipped_folders(tmp_path):
    root = tmp_path / "mvtec"
    write_folder(root / "bottle", junk=False)
    (root / "notes" / "test").mkdir(parents=True)  # no train/good
    with pytest.warns(UserWarning, match=r"using 1 \(bottle\); skipped 1 folder\(s\) without train/good: notes"):
        assert {s.category for s in list_mvtec(root, "all")} == {"bottle"}
    only_bad = tmp_path / "bad"
    (only_bad / "notes").mkdir(parents=True)
    with pytest.raises(ValueError, match="no category with a train/good folder.*sub-folders found: notes"):
        list_mvtec(only_bad)
    with pytest.raises(ValueError, match="use --dataset folder"):
        list_mvtec(root / "bottle")  # one category given as the MVTec root


def test_score_listing_reports_unsupported_and_empty_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no files in .*empty"):
        find_images([empty])
    odd = tmp_path / "odd"
    odd.mkdir()
    for name in ("a.heic", "b.heic", "c.svg", ".DS_Store"):
        (odd / name).write_bytes(b"x")
    with pytest.raises(ValueError, match=r"no supported images in .*odd.*2 \.heic, 1 \.svg; supported: \.png"):
        find_images([odd])
    listing = find_images([odd], require=False)
    assert listing.files == [] and len(listing.unsupported) == 3 and len(listing.hidden) == 1


def test_webp_and_gif_are_supported(tmp_path):
    assert ".webp" in IMAGE_SUFFIXES and ".gif" in IMAGE_SUFFIXES
    rgb = picture()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.webp", lossless=True)
    g = rgb[..., 0]
    Image.fromarray(g).save(tmp_path / "g.gif")
    Image.fromarray(g).save(tmp_path / "g.png")
    assert [p.name for p in find_images([tmp_path]).files] == ["a.png", "a.webp", "g.gif", "g.png"]
    np.testing.assert_array_equal(read_rgb(tmp_path / "a.webp"), read_rgb(tmp_path / "a.png"))
    np.testing.assert_array_equal(read_rgb(tmp_path / "g.gif"), read_rgb(tmp_path / "g.png"))


# ---------------------------------------------------------------- item 11: huge images are unreadable files, not crashes

def test_decompression_bomb_is_an_unreadable_file_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.delenv("DXMI_AD_MAX_IMAGE_PIXELS", raising=False)
    Image.fromarray(picture(20, 30)).save(tmp_path / "huge.png")  # 600 pixels
    Image.fromarray(picture(8, 8)).save(tmp_path / "small.png")  # 64 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above 2 x 100
    with pytest.raises(ImageReadError, match=r"huge.png: image is 30 x 20 = 600 pixels, more than the limit of 200.*"
                                             r"DXMI_AD_MAX_IMAGE_PIXELS=600"):
        load_image(tmp_path / "huge.png", 8)
    with pytest.raises(ImageReadError, match="600 pixels"):
        load_mask(tmp_path / "huge.png", 8)
    assert Image.MAX_IMAGE_PIXELS == 100  # PIL's setting is left as it was
    assert load_image(tmp_path / "small.png", 8)[0].shape == (3, 8, 8)
    # training's reader: the big file is one error among readable files (so --skip-bad-files leaves it out)
    from dxmi_ad.image import _read_error, iter_batches

    assert "600 pixels" in _read_error(tmp_path / "huge.png")
    samples = [ImageSample(tmp_path / n, "c", "train", "good", 0, None) for n in ("small.png", "huge.png")]
    (idx, images, _, errors), = list(iter_batches(samples, 8, 4))
    assert idx == [0] and images.shape == (1, 3, 8, 8) and "600 pixels" in errors[1]
    # the limit can be raised (or removed) by the environment variable
    monkeypatch.setenv("DXMI_AD_MAX_IMAGE_PIXELS", "600")
    assert load_image(tmp_path / "huge.png", 8)[1] == (20, 30)
    monkeypatch.setenv("DXMI_AD_MAX_IMAGE_PIXELS", "0")
    assert load_image(tmp_path / "huge.png", 8)[1] == (20, 30)
    monkeypatch.setenv("DXMI_AD_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="DXMI_AD_MAX_IMAGE_PIXELS='lots' is not a whole number"):
        load_image(tmp_path / "small.png", 8)


def tiny_detector():
    """A real, untrained-backbone ImageDetector at 32 px (seconds to build): scoring is the code under test."""
    from dxmi_ad.config import DxMIConfig
    from dxmi_ad.image import FeatureSettings, ImageDetector

    cfg = DxMIConfig.from_dict(dict(n_iter=2, ae_pretrain_iter=2, warmup_iter=1, batch_size=16, sampler_hidden=8,
                                    value_hidden=8, energy_hidden=8, latent_dim=4, seed=0))
    det = ImageDetector(cfg, FeatureSettings(image_size=32, pretrained=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny calibration split's rate warning
        det.fit_features(np.random.default_rng(0).random((10, 2, 2, 192)).astype(np.float32), ["c"])
    return det


def test_score_keeps_going_past_a_huge_file(tmp_path, monkeypatch):
    """``score`` writes a row per file: the huge one gets its reason in ``error``, the others are scored."""
    from dxmi_ad.cli.images import score_paths

    monkeypatch.delenv("DXMI_AD_MAX_IMAGE_PIXELS", raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(picture(8, 8)).save(folder / "a.png")
    Image.fromarray(picture(20, 30)).save(folder / "b_huge.png")
    Image.fromarray(picture(8, 8, seed=2)).save(folder / "c.png")

    det = tiny_detector()
    score_paths(det, [folder], tmp_path / "scores.csv", None)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "scores.csv").read_text())))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["a.png", "b_huge.png", "c.png"]
    assert "600 pixels" in rows[1]["error"] and not rows[0]["error"] and not rows[2]["error"]
    assert np.isfinite(float(rows[0]["pred_score"])) and np.isfinite(float(rows[2]["pred_score"]))


def test_pixel_mode_skip_bad_files_leaves_a_huge_training_file_out(tmp_path, monkeypatch):
    """``train --mode pixel --skip-bad-files`` reaches the image-folder reader (it used to stop on any bad file)."""
    from dxmi_ad.cli.pixel import PixelCLIError, load_pixel_split

    monkeypatch.delenv("DXMI_AD_MAX_IMAGE_PIXELS", raising=False)
    root = write_folder(tmp_path / "parts")
    Image.fromarray(picture(20, 30)).save(root / "train/good/zz_huge.png")  # 600 pixels; the others have 256
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    with pytest.raises(PixelCLIError, match="zz_huge.png: image is 30 x 20 = 600 pixels"):
        load_pixel_split("folder", -1, 0, root, image_size=8)
    with pytest.warns(UserWarning, match="1 unreadable file.*zz_huge.png"):
        split = load_pixel_split("folder", -1, 0, root, image_size=8, skip_bad_files=True)
    assert split.train.shape == (3, 3, 8, 8) and split.test.shape == (2, 3, 8, 8)

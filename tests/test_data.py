"""Dataset loaders: real splits and the strict CSV reader (errors name the file, line and column)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dxmi_ad.data.synthetic import eight_gaussians, uniform_box
from dxmi_ad.data.tabular import digits_split, load_csv, odds_split


def test_digits_split_is_one_class():
    sp = digits_split(3)
    assert sp.train.shape[1] == 64 and sp.test.shape[1] == 64
    assert len(sp.train) == round(0.7 * 183)
    assert sp.test_label.sum() == 1797 - 183  # every other class is anomalous
    with pytest.raises(ValueError, match="0-9"):
        digits_split(10)


@pytest.mark.parametrize(("name", "n", "d", "n_out"), [("wbc", 378, 30, 21), ("wine", 129, 13, 10)])
def test_odds_recipes_match_published_sizes(name, n, d, n_out):
    sp = odds_split(name, seed=0)
    assert len(sp.train) + len(sp.test) == n and sp.train.shape[1] == d and sp.test_label.sum() == n_out


def test_eight_gaussians_scale():
    x = eight_gaussians(4000, 0)
    radius = np.linalg.norm(x, axis=1)
    assert abs(np.median(radius) - 4 / 1.414) < 0.1
    assert np.abs(uniform_box(100)).max() <= 4


def _write(tmp_path, text):
    p = tmp_path / "t.csv"
    p.write_text(text)
    return p


def test_csv_ok_with_label(tmp_path):
    X, y, names = load_csv(_write(tmp_path, "a,b,label\n1,2,0\n3,4,1\n\n5,6,0\n"))
    assert X.shape == (3, 2) and y.tolist() == [0, 1, 0] and names == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,b\n1,2\n3,x\n", r"line 3, column 'b': 'x' is not a number"),  # non-numeric value
        ("a,b\n1,2\n3,4,5\n", r"line 3: expected 2 fields"),  # ragged row
        ("a,b\n1,2\n3,inf\n", r"line 3, column 'b'.*not finite"),  # inf
        ("a,b\n1,nan\n3,4\n", r"line 2, column 'b'.*not finite"),  # NaN
        ("a,label\n1,0\n2,7\n", r"line 3, column 'label': labels must be 0"),  # bad label
        ("", "missing header"),  # empty file
        ("a,b\n1,2\n", "at least 2 data rows"),  # one row
        ("label\n0\n1\n", "no feature columns"),  # only labels
    ],
)
def test_csv_errors_name_the_line(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_csv(_write(tmp_path, text))


def test_csv_with_byte_order_mark_keeps_label(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes("label,a\n0,1\n1,2\n".encode("utf-8-sig"))
    X, y, names = load_csv(p)
    assert names == ["a"] and y.tolist() == [0, 1]


def test_csv_missing_and_binary(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_csv(tmp_path / "nope.csv")
    p = tmp_path / "bin.csv"
    p.write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(ValueError, match="UTF-8"):
        load_csv(p)


def test_unseen_defect_kinds_keep_the_normal_tiles_and_change_only_their_masks():
    from dxmi_ad.data.textures import DEFECT_KINDS, UNSEEN_KINDS, texture_tiles

    assert not set(DEFECT_KINDS) & set(UNSEEN_KINDS)
    seen, unseen = texture_tiles("grass"), texture_tiles("grass", kinds=UNSEEN_KINDS)
    np.testing.assert_array_equal(seen["train"], unseen["train"])
    good = seen["kind"] == "good"
    np.testing.assert_array_equal(good, unseen["kind"] == "good")  # the same tiles are normal ...
    np.testing.assert_array_equal(seen["test"][good], unseen["test"][good])  # ... and identical
    assert sorted(set(unseen["kind"][~good])) == sorted(f"synthetic_{k}" for k in UNSEEN_KINDS)
    import skimage.data as skd

    photo = skd.grass()
    strip = photo[int(photo.shape[0] * 0.75):]  # the test strip, cut at stride 16 as texture_tiles does
    clean = np.stack([strip[i:i + 64, j:j + 64] for i in range(0, strip.shape[0] - 63, 16)
                      for j in range(0, strip.shape[1] - 63, 16)])
    np.testing.assert_array_equal(unseen["test"][good], clean[good])
    for i in np.flatnonzero(~good):
        m = unseen["mask"][i]
        assert m.sum() >= 16 * 16
        np.testing.assert_array_equal(unseen["test"][i][~m], clean[i][~m])  # only the masked pixels change ...
        assert np.abs(unseen["test"][i][m].astype(float) - clean[i][m].astype(float)).mean() > 2  # ... visibly
    with pytest.raises(ValueError, match="unknown defect kinds"):
        texture_tiles("grass", kinds=("crack",))


def test_csv_mistakes_get_the_right_hint(tmp_path):
    """New-user findings: one bad cell in a numeric column is not called an identifier column; a column of text is;
    a literal NaN is called a missing value; names that differ only in case, and a semicolon-separated header read as
    one column, get their own hints."""
    from dxmi_ad.data.tabular import check_columns, load_csv

    p = tmp_path / "a.csv"
    p.write_text("a,b\n" + "\n".join(f"{'n/a' if i == 3 else i},{i * 2}" for i in range(10)))
    with pytest.raises(ValueError, match="line 5, column 'a'.*other cells are numbers"):
        load_csv(p)
    p.write_text("a,b\n" + "\n".join(f"id{i},{i}" for i in range(10)))
    with pytest.raises(ValueError, match="identifier column"):
        load_csv(p)
    p.write_text("a,b\n1,2\nNaN,3\n")
    with pytest.raises(ValueError, match="line 3.*not finite .a missing value"):
        load_csv(p)
    with pytest.raises(ValueError, match="differ only in letter case.*'A' for 'a'"):
        check_columns(["A", "b"], ["a", "b"], "f")
    with pytest.raises(ValueError, match="separate its fields with ';'"):
        check_columns(["a;b"], ["a", "b"], "f")


def test_embedded_textures_hold_out_pixel_disjoint_blocks():
    """Training tiles overlap by half; train/tiles.csv lets every hold-out keep held-out pixels unseen."""
    import skimage.data as skd
    from PIL import Image

    from dxmi_ad.data.mvtec import list_mvtec
    from dxmi_ad.data.textures import write_textures
    from dxmi_ad.image import split_calibration

    train = [s for s in list_mvtec(write_textures()) if s.split == "train"]
    assert len(train) == 495 and all(s.tile is not None for s in train)
    photos = {name: getattr(skd, name)() for name in ("brick", "grass", "gravel")}
    for s in train[::37]:  # each box is where the tile's pixels come from in its photo
        b = s.tile
        np.testing.assert_array_equal(np.asarray(Image.open(s.path)),
                                      photos[b.source][b.top:b.top + b.height, b.left:b.left + b.width])
    fit, cal = split_calibration(train, 0.2, seed=0)
    fit2, val = split_calibration(fit, 0.1, seed=1, minimum=1)
    assert len(cal) == 99 and len(val) == 33  # the fraction of each category, as the random draw holds out
    assert not any(a.tile.overlaps(b.tile) for a in fit for b in cal)
    assert not any(a.tile.overlaps(b.tile) for a in fit2 for b in [*cal, *val])
    assert 300 < len(fit) < 396 and 240 < len(fit2) < len(fit)  # the overlapping neighbours are not trained on
    assert {s.category for s in cal} == {s.category for s in val} == {"brick", "grass", "gravel"}
    untiled = [dataclasses.replace(s, tile=None) for s in train]  # without boxes: the seeded random draw, all kept
    fit_r, cal_r = split_calibration(untiled, 0.2, seed=0)
    assert len(fit_r) == 396 and len(cal_r) == 99
    assert any(a.tile.overlaps(b.tile) for a in [train[untiled.index(s)] for s in fit_r]
               for b in [train[untiled.index(s)] for s in cal_r])  # what the block hold-out prevents


@pytest.mark.parametrize(("rows", "match"), [
    ("file,source,top,left,height\n", "missing column"),
    ("file,source,top,left,height,width\nnope.png,a,0,0,8,8\n", "line 2: 'nope.png' is not a training image"),
    ("file,source,top,left,height,width\n0.png,a,0,0,8,8\n0.png,a,8,0,8,8\n", "line 3: '0.png' has a row already"),
    ("file,source,top,left,height,width\n0.png,a,-1,0,8,8\n", "line 2: need top, left >= 0"),
    ("file,source,top,left,height,width\n0.png,a,x,0,8,8\n", "line 2: top, left, height and width must be integers"),
    ("file,source,top,left,height,width\n0.png,a,0,0,8,8\n", r"1 training image\(s\) have no row \(1.png\)"),
    ("file,source,top,left,height,width\n\n\nnope.png,a,0,0,8,8\n", "line 4: 'nope.png'"),  # the file's line
    ("file,source,top,left,height,width\n0.png, ,0,0,8,8\n", "line 2: empty source"),
    ("\ufeffFile, source,top,left,height,width\r\n0.png,a,0,0,8,8\r\n1.png,a,0,0,8,8\r\nx.png,a,0,0,8,8\r\n",
     "line 4: 'x.png'"),  # a byte-order mark, a capital and a space are read past
])
def test_tile_table_mistakes_name_the_line(tmp_path, rows, match):
    from PIL import Image

    from dxmi_ad.data.mvtec import list_folder

    good = tmp_path / "train" / "good"
    good.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(good / f"{i}.png")
    (tmp_path / "train" / "tiles.csv").write_text(rows)
    with pytest.raises(ValueError, match=match):
        list_folder(tmp_path)


def test_tiles_too_dense_to_hold_out_are_refused(tmp_path):
    from dxmi_ad.data.mvtec import ImageSample, TileBox
    from dxmi_ad.image import split_calibration

    same = [ImageSample(tmp_path / f"{i}.png", "c", "train", "good", 0, None, TileBox("p", 0, i, 8, 8))
            for i in range(5)]  # every tile overlaps every other one
    with pytest.raises(ValueError, match="category 'c': holding out 1 of 5 tiles leaves 0"):
        split_calibration(same, 0.2, seed=0)

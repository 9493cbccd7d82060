"""Dataset loaders: real splits and the strict CSV reader (errors name the file, line and column)."""

from __future__ import annotations

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

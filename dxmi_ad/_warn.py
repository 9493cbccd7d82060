"""``stacklevel`` for library warnings: they name the user's line, not a line inside dxmi_ad."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep
# decorators whose wrapper frames stand between a dxmi_ad method and its caller (torch.no_grad on predict)
_WRAPPERS = (os.sep + os.path.join("torch", "utils", "_contextlib.py"),)


def _is_library(filename: str) -> bool:
    path = str(Path(filename).resolve())
    return path.startswith(_PACKAGE) or path.endswith(_WRAPPERS)


def caller_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` that names the first frame outside the dxmi_ad package.

    Call it inside the ``warnings.warn(...)`` call of the function that warns, e.g.
    ``warnings.warn(msg, UserWarning, stacklevel=caller_stacklevel())``.

    Frames of decorators such as ``torch.no_grad`` are skipped too.

    Returns:
        An int >= 1.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and _is_library(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level

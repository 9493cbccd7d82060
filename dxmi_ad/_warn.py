"""``stacklevel`` for library warnings: they name the user's line, not a line inside dxmi_ad."""

from __future__ import annotations

import sys
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


def caller_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` that names the first frame outside the dxmi_ad package.

    Call it inside the ``warnings.warn(...)`` call of the function that warns, e.g.
    ``warnings.warn(msg, UserWarning, stacklevel=caller_stacklevel())``.

    Returns:
        An int >= 1 (1 = the warning function's caller when the whole stack is inside the package).
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level

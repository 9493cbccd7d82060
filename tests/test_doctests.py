"""The ``Example`` blocks of the modules that have them run as doctests (issue #12: examples that cannot drift)."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["dxmi_ad.recipes", "dxmi_ad.scoring", "dxmi_ad.validation", "dxmi_ad.decision",
                                  "dxmi_ad.training.fit"])
def test_module_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0

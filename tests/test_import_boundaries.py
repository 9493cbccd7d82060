"""Layering (issue #12): the core imports nothing above it, deployment code nothing from the front ends."""

from __future__ import annotations

import subprocess
import sys

import pytest

FRONT_ENDS = ("dxmi_ad.cli", "dxmi_ad.estimator", "dxmi_ad.anomalib", "dxmi_ad.image", "dxmi_ad.pixel")


@pytest.mark.parametrize(("modules", "forbidden"), [
    # the DxMI core: torch only
    (("dxmi_ad.objectives", "dxmi_ad.nn.model", "dxmi_ad.nn.sampler", "dxmi_ad.nn.energy", "dxmi_ad.training.dxdp"),
     ("lightning", "typer", "anomalib", "sklearn", "pandas", "matplotlib", "dxmi_ad.export", *FRONT_ENDS)),
    # the one scorer and the deployment graph: no front end, no training loop
    (("dxmi_ad.scoring", "dxmi_ad.export"), ("typer", "anomalib", "dxmi_ad.training.fit", *FRONT_ENDS)),
])
def test_layers_import_nothing_above_them(modules, forbidden):
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(','.join(m for m in {forbidden!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "", f"{modules} pulled in {out.stdout.strip()}"

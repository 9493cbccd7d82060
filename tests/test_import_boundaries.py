"""Layering (issue #12): the core imports nothing above it, deployment code nothing from the front ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FRONT_ENDS = ("dxmi_ad.cli", "dxmi_ad.estimator", "dxmi_ad.anomalib", "dxmi_ad.image", "dxmi_ad.pixel")


@pytest.mark.parametrize(("modules", "forbidden"), [
    # the DxMI core: torch only
    (("dxmi_ad.objectives", "dxmi_ad.nn.model", "dxmi_ad.nn.sampler", "dxmi_ad.nn.energy", "dxmi_ad.training.dxdp"),
     ("lightning", "typer", "anomalib", "sklearn", "pandas", "matplotlib", "dxmi_ad.export", *FRONT_ENDS)),
    # the one scorer and the deployment graph: no front end, no training loop
    (("dxmi_ad.scoring", "dxmi_ad.export"), ("typer", "anomalib", "dxmi_ad.training.fit", *FRONT_ENDS)),
    # the decision layer and the stage schedule: below every front end
    (("dxmi_ad.decision", "dxmi_ad.training.schedule"), ("typer", "anomalib", "lightning", *FRONT_ENDS)),
])
def test_layers_import_nothing_above_them(modules, forbidden):
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(','.join(m for m in {forbidden!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "", f"{modules} pulled in {out.stdout.strip()}"


def test_the_config_checks_every_mode_without_importing_the_networks():
    """``config.py`` sits below ``nn/`` (which imports it): validating a pixel config loads neither ``nn`` nor torch."""
    code = ("import sys\nfrom dxmi_ad.config import DxMIConfig\n"
            "DxMIConfig(mode='pixel', dim=3 * 16 * 16, image_channels=3, image_size=16, energy_model='shared', "
            "parameterization='eps', initial='gaussian', diffusion_steps=1000)\n"
            "print(','.join(m for m in sys.modules if m == 'torch' or m.startswith('dxmi_ad.nn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "", out.stdout


def test_public_api_docstrings_follow_pydocstyle():
    """ruff's pydocstyle rules (Google convention, pyproject.toml) hold for the whole package."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "D", "--ignore", "D107,D205",
                          "--output-format", "concise", str(Path(__file__).resolve().parents[1] / "dxmi_ad")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

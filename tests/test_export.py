"""`dxmi-ad export`: ONNX (onnxruntime) and TorchScript scorers match the in-process scores on the textures test set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from dxmi_ad import recipes
from dxmi_ad.cli.main import app
from dxmi_ad.data.mvtec import list_mvtec
from dxmi_ad.data.textures import write_textures
from dxmi_ad.image import iter_batches

pytest.importorskip("onnxruntime")
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small image model of the embedded textures at the recipe's input size (224 px)."""
    base = tmp_path_factory.mktemp("export")
    recipe = yaml.safe_load(recipes.path("textures").read_text())
    recipe["model"].update(ae_pretrain_iter=100, n_iter=5, warmup_iter=1, energy_hidden=64, sampler_hidden=32,
                           value_hidden=32, latent_dim=16)
    (base / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = base / "run"
    result = runner.invoke(app, ["train", "--recipe", str(base / "r.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def textures_test():
    """The whole textures test set as model-input tensors (the in-process reader: PIL, 224 px)."""
    test = [s for s in list_mvtec(write_textures()) if s.split == "test"]
    return torch.cat([images for _, images, _, _ in iter_batches(test, 224, 64)])


@pytest.fixture(scope="module")
def reference(run_dir, textures_test):
    """In-process PyTorch scores and maps of the test set, with the loaded detector."""
    import dxmi_ad

    det = dxmi_ad.load(run_dir)
    outs = [det.predict(chunk) for chunk in textures_test.split(64)]
    return det, np.concatenate([o["pred_score"].numpy() for o in outs]), np.concatenate(
        [o["anomaly_map"].numpy() for o in outs])


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_scorer_matches_in_process(run_dir, textures_test, reference, fmt):
    from dxmi_ad.export import load_torchscript, onnx_metadata, run_onnx

    path = run_dir / ("m.onnx" if fmt == "onnx" else "m.pt")
    result = runner.invoke(app, ["export", "--model", str(run_dir), "--format", fmt, "--out", str(path)])
    assert result.exit_code == 0, result.output
    det, ref_scores, ref_maps = reference
    if fmt == "onnx":
        got = [run_onnx(path, chunk) for chunk in textures_test.split(64)]
        meta = onnx_metadata(path)
    else:
        module, meta = load_torchscript(path)
        with torch.no_grad():
            got = [tuple(t.numpy() for t in module(chunk)) for chunk in textures_test.split(64)]
    scores, maps = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    assert scores.shape == (len(textures_test),) and maps.shape == (len(textures_test), 224, 224)
    assert _relative(scores, ref_scores) < 1e-4 and _relative(maps, ref_maps) < 1e-4
    # the decision travels with the file: same threshold, same decisions
    assert meta["threshold"] == pytest.approx(det.threshold) and meta["input_dtype"] == "float32"
    np.testing.assert_array_equal(scores > meta["threshold"], ref_scores > det.threshold)


def test_uint8_non_square_export_resizes_in_the_graph(run_dir, tmp_path):
    import dxmi_ad
    from dxmi_ad.export import Scorer, run_onnx

    path = tmp_path / "u8.onnx"
    result = runner.invoke(app, ["export", "--model", str(run_dir), "--input-dtype", "uint8", "--input-size", "180",
                                 "120", "--out", str(path)])
    assert result.exit_code == 0, result.output
    images = (torch.rand(3, 3, 180, 120, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    scores, maps = run_onnx(path, images)
    assert maps.shape == (3, 180, 120)  # the map comes back at the input size
    with torch.no_grad():
        eager = Scorer(dxmi_ad.load(run_dir), "uint8")(images)
    assert _relative(scores, eager[0].numpy()) < 1e-4 and _relative(maps, eager[1].numpy()) < 1e-4


def test_export_errors_are_clear(run_dir, tmp_path):
    bad = runner.invoke(app, ["export", "--model", str(run_dir), "--format", "openvino"])
    assert bad.exit_code == 2 and "onnx" in bad.output and "torchscript" in bad.output
    missing = runner.invoke(app, ["export", "--model", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not found" in missing.output

"""Pixel-space DxMI: schedules, networks, the image trainer's pieces, the detector API, the CLI (docs/paper_map.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from dxmi_ad.cli.main import app
from dxmi_ad.nn.pixel import ConvEnergy, UNet, ddpm_alpha_bar, reschedule
from dxmi_ad.nn.sampler import PixelSampler
from dxmi_ad.objectives import time_cost
from dxmi_ad.pixel import PixelDetector, pixel_config

TINY = dict(n_steps=4, unet_channels=8, unet_levels=1, energy_channels=8, time_dim=16, batch_size=32,
            sampler_pretrain_iter=20, n_iter=6)


def _digits(cls: int | None = None) -> np.ndarray:
    X, y = load_digits(return_X_y=True)
    X = X if cls is None else X[y == cls]
    return (X / 16).reshape(-1, 8, 8).astype(np.float32)


def test_var_schedule_reproduces_the_reference_t10_list_and_uniform_k_is_ddpm():
    ab = ddpm_alpha_bar(1000)
    short, times = reschedule(ab, 10, "var")
    betas = 1 - short[1:] / short[:-1]
    published = (0.01 + 0.095 * torch.arange(10, dtype=torch.float64)) ** 2  # 1e-4, 0.011025, 0.04, ..., 0.748225
    assert torch.allclose(betas, published, rtol=1e-6)
    assert bool((times[1:] > times[:-1]).all()) and 0 < float(times[0]) < float(times[-1]) <= 1000
    # the continuous positions land where the 1000-step chain has the same signal
    interp = np.interp(times.numpy(), np.arange(1001), ab.log().numpy())
    assert np.allclose(interp, short[1:].log().numpy(), atol=1e-3)
    for T in (1, 4, 7):  # other T: same total signal as the T = 10 list (the named rule)
        s, _ = reschedule(ab, T, "var")
        assert abs(float(s[-1]) - float(short[-1])) < 1e-6 or T == 1
    full, t_full = reschedule(ab, 1000, "uniform")
    assert torch.equal(full, ab) and torch.equal(t_full, torch.arange(1, 1001, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_steps"):
        reschedule(ab, 1001)


def test_sampler_sigmas_and_many_step_reference():
    s = PixelSampler(1, 8, n_steps=10, base=8, levels=1, time_dim=16)
    sig = s.sigmas().detach()
    assert sig.shape == (10,) and float(sig[-1]) == pytest.approx(1e-3, rel=1e-4)  # fix_last
    assert bool((sig[:-1] > sig[1:]).all())  # noise shrinks towards the data end (RL time)
    ref = s.with_steps(1000)
    assert ref.n_steps == 1000 and ref.net is s.net and s.n_steps == 10  # the original is untouched
    beta = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - beta, 0)
    post = ((1 - ab[:-1]) / (1 - ab[1:]) * beta[1:]).sqrt()  # DDPM posterior std, diffusion steps 2..1000
    assert torch.allclose(ref.sigmas().detach()[:-1].double(), post.flip(0), rtol=2e-3)  # float32 buffers
    x = torch.randn(3, 1, 8, 8)
    assert s.sample(x).shape == (11, 3, 1, 8, 8)


@pytest.mark.parametrize(("c", "size"), [(1, 8), (1, 28), (3, 32), (3, 64)])
def test_networks_shapes_and_energy_has_no_normalization(c, size):
    x = torch.randn(2, c, size, size)
    net = UNet(c, 8, 2, 16)
    assert net(x, torch.tensor([3.0, 500.0])).shape == x.shape
    assert float(net(x, torch.tensor([3.0, 500.0])).detach().abs().max()) == 0.0  # zero-initialised output
    e = ConvEnergy(c, 8, 2)
    assert e(x).shape == (2,)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm,
                                  torch.nn.InstanceNorm2d)) for m in e.modules())


def test_sigmoid_time_cost_telescopes():
    for T in (4, 5, 10):
        r = time_cost(torch.arange(T), T, "sigmoid")
        assert bool((r > 0).all())
        c = T // 2
        expected = torch.sigmoid(torch.tensor(float(c))) - torch.sigmoid(torch.tensor(float(c - T)))
        assert float(r.sum()) == pytest.approx(float(expected), rel=1e-5)
    assert torch.equal(time_cost(torch.arange(3), 3, "linear", 0.05), torch.full((3,), 0.05))


def test_pixel_config_validation():
    cfg = pixel_config(1, 8)
    assert cfg.dim == 64 and cfg.mode == "pixel" and cfg.time_cost == "sigmoid" and cfg.energy_l2_weight == 1.0
    assert (cfg.entropy_weight, cfg.velocity_weight, cfg.avr_momentum) == (0.1, 0.01, 0.99)
    with pytest.raises(ValueError, match="energy_model='shared'"):
        pixel_config(1, 8, energy_model="autoencoder")
    with pytest.raises(ValueError, match="image_size"):
        pixel_config(1, 128)
    with pytest.raises(ValueError, match="unknown config key"):
        pixel_config(1, 8, unet_width=3)


def test_detector_fit_predict_sample_save_load(tmp_path):
    torch.manual_seed(0)
    det = PixelDetector(pixel_config(1, 8, **TINY)).fit(_digits(0), calibration=0.25, fpr=0.1)
    assert det.stage == "dxmi" and det.calibration_ is not None and len(det.calibration_.scores) == round(0.25 * 178)
    test = _digits(1)[:10]
    out = det.predict(test)
    assert out["pred_score"].shape == (10,) and out["anomaly_map"].shape == (10, 8, 8)
    assert (out["anomaly_map"] >= 0).all() and out["anomaly_map"].sum() > 0
    assert ((out["p_value"] > 0) & (out["p_value"] <= 1)).all()
    # uint8 and another size are accepted (resized); 0-255 floats and NaN rows are refused by name
    assert det.energy((test * 255).astype(np.uint8)).shape == (10,)
    assert det.energy(np.repeat(np.repeat(test, 2, 1), 2, 2)).shape == (10,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        det.energy(test * 255)
    bad = test.copy()
    bad[3, 0, 0] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        det.energy(bad)
    imgs = det.sample(5, seed=3)
    assert imgs.shape == (5, 1, 8, 8) and imgs.min() >= 0 and imgs.max() <= 1
    assert np.array_equal(imgs, det.sample(5, seed=3))  # a seed fixes the draw
    det.save(tmp_path / "m")
    again = PixelDetector.load(tmp_path / "m")
    assert np.array_equal(again.energy(test), det.energy(test))
    assert np.array_equal(again.sample(5, seed=3), imgs)
    import dxmi_ad

    assert isinstance(dxmi_ad.load(tmp_path / "m"), PixelDetector)


def test_value_guidance_moves_samples_downhill_in_energy():
    torch.manual_seed(0)
    det = PixelDetector(pixel_config(1, 8, **TINY)).fit(_digits(0), calibration=0.0)
    plain = det.energy(det.sample(200, seed=1))
    guided = det.energy(det.sample(200, seed=1, guidance=0.5))
    assert guided.mean() < plain.mean()
    with pytest.raises(ValueError, match="guidance"):
        det.sample(2, guidance=-1)


def test_init_sampler_must_fit(tmp_path):
    pre = PixelDetector(pixel_config(1, 8, **TINY)).pretrain(_digits())
    assert pre.stage == "pretrained"
    other = PixelDetector(pixel_config(1, 8, **{**TINY, "unet_channels": 16}))
    with pytest.raises(ValueError, match="unet_channels"):
        other.fit(_digits(0), init_sampler=pre)
    # a different T is fine: the pre-trained network is re-scheduled
    ok = PixelDetector(pixel_config(1, 8, **{**TINY, "n_steps": 6, "n_iter": 0})).fit(
        _digits(0), calibration=0.0, init_sampler=pre)
    assert ok.model_.sampler.n_steps == 6
    a, b = ok.model_.sampler.net.state_dict(), pre.model_.sampler.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the weights were transferred
    # AVR starts from the re-scheduled chain's forward betas (reference image trainer), RL order
    s2 = ok.model_.velocity_scale_sq
    ab = ok.model_.sampler.level_alpha_bar
    assert torch.allclose(s2, (1 - ab[1:] / ab[:-1]).flip(0))


def test_cli_pretrain_train_sample_cycle(tmp_path):
    runner = CliRunner()
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    pre = tmp_path / "pre"
    r = runner.invoke(app, ["pretrain-sampler", "--dataset", "digits", "--out", str(pre), *sets])
    assert r.exit_code == 0, r.output
    assert json.loads((pre / "metrics.json").read_text())["stage"] == "pretrained"
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--mode", "pixel", "--dataset", "digits", "--normal-class", "3",
                            "--init-sampler", str(pre), "--out", str(run), *sets])
    assert r.exit_code == 0, r.output
    m = json.loads((run / "metrics.json").read_text())
    assert m["mode"] == "pixel" and 0 <= m["image_AUROC"] <= 1 and m["n_test_anomalous"] > 1000
    assert {"model.safetensors", "config.json", "calibration.json", "samples.png", "metrics.json"} <= {
        p.name for p in run.iterdir()}
    r = runner.invoke(app, ["sample", "--model", str(run), "-n", "9", "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "g.npy").shape == (9, 1, 8, 8) and (tmp_path / "g.png").stat().st_size > 100
    r = runner.invoke(app, ["sample", "--model", str(pre), "-n", "4", "--steps", "50", "--out", str(tmp_path / "h.png")])
    assert r.exit_code == 0 and "50 re-scheduled steps" in r.output, r.output
    r = runner.invoke(app, ["sample", "--model", str(run), "--steps", "5000", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "--steps must be in" in r.output
    r = runner.invoke(app, ["train", "--mode", "pixel", "--init-sampler", str(pre), "--dataset", "mnist",
                            "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "pre-trained on 'digits'" in " ".join(r.output.split())
    r = runner.invoke(app, ["train", "--init-sampler", str(pre), "--dataset", "digits", "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "--mode pixel" in r.output
    # without network keys the pre-trained sampler's shape is used; a sampler that saw every class is warned about
    r = runner.invoke(app, ["train", "--mode", "pixel", "--dataset", "digits", "--normal-class", "3", "--init-sampler",
                            str(pre), "--set", "n_iter=3", "--set", "batch_size=32", "--out", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    assert "saw every class" in " ".join(r.output.split())
    assert json.loads((tmp_path / "w/config.json").read_text())["config"]["unet_channels"] == TINY["unet_channels"]
    # a pixel model re-calibrates from its stored scores; image-only commands say what to do instead
    r = runner.invoke(app, ["calibrate", "--model", str(run), "--fpr", "0.2"])
    assert r.exit_code == 0 and json.loads((run / "calibration.json").read_text())["fpr"] == 0.2, r.output
    r = runner.invoke(app, ["evaluate", "--model", str(run)])
    assert r.exit_code == 2 and "pixel-mode model" in r.output
    (tmp_path / "a_file.png").write_text("")
    r = runner.invoke(app, ["sample", "--model", str(run), "--out", str(tmp_path / "a_file.png" / "x.png")])
    assert r.exit_code == 2 and "sampling failed" in r.output


def test_pixel_metrics_orientation():
    """Higher scores on anomalies give AUROC 1 (and pixel AUROC 1 for maps that light up the masks)."""
    from dxmi_ad.cli.pixel import PixelSplit, pixel_metrics

    label = np.array([0, 0, 1, 1, 1])
    mask = np.zeros((5, 4, 4), bool)
    mask[2:, 1, 1] = True

    class Stub:
        calibration_ = None

        def predict(self, images):
            return {"pred_score": label + 0.1 * np.arange(5), "anomaly_map": mask.astype(np.float32)}

    split = PixelSplit(np.zeros((3, 4, 4)), np.zeros((5, 4, 4)), label, mask, "stub")
    m = pixel_metrics(Stub(), split)
    assert m["image_AUROC"] == 1.0 and m["pixel_AUROC"] == 1.0 and m["n_test_anomalous"] == 3


@pytest.mark.slow  # about 3.5 minutes on 2 cores: run with -m slow
def test_dxmi_fine_tuning_improves_a_few_step_sampler_on_digits():
    """The issue's cycle on real data: DDPM pre-training, re-scheduling to T = 4 (the paper's starting point), DxMI
    fine-tuning, sampling. The fine-tuned sampler's Frechet distance (digit-classifier features, 500 samples against
    all 1797 digits) must be clearly below the starting point's. Measured (1 thread): seed 0 71.6 -> 41.8, seed 1
    76.8 -> 46.7 (recall 0.40 -> 0.75, 0.43 -> 0.66)."""
    from dxmi_ad.sample_quality import fit_digit_classifier, sample_quality

    d = load_digits()
    images = (d.images / 16).astype(np.float32)
    clf = fit_digit_classifier(images, d.target, seed=0)
    cfg = dict(n_steps=4, unet_channels=16, unet_levels=1, energy_channels=16, time_dim=32, batch_size=64,
               sampler_pretrain_iter=800, n_iter=600, sampler_lr=3e-6, sigma_lr=3e-4, seed=0)
    pre = PixelDetector(pixel_config(1, 8, **cfg)).pretrain(images)
    start = sample_quality(clf, images, pre.sample(500, steps=4, seed=1))
    det = PixelDetector(pixel_config(1, 8, **cfg)).fit(images, calibration=0.0, init_sampler=pre)
    tuned = sample_quality(clf, images, det.sample(500, seed=1))
    assert tuned["frechet"] < 0.8 * start["frechet"], (start, tuned)
    assert tuned["recall"] > start["recall"], (start, tuned)


def test_cli_pixel_mode_holds_out_a_pixel_disjoint_block_of_tiles(tmp_path, monkeypatch):
    """With train/tiles.csv, pixel mode calibrates on a block of tiles none of its training tiles overlaps."""
    from PIL import Image

    good = tmp_path / "parts" / "train" / "good"
    good.mkdir(parents=True)
    rows = ["file,source,top,left,height,width"]
    for i in range(10):  # a strip of tiles, each overlapping the next by half; tile i is the grey level 20 i
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(good / f"{i}.png")
        rows.append(f"{i}.png,strip,0,{4 * i},8,8")
    (tmp_path / "parts" / "train" / "tiles.csv").write_text("\n".join(rows) + "\n")
    seen = {}

    def capture(self, images, calibration=None, **kw):
        seen["train"], seen["cal"] = images, calibration
        raise KeyboardInterrupt  # stop before training; only the split is under test

    monkeypatch.setattr(PixelDetector, "fit", capture)
    r = CliRunner().invoke(app, ["train", "--mode", "pixel", "--dataset", "folder", "--data-root",
                                 str(tmp_path / "parts"), "--calibration-fraction", "0.2", "--out",
                                 str(tmp_path / "run"), *[x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]])
    assert "train" in seen, r.output  # (the CLI turns the interrupt into exit status 130)

    def levels(x):
        return sorted(round(float(np.asarray(im).mean()) * 255 / 20) for im in x)

    assert levels(seen["cal"]) == [8, 9]  # the block: the last tiles in raster order
    assert levels(seen["train"]) == [0, 1, 2, 3, 4, 5, 6]  # tile 7 overlaps tile 8: not trained on
    assert "block of 2 tiles" in r.output and "the 1 tiles sharing pixels" in " ".join(r.output.split())


def test_cli_pixel_mode_holds_out_blocks_only_where_a_category_has_tiles(tmp_path, monkeypatch):
    """One category with train/tiles.csv, one without: the first gets a block, the second a random draw."""
    from PIL import Image

    root = tmp_path / "root"
    for cat, level in (("strip", 0), ("plain", 200)):
        good = root / cat / "train" / "good"
        good.mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8), level + i, np.uint8)).save(good / f"{i}.png")
    rows = ["file,source,top,left,height,width", *(f"{i}.png,strip,0,{4 * i},8,8" for i in range(10))]
    (root / "strip" / "train" / "tiles.csv").write_text("\n".join(rows) + "\n")
    seen = {}

    def capture(self, images, calibration=None, **kw):
        seen["train"], seen["cal"] = images, calibration
        raise KeyboardInterrupt

    monkeypatch.setattr(PixelDetector, "fit", capture)
    r = CliRunner().invoke(app, ["train", "--mode", "pixel", "--dataset", "mvtec", "--data-root", str(root),
                                 "--category", "strip,plain", "--calibration-fraction", "0.2", "--out",
                                 str(tmp_path / "run"), *[x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]])
    assert "train" in seen, r.output

    def levels(x):
        return sorted(round(float(np.asarray(im).mean()) * 255) for im in x)

    cal, train = levels(seen["cal"]), levels(seen["train"])
    assert [v for v in cal if v < 100] == [8, 9]  # the strip's block
    assert len([v for v in cal if v >= 200]) == 2  # a random 2 of the plain category's 10
    assert [v for v in train if v < 100] == list(range(7))  # tile 7 overlaps the block: not trained on
    assert len([v for v in train if v >= 200]) == 8
    assert "a random draw in the others" in " ".join(r.output.split())

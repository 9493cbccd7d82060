"""dxmi_ad.anomalib.Dxmi inside anomalib: Engine fit/test/predict with Folder, AUROC agreement, user epochs, CLI."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import numpy as np
import pytest

anomalib = pytest.importorskip("anomalib")

from anomalib.data import Folder  # noqa: E402
from anomalib.engine import Engine  # noqa: E402

from dxmi_ad.anomalib import Dxmi  # noqa: E402
from dxmi_ad.data.mvtec import list_mvtec  # noqa: E402
from dxmi_ad.data.textures import write_textures  # noqa: E402
from dxmi_ad.evaluation import metrics_table  # noqa: E402

SMALL = {"ae_pretrain_iter": 150, "latent_dim": 16, "energy_hidden": 64, "sampler_hidden": 32, "value_hidden": 32,
         "warmup_iter": 2}
DEFECTS = ("synthetic_blob", "synthetic_cutpaste", "synthetic_scratch")


def _brick_folder(root):
    # val = test ("same_as_test"): anomalib then tests on every test image, as `dxmi-ad evaluate` does
    return Folder(name="brick", root=root / "brick", normal_dir="train/good", normal_test_dir="test/good",
                  abnormal_dir=[f"test/{d}" for d in DEFECTS], train_batch_size=32, eval_batch_size=32,
                  num_workers=0, val_split_mode="same_as_test")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = write_textures()
    logging.getLogger("anomalib").setLevel(logging.ERROR)
    model = Dxmi(model_overrides=SMALL, image_size=96, updates_per_batch=10)
    engine = Engine(max_epochs=3, default_root_dir=tmp_path_factory.mktemp("results"), logger=False,
                    enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.fit(model, datamodule=_brick_folder(root))
        results = engine.test(model, datamodule=_brick_folder(root))
    return root, model, engine, results


def test_engine_respects_user_epochs_and_trains_both_stages(fitted):
    _, model, engine, _ = fitted
    assert engine.trainer.max_epochs == 3 and engine.trainer.current_epoch == 3
    assert set(model.trainer_arguments) == {"num_sanity_val_steps", "devices"}
    # 165 training tiles / 32 per batch = 6 batches x 10 updates x 3 epochs: 150 autoencoder + 30 DxMI updates
    assert int(model.updates_done) == 180 and model.model.dxmi.initial_ae is not None


def test_anomalib_auroc_agrees_with_dxmi_evaluate(fitted):
    root, model, _, results = fitted
    anomalib_auroc = results[0]["image_AUROC"]
    det = model.to_detector()
    test = [s for s in list_mvtec(root, "brick") if s.split == "test"]
    ours = metrics_table(test, det.score_samples(test)).set_index("category").loc["brick", "image_AUROC"]
    assert abs(anomalib_auroc - ours) <= 0.01, (anomalib_auroc, ours)
    assert ours > 0.6


def test_engine_predict_returns_scores_and_maps(fitted):
    root, model, engine, _ = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = engine.predict(model, data_path=root / "brick" / "test" / "synthetic_blob", return_predictions=True)
    scores = np.concatenate([b.pred_score.numpy() for b in batches])
    assert len(scores) == len(list((root / "brick/test/synthetic_blob").glob("*.png")))
    assert np.isfinite(scores).all() and batches[0].anomaly_map.shape[-2:] == (96, 96)


def test_grayscale_batch_gets_a_clear_error(fitted):
    import torch

    _, model, _, _ = fitted
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.model(torch.rand(2, 1, 96, 96))


def test_energy_refit_is_refused_with_a_clear_error():
    # the refit runs after train_model's last DxMI iteration; anomalib's Engine has no such stage
    with pytest.raises(ValueError, match="energy_refit_iter=5"):
        Dxmi(model_overrides={**SMALL, "energy_refit_iter": 5}, image_size=96)
    with pytest.raises(ValueError, match="energy_ema=0.99"):  # the Engine would score the last iterate instead
        Dxmi(model_overrides={**SMALL, "energy_ema": 0.99}, image_size=96)


def test_anomalib_cli_accepts_the_class_path(tmp_path):
    root = write_textures()
    cmd = [sys.executable, "-m", "anomalib.cli.cli", "fit", "--model", "dxmi_ad.anomalib.Dxmi",
           "--model.image_size", "64", "--model.model_overrides", '{"ae_pretrain_iter": 4}',
           "--model.updates_per_batch", "1", "--data", "anomalib.data.Folder", "--data.name", "brick",
           "--data.root", str(root / "brick"), "--data.normal_dir", "train/good", "--data.abnormal_dir",
           "test/synthetic_blob", "--data.normal_test_dir", "test/good", "--data.num_workers", "0",
           "--trainer.max_epochs", "1", "--trainer.logger", "false", "--default_root_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max_epochs=1" in proc.stdout + proc.stderr


def test_checkpoint_keeps_the_scoring_it_was_made_with():
    """The resolved scoring travels in the Lightning checkpoint; one written before top_k existed keeps the max."""
    from dxmi_ad.scoring import ScoringSettings

    made = Dxmi(image_size=64, blur_sigma=0.5)  # the default recipe: top_k 3
    ckpt: dict = {}
    made.on_save_checkpoint(ckpt)
    assert ckpt["dxmi_scoring"] == {"blur_sigma": 0.5, "top_k": 3}
    loaded = Dxmi(image_size=64, top_k=10)  # whatever the recipe says at load time, the checkpoint's scoring wins
    loaded.on_load_checkpoint(ckpt)
    assert loaded.scoring == ScoringSettings(blur_sigma=0.5, top_k=3) and loaded.model.scoring == loaded.scoring
    legacy = Dxmi(image_size=64)
    legacy.on_load_checkpoint({})  # no dxmi_scoring: made when pred_score was the maximum
    assert legacy.model.scoring.top_k == 1

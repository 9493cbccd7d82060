"""The energy refit after the DxMI stage (``energy_refit_iter``, issue #13): energy-only steps against the frozen
final sampler. It changes the energy and nothing else, is logged, is validated as the last candidate of model
selection, lowers the game's loss against the final sampler, and is scaled with a shorter run."""

from __future__ import annotations

import pytest
import torch

from dxmi_ad.config import DxMIConfig
from dxmi_ad.data.synthetic import eight_gaussians
from dxmi_ad.training.fit import train_model
from dxmi_ad.training.schedule import plan_stages

SMALL = {"dim": 2, "n_steps": 3, "sampler_hidden": 32, "value_hidden": 32, "energy_hidden": 32, "time_dim": 8,
         "batch_size": 64, "sampler_layers": 2, "value_layers": 2, "energy_layers": 2, "energy_model": "mlp",
         "initial": "gaussian", "parameterization": "eps", "energy_l2_weight": 1.0, "n_iter": 20,
         "energy_lr": 1e-3, "value_lr": 1e-3, "sampler_lr": 1e-3, "seed": 0}


def _data(n: int = 512) -> torch.Tensor:
    return torch.tensor(eight_gaussians(n, 0), dtype=torch.float32)


@pytest.mark.parametrize("energy_model", ["mlp", "shared"])
def test_refit_moves_only_the_energy_and_is_logged(energy_model):
    base = DxMIConfig(**{**SMALL, "energy_model": energy_model})
    plain, _ = train_model(_data(), base)
    refitted, history = train_model(_data(), base.replace(energy_refit_iter=15))
    for name, before in plain.sampler.state_dict().items():  # same game, then a frozen sampler
        assert torch.equal(before, refitted.sampler.state_dict()[name]), name
    moved = [not torch.equal(a, b) for a, b in zip(plain.energy.parameters(), refitted.energy.parameters())]
    assert all(moved)
    if energy_model == "mlp":  # a separate energy: the value net is not touched either
        for a, b in zip(plain.value.parameters(), refitted.value.parameters()):
            assert torch.equal(a, b)
    steps = [h["energy_refit_step"] for h in history if "energy_refit_step" in h]
    assert steps[0] == 1 and steps[-1] == 15
    assert {"energy_data", "energy_samples", "energy_gap"} <= set(history[-1])


def test_refit_is_the_last_candidate_of_model_selection():
    config = DxMIConfig(**{**SMALL, "validate_every": 10, "energy_refit_iter": 5})
    calls = []

    def validate(model):
        calls.append(1)
        return float(len(calls))  # every later candidate is better: the refitted model must win

    _, history = train_model(_data(), config, validate=validate)
    vals = [h["iteration"] for h in history if "val_auroc" in h]
    assert vals == [0, 10, 20]  # start, iteration 10, then the refitted last iterate (once, after the refit)
    assert history[-1]["selected_iteration"] == 20
    assert history.index(next(h for h in history if "energy_refit_step" in h)) < len(history) - 2


def test_refit_length_checked_and_counted():
    with pytest.raises(ValueError, match="energy_refit_iter must be >= 0"):
        DxMIConfig(**{**SMALL, "energy_refit_iter": -1})
    stages = plan_stages(DxMIConfig(**{**SMALL, "energy_refit_iter": 7}))
    assert stages.energy_refit == 7 and stages.total == 27
    assert "7 energy refit" in stages.describe()


def test_refit_brings_the_energy_closer_to_its_best_response():
    """The refit minimizes the game's energy loss against the frozen final sampler: on fresh data batches and fresh
    samples (not the ones it trained on) that loss must be lower after it than at the end of the game."""
    from dxmi_ad.objectives import energy_loss
    from dxmi_ad.training.dxdp import random_batch

    data = torch.tensor(eight_gaussians(8_000, 0), dtype=torch.float32)
    config = DxMIConfig(**{**SMALL, "n_iter": 60, "activation": "leaky_relu"})
    game, _ = train_model(data, config)
    refitted, _ = train_model(data, config.replace(energy_refit_iter=300))
    held_out = torch.tensor(eight_gaussians(8_000, 9), dtype=torch.float32)

    def loss(model):
        gen = torch.Generator().manual_seed(3)
        total = 0.0
        with torch.no_grad():
            for _ in range(10):
                x = random_batch(held_out, 256, gen)
                x_T = model.sampler.sample(model.initial_states(256, x, gen), gen)[-1]
                total += float(energy_loss(model.energy(x), model.energy(x_T), config.energy_l2_weight)[0])
        return total / 10

    assert loss(refitted) < loss(game) - 0.01, (loss(game), loss(refitted))


def test_a_shorter_run_scales_the_refit_unless_it_is_given():
    from dxmi_ad.training.fit import scale_schedule

    recipe = {"energy_model": "mlp", "n_iter": 2000, "energy_refit_iter": 1000}
    changes, notes = scale_schedule(recipe, {"n_iter": 10})
    assert changes["energy_refit_iter"] == 5 and any("energy_refit_iter" in n for n in notes)
    changes, _ = scale_schedule(recipe, {"n_iter": 10, "energy_refit_iter": 300})
    assert "energy_refit_iter" not in changes  # the user's value is kept (applied over the recipe by the caller)


def test_no_refit_without_dxmi_iterations():
    # a pre-training-only run (n_iter = 0, e.g. PixelDetector.pretrain) has no final sampler to refit against
    config = DxMIConfig(**{**SMALL, "n_iter": 0, "energy_refit_iter": 5})
    plain, _ = train_model(_data(), config.replace(energy_refit_iter=0))
    model, history = train_model(_data(), config)
    assert not any("energy_refit_step" in h for h in history)
    for a, b in zip(plain.energy.parameters(), model.energy.parameters()):
        assert torch.equal(a, b)
    assert plan_stages(config).energy_refit == 0


def test_vector_cli_scales_the_refit_with_a_shorter_run(tmp_path):
    from dxmi_ad.cli.train import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  energy_model: mlp\n  n_iter: 2000\n  energy_refit_iter: 1000\n")
    scaled = load_recipe(recipe, "eight-gaussians", ["n_iter=10"])
    assert scaled["config_overrides"]["energy_refit_iter"] == 5
    kept = load_recipe(recipe, "eight-gaussians", ["n_iter=10", "energy_refit_iter=3"])
    assert kept["config_overrides"]["energy_refit_iter"] == 3


def test_fourier_features_need_the_mlp_energy():
    with pytest.raises(ValueError, match="needs energy_model='mlp'"):
        DxMIConfig(**{**SMALL, "energy_model": "shared", "energy_fourier_features": 8})

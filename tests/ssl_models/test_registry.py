import pytest

from ssl_models import METHODS, build_method
from ssl_models.methods import SimCLR
from ssl_models.registry import method_params


def test_build_simclr_with_options():
    model = build_method("simclr", backbone="small_cnn", width=0.25, in_channels=1, temperature=0.5)
    assert isinstance(model, SimCLR) and METHODS["simclr"] is SimCLR
    assert model.criterion.temperature == 0.5
    assert model.backbone.features[0].in_channels == 1


def test_method_params_lists_options_with_defaults():
    params = method_params("simclr")
    assert params == {
        "temperature": 0.2,
        "projection_hidden_dim": 512,
        "projection_dim": 128,
        "projection_layers": 2,
    }


def test_unknown_method_names_key_and_choices():
    with pytest.raises(ValueError, match="'moco9'.*simclr"):
        build_method("moco9", backbone="small_cnn", width=0.25, in_channels=1)


def test_unknown_option_names_key_and_allowed():
    with pytest.raises(ValueError, match="'temprature'.*temperature"):
        build_method("simclr", backbone="small_cnn", width=0.25, in_channels=1, temprature=0.1)

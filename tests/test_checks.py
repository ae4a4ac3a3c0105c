"""Component checks: each component judges its own config section before anything runs."""

from __future__ import annotations

import pytest

from imret.checks import check
from imret.config import ConfigError, from_dict


def test_unknown_loss_and_loss_parameter():
    with pytest.raises(ConfigError, match="unknown loss 'smoothap'; did you mean 'smooth_ap'"):
        check(from_dict({"loss": {"terms": [{"name": "smoothap"}]}}))
    with pytest.raises(ConfigError, match="loss 'smooth_ap' has no parameter 'temp'; did you mean 'temperature'"):
        check(from_dict({"loss": {"terms": [{"name": "smooth_ap", "params": {"temp": 0.1}}]}}))


def test_unknown_metric_and_timm_model():
    with pytest.raises(ConfigError, match="unknown metric 'recal@1'"):
        check(from_dict({"evaluate": {"metrics": ["recal@1"]}}))
    with pytest.raises(ConfigError, match="timm has no model 'resnet181'"):
        check(from_dict({"model": {"backbone": "resnet181"}}))

"""The typed configuration of an experiment: the ground floor of imret.

``schema`` holds the dataclasses (one per section, a docstring per field), ``load``
reads YAML strictly and safely (experiments.yaml with inheritance, ``--set`` overrides,
a run's config.yaml), ``names`` is the one rule for names that become paths or sbatch
lines, and ``validate`` checks the rules between fields. Nothing in this
package imports an imret component; ``imret.checks`` asks the components about
their own sections. The names below are the package's public face.
"""

from imret.config.errors import ConfigError
from imret.config.load import (
    Experiments, apply_override, deep_merge, from_dict, load_yaml, read_yaml, read_yaml_file, save_yaml,
)
from imret.config.names import check_name, check_run_name
from imret.config.schema import (
    STAGE_ORDER, ClusterConfig, DataConfig, EnsembleConfig, EvaluateConfig, ExperimentConfig, ExtractConfig,
    HilanderConfig, LossConfig, LossTerm, ModelConfig, OptimConfig, ResourcesConfig, RunConfig, ScheduleConfig,
    StageResources, SweepConfig, TrainConfig,
)
from imret.config.validate import validate

__all__ = [
    "STAGE_ORDER", "ClusterConfig", "ConfigError", "DataConfig", "EnsembleConfig", "EvaluateConfig",
    "ExperimentConfig", "Experiments", "ExtractConfig", "HilanderConfig", "LossConfig", "LossTerm", "ModelConfig",
    "OptimConfig", "ResourcesConfig", "RunConfig", "ScheduleConfig", "StageResources", "SweepConfig", "TrainConfig",
    "apply_override", "check_name", "check_run_name", "deep_merge", "from_dict", "load_yaml", "read_yaml",
    "read_yaml_file", "save_yaml", "validate",
]

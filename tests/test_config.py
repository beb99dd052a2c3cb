"""params.yaml validation: every bad file fails before any work, naming key, value and fix."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nnpipe.cli import main as cli
from nnpipe.config import ConfigError, json_schema, load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]

BAD = [
    ({"train": {"lr": "fast"}}, "train.lr: must be a finite number > 0, got 'fast'"),
    ({"train": {"lr": -0.1}}, "train.lr: must be a finite number > 0, got -0.1"),
    ({"train": {"max_epochs": 0}}, "train.max_epochs: must be an int >= 1, got 0"),
    ({"trian": {}}, "trian: unknown key. Did you mean 'train'?"),
    ({"model": {"activaton": "relu"}}, "model.activaton: unknown key. Did you mean 'activation'?"),
    ({"model": {"activation": "rleu"}}, "model.activation: must be one of"),
    ({"model": {"lr": 0.1}}, "model.lr: is a training setting: move it to train."),
    ({"train": {"dropout": 0.1}}, "train.dropout: is an architecture setting: move it to model."),
    ({"model": {"dropout": 1.5}}, "model.dropout: must be a float in [0, 1), got 1.5"),
    ({"model": {"module": "resnet"}}, "model.module: must be one of 'cnn1d', 'cnn2d', 'mlp'"),
    ({"model": {"module__hiden_sizes": [3]}}, "model.module__hiden_sizes: is not a parameter"),
    ({"train": {"optimizer": "adm"}}, "Did you mean 'adam'?"),
    ({"train": {"lr_schedule": "cosin"}}, "Did you mean 'cosine'?"),
    ({"train": {"early_stopping": 3, "train_split": None}},
     "train.early_stopping: monitors a validation metric"),
    ({"data": {"test_size": 2}}, "data.test_size: input should be less than 1, got 2"),
    ({"data": {"sorce": "npz"}}, "data.sorce: unknown key. Did you mean 'source'?"),
    ({"data": {"task": "clustering"}}, "data.task: input should be 'classification' or 'regression'"),
    ({"cv": {"folds": 1}}, "cv.folds: input should be greater than or equal to 2, got 1"),
    ({"cv": {"folds": "five"}}, "cv.folds: input should be a valid integer"),
    ({"augment": {"hfilp": {}}}, "Did you mean 'hflip'?"),
    ({"augment": {"rotation": {"p": 2}}}, "augment__rotation__p must be a probability in [0, 1], got 2"),
    ({"augment": {"hflip": {}}, "model": {"module": "cnn1d", "input_shape": [1, 64]}},
     "'hflip' works on images"),
    ({"preprocess": ["zcaa"]}, "Did you mean 'zca'?"),
    ({"tracking": {"enabled": "sometimes"}}, "tracking.enabled: input should be a valid boolean"),
    ([1, 2], "the file must be a mapping of sections"),
    # routed parameters: checked against the component they go to, not at fit
    ({"train": {"optimizer": "sgd", "optimizer__momentun": 0.9}},
     "train.optimizer__momentun: is not a parameter of SGD; valid: ['optimizer__dampening'"),
    ({"train": {"optimizer": "sgd", "optimizer__momentun": 0.9}}, "Did you mean 'momentum'?"),
    ({"train": {"optimizer": "adam", "optimizer__momentum": 0.9}},
     "train.optimizer__momentum: is not a parameter of Adam"),
    ({"train": {"optimizer": "sgd", "optimizer__momentum": "high"}},
     "train.optimizer__momentum: was rejected by SGD, got 'high'"),
    ({"train": {"optimizer": "sgd", "optimizer__nesterov": True}},
     "train.optimizer__nesterov: was rejected by SGD, got True: Nesterov momentum requires a "
     "momentum"),
    ({"train": {"optimizer": "adam", "optimizer__betas": [0.9]}},
     "train.optimizer__betas: was rejected by Adam, got [0.9]"),
    ({"train": {"criterion__label_smoothin": 0.1}},
     "train.criterion__label_smoothin: is not a parameter of CrossEntropyLoss"),
    ({"train": {"criterion__weight": ["a", "b"]}},
     "train.criterion__weight: must be a list of numbers (one per class), got ['a', 'b']"),
    ({"train": {"lr_schedule": "exponential", "lr_schedule__gamma": 0.9}},
     "train.lr_schedule__gamma: is not a parameter of lr_schedule='exponential'; valid: "
     "['lr_schedule__decay_rate', 'lr_schedule__decay_steps']"),
    ({"train": {"lr_schedule": "plateau", "lr_schedule__factor": 2}},
     "train.lr_schedule__factor: must be a float in (0, 1), got 2"),
    ({"train": {"early_stopping": 5, "early_stopping__patince": 3}},
     "train.early_stopping__patince: is not a parameter of early stopping"),
    ({"train": {"early_stopping": True, "early_stopping__patience": "x"}},
     "train.early_stopping__patience: was rejected by early stopping, got 'x': patience must "
     "be an int >= 1"),
    ({"train": {"early_stopping": "yes"}},
     "train.early_stopping: must be None, a bool (True: patience 5) or the patience, an int >= 1"
     ", got 'yes'"),
    ({"train": {"early_stopping": 0}}, "train.early_stopping: must be None, a bool"),
    ({"train": {"device": "tpu"}},
     "train.device: must be a torch device: 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_params_fail_naming_the_key_path_value_and_fix(raw, message):
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    assert message in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        validate_config({"trian": {}, "cv": {"folds": 1}, "data": {"sorce": "x"}})
    assert len(info.value.problems) == 3
    assert str(info.value).startswith("params.yaml: 3 problems")


def test_shipped_params_are_valid_and_build_the_pipeline():
    cfg = load_config(ROOT / "params.yaml")
    pipe = cfg.build_pipeline("classification", (1, 8, 8))
    net = pipe[-1]
    assert net.module == "cnn2d" and list(net.input_shape) == [1, 8, 8]
    assert net.get_params()["augment"]["rotation"]["degrees"] == 10
    # keys left out are not passed: the estimator's own defaults apply
    assert "batch_norm" not in cfg.train and net.l2 == 0.0


def test_input_shape_comes_from_the_data_only_when_needed():
    mlp = validate_config({"model": {"module": "mlp"}})
    assert "input_shape" not in mlp.estimator_params((1, 8, 8))
    cnn = validate_config({"model": {"module": "cnn2d"}})
    assert cnn.estimator_params((1, 8, 8))["input_shape"] == [1, 8, 8]


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("train: {lr: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="no such params file"):
        load_config(tmp_path / "missing.yaml")


def test_check_command_and_schema_export(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"train": {"lr": 0.01}}))
    assert cli(["check", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"lr": 0}}))
    assert cli(["check", str(bad)]) == 1
    assert "train.lr" in capsys.readouterr().err
    out = tmp_path / "schema.json"
    assert cli(["schema", "-o", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert {"data", "model", "train", "cv", "evaluate", "tracking"} <= set(schema["properties"])
    assert "lr" in schema["properties"]["train"]["properties"]
    assert "activation" in schema["properties"]["model"]["properties"]
    proc = subprocess.run([sys.executable, "-m", "nnpipe.cli", "check", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "train.lr" in proc.stderr


def test_schema_is_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(json_schema())
    validator = jsonschema.Draft202012Validator(json_schema())
    assert not list(validator.iter_errors(yaml.safe_load((ROOT / "params.yaml").read_text())))

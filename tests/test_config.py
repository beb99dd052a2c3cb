"""params.yaml validation: every bad file fails before any work, naming key, value and fix."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from nnpipe.cli import main as cli
from nnpipe.config import (ConfigError, check_against_data, data_shape, json_schema, load_config,
                           validate_config)

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


# --------------------------------------------------------------------------- every problem at once


def test_every_problem_of_every_section_is_reported_at_once():
    raw = {"data": {"sorce": "npz", "test_size": 2},              # two in one pydantic section
           "cv": {"folds": 1},
           "preprocess": ["zcaa", "global_center", "minmx"],       # two bad steps of three
           "augment": {"hfilp": {}, "rotation": {"p": 2}, "noise": {"std": 0.1}},
           "model": {"activaton": "relu", "dropout": 1.5, "module": "resnet",
                     "module__channels": [3]},
           "train": {"lr": "fast", "max_epochs": "forty", "optimizer": "sgdd",
                     "optimizer__momentum": 0.9},
           "pretrain": {"enabled": True, "max_epochs": 0},
           "search": {"n_trials": 0, "sampler": "tpee"},
           "ensemble": {"enabled": True, "n_members": 0, "combine": "meen", "kindd": "x"}}
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    paths = [path for path, _ in info.value.problems]
    expected = ["data.sorce", "data.test_size", "cv.folds", "preprocess[0]", "preprocess[2]",
                "augment.hfilp", "augment.rotation", "model.activaton", "model.dropout",
                "model.module", "train.lr", "train.max_epochs", "train.optimizer",
                "pretrain.max_epochs", "search.n_trials", "search.sampler", "ensemble.kindd",
                "ensemble.n_members", "ensemble.combine"]
    assert sorted(paths) == sorted(expected), info.value
    n = len(expected)
    assert str(info.value).startswith(f"params.yaml: {n} problems\n")
    # a key dropped for its error takes the keys routed to it along: no follow-on noise
    assert "train.optimizer__momentum" not in paths and "model.module__channels" not in paths
    for path, message in info.value.problems:
        assert f"  {path}: {message}" in str(info.value)


def test_two_bad_values_in_one_estimator_section_are_both_reported():
    with pytest.raises(ConfigError) as info:
        validate_config({"train": {"lr": "fast", "max_epochs": "forty"}})
    assert info.value.problems == [("train.lr", "must be a finite number > 0, got 'fast'."),
                                   ("train.max_epochs", "must be an int >= 1, got 'forty'.")]


def test_search_space_entries_are_each_checked_even_next_to_other_problems():
    raw = {"train": {"lr": "fast"},
           "search": {"enabled": True, "space": {
               "model.dropout": {"type": "float", "low": 0.0, "high": 1.5},
               "train.optimizer": {"type": "categorical", "choices": ["adam", "adm"]}}}}
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    paths = [path for path, _ in info.value.problems]
    assert paths == ["train.lr", "search.space.model.dropout", "search.space.train.optimizer"]


# --------------------------------------------------------------------------- the data's shape

def _csv(tmp_path, n_features=6):
    rng = np.random.RandomState(0)
    lines = [",".join([f"f{i}" for i in range(n_features)] + ["label"])]
    lines += [",".join(f"{v:.3f}" for v in rng.rand(n_features)) + f",{i % 2}" for i in range(20)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return {"source": "csv", "path": str(path), "target": "label"}


def test_check_against_data_catches_a_cnn_and_image_ops_on_tabular_rows(tmp_path):
    data = _csv(tmp_path)
    raw = {"data": data, "model": {"module": "cnn2d"},
           "augment": {"shift": {"max_fraction": 0.1}, "rotation": {"degrees": 10},
                       "noise": {"std": 0.02}}}
    cfg = validate_config(raw)  # the file alone cannot know: the data decides
    with pytest.raises(ConfigError) as info:
        check_against_data(cfg, "classification", None, 6)
    problems = dict(info.value.problems)
    assert set(problems) == {"model.module", "augment.shift", "augment.rotation", "augment.noise"}
    assert problems["model.module"].startswith("'cnn2d' does not fit the data")
    assert "CNN2d needs input_shape=(C, H, W) to reshape the 6 flat features" in \
        problems["model.module"]
    assert problems["augment.shift"].startswith("{'max_fraction': 0.1} does not fit the data")
    assert "needs input_shape=(C, L) or (C, H, W)" in problems["augment.shift"]
    # nnpipe check reads the shape from the CSV's header: the same problems, found at once
    with pytest.raises(ConfigError) as info:
        validate_config(raw, data=True)
    assert {p for p, _ in info.value.problems} == set(problems)
    assert "csv" in info.value.problems[0][1] and "6 features per row" in info.value.problems[0][1]


@pytest.mark.parametrize("model, augment, shape, n_features, bad", [
    ({"module": "cnn2d", "input_shape": [1, 8, 8]}, None, None, 6, {"model.input_shape"}),
    ({"module": "cnn1d", "input_shape": [2, 4]}, None, None, 6, {"model.input_shape"}),
    ({"module": "cnn1d"}, {"roll": {}, "rotation": {}, "noise": {}}, None, 6,
     {"augment.rotation"}),  # a sequence (1, 6): rotation needs images
    ({"module": "cnn2d"}, {"roll": {}, "hflip": {}}, (1, 8, 8), 64, {"augment.roll"}),
    ({"module": "mlp"}, {"shift": {}}, (3, 4, 4), 48, set()),  # images flattened for an MLP
    ({"module": "mlp"}, None, None, 6, set()),
], ids=["cnn2d-size", "cnn1d-size", "rotation-on-sequences", "roll-on-images", "mlp-images",
        "mlp-rows"])
def test_check_against_data_follows_the_fit_time_checks(model, augment, shape, n_features, bad):
    cfg = validate_config({"data": {"source": "npz"}, "model": model, "augment": augment})
    if not bad:
        check_against_data(cfg, "classification", shape, n_features)
        return
    with pytest.raises(ConfigError) as info:
        check_against_data(cfg, "classification", shape, n_features)
    assert {p for p, _ in info.value.problems} == bad
    # the same configuration fails at fit with the same reason (the truth comes from fit)
    X = np.random.RandomState(0).rand(8, n_features).astype(np.float32)
    est = cfg.build_estimator("classification", shape, max_epochs=1)
    with pytest.raises(ValueError) as fit_error:
        est.fit(X, np.arange(8) % 2)
    assert str(fit_error.value) in str(info.value)


def test_shipped_params_pass_against_their_data_and_the_prepared_folder(tmp_path):
    from nnpipe.data import load_dataset, save_dataset

    load_config(ROOT / "params.yaml", data=True)
    save_dataset(load_dataset("digits"), tmp_path / "prepared")
    load_config(ROOT / "params.yaml", data=tmp_path / "prepared")
    shape = data_shape(load_config(ROOT / "params.yaml"), tmp_path / "prepared")
    assert (shape.input_shape, shape.n_features, shape.task) == ((1, 8, 8), 64, "classification")


def test_source_shapes_are_read_without_loading_the_rows(tmp_path):
    from PIL import Image

    np.savez(tmp_path / "seq.npz", X=np.zeros((5, 2, 30), np.float32), y=np.arange(5) % 2)
    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        Image.new("RGB", (12, 10)).save(tmp_path / "img" / cls / "0.png")
    cases = [({"source": "npz", "path": str(tmp_path / "seq.npz")}, (2, 30), 60),
             ({"source": "images", "path": str(tmp_path / "img")}, (3, 10, 12), 360),
             ({"source": "images", "path": str(tmp_path / "img"), "grayscale": True,
               "image_size": [4, 5]}, (1, 4, 5), 20),
             (_csv(tmp_path, 3), None, 3)]
    for data, shape, n_features in cases:
        got = data_shape(validate_config({"data": data}))
        assert (got.input_shape, got.n_features) == (shape, n_features), data


@pytest.mark.parametrize("data, key, message", [
    ({"source": "csv", "path": "nowhere.csv", "target": "y"}, "data.path",
     "'nowhere.csv' does not exist"),
    ({"source": "csv", "target": "lable"}, "data.target",
     "'lable' is not a column of"),
])
def test_the_data_section_is_checked_against_the_files(tmp_path, data, key, message):
    if "path" not in data:
        data = {**_csv(tmp_path), "target": data["target"]}
    with pytest.raises(ConfigError) as info:
        validate_config({"data": data}, data=True)
    assert info.value.problems[0][0] == key and message in info.value.problems[0][1]


def test_a_stage_checks_params_against_the_prepared_data_before_any_work(tmp_path, capsys):
    from nnpipe.data import load_dataset, save_dataset
    from pipelines.train import main as train

    data = _csv(tmp_path)
    save_dataset(load_dataset(**data), tmp_path / "prepared")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data, "model": {"module": "cnn2d"},
                                      "augment": {"shift": {}}, "tracking": {"enabled": False}}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        train(["--params", str(params), "--data", str(tmp_path / "prepared"), "--model",
               str(out / "model"), "--metrics", str(out / "m.json"), "--curves",
               str(out / "c.csv"), "--plot", str(out / "c.png")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "model.module: 'cnn2d' does not fit the data" in err and "augment.shift" in err
    assert "Traceback" not in err and not (out / "model").exists()

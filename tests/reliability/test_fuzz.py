"""Property-based fuzzing (issue #7, item 10) of the two places where untrusted input meets code:

* the params.yaml loader: any mutation of a valid file -- unknown and near-miss keys, wrong types,
  NaN / inf / huge numbers, empty or mistyped sections, invalid YAML, random bytes, a non-mapping
  top level -- either validates or raises :class:`nnpipe.config.ConfigError` naming the key;
* the preprocessing transformers: any 2-D array (0 / 1 rows, 1 column, int / float32 / float64 /
  bool, NaN / inf / huge values, constant columns) and any constructor parameters either give a
  finite output of the right shape and dtype, or raise ValueError / TypeError naming the argument.

Each problem hypothesis found has a plain regression test at the end of this file.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import warnings

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nnpipe.augment import OPS
from nnpipe.config import ConfigError, json_schema, load_config, validate_config
from nnpipe.preprocessing import (PREPROCESSORS, Centerer, Standardizer, ZCAWhitener,
                                  make_preprocessor)

#: NNPIPE_FUZZ_EXPLORE=<n> runs n random examples per test (a longer hunt, e.g. 5000); by default
#: the examples are derandomized, so that a CI run is repeatable and takes ~10 s per test
EXPLORE = int(os.environ.get("NNPIPE_FUZZ_EXPLORE") or 0)


def fuzz(max_examples: int):
    return settings(max_examples=EXPLORE or max_examples, deadline=None, derandomize=not EXPLORE,
                    database=None, suppress_health_check=[HealthCheck.too_slow,
                                                          HealthCheck.filter_too_much])

# --------------------------------------------------------------------------- params.yaml

#: a valid file using every section (the search is declared but off: enabling it is a mutation)
BASE = {
    "data": {"source": "digits", "test_size": 0.25, "random_state": 0},
    "preprocess": ["center", {"zca": {"epsilon": 0.1}}],
    "augment": {"shift": {"max_fraction": 0.1, "p": 0.5}, "noise": {"std": 0.02}},
    "model": {"module": "cnn2d", "module__channels": [4, 8], "batch_norm": True,
              "dropout": 0.1, "activation": "relu"},
    "train": {"optimizer": "adam", "lr": 0.005, "max_epochs": 2, "batch_size": 64,
              "lr_schedule": "cosine", "train_split": 0.1, "random_state": 0},
    "search": {"enabled": False, "n_trials": 4, "sampler": "tpe", "metric": "accuracy",
               "folds": 3, "space": {"train.lr": {"type": "float", "low": 0.001, "high": 0.01,
                                                  "log": True}}},
    "ensemble": {"enabled": True, "kind": "seeds", "n_members": 2, "combine": "mean",
                 "n_jobs": 1, "random_state": 0},
    "cv": {"folds": 3, "shuffle": True, "random_state": 0},
    "evaluate": {"ece_bins": 15, "prune": {"sparsity": 0.5}},
    "tracking": {"enabled": False, "experiment": "fuzz"},
    "pretrain": {"enabled": False, "noise": "gaussian", "max_epochs": 2},
}

def _schema_keys() -> dict:
    """Every section's keys, from the JSON schema (new sections and keys are fuzzed too)."""
    schema = json_schema()
    defs = schema.get("$defs", {})

    def keys_of(node):
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[1]]
        for alternative in node.get("anyOf", []):
            found = keys_of(alternative)
            if found:
                return found
        return list(node.get("properties", {}))

    return {name: keys_of(node) for name, node in schema["properties"].items()}


#: every key per section, plus routed parameters and augmentation ops the schema cannot list
KEYS = _schema_keys()
KEYS["model"] += ["module__channels", "module__hidden_sizes", "module__kernel_size",
                  "module__pool", "activation__negative_slope"]
KEYS["train"] += ["optimizer__momentum", "lr_schedule__cycle_epochs", "early_stopping__monitor",
                  "criterion__label_smoothing", "iterator_train__shuffle"]
KEYS["augment"] = list(OPS.names())
KEYS["evaluate"] = KEYS["evaluate"] + ["sparsity", "scope", "fine_tune_epochs"]  # prune's
SECTIONS = list(KEYS)


def _near_miss(word: str) -> st.SearchStrategy:
    """Typos: a dropped, doubled or swapped letter, a changed case, a suffix."""
    n = len(word)
    return st.one_of(
        st.integers(0, n - 1).map(lambda i: word[:i] + word[i + 1:]),
        st.integers(0, n - 1).map(lambda i: word[:i] + word[i] + word[i:]),
        st.integers(0, max(0, n - 2)).map(
            lambda i: word[:i] + word[i + 1:i + 2] + word[i:i + 1] + word[i + 2:]),
        st.just(word.upper()), st.just(word.capitalize()), st.just(word + "s"),
        st.just(word + "_"), st.just(" " + word),
    )


ALL_KEYS = sorted({k for ks in KEYS.values() for k in ks} | set(SECTIONS))


def test_the_base_file_is_valid():
    validate_config(BASE)
keys = st.one_of(
    st.sampled_from(ALL_KEYS),
    st.sampled_from(ALL_KEYS).flatmap(_near_miss),
    st.text(min_size=0, max_size=8),
    st.integers(-3, 3), st.none(), st.booleans(),  # YAML allows non-string keys
)
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from([0, -1, 1, 2, 10**30, -(10**30), 2**63, 2**64 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 0.0, -0.0, 0.5]),
    st.text(max_size=12),
    st.sampled_from(["", "relu", "adam", "cnn2d", "mlp", "sgd", "cosine", "zca", "center",
                     "classification", "regression", "digits", "npz", "true", "null", "nan",
                     "1e-3", "tpe", "grid", "seeds", "mean", "dask", "cpu", "cuda"]),
    st.dates(min_value=datetime.date(1, 1, 1)),  # YAML turns 2024-01-01 into a date
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(keys, children, max_size=4)),
    max_leaves=8,
)


#: parameter names one level down: augment ops', search space entries', prune's, preprocessors'
INNER = ["p", "degrees", "std", "max_fraction", "padding", "size", "range", "op", "type", "low",
         "high", "log", "step", "choices", "value", "condition", "epsilon", "copy", "mode",
         "n_components", "whiten", "feature_range", "sparsity", "scope"]
inner_keys = st.one_of(st.sampled_from(INNER), st.sampled_from(INNER).flatmap(_near_miss), keys)
preprocess_steps = st.one_of(
    st.sampled_from(PREPROCESSORS), keys,
    st.dictionaries(st.one_of(st.sampled_from(PREPROCESSORS), keys),
                    st.one_of(st.none(), st.dictionaries(inner_keys, values, max_size=2)),
                    max_size=2),
)


@st.composite
def mutated_configs(draw):
    """The base file with 1-3 mutations: set / replace / delete at a (possibly new) key path."""
    raw = copy.deepcopy(BASE)
    paths = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["set", "set", "set", "set", "section", "delete", "top",
                                     "preprocess"]))
        if kind == "top":  # an unknown or near-miss top-level section
            key = draw(keys)
            raw[key] = draw(values)
            paths.append((key,))
        elif kind == "section":  # a whole section of the wrong type, empty, or None
            section = draw(st.sampled_from(SECTIONS))
            raw[section] = draw(st.one_of(st.none(), st.just({}), st.just([]), values))
            paths.append((section,))
        elif kind == "delete":
            section = draw(st.sampled_from(sorted(raw, key=str)))
            del raw[section]
        elif kind == "preprocess":
            raw["preprocess"] = draw(st.lists(preprocess_steps, max_size=3))
            paths.append(("preprocess",))
        else:  # set a key (real, near-miss or random) somewhere, maybe one level deeper
            section = draw(st.sampled_from([k for k in SECTIONS if KEYS[k]]))
            key = draw(st.one_of(st.sampled_from(KEYS[section]),
                                 st.sampled_from(KEYS[section]).flatmap(_near_miss), keys))
            body = raw.get(section)
            if not isinstance(body, dict):
                body = raw[section] = {}
            value = draw(values)
            if draw(st.booleans()) and isinstance(body.get(key), dict):
                inner = draw(inner_keys)
                body[key][inner] = value
                paths.append((section, key, inner))
            else:
                body[key] = value
                paths.append((section, key))
    return raw, paths


def _check_config_error(exc: ConfigError, source: str) -> None:
    """A ConfigError names the file and, for each problem, where it is and what is wrong."""
    # validate_config turns an error no check foresaw into a ConfigError naming only the
    # section, with the original as __cause__: a bug to fix, not a pass
    assert exc.__cause__ is None, f"unforeseen {exc.__cause__!r}: {exc}"
    assert exc.problems, "a ConfigError with no problems"
    text = str(exc)
    assert text.startswith(source)
    for path, message in exc.problems:
        assert isinstance(path, str) and isinstance(message, str) and message.strip()
        assert path or "mapping" in message or "YAML" in message, (path, message)
        assert path in text and message in text


@fuzz(1000)
@given(mutated_configs())
@example((dict(BASE, model={**BASE["model"], "dropout": math.nan}), [("model", "dropout")]))
@example((dict(BASE, train={**BASE["train"], "lr": 10**400}), [("train", "lr")]))
@example((dict(BASE, cv=None, evaluate=[]), [("cv",), ("evaluate",)]))
def test_any_mutated_params_validate_or_raise_config_error(case):
    raw, paths = case
    try:
        cfg = validate_config(raw, "fuzz.yaml")
    except ConfigError as exc:
        _check_config_error(exc, "fuzz.yaml")
        return
    # accepted: then the sections it builds from must build
    cfg.build_preprocessing()
    cfg.estimator_params((1, 8, 8))


@fuzz(400)
@given(mutated_configs())
def test_a_written_file_loads_or_raises_config_error(tmp_path_factory, case):
    raw, _ = case
    path = tmp_path_factory.mktemp("cfg") / "params.yaml"
    try:
        text = yaml.safe_dump(raw, allow_unicode=True)
    except yaml.YAMLError:
        assume(False)  # not representable in YAML (e.g. a None key nested oddly)
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        _check_config_error(exc, str(path))


yaml_texts = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"---", b"- a\n- b\n", b"42", b"null", b"[", b"{a: 1", b"a: [1, 2",
                     b"\t- x", b"a: *undefined", b"!!python/object:os.system {}",
                     b"a: !!binary AAAA", b"? [1, 2]\n: x", b"\xff\xfe\x00", b"a: b\x00",
                     b"model: {lr: .nan}", b"&a [*a]", b"\xef\xbb\xbfdata: {}",
                     b"data: {test_size: 1e400}", b"%YAML 9.9\n---\na: 1"]),
)


@fuzz(1000)
@given(yaml_texts)
def test_arbitrary_bytes_load_or_raise_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("raw") / "params.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as exc:
        _check_config_error(exc, str(path))


# --------------------------------------------------------------------------- preprocessing

DTYPES = [np.dtype(t) for t in ("float64", "float32", "int8", "int64", "bool")]


@st.composite
def matrices(draw):
    """2-D arrays with edge-case shapes, dtypes and values, some columns constant."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.tuples(st.sampled_from([0, 1, 2, 3, 5, 12]), st.sampled_from([0, 1, 2, 4])))
    if dtype.kind == "f":
        finite = draw(st.booleans())
        big = np.finfo(dtype).max
        elements = st.floats(width=dtype.itemsize * 8, allow_nan=not finite,
                             allow_infinity=not finite) if not draw(st.booleans()) else \
            st.sampled_from([0.0, 1.0, -1.0, 1e-30, big, -big, big / 3, 1e30, 3.5])
    else:
        elements = None
    X = draw(hnp.arrays(dtype, shape, elements=elements))
    if shape[0] and shape[1] and draw(st.booleans()):  # a constant column
        X[:, draw(st.integers(0, shape[1] - 1))] = X.flat[0]
    return X


params = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.floats(),
                   st.sampled_from([1e-300, 1e300, 1e-5, 0.1, -1.0, 0.0]),
                   st.text(max_size=8),
                   st.sampled_from(["feature", "global", "sample", "Feature", "samples"]))

transformers = st.one_of(
    st.builds(Centerer, mode=st.one_of(st.sampled_from(Centerer._MODES), params)),
    st.builds(Standardizer, mode=st.one_of(st.sampled_from(Standardizer._MODES), params)),
    st.builds(ZCAWhitener, epsilon=st.one_of(st.floats(1e-8, 10), params),
              copy=st.booleans()),
    st.sampled_from(PREPROCESSORS).map(make_preprocessor),
)

#: what an error message must mention: the argument, or which input it is about
_NAMES = ("mode", "epsilon", "X", "array", "Input", "input", "sample", "feature", "n_components")


def _check_error(exc: Exception) -> None:
    assert isinstance(exc, (ValueError, TypeError)), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message.strip() and any(n in message for n in _NAMES), message


def _huge(X) -> bool:
    finite = np.asarray(X, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return bool(finite.size) and float(np.abs(finite).max()) > 1e30


def _sklearn_edge(X) -> bool:
    """Input where scikit-learn's transformers may return inf / NaN without an error."""
    return _huge(X) or X.shape[0] < 2 or not np.isfinite(np.asarray(X, dtype=np.float64)).all()


def _check_output(out, like, n_features=None, lenient=False, ours=True) -> None:
    """``out`` has ``like``'s rows, the right width, a floating dtype (nnpipe's transformers:
    float32 stays float32, anything else becomes float64), and finite values."""
    out = np.asarray(out)
    assert out.ndim == 2 and out.shape[0] == like.shape[0]
    if n_features is not None:
        assert out.shape[1] == n_features
    if ours:
        assert out.dtype == (np.float32 if like.dtype == np.float32 else np.float64), out.dtype
    assert out.dtype.kind == "f", out.dtype
    if not lenient:
        assert np.isfinite(out).all(), "non-finite output"


@fuzz(1200)
@given(transformers, matrices(), st.data())
def test_transformers_give_finite_output_or_a_clear_error(est, X, data):
    # nnpipe's own transformers must not even warn: an overflow is a ValueError, never a silent
    # inf / NaN. scikit-learn's StandardScaler / MinMaxScaler / PCA (named by make_preprocessor)
    # compute in the input's dtype and overflow to inf / NaN near its limit (float32: 3.4e38),
    # PCA(whiten=True) fitted on one sample returns NaN (variance / (n - 1)), and the scalers
    # pass NaN through as "missing" by design, all without an error; nnpipe passes them on
    # unchanged (the network's input check then rejects the NaN with a ValueError), so there
    # they only need the right shape and dtype.
    ours = isinstance(est, (Centerer, Standardizer, ZCAWhitener))
    with warnings.catch_warnings():
        warnings.simplefilter("error" if ours else "ignore", RuntimeWarning)
        try:
            est.fit(X)
        except Exception as exc:  # noqa: BLE001 - checked
            _check_error(exc)
            return
        keeps = not hasattr(est, "n_components")  # PCA may drop components
        try:
            out = est.transform(X)
        except Exception as exc:  # noqa: BLE001
            _check_error(exc)
            return
        lenient = not ours and _sklearn_edge(X)
        _check_output(out, X, X.shape[1] if keeps else None, lenient, ours)
        # new data, maybe of another dtype (float32 at predict time after float64 at fit)
        X2 = data.draw(matrices().filter(lambda m: m.shape[1] == X.shape[1]), label="X2")
        try:
            out2 = est.transform(X2)
        except Exception as exc:  # noqa: BLE001
            _check_error(exc)
        else:
            _check_output(out2, X2, out.shape[1], lenient or not ours and _sklearn_edge(X2), ours)
        if hasattr(est, "inverse_transform"):
            try:
                back = est.inverse_transform(out)
            except Exception as exc:  # noqa: BLE001
                _check_error(exc)
            else:
                _check_output(back, out, X.shape[1], lenient, ours)


# --------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("data", [b"\x80", b"data: {test_size: 0.2}\x00", b"\xff\xfe\x00\xd8"])
def test_load_config_reports_bytes_that_are_not_text(tmp_path, data):
    """Regression: non-UTF-8 bytes escaped as UnicodeDecodeError."""
    path = tmp_path / "params.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_reads_a_utf8_bom_and_utf16(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"\xef\xbb\xbfdata: {test_size: 0.2}\n")
    assert load_config(path).data.test_size == 0.2
    path.write_bytes("data: {test_size: 0.3}\n".encode("utf-16"))
    assert load_config(path).data.test_size == 0.3


def test_load_config_reports_nesting_too_deep_for_the_parser(tmp_path):
    """Regression: PyYAML's recursive composer raised RecursionError."""
    path = tmp_path / "params.yaml"
    path.write_text("model: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested deeper"):
        load_config(path)


BAD = [  # (mutation of an empty file, the key the ConfigError must name); each escaped before
    ({"train": {"lr": 10**400}}, "train.lr"),  # OverflowError in math.isfinite
    ({"cv": {"folds": -(10**400)}}, "cv.folds"),
    ({"train": {None: 1}}, "train.None"),  # YAML `null:` key
    ({"search": {1: 2}}, "search.1"),  # TypeError sorting int and str keys
    ({"preprocess": [{}]}, "preprocess[0]"),  # StopIteration
    ({"preprocess": [{"center": None, "zca": None}]}, "preprocess[0]"),  # zca silently dropped
    ({"model": {"module": []}}, "model.module"),  # unhashable list
    ({"model": {"module": "cnn2d", "module__channels": math.nan}}, "model.module__channels"),
    ({"model": {"module": "mlp", "input_shape": 5}}, "model.input_shape"),  # int not iterable
    ({"model": {"module": "mlp", "input_shape": "abc"}}, "model.input_shape"),
    ({"model": {"module": "cnn2d", "input_shape": [1.5, 8, 8]}}, "model.input_shape"),
    ({"model": {"module": "cnn2d", "module__kernel_size": [3]}}, "model.module__kernel_size"),
    ({"model": {"module": "cnn2d", "module__pool": [2]}}, "model.module__pool"),
    ({"train": {"tta": 5}}, "train.tta"),
    ({"train": {"tta": "hflip"}}, "train.tta"),  # iterated letter by letter
    ({"train": {"tta": [["hflip"]]}}, "train.tta"),
    ({"search": 5}, "search"),
    ({"search": {"storage": 5}}, "search.storage"),  # AttributeError: startswith
    ({"search": {"space": 5}}, "search.space"),  # AttributeError: items
    ({"search": {"metric": ["accuracy"]}}, "search.metric"),  # unhashable list
    ({"search": {"enabled": "false"}}, "search.enabled"),  # a string is truthy: search ran
    ({"ensemble": {"enabled": "no"}}, "ensemble.enabled"),
    ({"ensemble": {"enabled": True, "swa_start": "x"}}, "ensemble.swa_start"),
    ({"ensemble": {"enabled": True, "n_jobs": "x"}}, "ensemble.n_jobs"),
    ({"ensemble": {"enabled": True, "max_retries": -1}}, "ensemble.max_retries"),
    ({"ensemble": {"enabled": True, "random_state": "x"}}, "ensemble.random_state"),
]


@pytest.mark.parametrize("raw, key", BAD, ids=[k for _, k in BAD])
def test_wrong_types_raise_config_error_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    assert info.value.__cause__ is None, info.value
    assert key in [path for path, _ in info.value.problems], info.value.problems


def test_good_values_next_to_the_new_checks_still_validate():
    validate_config({"model": {"module": "cnn2d", "module__pool": None, "input_shape": [1, 8, 8],
                               "module__kernel_size": 3}, "train": {"tta": ["identity", "hflip"]},
                     "search": {"enabled": False, "timeout": 5, "metric": "accuracy"},
                     "ensemble": {"enabled": True, "n_jobs": -1, "random_state": None,
                                  "max_retries": 0}})


def test_an_unforeseen_error_still_becomes_a_config_error(monkeypatch):
    """The safety net: a check that trips over a value's form gives a ConfigError naming the
    section (and keeps the original as __cause__, which the fuzz tests count as a bug)."""
    import nnpipe.config as config

    def broken(cfg, problems):
        raise TypeError("'int' object is not iterable")

    monkeypatch.setattr(config, "_check_estimator_sections", broken)
    with pytest.raises(ConfigError, match="not iterable") as info:
        validate_config({})
    assert info.value.problems[0][0] == "model/train"
    assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.parametrize("est, X", [
    (Centerer(), [[1.7e308, 1.0], [1.7e308, 2.0]]),  # the column mean overflowed to inf
    (Centerer(mode="global"), [[1.7e308, 1.7e308]]),
    (Centerer(mode="sample"), [[1.7e308, 1.7e308]]),
    (Standardizer(), [[1e160], [-1e160]]),  # var overflowed; returned X unscaled
    (Standardizer(mode="sample"), [[1e160, -1e160]]),
    (ZCAWhitener(), [[1e200, 1.0], [-1e200, 2.0], [0.0, 3.0]]),  # NaN output
], ids=lambda v: type(v).__name__ if not isinstance(v, list) else "")
def test_overflowing_statistics_raise_instead_of_inf_or_nan(est, X):
    X = np.asarray(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="too large"):
            est.fit_transform(X)


def test_a_float32_result_beyond_float32_raises():
    """Regression: the float64 result was cast back to float32 as inf."""
    est = Centerer().fit(np.full((2, 1), -3e38, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="too large for float32"):
            est.transform(np.full((1, 1), 3e38, dtype=np.float32))
    assert est.transform(np.full((1, 1), 3e38)).dtype == np.float64  # float64 holds it

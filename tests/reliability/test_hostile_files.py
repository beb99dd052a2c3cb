"""Issue #7 item 6: hostile files handed to every reader nnpipe has never run code.

Each payload is real: ``test_the_payloads_are_live`` shows that unpickling it (or a permissive
loader) does create the marker file. Every nnpipe reader must instead raise a clear error naming
the file, and the marker must never appear. Plus a static scan (``ast``) of nnpipe/ and
pipelines/ for unsafe deserialisation calls.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import nnpipe
from nnpipe import EnsembleClassifier, NNClassifier
from nnpipe.checkpoint import Checkpoint, load_checkpoint
from nnpipe.persist import UntrustedTypeError

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _skops_runstring(marker) -> bytes:
    """A well-formed skops file whose one node calls numpy.testing's ``runstring`` (``exec``)."""
    import skops.io as sio

    args = json.loads(zipfile.ZipFile(io.BytesIO(sio.dumps(
        (f"open({str(marker)!r}, 'w').close()", {})))).read("schema.json"))
    protocol = args.pop("protocol"), args.pop("_skops_version")
    node = {"__class__": "runstring", "__module__": "numpy.testing._private.utils",
            "__loader__": "ConstructorFromReduceNode", "content": args, "__id__": 1,
            "protocol": protocol[0], "_skops_version": protocol[1]}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("schema.json", json.dumps(node))
    return buf.getvalue()


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a hostile file ran code"


@pytest.fixture
def payloads(tmp_path, marker):
    """The same payload as a raw pickle (.pkl), a torch.save zip (.pt) and a skops file."""
    pkl = tmp_path / "payload.pkl"
    pkl.write_bytes(pickle.dumps(_Payload(marker)))
    pt = tmp_path / "payload.pt"
    torch.save(_Payload(marker), pt)
    assert zipfile.ZipFile(pt).namelist()[0].endswith("data.pkl")  # torch's zip format
    skops = tmp_path / "payload.skops"
    skops.write_bytes(_skops_runstring(marker))
    return {"pkl": pkl, "pt": pt, "skops": skops}


def test_the_payloads_are_live(tmp_path):
    """Control: each payload really runs code when given to a permissive loader."""
    import skops.io as sio

    for i, load in enumerate([
            lambda p: pickle.loads(p["pkl"].read_bytes()),
            lambda p: torch.load(p["pt"], weights_only=False),
            lambda p: sio.loads(p["skops"].read_bytes(), trusted=sio.get_untrusted_types(
                data=p["skops"].read_bytes()))]):
        marker = tmp_path / f"live-{i}"
        payload_dir = tmp_path / f"p{i}"
        payload_dir.mkdir()
        pkl, pt, sk = payload_dir / "a.pkl", payload_dir / "a.pt", payload_dir / "a.skops"
        pkl.write_bytes(pickle.dumps(_Payload(marker)))
        torch.save(_Payload(marker), pt)
        sk.write_bytes(_skops_runstring(marker))
        load({"pkl": pkl, "pt": pt, "skops": sk})
        assert marker.exists()


# --------------------------------------------------------------------------- saved models

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One small saved network, pipeline and stacking ensemble (copied by each test)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.RandomState(0)
    X = rng.normal(size=(80, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    root = tmp_path_factory.mktemp("saved")
    net = NNClassifier(max_epochs=1, module__hidden_sizes=[8], random_state=0)
    nnpipe.save(net.fit(X, y), root / "net")
    nnpipe.save(make_pipeline(StandardScaler(), net).fit(X, y), root / "pipe")
    nnpipe.save(EnsembleClassifier(net, n_members=2, combine="stacking",
                                   validation_fraction=0.25).fit(X, y), root / "ens")
    return root, X, y


def _copy(saved, name, tmp_path) -> Path:
    return Path(shutil.copytree(saved[0] / name, tmp_path / name))


def _replace_part(directory: Path, key: str, data: bytes, name: str = None) -> Path:
    """Replace the file the manifest's ``key`` names and update its checksum, so that only the
    format check stands between the file and the loader."""
    manifest = json.loads((directory / "model.json").read_text())
    old = directory / manifest[key]["file"]
    new = directory / (name or old.name)
    old.unlink()
    new.write_bytes(data)
    manifest[key] = {"file": new.name, "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "model.json").write_text(json.dumps(manifest))
    return new


def test_pickles_beside_a_model_are_never_read(saved, payloads, tmp_path):
    directory = _copy(saved, "net", tmp_path)
    for name in ("model.pkl", "model.pt", "estimator.pkl", "weights.pt", "checkpoint.pt"):
        shutil.copy(payloads["pt" if name.endswith(".pt") else "pkl"], directory / name)
    np.testing.assert_array_equal(nnpipe.load(directory).predict_proba(saved[1]),
                                  nnpipe.load(saved[0] / "net").predict_proba(saved[1]))
    load_checkpoint(directory)
    # the manifest pointing at one of them is refused by name, before it is opened
    manifest = json.loads((directory / "model.json").read_text())
    manifest["weights"]["file"] = "model.pkl"
    (directory / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="invalid weights file 'model.pkl'"):
        nnpipe.load(directory)


@pytest.mark.parametrize("kind", ["pkl", "pt"])
def test_weights_replaced_by_a_pickle_with_a_matching_checksum(saved, payloads, tmp_path, kind):
    directory = _copy(saved, "net", tmp_path)
    bad = _replace_part(directory, "weights", payloads[kind].read_bytes(),
                        name=f"weights-0000000000000000.{kind}")
    for loader in (nnpipe.load, load_checkpoint):
        with pytest.raises(ValueError, match=f"{bad}.* is not a safetensors file"):
            loader(directory)


@pytest.mark.parametrize("kind", ["pkl", "pt"])
def test_a_pickle_or_torch_checkpoint_given_to_each_loader(saved, payloads, tmp_path, kind):
    path = payloads[kind]
    X, y = saved[1], saved[2]
    message = f"{path} is a file, not an nnpipe model directory"
    with pytest.raises(ValueError, match=message):
        nnpipe.load(path)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=message):
        NNClassifier(max_epochs=1, transfer_from=path).fit(X, y)
    with pytest.raises(ValueError, match=f"dirname='{path}' is a file"):
        NNClassifier(max_epochs=1, callbacks=[Checkpoint(path, load_best=True)]).fit(X, y)
    # a directory holding only a torch checkpoint is no nnpipe model
    only = tmp_path / "torch-dir"
    only.mkdir()
    shutil.copy(path, only / "model.pt")
    with pytest.raises(FileNotFoundError, match=f"{only} is not an nnpipe model directory"):
        nnpipe.load(only)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load_checkpoint(only)


def test_skorch_load_params_inherited_by_nnpipe_refuses_the_payload(saved, payloads):
    """skorch's own load_params (which nnpipe nets inherit) keeps torch's weights_only=True."""
    net = nnpipe.load(saved[0] / "net")
    with pytest.raises(pickle.UnpicklingError):  # torch: "Weights only load failed"
        net.load_params(f_params=payloads["pt"])


def test_manifests_naming_code_in_trusted_packages_are_refused(saved, payloads, tmp_path):
    """The trusted packages hold callables that run code (torch.load with weights_only=False,
    numpy.testing's runstring = exec); model.json must not get them called."""
    base = json.loads((saved[0] / "net" / "model.json").read_text())
    attacks = {
        "torch.serialization:load": {"criterion__f": str(payloads["pkl"]),
                                     "criterion__weights_only": False},
        "numpy.testing._private.utils:runstring": {"criterion__astr": "open('x', 'w')",
                                                   "criterion__dict": {}},
        "torch:load": {"criterion__f": str(payloads["pt"]), "criterion__weights_only": False},
        "torch.nn:Module.load_state_dict": {},
        "numpy:memmap": {"criterion__filename": str(tmp_path / "clobbered"),
                         "criterion__mode": "w+", "criterion__shape": [1]},
    }
    for i, (ref, extra) in enumerate(attacks.items()):
        directory = _copy(saved, "net", tmp_path / str(i))
        params = dict(base["params"], criterion={"__ref__": ref}, **extra)
        (directory / "model.json").write_text(json.dumps(dict(base, params=params)))
        with pytest.raises(UntrustedTypeError, match=f"{directory / 'model.json'}.*{ref!r}"):
            nnpipe.load(directory)
    assert not (tmp_path / "clobbered").exists()
    directory = _copy(saved, "net", tmp_path / "tlk")
    params = dict(base["params"], torch_load_kwargs={"weights_only": False})
    (directory / "model.json").write_text(json.dumps(dict(base, params=params)))
    with pytest.raises(UntrustedTypeError, match="torch_load_kwargs"):
        nnpipe.load(directory)


def test_legitimate_references_still_load(saved, tmp_path):
    """The narrowing above keeps what nnpipe's parameters take: classes and init functions."""
    X, y = saved[1], saved[2]
    clf = NNClassifier(max_epochs=1, criterion=torch.nn.CrossEntropyLoss,
                       optimizer=torch.optim.SGD, activation=torch.nn.Tanh,
                       init=torch.nn.init.xavier_uniform_, random_state=0).fit(X, y)
    nnpipe.save(clf, tmp_path / "m")
    np.testing.assert_array_equal(nnpipe.load(tmp_path / "m").predict_proba(X),
                                  clf.predict_proba(X))


@pytest.mark.parametrize("kind", ["skops", "pkl", "pt"])
def test_pipeline_preprocessing_replaced(saved, payloads, tmp_path, kind):
    directory = _copy(saved, "pipe", tmp_path)
    bad = _replace_part(directory, "preprocess", payloads[kind].read_bytes())
    error = UntrustedTypeError if kind == "skops" else ValueError
    match = "runstring" if kind == "skops" else "is not a skops file"
    with pytest.raises(error, match=f"{bad}.*{match}"):
        nnpipe.load(directory)


@pytest.mark.parametrize("kind", ["skops", "pkl"])
def test_ensemble_meta_learner_replaced(saved, payloads, tmp_path, kind):
    directory = _copy(saved, "ens", tmp_path)
    bad = _replace_part(directory, "meta", payloads[kind].read_bytes())
    error = UntrustedTypeError if kind == "skops" else ValueError
    with pytest.raises(error, match=f"{bad}.*(runstring|is not a skops file)"):
        nnpipe.load(directory)


def test_ensemble_member_replaced(saved, payloads, tmp_path):
    directory = _copy(saved, "ens", tmp_path)
    member = directory / json.loads((directory / "model.json").read_text())["members"][0]
    bad = _replace_part(member, "weights", payloads["pt"].read_bytes())
    with pytest.raises(ValueError, match=f"{bad}.* is not a safetensors file"):
        nnpipe.load(directory)
    shutil.rmtree(member)  # the member directory replaced by a torch checkpoint
    member.mkdir()
    shutil.copy(payloads["pt"], member / "model.pt")
    with pytest.raises(FileNotFoundError, match=f"{member} is not an nnpipe model directory"):
        nnpipe.load(directory)


# --------------------------------------------------------------------------- data and config

def _npz_with_object_array(path: Path, marker: Path) -> Path:
    X = np.empty(4, dtype=object)
    X[:] = [_Payload(marker)] * 4
    np.savez(path, X=X, y=np.arange(4))
    return path


def test_datasets_with_object_arrays_or_pickles(payloads, marker, tmp_path):
    from nnpipe.data import load_dataset, read_dataset, save_dataset

    npz = _npz_with_object_array(tmp_path / "evil.npz", marker)
    with pytest.raises(ValueError, match=f"array 'X' in '{npz}' is an object array"):
        load_dataset("npz", path=npz)
    for kind in ("pkl", "pt"):
        with pytest.raises(ValueError, match=f"'{payloads[kind]}'"):
            load_dataset("npz", path=payloads[kind])
    good = tmp_path / "prepared"
    save_dataset(load_dataset("digits"), good)
    for source in (npz, payloads["pkl"], payloads["pt"]):
        shutil.copy(source, good / "train.npz")
        with pytest.raises(ValueError, match=f"read_dataset: '{good / 'train.npz'}' is not"):
            read_dataset(good)


def test_params_yaml_with_python_tags(marker, tmp_path):
    from nnpipe.config import ConfigError, load_config

    for tag in ("!!python/object/apply:os.system", "!!python/object/new:os.system"):
        params = tmp_path / "params.yaml"
        params.write_text(f"train:\n  lr: {tag} ['touch {marker}']\n")
        with pytest.raises(ConfigError, match=f"(?s){params}.*not valid YAML"):
            load_config(params)


# --------------------------------------------------------------------------- static scan

_BANNED = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load",
    "cloudpickle.loads", "joblib.load", "pandas.read_pickle", "marshal.load", "marshal.loads",
    "shelve.open", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
    "yaml.full_load_all", "numpy.lib.format.read_array",
}
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kwarg(call: ast.Call, name: str, position: int = None):
    """The keyword's AST node, or the positional one, or None; ``...`` when **kwargs hide it."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    if position is not None and len(call.args) > position:
        return call.args[position]
    return ... if any(kw.arg is None for kw in call.keywords) else None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, filename: str = "<string>") -> list:
    """``file:line: call`` for every unsafe deserialising call in ``source``."""
    tree = ast.parse(source, filename)
    aliases = {}  # local name -> fully qualified name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                    a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    aliases.setdefault("np", "numpy")
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = (aliases.get(head, head) + ("." + rest if rest else "")) if name else ""
        full = full.replace("numpy.lib.npyio.load", "numpy.load")
        bad = full in _BANNED
        if full in ("torch.load", "torch.serialization.load"):
            bad = not _is_const(_kwarg(node, "weights_only"), True)
        elif full == "numpy.load":
            allow = _kwarg(node, "allow_pickle", 2)
            bad = allow is ... or (allow is not None and not _is_const(allow, False))
        elif full in ("yaml.load", "yaml.load_all"):
            loader = _kwarg(node, "Loader", 1)
            bad = loader is None or loader is ... or _dotted(loader).split(".")[-1] \
                not in _SAFE_YAML_LOADERS
        elif full in ("skops.io.load", "skops.io.loads"):
            trusted = _kwarg(node, "trusted", 1)
            bad = _is_const(trusted, True) or trusted is ...
        if bad:
            hits.append((node.lineno, f"{filename}:{node.lineno}: {full}"))
    return [hit for _, hit in sorted(hits)]


def test_the_scanner_catches_planted_violations():
    planted = """\
import pickle, joblib, dill, cloudpickle, marshal, shelve
import numpy as np
import torch
import yaml
import skops.io as sio
from pickle import loads as _l
from torch import load as tload
pickle.load(f)                                  # 8
_l(b)                                           # 9
joblib.load("m.joblib")                         # 10
torch.load("m.pt")                              # 11
tload("m.pt", weights_only=False)               # 12
np.load("a.npy", allow_pickle=True)             # 13
np.load("a.npy", None, True)                    # 14
yaml.load(text)                                 # 15
yaml.unsafe_load(text)                          # 16
cloudpickle.loads(b)                            # 17
dill.load(f)                                    # 18
sio.load("m.skops", trusted=True)               # 19
torch.load("m.pt", **kwargs)                    # 20
yaml.load(text, Loader=yaml.UnsafeLoader)       # 21
pickle.Unpickler(f).load()                      # 22
marshal.loads(b)                                # 23
"""
    hits = unsafe_loads(planted, "planted.py")
    assert [int(h.split(":")[1]) for h in hits] == list(range(8, 24)), hits
    safe = """\
import numpy as np, torch, yaml, json
import skops.io as sio
torch.load("m.pt", weights_only=True)
np.load("a.npz", allow_pickle=False)
np.load("a.npz")
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
sio.loads(blob, trusted=["nnpipe.preprocessing.Centerer"])
json.loads(text)
model.load_state_dict(state)
"""
    assert unsafe_loads(safe) == []


def test_no_unsafe_deserialisation_in_nnpipe_or_pipelines():
    hits = []
    files = sorted((ROOT / "nnpipe").rglob("*.py")) + sorted((ROOT / "pipelines").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        hits += unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))
    assert hits == [], "unsafe deserialisation:\n" + "\n".join(hits)

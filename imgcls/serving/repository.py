"""The models a server holds: one file, or a folder laid out like Triton's model repository

    REPO/<name>/<version>/model.{onnx,tflite,torchscript.pt,pt}     (version: a positive integer)

and which version answers a request: the one it names, else the traffic split of its model
(`NAME=1:0.9,2:0.1`, deterministic per request id), else the highest version.

`scan()` loads what is new in the folder. A version is servable only once it loaded and gave
finite logits of the right shape on a blank input; a broken one is refused (with the reason, in
`index()` and one log line) while the others keep serving, and retried when its file changes.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls.inference import TORCHSCRIPT_SUFFIX, Predictor

log = logging.getLogger("imgcls.serve")
MODEL_FILES = ("model.onnx", "model.tflite", "model" + TORCHSCRIPT_SUFFIX, "model.pt")


class NotFound(LookupError):
    """An unknown model or version (404)."""


@dataclass
class ModelVersion:
    name: str
    version: str
    path: str
    model: Predictor
    serving: object = None  # what the app attaches: batcher, monitor (imgcls/serving/app.py)

    @property
    def meta(self) -> dict:
        return self.model.meta


@dataclass
class Refusal:
    path: str
    stamp: tuple
    reason: str


def model_name(path: str) -> str:
    """A single file's default name: its stem (best.onnx, best.torchscript.pt -> best)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (TORCHSCRIPT_SUFFIX, ".onnx", ".tflite", ".pt"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def parse_traffic(specs: list[str]) -> dict[str, dict[str, float]]:
    """["NAME=1:0.9,2:0.1", ...] -> {NAME: {"1": 0.9, "2": 0.1}}; a ValueError naming the spec."""
    split = {}
    for spec in specs:
        name, _, weights = spec.partition("=")
        try:
            pairs = [part.split(":") for part in weights.split(",")]
            split[name] = {str(int(v)): float(w) for v, w in pairs}
        except ValueError:
            raise ValueError(f"--traffic {spec!r}: expected NAME=VERSION:WEIGHT,VERSION:WEIGHT") from None
        if not name or any(w < 0 for w in split[name].values()) or sum(split[name].values()) <= 0:
            raise ValueError(f"--traffic {spec!r}: needs a model name and weights >= 0 that sum above 0")
    return split


def share(request_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by the request id (so a client sticks to its version), random without one."""
    if not request_id:
        return random.random()
    return int.from_bytes(hashlib.sha256(f"{salt}/{request_id}".encode()).digest()[:8], "big") / 2**64


def smoke_test(model: Predictor) -> None:
    """Finite logits, one per class, on a blank input of the model's shape."""
    image, classes = model.meta["image"], len(model.meta["classes"])
    logits = model(np.zeros((1, image["channels"], image["height"], image["width"]), np.float32))
    if logits.shape != (1, classes) or not np.isfinite(logits).all():
        raise ValueError(f"gives logits of shape {logits.shape} (finite: {np.isfinite(logits).all()}) "
                         f"on a blank image; expected (1, {classes})")


@dataclass
class Repository:
    """Model versions by name, from `source` (a model file or URL, or a repository folder)."""
    source: str
    load: Callable[[str], Predictor]
    name: str = ""                   # a single file's model name (default: its stem)
    traffic: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)     # name -> {version: ModelVersion}
    refused: dict = field(default_factory=dict)    # (name, version) -> Refusal

    @property
    def is_folder(self) -> bool:
        return "://" not in self.source and Path(self.source).is_dir()

    def candidates(self) -> dict[tuple[str, str], str]:
        """(name, version) -> model file, as the source lays them out now."""
        if not self.is_folder:
            return {(self.name or model_name(self.source), "1"): self.source}
        found = {}
        for version_dir in sorted(Path(self.source).glob("*/*")):
            if version_dir.is_dir() and version_dir.name.isdigit() and int(version_dir.name) > 0:
                files = [version_dir / f for f in MODEL_FILES if (version_dir / f).is_file()]
                if files:
                    found[(version_dir.parent.name, str(int(version_dir.name)))] = str(files[0])
        return found

    def scan(self) -> list[ModelVersion]:
        """Load the versions that are new (or whose refused file changed); returns those loaded."""
        loaded = []
        for (name, version), path in self.candidates().items():
            if version in self.models.get(name, {}):
                continue
            stamp = _stamp(path)
            old = self.refused.get((name, version))
            if old and old.stamp == stamp:
                continue
            try:
                model = self.load(path)
                smoke_test(model)
            except Exception as e:  # noqa: BLE001 - any failure refuses this version only
                reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                self.refused[(name, version)] = Refusal(path, stamp, reason)
                log.warning("refused model %s version %s (%s): %s", name, version, path, reason)
                continue
            self.refused.pop((name, version), None)
            loaded.append(ModelVersion(name, version, path, model))
        return loaded

    def add(self, version: ModelVersion) -> None:
        self.models.setdefault(version.name, {})[version.version] = version
        log.warning("serving model %s version %s (%s, %s)", version.name, version.version, version.path,
                    version.model.kind)

    def versions(self) -> list[ModelVersion]:
        return [v for versions in self.models.values() for v in versions.values()]

    def default_name(self) -> str:
        return next(iter(self.models))

    def pick(self, name: str, version: str = "", request_id: str = "") -> ModelVersion:
        """The version that answers: the one named, else the traffic split, else the highest."""
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"unknown model {name!r}; served: {', '.join(self.models) or 'none'}")
        if version:
            if version not in versions:
                raise NotFound(f"model {name!r} has no servable version {version!r}; "
                               f"servable: {', '.join(sorted(versions, key=int))}")
            return versions[version]
        weights = {v: w for v, w in self.traffic.get(name, {}).items() if v in versions and w > 0}
        if not weights:
            return versions[max(versions, key=int)]
        point, total = share(request_id, name) * sum(weights.values()), 0.0
        for v, w in sorted(weights.items(), key=lambda item: int(item[0])):
            total += w
            if point < total:
                return versions[v]
        return versions[v]

    def index(self) -> list[dict]:
        """Triton's repository index: every version found, READY or UNAVAILABLE with the reason."""
        rows = [{"name": v.name, "version": v.version, "state": "READY"} for v in self.versions()]
        rows += [{"name": n, "version": v, "state": "UNAVAILABLE", "reason": r.reason}
                 for (n, v), r in self.refused.items()]
        return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def _stamp(path: str) -> tuple:
    try:
        stat = Path(path).stat()
        return stat.st_mtime_ns, stat.st_size
    except OSError:
        return ()

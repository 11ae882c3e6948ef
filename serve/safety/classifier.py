"""Stage 9's classifier: images in, scores per category out (0..1, higher is surer).
What a score means for an image (allow, review, blur, withhold) is the policy's
business (images.py), not the classifier's, so pointing the service at another model
is one class with `classify`.

Shipped: NudeNet's detector (the ONNX model bundled in the `nudenet` wheel, run here
by onnxruntime on the CPU; the `safety` extra: its wheel carries AGPL-3.0 licence
text although its metadata says MIT, README § Safety), and a fixed-score classifier
for threshold tests and drills. `load_classifier` reads the `image_classifier`
setting: `nudenet`, `fixed:CATEGORY=SCORE,...`, `none`, or `module:attribute` naming
a class (or factory) of your own.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import ConfigError

Scores = dict[str, float]


class Classifier(Protocol):
    name: str  # recorded with every case, for tuning

    def classify(self, images: list[np.ndarray]) -> list[Scores]:
        """One score per category for each HxWx3 uint8 image (blocking; CPU bound)."""
        ...


class Classifying(Protocol):
    """What the request path awaits: a classifier in its own deployment (a Serve
    handle, deployments/safety.py) or in this process (LocalClassifier)."""

    name: str

    async def classify(self, images: list[np.ndarray]) -> list[Scores]: ...


class LocalClassifier:
    """A classifier run in this process, on a thread of its own (onnxruntime releases
    the GIL while it runs)."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.name = classifier.name
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="image-classifier")

    async def classify(self, images: list[np.ndarray]) -> list[Scores]:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self.classifier.classify, images)


class ClassifierUnavailable(RuntimeError):
    """The classifier cannot run (not installed, its model missing or failing)."""


# NudeNet 3.4's detector labels (the model's class order) -> the categories it backs.
# An image's category score is its most confident detection of any of its labels.
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
NUDENET_CATEGORIES = {
    "sexual": ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_EXPOSED",
               "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED"),
    "suggestive": ("FEMALE_GENITALIA_COVERED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
                   "BUTTOCKS_COVERED"),
}


class NudeNet:
    """NudeNet's 320n detector (YOLOv8n, 320x320 input). Its own `detect` runs a
    Python loop over 2,100 anchors and non-maximum suppression for boxes; a verdict
    needs only each label's best score, one vectorised max. The input is prepared as
    NudeNet does (padded square at the bottom right, resized, 0..1 RGB)."""

    size = 320

    def __init__(self, threads: int = 1, model_path: str | Path | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ClassifierUnavailable("image classifier nudenet needs the safety extra: "
                                        "pip install 'imagegen[safety]'") from None
        path = Path(model_path) if model_path else _nudenet_model()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            raise ClassifierUnavailable(f"image classifier model {path}: {e}") from None
        self.input = self.session.get_inputs()[0].name
        self.name = f"nudenet-{path.stem}"
        index = {label: i for i, label in enumerate(NUDENET_LABELS)}
        self._columns = {c: [index[label] for label in labels]
                         for c, labels in NUDENET_CATEGORIES.items()}

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = image.shape[:2]
        side = max(h, w)
        square = np.zeros((side, side, 3), np.uint8)
        square[:h, :w] = image[..., :3]
        resized = Image.fromarray(square).resize((self.size, self.size), Image.BILINEAR)
        return (np.asarray(resized, np.float32) / 255.0).transpose(2, 0, 1)

    def classify(self, images: list[np.ndarray]) -> list[Scores]:
        if not images:
            return []
        batch = np.stack([self._prepare(i) for i in images])
        # (batch, 4 box + 18 label scores, anchors) -> each label's best anchor
        best = self.session.run(None, {self.input: batch})[0][:, 4:, :].max(axis=2)
        return [{c: round(float(row[cols].max()), 4) for c, cols in self._columns.items()}
                for row in best]


def _nudenet_model() -> Path:
    # Found without importing the package: its __init__ imports OpenCV, unused here.
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        raise ClassifierUnavailable("image classifier nudenet needs the safety extra: "
                                    "pip install 'imagegen[safety]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "320n.onnx"
    if not path.is_file():
        raise ClassifierUnavailable(f"image classifier nudenet: no model at {path}")
    return path


class FixedScores:
    """The same scores for every image: threshold tests and drills."""

    def __init__(self, scores: Scores) -> None:
        self.scores = dict(scores)
        self.name = "fixed"

    def classify(self, images: list[np.ndarray]) -> list[Scores]:
        return [dict(self.scores) for _ in images]


def load_classifier(spec: str, threads: int = 1) -> Classifier | None:
    """The `image_classifier` setting -> a classifier (None for `none`).
    ClassifierUnavailable if it cannot run; ConfigError for a spec that names none."""
    if spec == "none":
        return None
    if spec == "nudenet":
        return NudeNet(threads)
    if spec.startswith("fixed:"):
        return FixedScores(parse_fixed(spec))
    return load_attribute(spec, "image_classifier")()


def load_attribute(spec: str, setting: str):
    """`module:attribute` -> that attribute; ConfigError naming the setting if it is
    none."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"{setting} {spec!r}: use module:attribute"
                          + (" (or nudenet, none, fixed:CATEGORY=SCORE,...)"
                             if setting == "image_classifier" else ""))
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{setting} {spec!r}: {e}") from None


def check_spec(spec: str) -> None:
    """ConfigError for an image_classifier setting that can never work (at start;
    the model itself loads where it runs)."""
    if spec in ("none", "nudenet"):
        return
    if spec.startswith("fixed:"):
        parse_fixed(spec)
    else:
        load_attribute(spec, "image_classifier")


def parse_fixed(spec: str) -> Scores:
    scores: Scores = {}
    for part in filter(None, spec.removeprefix("fixed:").split(",")):
        name, _, value = part.partition("=")
        try:
            score = float(value)
        except ValueError:
            score = -1.0
        if not name or not 0 <= score <= 1:
            raise ConfigError(f"image_classifier {spec!r}: {part!r} is not CATEGORY=SCORE "
                              "with a score in 0..1")
        scores[name.strip()] = score
    return scores

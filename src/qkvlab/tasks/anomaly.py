"""Set anomaly detection, "odd one out" (PAPER.md 2.2, Table 3's Anomaly column), as a trainer task.

Each example is a set of ``set_size`` image feature vectors: ``set_size - 1`` images of one
class and one image of another, at a random position. A permutation-equivariant
:class:`~qkvlab.models.SetEncoder` (no positions) scores every element; the loss is the
cross-entropy of the scores over the set against the odd element, and ``val_acc`` is the
share of held-out sets whose top score is the odd element (chance: ``1 / set_size``).

Features. The paper encodes images with a frozen ImageNet-pretrained ResNet34, which no
machine of this project can download. By default this task instead trains a small CNN
(:class:`SmallCNN`) on a disjoint part of the training images (``backbone_fraction`` of
each class; those images never appear in a set) and uses its penultimate features. Any
local backbone works as well: ``backbone`` may name a TorchScript file or a state dict
(``.safetensors``, or a ``torch.save`` file read with ``weights_only=True``: never
unpickled) of ``backbone_arch`` ``cnn``, ``resnet18`` or ``resnet34`` (the ResNets need
torchvision). Loading a TorchScript file runs the code compiled into it, by design: name only
a file you trust (a state dict is read without running code; see docs/trust.md). Features are
computed once and cached on disk under a key that hashes the data, the backbone and its
settings; ``info()["task"]["features"]`` records which extractor was used, so a report can
say so.

The task section of a train config::

    task:
      name: anomaly
      dataset: cifar10          # any dataset of qkvlab.data.vision (path: to override its location)
      set_size: 10              # 9 normal + 1 odd; chance accuracy 1/set_size
      n_train_sets: 10000       # fixed pool of training sets from the training images
      n_test_sets: 2000         # fixed held-out sets from the test split
      backbone: cnn             # or a TorchScript (runs its code: trusted files only) / state-dict path
      backbone_arch: cnn        # architecture of a state dict: cnn, resnet18, resnet34
      backbone_fraction: 0.5    # share of each class's training images that trains the CNN
      backbone_epochs: 10
      backbone_width: 32        # CNN width; features are 4 * width wide
      backbone_image_size: null # resize images for a checkpoint backbone (e.g. 224)
      backbone_normalize: null  # 'dataset' or 'imagenet'; default: dataset for cnn, imagenet otherwise
      epochs: 20                # passes over the training sets (else max_tokens in sets, else max_steps);
                                #   when set, max_steps is not used and max_tokens is an error
      seed: 0                   # data seed: splits, sets and the CNN's training
      cache_dir: null           # default $QKVLAB_CACHE

The ``model`` section holds :class:`~qkvlab.models.SetConfig` fields (``in_features`` comes
from the backbone). The 2D positional fix (the paper's "+" rows) breaks permutation
equivariance, so it is refused unless ``model.allow_pos2d: true`` opts in.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qkvlab.checkpoint import atomic_write
from qkvlab.data import vision as vdata
from qkvlab.errors import ConfigError, check_keys
from qkvlab.models.config import SetConfig
from qkvlab.tasks.common import ExampleTask, as_int, build_config, model_fields, task_epochs
from qkvlab.train.context import RunContext
from qkvlab.train.evaluation import evaluate_classifier

TASK_KEYS = (
    "name",
    "dataset",
    "path",
    "set_size",
    "n_train_sets",
    "n_test_sets",
    "backbone",
    "backbone_arch",
    "backbone_fraction",
    "backbone_epochs",
    "backbone_width",
    "backbone_image_size",
    "backbone_normalize",
    "epochs",
    "seed",
    "cache_dir",
)
ARCHS = ("cnn", "resnet18", "resnet34")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FEATURE_CACHE_VERSION = 1


@dataclass(frozen=True)
class AnomalySettings:
    """The validated ``task`` section of an anomaly run."""

    dataset: str = "cifar10"
    path: str | None = None
    set_size: int = 10
    n_train_sets: int = 10_000
    n_test_sets: int = 2_000
    backbone: str = "cnn"
    backbone_arch: str = "cnn"
    backbone_fraction: float = 0.5
    backbone_epochs: int = 10
    backbone_width: int = 32
    backbone_image_size: int | None = None
    backbone_normalize: str = "dataset"
    epochs: float | None = None
    seed: int = 0
    cache_dir: str | None = None

    @classmethod
    def from_train_config(cls, config) -> AnomalySettings:
        task = dict(config.task)
        check_keys("task", task, TASK_KEYS)
        dataset = task.get("dataset", cls.dataset)
        if dataset not in vdata.DATASET_NAMES:
            raise ConfigError(
                f"task.dataset={dataset!r} is not a dataset; use one of {', '.join(vdata.DATASET_NAMES)}."
            )
        if dataset == "folder" and not task.get("path"):
            raise ConfigError(
                "task.dataset=folder needs task.path: a folder or zip of <split>/<class>/*.jpg|png images."
            )
        backbone = task.get("backbone", "cnn")
        if not isinstance(backbone, str) or not backbone:
            raise ConfigError(f"task.backbone must be 'cnn' or the path of a checkpoint file, got {backbone!r}.")
        if backbone != "cnn" and not Path(backbone).expanduser().is_file():
            raise ConfigError(
                f"task.backbone={backbone!r}: no such file. Give 'cnn' (train a small CNN here) or the path of a "
                "TorchScript or state-dict checkpoint."
            )
        arch = task.get("backbone_arch", "cnn")
        if arch not in ARCHS:
            raise ConfigError(f"task.backbone_arch must be one of {', '.join(ARCHS)}, got {arch!r}.")
        fraction = task.get("backbone_fraction", cls.backbone_fraction)
        if backbone == "cnn" and (
            isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1
        ):
            raise ConfigError(
                f"task.backbone_fraction must be in (0, 1): the share of training images that trains the CNN, "
                f"got {fraction!r}."
            )
        normalize = task.get("backbone_normalize") or ("dataset" if backbone == "cnn" else "imagenet")
        if normalize not in ("dataset", "imagenet"):
            raise ConfigError(f"task.backbone_normalize must be 'dataset' or 'imagenet', got {normalize!r}.")
        set_size = as_int("set_size", task.get("set_size", cls.set_size), 2)
        epochs = task_epochs(task.get("epochs"), config, dataset)
        cache_dir = task.get("cache_dir")
        return cls(
            dataset=dataset,
            path=task.get("path"),
            set_size=set_size,
            n_train_sets=as_int("n_train_sets", task.get("n_train_sets", cls.n_train_sets), 1),
            n_test_sets=as_int("n_test_sets", task.get("n_test_sets", cls.n_test_sets), 1),
            backbone=backbone,
            backbone_arch=arch,
            backbone_fraction=float(fraction) if backbone == "cnn" else 0.0,
            backbone_epochs=as_int("backbone_epochs", task.get("backbone_epochs", cls.backbone_epochs), 1),
            backbone_width=as_int("backbone_width", task.get("backbone_width", cls.backbone_width), 1),
            backbone_image_size=as_int("backbone_image_size", task.get("backbone_image_size"), 1, optional=True),
            backbone_normalize=normalize,
            epochs=epochs,
            seed=as_int("seed", task.get("seed", 0), 0),
            cache_dir=None if cache_dir is None else str(cache_dir),
        )


# ================================================================== sets
def check_set_size(labels: np.ndarray, n_classes: int, set_size: int, where: str) -> None:
    """Every class needs ``set_size - 1`` images for a set of its own, and two classes must exist."""
    counts = np.bincount(labels, minlength=n_classes)
    present = int((counts > 0).sum())
    if present < 2:
        raise ConfigError(
            f"The {where} has images of {present} class(es); an odd-one-out set needs two classes. Use a dataset "
            "with at least two classes."
        )
    need = set_size - 1
    low = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
    if counts[low] < need:
        raise ConfigError(
            f"task.set_size={set_size} needs {need} images of every class in the {where}, but class {low} has only "
            f"{int(counts[low])}: the limit here is set_size <= {int(counts[low]) + 1}. Lower task.set_size, or give "
            "each class more images (e.g. a lower backbone_fraction)."
        )


def make_sets(
    labels: np.ndarray, n_sets: int, set_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n_sets`` odd-one-out sets over items with ``labels``.

    Returns item indices ``(n_sets, set_size)`` and the odd element's position ``(n_sets,)``:
    ``set_size - 1`` distinct items of a normal class and one item of another class.
    """
    classes = np.unique(labels)
    by_class = {int(c): np.flatnonzero(labels == c) for c in classes}
    normal_ok = np.array([c for c in classes if len(by_class[int(c)]) >= set_size - 1])
    sets = np.empty((n_sets, set_size), dtype=np.int64)
    odd_pos = rng.integers(0, set_size, size=n_sets)
    for i in range(n_sets):
        normal = int(rng.choice(normal_ok))
        odd = int(rng.choice(classes[classes != normal]))
        members = rng.choice(by_class[normal], size=set_size - 1, replace=False)
        sets[i] = np.insert(members, odd_pos[i], rng.choice(by_class[odd]))
    return sets, odd_pos.astype(np.int64)


# ================================================================== feature extractors
class SmallCNN(nn.Module):
    """A small VGG-style CNN: three stages of two 3x3 convs (widths w, 2w, 4w), global average
    pooling, a linear classifier. ``features(x)`` is the ``4w``-wide penultimate layer."""

    def __init__(self, channels: int, n_classes: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for i, c in enumerate((width, 2 * width, 4 * width)):
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
            if i < 2:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width, n_classes)
        self.feature_dim = 4 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_input(images: np.ndarray | torch.Tensor, mean, std, size: int | None, device) -> torch.Tensor:
    x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[1] == 1 and len(mean) == 3:
        x = x.expand(-1, 3, -1, -1)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (x - m) / s


def train_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    s: AnomalySettings,
    mean,
    std,
    device,
    *,
    progress: bool = False,
) -> tuple[SmallCNN, dict[str, Any]]:
    """Train :class:`SmallCNN` on ``images`` (AdamW, one-cycle schedule, flips for colour images);
    ``progress`` shows a bar of its steps with the epoch and its mean loss so far.

    A loop of its own, not the :class:`~qkvlab.train.trainer.Trainer`: the CNN is trained while
    the task is built, before the trainer has a model or a run folder, and its features are the
    task's data, cached under a hash of these settings. It needs what the trainer does not do
    (BatchNorm statistics, a one-cycle schedule, flips drawn from the generator that orders the
    epochs), and drawing the order from :class:`~qkvlab.train.batches.ExampleBatches` instead
    would change every feature already cached. Its evaluation is the shared one.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(s.seed)
        model = SmallCNN(images.shape[-1], n_classes, s.backbone_width).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
        batch = 128
        steps_per_epoch = math.ceil(len(images) / batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=2e-3, total_steps=s.backbone_epochs * steps_per_epoch, pct_start=0.15
        )
        rng = np.random.default_rng([s.seed, 0xC22])
        flip = images.shape[-1] == 3
        model.train()
        losses: list[float] = []
        bar = tqdm(
            total=s.backbone_epochs * steps_per_epoch,
            desc="backbone CNN",
            unit="step",
            dynamic_ncols=True,
            disable=not progress,
        )
        for epoch in range(s.backbone_epochs):
            losses = []
            order = rng.permutation(len(images))
            for i in range(0, len(images), batch):
                idx = order[i : i + batch]
                x = _to_input(images[idx], mean, std, None, device)
                if flip:
                    x = torch.where(
                        torch.from_numpy(rng.random(len(idx)) < 0.5).to(device).view(-1, 1, 1, 1), x.flip(-1), x
                    )
                y = torch.from_numpy(labels[idx]).to(device)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                if progress:
                    bar.set_postfix(
                        epoch=f"{epoch + 1}/{s.backbone_epochs}", loss=f"{np.mean(losses):.4f}", refresh=False
                    )
                    bar.update(1)
        bar.close()
    model.eval()
    return model, {"last_epoch_loss": float(np.mean(losses)), "train_images": len(images), "epochs": s.backbone_epochs}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def load_backbone(s: AnomalySettings, device) -> tuple[Any, str]:
    """A local backbone checkpoint as ``fn(x) -> (B, F)`` features, and a description of it."""
    path = Path(s.backbone).expanduser()
    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"Cannot load TorchScript backbone {str(path)!r}: {e}".split("\n")[0]) from None
        module.eval()
        return (lambda x: module(x).flatten(1)), f"torchscript:{path.name}"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable or disallowed content is a user-facing error
        raise ConfigError(
            f"Cannot load backbone state dict {str(path)!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "give a .safetensors file, a torch.save'd state dict of tensors, or a TorchScript file."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{str(path)!r} does not hold a state dict of tensors; save model.state_dict() instead.")
    if s.backbone_arch == "cnn":
        if "head.weight" not in state or "body.0.weight" not in state:
            raise ConfigError(
                f"{str(path)!r} is not a SmallCNN state dict (no head.weight / body.0.weight); set "
                "task.backbone_arch to the architecture it was saved from (cnn, resnet18, resnet34)."
            )
        n_classes, feat = state["head.weight"].shape
        model = SmallCNN(state["body.0.weight"].shape[1], n_classes, feat // 4)
    else:
        try:
            import torchvision
        except ImportError:
            raise ConfigError(
                f"task.backbone_arch={s.backbone_arch!r} needs torchvision, which is not installed; install it, or "
                "export the backbone as TorchScript (then torchvision is not needed)."
            ) from None
        model = getattr(torchvision.models, s.backbone_arch)(weights=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(
            f"{str(path)!r} does not fit a {s.backbone_arch} ({str(e).splitlines()[0][:200]}); set "
            "task.backbone_arch to the architecture it was saved from."
        ) from None
    if s.backbone_arch == "cnn":
        fn_model = model.to(device).eval()
        return fn_model.features, f"state_dict:{s.backbone_arch}:{path.name}"
    model.fc = nn.Identity()
    model = model.to(device).eval()
    return model, f"state_dict:{s.backbone_arch}:{path.name}"


@torch.no_grad()
def extract(
    fn, images: np.ndarray, mean, std, size: int | None, device, batch: int = 256, *, progress: str | None = None
) -> np.ndarray:
    """``fn``'s features of ``images`` in batches; ``progress``: the label of a bar over them (None: no bar)."""
    starts = range(0, len(images), batch)
    bar = tqdm(starts, desc=progress, unit="batch", dynamic_ncols=True, disable=progress is None)
    out = [fn(_to_input(images[i : i + batch], mean, std, size, device)).float().cpu() for i in bar]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


@dataclass
class SetFeatures:
    """Per-image features for the set pools: ``train_*`` builds training sets, ``test_*`` test sets."""

    train_features: np.ndarray
    train_labels: np.ndarray
    test_features: np.ndarray
    test_labels: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def compute_features(
    s: AnomalySettings, device, ds: vdata.ImageDataset | None = None, *, progress: bool = False
) -> SetFeatures:
    """Features of the set images, from the disk cache when it has them.

    ``progress`` reports what is done (a line, then bars for the CNN's training and for the
    feature extraction), as the trainer reports its own loop.
    """
    ds = ds if ds is not None else vdata.load_dataset(s.dataset, s.path, cache_dir=s.cache_dir)
    if len(ds.test_images) == 0:
        raise ConfigError(f"{ds.meta.get('path')!r} has no test split; the anomaly task draws its test sets from it.")
    backbone_hash = "cnn" if s.backbone == "cnn" else vdata.hash_files([Path(s.backbone).expanduser()])
    spec = {
        "version": FEATURE_CACHE_VERSION,
        "data": ds.meta.get("fingerprint"),
        "backbone": backbone_hash,
        "arch": s.backbone_arch,
        "fraction": s.backbone_fraction,
        "epochs": s.backbone_epochs,
        "width": s.backbone_width,
        "size": s.backbone_image_size,
        "normalize": s.backbone_normalize,
        "seed": s.seed,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(s.cache_dir).expanduser() if s.cache_dir else vdata.default_image_cache().parent
    folder = root / "anomaly-features" / key
    names = ("train_features", "train_labels", "test_features", "test_labels")

    def say(message: str) -> None:
        if progress:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    if (folder / "meta.json").is_file():
        try:
            info = json.loads((folder / "meta.json").read_text())
            arrays = [np.load(folder / f"{n}.npy", allow_pickle=False) for n in names]
            say(f"anomaly: image features from the cache {folder}")
            return SetFeatures(*arrays, {**info, "cache": str(folder), "cache_hit": True})
        except (OSError, ValueError):
            pass  # rebuilt below

    c = ds.image_shape[2]
    if s.backbone_normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        flat = ds.train_images.reshape(-1, c).astype(np.float64) / 255
        mean, std = tuple(flat.mean(0)), tuple(np.maximum(flat.std(0), 1e-3))
    train_x, train_y = ds.train_images, ds.train_labels
    info: dict[str, Any] = {"dataset": s.dataset, "source": ds.meta, "normalize": s.backbone_normalize}
    if s.backbone == "cnn":
        rng = np.random.default_rng([s.seed, 0xBAC])
        to_cnn = np.zeros(len(train_y), dtype=bool)
        for cls in np.unique(train_y):  # the same share of every class
            idx = rng.permutation(np.flatnonzero(train_y == cls))
            to_cnn[idx[: round(s.backbone_fraction * len(idx))]] = True
        say(
            f"anomaly: training the backbone CNN on {int(to_cnn.sum()):,} images for {s.backbone_epochs} epochs, then "
            f"extracting the set features (once: cached in {folder})"
        )
        cnn, stats = train_cnn(train_x[to_cnn], train_y[to_cnn], ds.n_classes, s, mean, std, device, progress=progress)
        say("anomaly: scoring the backbone CNN on the test images")
        scores = evaluate_classifier(
            cnn,
            ds.test_images,
            ds.test_labels,
            batch_size=256,
            ctx=RunContext(device=device),
            count_key="test_images",
            forward=lambda x: cnn(_to_input(x, mean, std, None, device)),
        )
        stats["test_acc"] = scores["val_acc"]
        fn = cnn.features
        train_x, train_y = train_x[~to_cnn], train_y[~to_cnn]
        info["extractor"] = {
            "kind": "cnn",
            "description": f"SmallCNN (width {s.backbone_width}) trained here on {int(to_cnn.sum())} training images "
            f"disjoint from the sets; penultimate {cnn.feature_dim}-d features",
            **stats,
        }
        weights = {k: v.detach().cpu().contiguous() for k, v in cnn.state_dict().items()}
    else:
        fn, desc = load_backbone(s, device)
        info["extractor"] = {"kind": desc.split(":")[0], "description": desc, "path": str(Path(s.backbone).resolve())}
        weights = None
        say(f"anomaly: extracting the set features with {desc} (once: cached in {folder})")
    size = s.backbone_image_size
    feats_train = extract(fn, train_x, mean, std, size, device, progress="train features" if progress else None)
    feats_test = extract(fn, ds.test_images, mean, std, size, device, progress="test features" if progress else None)
    info["feature_dim"] = int(feats_train.shape[1])
    info["classes"] = list(ds.classes)
    out = SetFeatures(feats_train, train_y.astype(np.int64), feats_test, ds.test_labels.astype(np.int64), info)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for n in names:
            array = getattr(out, n)
            atomic_write(folder / f"{n}.npy", lambda p, a=array: vdata.save_npy(p, a))
        if weights is not None:
            from safetensors.torch import save_file

            atomic_write(folder / "backbone.safetensors", lambda p: save_file(weights, p))
        atomic_write(folder / "meta.json", lambda p: Path(p).write_text(json.dumps(info, default=str)))
    except OSError as e:
        raise ConfigError(
            f"Cannot write the feature cache in {str(folder)!r}: {e.strerror or e}; set task.cache_dir to a "
            "writable folder."
        ) from None
    out.info.update({"cache": str(folder), "cache_hit": False})
    return out


# ================================================================== the task
class AnomalyTask(ExampleTask):
    """Odd-one-out over sets of image features (see the module docstring)."""

    metric_keys = ("val_loss", "val_acc")

    def __init__(self, config, features: SetFeatures | None = None, *, device=None, progress: bool = False):
        """``progress``: report the backbone's training and the feature extraction (see :func:`compute_features`)."""
        self.config = config
        self.settings = s = AnomalySettings.from_train_config(config)
        if features is None:
            features = compute_features(s, device or torch.device("cpu"), progress=progress)
        self.features = features
        f = self.features
        n_classes = int(max(f.train_labels.max(), f.test_labels.max())) + 1
        check_set_size(f.train_labels, n_classes, s.set_size, "part of the training split that builds sets")
        check_set_size(f.test_labels, n_classes, s.set_size, "test split")
        mean = f.train_features.mean(0, keepdims=True)
        std = f.train_features.std(0, keepdims=True) + 1e-6
        self.train_feats = torch.from_numpy(((f.train_features - mean) / std).astype(np.float32))
        self.test_feats = torch.from_numpy(((f.test_features - mean) / std).astype(np.float32))
        rng = np.random.default_rng([s.seed, 0x5E7])
        self.train_sets, self.train_odd = make_sets(f.train_labels, s.n_train_sets, s.set_size, rng)
        self.test_sets, self.test_odd = make_sets(f.test_labels, s.n_test_sets, s.set_size, rng)
        self.model_cfg = self.model_config(config, in_features=int(self.train_feats.shape[1]))

    # ------------------------------------------------------------- config
    @classmethod
    def check_config(cls, config) -> None:
        AnomalySettings.from_train_config(config)
        if cls.model_config(config) is None:
            build_config(SetConfig, {**model_fields(config, SetConfig), "in_features": 1}, "anomaly")

    @classmethod
    def model_config(cls, config, in_features: int | None = None) -> SetConfig | None:
        """The set encoder this task trains; None when the feature width is not known before the
        backbone is loaded (a checkpoint backbone and no ``model.in_features``)."""
        s = AnomalySettings.from_train_config(config)
        fields = model_fields(config, SetConfig)
        if in_features is None and s.backbone == "cnn":
            in_features = 4 * s.backbone_width
        if in_features is not None:
            if fields.get("in_features", in_features) != in_features:
                raise ConfigError(
                    f"model.in_features={fields['in_features']!r} but the backbone gives {in_features}-d features; "
                    "remove model.in_features (it comes from the backbone)."
                )
            fields["in_features"] = in_features
        elif "in_features" not in fields:
            return None
        return build_config(SetConfig, fields, "anomaly")

    @classmethod
    def from_config(cls, config, ctx) -> AnomalyTask:
        # Process 0 computes (and caches) the features first; the others read the cache.
        if not ctx.is_main:
            ctx.barrier()
        task = cls(config, device=ctx.device, progress=ctx.is_main and config.log.progress)
        if ctx.is_main:
            ctx.barrier()
        return task

    # ------------------------------------------------------------- the Task protocol
    def train_examples(self):
        """The training sets (item indices) and the odd element's position in each; one example per set."""
        return self.train_sets, self.train_odd

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        sets, odd = batch
        if self.train_feats.device != sets.device:
            self.train_feats = self.train_feats.to(sets.device)
        return F.cross_entropy(model(self.train_feats[sets]).float(), odd)

    def evaluate(self, model: nn.Module, *, batch_size: int, max_batches: int, ctx) -> dict[str, float]:
        """Loss and odd-one-out accuracy over all ``n_test_sets`` test sets, summed over processes."""
        feats = self.test_feats.to(ctx.device)
        return evaluate_classifier(
            model,
            self.test_sets,
            self.test_odd,
            batch_size=batch_size,
            ctx=ctx,
            count_key="val_sets",
            forward=lambda sets: model(feats[sets]),
        )

    def info(self) -> dict[str, Any]:
        s, f = self.settings, self.features
        return {
            "task": {
                "name": "anomaly",
                "dataset": s.dataset,
                "set_size": s.set_size,
                "chance_acc": 1 / s.set_size,
                "n_train_sets": s.n_train_sets,
                "n_test_sets": s.n_test_sets,
                "train_pool_images": len(f.train_labels),
                "test_pool_images": len(f.test_labels),
                "features": f.info,
                "epochs": s.epochs,
                "seed": s.seed,
            },
            "model": self.model_cfg.to_dict(),
            "model_family": self.model_cfg.family,
        }

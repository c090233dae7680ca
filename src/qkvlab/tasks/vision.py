"""Image classification with a ViT (PAPER.md 2.2, Table 3) as a trainer :class:`~qkvlab.train.trainer.Task`.

A :class:`~qkvlab.models.ViT` built from ``config.model`` (variant, shape, ``patch_size``;
image size, channels and class count come from the data) is trained with cross-entropy;
evaluation covers the whole validation set: ``val_loss``, ``val_acc`` and ``val_images``.

The task section of a train config::

    task:
      name: vision
      dataset: mnist       # mnist, fashion-mnist, cifar10, cifar100, tinyimagenet, folder
      path: null           # where the data is (default: the dataset's usual folders; see
                           #   qkvlab.data.vision); required for dataset 'folder'
      n_train: null        # use a seeded random subset of this many training images
      n_test: null         # and of this many validation images
      val_split: test      # 'test' (the dataset's test split, as in the paper) or a fraction
                           #   of the training images held out instead
      normalize: dataset   # 'dataset': per-channel mean/std of the training images; 'none': x/255
      augment: false       # the paper trains without augmentation; true: random crop (pad 4),
                           #   plus horizontal flips for colour images
      epochs: 20           # budget in passes over the training images; or a mapping such as
                           #   {mnist: 20, cifar10: 40} read with the current dataset
      seed: 0              # data seed (subsets, held-out split), apart from the training seed
      cache_dir: null      # decoded-image cache (default $QKVLAB_CACHE/images)

The step budget is ``task.epochs`` (``ceil(epochs * n_train / (batch_size * grad_accum))``
steps) if set, else ``max_tokens`` counted in images, else ``max_steps``. With ``task.epochs``
set, ``max_tokens`` is an error and ``max_steps`` is not used (the config warns when it is set).

The ``model`` section holds :class:`~qkvlab.models.ViTConfig` fields plus an optional
``preset`` for the shape (its vocabulary and length are not used). Variants may use the 2D
positional fix, e.g. ``(Q=K-V)+``. ``image_size``, ``channels`` and ``n_classes`` may be
left out; if given they must match the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.data import vision as vdata
from qkvlab.errors import ConfigError, check_keys
from qkvlab.models.config import ViTConfig
from qkvlab.tasks.common import ExampleTask, as_int, build_config, model_fields, task_epochs
from qkvlab.train.evaluation import evaluate_classifier

TASK_KEYS = (
    "name",
    "dataset",
    "path",
    "n_train",
    "n_test",
    "val_split",
    "normalize",
    "augment",
    "epochs",
    "seed",
    "cache_dir",
)
NORMALIZE = ("dataset", "none")


@dataclass(frozen=True)
class VisionSettings:
    """The validated ``task`` section of a vision run."""

    dataset: str
    path: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    val_split: str | float = "test"
    normalize: str = "dataset"
    augment: bool = False
    epochs: float | None = None
    seed: int = 0
    cache_dir: str | None = None

    @classmethod
    def from_train_config(cls, config) -> VisionSettings:
        task = dict(config.task)
        check_keys("task", task, TASK_KEYS)
        dataset = task.get("dataset")
        if dataset not in vdata.DATASET_NAMES:
            raise ConfigError(
                f"task.dataset={dataset!r} is not a dataset; use one of {', '.join(vdata.DATASET_NAMES)}."
            )
        path = task.get("path")
        if path is not None and not isinstance(path, str):
            raise ConfigError(f"task.path must be a file or folder path, got {path!r}.")
        if dataset == "folder" and not path:
            raise ConfigError(
                "task.dataset=folder needs task.path: a folder or zip of <split>/<class>/*.jpg|png images."
            )
        val = task.get("val_split", "test")
        if val != "test" and (isinstance(val, bool) or not isinstance(val, int | float) or not 0 < val < 1):
            raise ConfigError(
                f"task.val_split must be 'test' or a fraction in (0, 1) of the training images, got {val!r}."
            )
        normalize = task.get("normalize", "dataset")
        if normalize not in NORMALIZE:
            raise ConfigError(f"task.normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}.")
        augment = task.get("augment", False)
        if not isinstance(augment, bool):
            raise ConfigError(f"task.augment must be true or false, got {augment!r}.")
        epochs = task_epochs(task.get("epochs"), config, dataset)
        cache_dir = task.get("cache_dir")
        return cls(
            dataset=dataset,
            path=path,
            n_train=as_int("n_train", task.get("n_train"), 1, optional=True),
            n_test=as_int("n_test", task.get("n_test"), 1, optional=True),
            val_split=val if val == "test" else float(val),
            normalize=normalize,
            augment=augment,
            epochs=epochs,
            seed=as_int("seed", task.get("seed", 0), 0),
            cache_dir=None if cache_dir is None else str(cache_dir),
        )


# ================================================================== data
@dataclass
class VisionData:
    """Training and validation images (``uint8`` ``(N, H, W, C)``), labels, class names and
    the per-channel normalisation (applied on the device, batch by batch)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train_x.shape[1:])  # type: ignore[return-value]


def _subset(n: int, limit: int | None, rng: np.random.Generator, key: str, what: str) -> np.ndarray:
    if limit is None:
        return np.arange(n)
    if limit > n:
        raise ConfigError(f"task.{key}={limit} but the {what} has only {n} images; lower task.{key} or remove it.")
    return np.sort(rng.permutation(n)[:limit])


def prepare_data(s: VisionSettings, ds: vdata.ImageDataset | None = None) -> VisionData:
    """Load the dataset (unless given), carve the validation split and subsets, compute the normalisation."""
    ds = ds if ds is not None else vdata.load_dataset(s.dataset, s.path, cache_dir=s.cache_dir)
    h, w, c = ds.image_shape
    if h != w:
        raise ConfigError(
            f"The ViT needs square images; {ds.meta.get('path')!r} holds {w}x{h} images. Crop or pad them."
        )
    rng = np.random.default_rng(s.seed)
    train_x, train_y = ds.train_images, ds.train_labels
    if s.val_split == "test":
        if len(ds.test_images) == 0:
            raise ConfigError(
                f"{ds.meta.get('path')!r} has no test split; set task.val_split to a fraction such as 0.1 to hold "
                "out part of the training images."
            )
        val_x, val_y = ds.test_images, ds.test_labels
    else:
        order = rng.permutation(len(train_x))
        n_val = min(len(train_x) - 1, max(1, round(s.val_split * len(train_x))))
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        val_x, val_y, train_x, train_y = train_x[val_idx], train_y[val_idx], train_x[train_idx], train_y[train_idx]
    keep = _subset(len(train_x), s.n_train, rng, "n_train", "training split")
    train_x, train_y = train_x[keep], train_y[keep]
    keep = _subset(len(val_x), s.n_test, rng, "n_test", "validation split")
    val_x, val_y = val_x[keep], val_y[keep]
    if s.normalize == "dataset":
        flat = train_x.reshape(-1, c)
        mean = flat.mean(0, dtype=np.float64) / 255
        std = np.maximum(np.sqrt((flat.astype(np.float64) ** 2).mean(0) / 255**2 - mean**2), 1e-3)
    else:
        mean, std = np.zeros(c), np.ones(c)
    return VisionData(
        np.ascontiguousarray(train_x),
        train_y,
        np.ascontiguousarray(val_x),
        val_y,
        list(ds.classes),
        mean,
        std,
        dict(ds.meta),
    )


class Normalizer:
    """``uint8`` ``(B, H, W, C)`` -> normalised float ``(B, C, H, W)`` on the batch's device."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        x = x.permute(0, 3, 1, 2).float().div_(255)
        return (x - self.mean) / self.std


class AugmentedBatches:
    """Random crops (zero padding ``pad``) and, if ``flip``, horizontal flips on top of a batch
    source. The draws depend only on ``(seed, global batch, rank)``, so resuming replays them."""

    def __init__(self, inner, *, seed: int, rank: int, flip: bool, pad: int = 4):
        self.inner, self.seed, self.rank, self.flip, self.pad = inner, seed, rank, flip, pad

    def next(self):
        rng = np.random.default_rng([self.seed, 0xA06, self.inner.batch, self.rank])
        x, y = self.inner.next()
        x = x.numpy()
        b, h, w, _ = x.shape
        p = self.pad
        padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        dy, dx = rng.integers(0, 2 * p + 1, size=(2, b))
        out = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
        if self.flip:
            flips = rng.random(b) < 0.5
            out[flips] = out[flips, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(out)), y

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


# ================================================================== the task
class VisionTask(ExampleTask):
    """A ViT classifier on one image dataset (see the module docstring)."""

    metric_keys = ("val_loss", "val_acc")

    def __init__(self, config, data: VisionData | None = None):
        self.config = config
        self.settings = VisionSettings.from_train_config(config)
        self.data = data if data is not None else prepare_data(self.settings)
        self.model_cfg = self.model_config(config, shape=(*self.data.shape, len(self.data.classes)))
        self.normalize = Normalizer(self.data.mean, self.data.std)

    # ------------------------------------------------------------- config
    @classmethod
    def check_config(cls, config) -> None:
        settings = VisionSettings.from_train_config(config)
        if cls.model_config(config) is None:  # shape unknown until the data is read: check the rest
            fields = model_fields(config, ViTConfig)
            patch = fields.get("patch_size", 4)
            fields = {"channels": 3, "n_classes": 2, **fields, "image_size": patch}
            build_config(ViTConfig, fields, f"vision ({settings.dataset})")

    @classmethod
    def model_config(cls, config, shape: tuple[int, int, int, int] | None = None) -> ViTConfig | None:
        """The ViT this task trains. ``shape`` is the data's ``(H, W, C, n_classes)``; without it a
        named dataset's known shape is used, and None is returned for a 'folder' dataset whose
        shape the model section does not give."""
        settings = VisionSettings.from_train_config(config)
        fields = model_fields(config, ViTConfig)
        if shape is None and settings.dataset in vdata.DATASETS:
            info = vdata.DATASETS[settings.dataset]
            shape = (info.image_size, info.image_size, info.channels, info.n_classes)
        if shape is None:
            if not all(k in fields for k in ("image_size", "channels", "n_classes")):
                return None
        else:
            want = {"image_size": shape[0], "channels": shape[2], "n_classes": shape[3]}
            for key, value in want.items():
                if key in fields and fields[key] != value:
                    raise ConfigError(
                        f"model.{key}={fields[key]!r} but the {settings.dataset} data has {key} {value}; "
                        f"remove model.{key} (it comes from the data)."
                    )
            fields.update(want)
        return build_config(ViTConfig, fields, f"vision ({settings.dataset})")

    @classmethod
    def from_config(cls, config, ctx) -> VisionTask:
        # Process 0 decodes (and caches) the images first, so the others find the cache ready.
        if not ctx.is_main:
            ctx.barrier()
        task = cls(config)
        if ctx.is_main:
            ctx.barrier()
        return task

    # ------------------------------------------------------------- the Task protocol
    def train_examples(self):
        """Training images and labels; one example per image (the trainer's "tokens")."""
        return self.data.train_x, self.data.train_y

    def batches(self, batch_size: int, *, seed: int, ctx):
        source = super().batches(batch_size, seed=seed, ctx=ctx)
        if not self.settings.augment:
            return source
        return AugmentedBatches(source, seed=seed, rank=ctx.rank, flip=self.data.shape[2] == 3)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(self.normalize(x)).float(), y)

    def evaluate(self, model: nn.Module, *, batch_size: int, max_batches: int, ctx) -> dict[str, float]:
        """Loss and accuracy over the whole validation set (``task.n_test`` sizes it, not
        ``max_batches``). Each process scores every ``world_size``-th image; sums are added."""
        return evaluate_classifier(
            model,
            self.data.val_x,
            self.data.val_y,
            batch_size=batch_size,
            ctx=ctx,
            count_key="val_images",
            forward=lambda x: model(self.normalize(x)),
        )

    def info(self) -> dict[str, Any]:
        s, d = self.settings, self.data
        return {
            "task": {
                "name": "vision",
                "dataset": s.dataset,
                "source": d.meta,
                "image_shape": list(d.shape),
                "n_classes": len(d.classes),
                "classes": d.classes,
                "n_train": len(d.train_x),
                "n_val": len(d.val_x),
                "val_split": s.val_split,
                "normalize": {"kind": s.normalize, "mean": d.mean.tolist(), "std": d.std.tolist()},
                "augment": s.augment,
                "epochs": s.epochs,
                "seed": s.seed,
            },
            "model": self.model_cfg.to_dict(),
            "model_family": self.model_cfg.family,
        }

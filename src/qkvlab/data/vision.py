"""Image datasets for the vision tasks, read with numpy and Pillow (torchvision is never needed).

Every loader returns ``uint8`` images of shape ``(N, H, W, C)`` and ``int64`` labels;
:func:`load_dataset` returns both splits and the class names as an :class:`ImageDataset`.
The formats, detected from what lies at the path:

* **IDX** (MNIST, Fashion-MNIST): ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or ``.gz``.
* **CIFAR python batches**: CIFAR-10 (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta``) or CIFAR-100 (``train``, ``test``, ``meta``; fine labels). They are
  pickles, read by an unpickler that only admits plain containers and numpy arrays of
  plain dtypes: no other global is ever imported or called.
* **Image folders** ``<split>/<class>/*.jpg|jpeg|png`` (split ``train`` and ``test`` or
  ``val``), as a directory, a zip of that layout, or a directory of such zips (the
  CIFAR-10 JPEG subset in ``shared/data/cifar10-jpeg`` is two zips, one per split).
* **TinyImageNet** (``tiny-imagenet-200``): ``wnids.txt``, ``train/<wnid>/images/*.JPEG``,
  ``val/images/*.JPEG`` with ``val/val_annotations.txt``; its ``val`` split is the test split.

Decoded JPEG/PNG arrays are cached as ``.npy`` files in ``<cache_dir>/<format>-<key>/``,
where ``key`` is a SHA-256 of the source (the bytes of each zip; for a directory of images
its file list with sizes and modification times), so a zip is decoded once. Files are
written under temporary names and renamed, ``meta.json`` last.

Named datasets (:data:`DATASETS`) are looked for in ``$QKVLAB_DATA``, ``./data``,
``../shared/data`` and, for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist`` (where
``apt-get install dataset-fashion-mnist`` puts it); ``path=`` overrides the search.

Example::

    ds = load_dataset("mnist")              # finds shared/data/mnist
    ds.train_images.shape, ds.classes[:3]   # (60000, 28, 28, 1), ['0', '1', '2']
    ds = load_dataset("folder", path="my_images.zip")
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qkvlab.checkpoint import atomic_write
from qkvlab.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_VERSION = 1
TEST_SPLITS = ("test", "val")  # the first present is the test split


# ================================================================== the dataset object
@dataclass
class ImageDataset:
    """Both splits of an image classification dataset.

    ``*_images``: ``uint8`` ``(N, H, W, C)``; ``*_labels``: ``int64`` ``(N,)`` in
    ``[0, len(classes))``. ``meta`` records where it came from (format, path, fingerprint,
    cache use). The test split may be empty when the source has none.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a named dataset before reading it."""

    folders: tuple[str, ...]
    image_size: int
    channels: int
    n_classes: int
    classes: tuple[str, ...] | None = None
    system_dirs: tuple[str, ...] = ()
    hint: str = ""


_FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_DIGITS = tuple(str(i) for i in range(10))

#: Named datasets: default folders (under each search root), shape and class count.
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(("mnist", "MNIST/raw"), 28, 1, 10, _DIGITS, hint="the four MNIST IDX files"),
    "fashion-mnist": DatasetInfo(
        ("fashion-mnist", "FashionMNIST/raw"),
        28,
        1,
        10,
        _FASHION,
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        hint="the four Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)",
    ),
    "cifar10": DatasetInfo(
        ("cifar10-jpeg", "cifar-10-batches-py", "cifar10"),
        32,
        3,
        10,
        hint="the CIFAR-10 JPEG zips (shared/data/cifar10-jpeg) or the python batches (cifar-10-batches-py)",
    ),
    "cifar100": DatasetInfo(
        ("cifar-100-python", "cifar100"), 32, 3, 100, hint="the CIFAR-100 python batches (cifar-100-python)"
    ),
    "tinyimagenet": DatasetInfo(
        ("tiny-imagenet-200", "tinyimagenet"), 64, 3, 200, hint="the TinyImageNet folder (tiny-imagenet-200)"
    ),
}
#: ``folder``: any supported layout at an explicit ``path``.
DATASET_NAMES = (*DATASETS, "folder")

LAYOUTS = (
    "IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
    "t10k-labels-idx1-ubyte[.gz]); CIFAR python batches (data_batch_1..5 + test_batch + batches.meta, or "
    "train + test + meta); an image folder <split>/<class>/*.jpg|png with split train and test (or val); a zip "
    "of that layout or a folder of such zips; TinyImageNet (wnids.txt, train/<wnid>/images/*.JPEG, val/images + "
    "val/val_annotations.txt)"
)


def default_image_cache() -> Path:
    """``$QKVLAB_CACHE/images`` if ``QKVLAB_CACHE`` is set, else ``~/.cache/qkvlab/images``."""
    env = os.environ.get("QKVLAB_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "qkvlab") / "images"


def search_roots() -> list[Path]:
    """Folders searched for named datasets, in order."""
    roots = []
    if os.environ.get("QKVLAB_DATA"):
        roots.append(Path(os.environ["QKVLAB_DATA"]).expanduser())
    roots += [Path("data"), Path("../shared/data")]
    repo = Path(__file__).resolve().parents[3]  # src/qkvlab/data/vision.py -> the checkout
    roots += [repo / "data", repo.parent / "shared" / "data"]
    return roots


def find_dataset(name: str) -> Path:
    """The folder holding the named dataset; a :class:`ConfigError` listing where it looked."""
    if name not in DATASETS:
        raise ConfigError(f"Unknown dataset {name!r}; use one of {', '.join(DATASET_NAMES)}.")
    info = DATASETS[name]
    tried = [root / folder for root in search_roots() for folder in info.folders]
    tried += [Path(d) for d in info.system_dirs]
    for candidate in tried:
        if candidate.exists():
            return candidate
    looked = ", ".join(str(p) for p in dict.fromkeys(tried))
    raise ConfigError(
        f"Dataset {name!r} not found; looked in {looked}. Put {info.hint} in one of these folders, set "
        f"QKVLAB_DATA to a folder holding {info.folders[0]}/, or give its location as task.path."
    )


# ================================================================== IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(
            f"Cannot read {str(path)!r}: {e}. The file is truncated or corrupt; replace it with a fresh copy."
        ) from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (raw or ``.gz``) as a numpy array of its declared shape and type."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No IDX file at {str(path)!r}; check the path.")
    data = _read_bytes(path)
    fix = "replace it with a fresh copy of the dataset file."
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or not 1 <= data[3] <= 4:
        raise ConfigError(
            f"{str(path)!r} is not an IDX file (its first bytes {data[:4].hex() or 'are missing'} are not a "
            f"valid IDX magic number); {fix}"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"{str(path)!r} ends inside its IDX header ({len(data)} bytes); it is truncated; {fix}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise ConfigError(
            f"{str(path)!r} holds {len(data) - header} bytes of data but its header declares shape {dims} "
            f"({expected} bytes): the file is truncated or corrupt; {fix}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _find_idx(folder: Path, prefixes: Iterable[str], kind: str, ndim_hint: str) -> Path | None:
    for prefix in prefixes:
        for stem in (f"{prefix}-{kind}-{ndim_hint}-ubyte", f"{prefix}-{kind}.{ndim_hint}-ubyte"):
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    return folder / name
    return None


def _has_idx(folder: Path) -> bool:
    return any(folder.glob("*-idx[0-9]-ubyte*")) or any(folder.glob("*.idx[0-9]-ubyte*"))


def load_idx_folder(folder: str | os.PathLike, classes: Iterable[str] | None = None) -> ImageDataset:
    """MNIST-style IDX files in ``folder``: ``train-*`` and ``t10k-*`` (or ``test-*``) images and labels."""
    folder = Path(folder)
    arrays: dict[str, np.ndarray] = {}
    files = []
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        for kind, hint in (("images", "idx3"), ("labels", "idx1")):
            path = _find_idx(folder, prefixes, kind, hint)
            if path is None:
                want = f"{prefixes[0]}-{kind}-{hint}-ubyte[.gz]"
                raise ConfigError(
                    f"Missing IDX file {want} in {str(folder)!r} (looked for "
                    f"{' / '.join(prefixes)}-{kind}-{hint}-ubyte with and without .gz). Put all four IDX files "
                    "(train/t10k images and labels) in that folder."
                )
            files.append(path)
            arrays[f"{split}_{kind}"] = read_idx(path)
    out = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ConfigError(
                f"The {split} IDX images in {str(folder)!r} have shape {images.shape} and type {images.dtype}; "
                "expected uint8 images (N, H, W) or (N, H, W, C)."
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ConfigError(
                f"The {split} IDX labels in {str(folder)!r} have shape {labels.shape} for {len(images)} images; "
                "the images and labels files do not belong together: replace them with a matching pair."
            )
        out[split] = (images, labels.astype(np.int64))
    names = list(classes) if classes is not None else [str(i) for i in range(int(out["train"][1].max()) + 1)]
    ds = ImageDataset(*out["train"], *out["test"], names, {"format": "idx", "path": str(folder)})
    check_dataset(ds, str(folder))
    ds.meta["fingerprint"] = hash_files(files)
    return ds


# ================================================================== CIFAR python batches
def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"only plain numpy arrays are allowed, not {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, _safe_dtype(dtype))


def _safe_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("arrays of Python objects are not allowed")
    return dtype


def _frombuffer(buffer, dtype, shape, order):
    return np.frombuffer(buffer, dtype=_safe_dtype(dtype)).reshape(shape, order=order).copy()


def _latin1(text, encoding="latin1"):
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin-1 byte strings")
    return text.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Callable] = {
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class SafeUnpickler(pickle.Unpickler):
    """Reads pickles of plain data only: dicts, lists, strings, bytes, numbers and numpy
    arrays of non-object dtype (the only globals admitted are numpy's array and dtype
    constructors, wrapped to refuse object dtypes, and the latin-1 ``_codecs.encode`` that
    protocol-2 pickles use for bytes). Any other global (a class or function to import and call)
    is refused, so a malicious file cannot run code."""

    def find_class(self, module: str, name: str):
        fn = _SAFE_GLOBALS.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        return fn


def read_pickle(path: Path) -> Any:
    """A pickle of plain data (see :class:`SafeUnpickler`); Python 2 byte strings stay bytes."""
    if not path.is_file():
        raise ConfigError(f"Missing file {str(path)!r}; put the complete CIFAR python batches in that folder.")
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ConfigError(
            f"Cannot read {str(path)!r} as a CIFAR python batch ({type(e).__name__}: {e}); it is corrupt, "
            "truncated or not plain data. Replace it with a fresh copy of the dataset."
        ) from None


def _key(d: dict, name: str) -> Any:
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    return None


def _text(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = read_pickle(path)
    data = _key(batch, "data") if isinstance(batch, dict) else None
    labels = _key(batch, label_key) if isinstance(batch, dict) else None
    if data is None or labels is None:
        raise ConfigError(
            f"{str(path)!r} is not a CIFAR batch: expected a dict with 'data' and '{label_key}'; replace the file."
        )
    if isinstance(data, bytes | bytearray):
        data = np.frombuffer(data, dtype=np.uint8)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.size % 3072:
        raise ConfigError(
            f"{str(path)!r}: 'data' must be uint8 rows of 3072 values (3 x 32 x 32), got {data.dtype} "
            f"{data.shape}; the file is corrupt."
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(images):
        raise ConfigError(f"{str(path)!r} holds {len(images)} images but {len(labels)} labels; the file is corrupt.")
    return np.ascontiguousarray(images), labels


def load_cifar_batches(folder: str | os.PathLike) -> ImageDataset:
    """CIFAR-10 (``data_batch_*``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``, ``test``, ``meta``)."""
    folder = Path(folder)
    if (folder / "train").is_file() or (folder / "meta").is_file():  # CIFAR-100
        meta = read_pickle(folder / "meta")
        names = _key(meta, "fine_label_names") if isinstance(meta, dict) else None
        files = {"train": [folder / "train"], "test": [folder / "test"]}
        label_key, fmt = "fine_labels", "cifar100-batches"
        meta_file = folder / "meta"
    else:
        train = sorted(folder.glob("data_batch_*"), key=lambda p: p.name)
        if not train:
            raise ConfigError(
                f"No CIFAR-10 training batches (data_batch_1 .. data_batch_5) in {str(folder)!r}; put the "
                "extracted cifar-10-batches-py files there."
            )
        meta = read_pickle(folder / "batches.meta")
        names = _key(meta, "label_names") if isinstance(meta, dict) else None
        files = {"train": train, "test": [folder / "test_batch"]}
        label_key, fmt = "labels", "cifar10-batches"
        meta_file = folder / "batches.meta"
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{str(meta_file)!r} has no list of label names; replace it with the dataset's own file.")
    out = {}
    for split, paths in files.items():
        parts = [_cifar_batch(p, label_key) for p in paths]
        out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    ds = ImageDataset(*out["train"], *out["test"], [_text(n) for n in names], {"format": fmt, "path": str(folder)})
    check_dataset(ds, str(folder))
    ds.meta["fingerprint"] = hash_files([*files["train"], *files["test"], meta_file])
    return ds


# ================================================================== image folders and zips
@dataclass
class _Entry:
    split: str
    label: str
    name: str  # shown in errors
    read: Callable[[], bytes]


def _split_class(parts: list[str]) -> tuple[str, str] | None:
    return (parts[-3], parts[-2]) if len(parts) >= 3 else None


def _zip_entries(path: Path) -> list[_Entry]:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"Cannot open {str(path)!r} as a zip ({e}); replace it with a complete copy.") from None
    entries = []
    for info in zf.infolist():
        if info.is_dir() or not info.filename.lower().endswith(IMAGE_SUFFIXES):
            continue
        parts = [p for p in info.filename.split("/") if p]
        sc = _split_class(parts)
        if sc is None:
            raise ConfigError(
                f"{str(path)!r} holds {info.filename!r} outside a <split>/<class>/ folder; expected members "
                "like train/<class>/0001.jpg and test/<class>/0001.jpg. Rebuild the zip in that layout."
            )
        entries.append(_Entry(sc[0], sc[1], f"{path}:{info.filename}", lambda zf=zf, n=info.filename: zf.read(n)))
    return entries


def _dir_entries(root: Path) -> list[_Entry]:
    entries = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for f in sorted(class_dir.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    entries.append(_Entry(split_dir.name, class_dir.name, str(f), f.read_bytes))
        stray = [f.name for f in split_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        if stray:
            raise ConfigError(
                f"{str(split_dir)!r} holds images ({stray[0]!r}, ...) directly, not in class folders; expected "
                f"{split_dir}/<class>/*.jpg|png. Move each image into a folder named after its class."
            )
    return entries


def _decode(entry: _Entry) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(entry.read())) as im:
            im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, zipfile.BadZipFile, zlib.error, ValueError) as e:
        raise ConfigError(f"Cannot decode image {entry.name!r} ({e}); remove or replace the file.") from None
    return arr[..., None] if arr.ndim == 2 else arr


def _stack(arrays: list[np.ndarray], names: list[str]) -> np.ndarray:
    channels = max(a.shape[2] for a in arrays)
    first = arrays[0].shape[:2]
    for a, n in zip(arrays, names, strict=True):
        if a.shape[:2] != first:
            raise ConfigError(
                f"Images of mixed sizes: {names[0]!r} is {first[1]}x{first[0]} but {n!r} is {a.shape[1]}x{a.shape[0]}. "
                "Resize every image to one size (e.g. with Pillow) before training."
            )
    if channels == 1:
        return np.stack(arrays)
    return np.stack([np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays])


def _decode_entries(entries: list[_Entry], classes: list[str], where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    splits = sorted({e.split for e in entries})
    all_arrays: list[np.ndarray] = []
    all_names: list[str] = []
    bounds = []
    for split in splits:
        chosen = [e for e in entries if e.split == split]
        for e in chosen:
            if e.label not in index:
                raise ConfigError(
                    f"{e.name!r} is labelled {e.label!r}, a class the training split does not have (label out of "
                    f"range: {len(classes)} classes {classes[:5]}...) in {where!r}; remove it or add training images."
                )
        start = len(all_arrays)
        all_arrays += [_decode(e) for e in chosen]
        all_names += [e.name for e in chosen]
        bounds.append((split, start, len(all_arrays), np.array([index[e.label] for e in chosen], dtype=np.int64)))
    stacked = _stack(all_arrays, all_names)  # one size and channel count over every split
    for split, a, b, labels in bounds:
        out[split] = (stacked[a:b], labels)
    return out


def _images_from_entries(entries: list[_Entry], where: str, fmt: str, fingerprint: str, cache_dir) -> ImageDataset:
    if not entries:
        raise ConfigError(f"No .jpg/.jpeg/.png images found in {where!r}; expected {LAYOUTS}.")
    splits = {e.split for e in entries}
    if "train" not in splits:
        raise ConfigError(
            f"{where!r} has no 'train' split (found {sorted(splits)}); expected <split>/<class>/*.jpg|png with "
            "split train and test (or val)."
        )
    test = next((s for s in TEST_SPLITS if s in splits), None)
    extra = sorted(splits - {"train", test})
    if extra:
        raise ConfigError(
            f"{where!r} has split folder(s) {extra}; expected train and test (or val), each holding one folder "
            "per class. Move or remove the others."
        )
    classes = sorted({e.label for e in entries if e.split == "train"})

    def build() -> ImageDataset:
        chosen = [e for e in entries if e.split in ("train", test)]
        arrays = _decode_entries(chosen, classes, where)
        train = arrays["train"]
        empty = (np.zeros((0, *train[0].shape[1:]), np.uint8), np.zeros(0, np.int64))
        return ImageDataset(*train, *arrays.get(test, empty), classes, {})

    ds = cached(fmt, fingerprint, build, cache_dir)
    ds.meta.update({"format": fmt, "path": where, "test_split": test})
    return ds


def load_image_folder(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Images in ``<split>/<class>/`` folders: a directory, a zip, or a directory of zips."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise ConfigError(f"{str(path)!r} is a file but not a .zip; give a zip or folder in the layout {LAYOUTS}.")
        return _images_from_entries(_zip_entries(path), str(path), "image-zip", hash_files([path]), cache_dir)
    if not path.is_dir():
        raise ConfigError(f"No file or folder at {str(path)!r}; check task.path.")
    zips = sorted(path.glob("*.zip"))
    if zips:
        entries = [e for z in zips for e in _zip_entries(z)]
        return _images_from_entries(entries, str(path), "image-zip", hash_files(zips), cache_dir)
    return _images_from_entries(_dir_entries(path), str(path), "image-folder", _hash_listing(path), cache_dir)


# ================================================================== TinyImageNet
def load_tinyimagenet(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> ImageDataset:
    """TinyImageNet: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images`` + ``val_annotations.txt``.

    Class order is ``wnids.txt``'s; names come from ``words.txt`` when present. The
    unlabelled ``test`` folder is not used: ``val`` is the test split.
    """
    root = Path(path)
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise ConfigError(f"Missing {str(wnids_file)!r}; a TinyImageNet folder holds wnids.txt, train/ and val/.")
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    entries: list[_Entry] = []
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise ConfigError(
                f"Missing {str(folder)!r}: TinyImageNet expects train/<wnid>/images/*.JPEG for every id in wnids.txt."
            )
        entries += [
            _Entry("train", wnid, str(f), f.read_bytes)
            for f in sorted(folder.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise ConfigError(
            f"Missing {str(annotations)!r}: TinyImageNet expects val/images/*.JPEG and val/val_annotations.txt "
            "(image name, wnid, box per line)."
        )
    for line in annotations.read_text().splitlines():
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            continue
        f = root / "val" / "images" / parts[0]
        if not f.is_file():
            raise ConfigError(f"{str(annotations)!r} names {parts[0]!r}, but {str(f)!r} does not exist.")
        entries.append(_Entry("val", parts[1], str(f), f.read_bytes))
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    fingerprint = _hash_listing(root / "train", root / "val", wnids_file)

    def build() -> ImageDataset:
        arrays = _decode_entries(entries, wnids, str(root))
        return ImageDataset(*arrays["train"], *arrays["val"], list(wnids), {})

    ds = cached("tinyimagenet", fingerprint, build, cache_dir)
    ds.classes = [words.get(w, w) for w in wnids]
    ds.meta.update({"format": "tinyimagenet", "path": str(root), "wnids": list(wnids)})
    return ds


# ================================================================== checks, hashing, cache
def check_dataset(ds: ImageDataset, where: str) -> None:
    """Labels in range and image shapes consistent; :class:`ConfigError` naming the problem otherwise."""
    n = len(ds.classes)
    for split, images, labels in (
        ("train", ds.train_images, ds.train_labels),
        ("test", ds.test_images, ds.test_labels),
    ):
        if len(labels) and (labels.min() < 0 or labels.max() >= n):
            bad = int(labels.max() if labels.max() >= n else labels.min())
            raise ConfigError(
                f"The {split} split of {where!r} has label {bad}, out of range for its {n} classes "
                f"(0..{n - 1}); the labels file is corrupt or belongs to another dataset: replace it."
            )
        if len(images) and images.shape[1:] != ds.train_images.shape[1:]:
            raise ConfigError(
                f"Images of mixed sizes in {where!r}: train images are {ds.train_images.shape[1:]}, {split} images "
                f"{images.shape[1:]}. Use one image size for every split."
            )
    if len(ds.train_images) == 0:
        raise ConfigError(f"{where!r} has no training images; expected {LAYOUTS}.")


def hash_files(paths: Iterable[Path]) -> str:
    """SHA-256 over the names and bytes of ``paths``, in order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _hash_listing(*roots: Path) -> str:
    """SHA-256 of every file's relative path, size and modification time under ``roots``."""
    h = hashlib.sha256()
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            h.update(f"{p.relative_to(root.parent)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached(fmt: str, fingerprint: str, build: Callable[[], ImageDataset], cache_dir=None) -> ImageDataset:
    """``build()``'s dataset, stored as ``.npy`` under ``cache_dir`` keyed by ``fingerprint``;
    later calls with the same fingerprint read the arrays instead of decoding again."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_image_cache()
    folder = root / f"{fmt}-{fingerprint[:16]}-v{CACHE_VERSION}"
    meta_file = folder / "meta.json"
    names = ("train_images", "train_labels", "test_images", "test_labels")
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            arrays = [np.load(folder / f"{n}.npy", allow_pickle=False) for n in names]
            if meta.get("fingerprint") == fingerprint:
                return ImageDataset(
                    *arrays,
                    list(meta["classes"]),
                    {"fingerprint": fingerprint, "cache": str(folder), "cache_hit": True},
                )
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    ds = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for n in names:
            array = getattr(ds, n)
            atomic_write(folder / f"{n}.npy", lambda p, a=array: save_npy(p, a))
        meta = {"fingerprint": fingerprint, "classes": ds.classes, "format": fmt}
        atomic_write(meta_file, lambda p: Path(p).write_text(json.dumps(meta)))
    except OSError as e:
        raise ConfigError(
            f"Cannot write the image cache in {str(folder)!r}: {e.strerror or e}. Set task.cache_dir or "
            "QKVLAB_CACHE to a writable folder."
        ) from None
    ds.meta.update({"fingerprint": fingerprint, "cache": str(folder), "cache_hit": False})
    return ds


def save_npy(path: str, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` to exactly ``path`` (``np.save`` would append a suffix)."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


# ================================================================== entry point
def detect_format(path: Path) -> str:
    """``idx``, ``cifar-batches``, ``tinyimagenet`` or ``image-folder`` for what lies at ``path``."""
    if path.is_file():
        return "image-folder"
    if not path.is_dir():
        raise ConfigError(f"No file or folder at {str(path)!r}; check task.path.")
    if _has_idx(path):
        return "idx"
    if any((path / n).is_file() for n in ("data_batch_1", "test_batch", "batches.meta", "meta")):
        return "cifar-batches"
    if (path / "wnids.txt").is_file():
        return "tinyimagenet"
    if any(path.glob("*.zip")) or any((path / s).is_dir() for s in ("train", *TEST_SPLITS)):
        return "image-folder"
    found = sorted(p.name for p in path.iterdir())[:8]
    raise ConfigError(f"{str(path)!r} is not in a layout this loader reads (found {found}); expected {LAYOUTS}.")


def load_dataset(
    name: str, path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None
) -> ImageDataset:
    """The dataset ``name`` (one of :data:`DATASET_NAMES`), from ``path`` or its default folder.

    The format is detected from what lies at the path (see the module docstring). For a
    named dataset the image shape and class count are checked against :data:`DATASETS`.
    """
    if name not in DATASET_NAMES:
        raise ConfigError(f"Unknown dataset {name!r}; use one of {', '.join(DATASET_NAMES)}.")
    if path is None:
        if name == "folder":
            raise ConfigError("Dataset 'folder' needs task.path: a folder or zip of <split>/<class>/*.jpg|png images.")
        path = find_dataset(name)
    path = Path(path).expanduser().resolve()
    fmt = detect_format(path)
    info = DATASETS.get(name)
    if fmt == "idx":
        ds = load_idx_folder(path, classes=info.classes if info else None)
    elif fmt == "cifar-batches":
        ds = load_cifar_batches(path)
    elif fmt == "tinyimagenet":
        ds = load_tinyimagenet(path, cache_dir=cache_dir)
    else:
        ds = load_image_folder(path, cache_dir=cache_dir)
    if info is not None:
        want = (info.image_size, info.image_size, info.channels)
        if ds.image_shape != want or ds.n_classes != info.n_classes:
            raise ConfigError(
                f"{str(path)!r} holds {ds.n_classes} classes of {ds.image_shape} images, but {name!r} has "
                f"{info.n_classes} classes of {want}; point task.path at {name} data or use dataset 'folder'."
            )
    ds.meta["dataset"] = name
    return ds


__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "DatasetInfo",
    "ImageDataset",
    "SafeUnpickler",
    "check_dataset",
    "default_image_cache",
    "detect_format",
    "find_dataset",
    "hash_files",
    "load_cifar_batches",
    "load_dataset",
    "load_idx_folder",
    "load_image_folder",
    "load_tinyimagenet",
    "read_idx",
    "read_pickle",
    "save_npy",
]

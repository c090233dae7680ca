"""Image loaders, the vision (ViT) task and the set-anomaly task, on tiny files the tests write."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from qkvlab.data import vision as vdata
from qkvlab.errors import ConfigError
from qkvlab.tasks.anomaly import AnomalySettings, AnomalyTask, SetFeatures, SmallCNN, compute_features, make_sets
from qkvlab.tasks.vision import VisionTask
from qkvlab.train import train
from qkvlab.train.config import TrainConfig

PIL = pytest.importorskip("PIL.Image")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ================================================================== writers of tiny files
def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def toy_images(n: int, size: int, channels: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable toy images: class k is bright in the k-th horizontal band, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    images = rng.integers(0, 60, size=(n, size, size, channels))
    band = size // n_classes
    for i, y in enumerate(labels):
        images[i, y * band : (y + 1) * band] += 180
    return images.astype(np.uint8), labels.astype(np.int64)


def write_idx(folder: Path, *, n_train=40, n_test=20, size=8, n_classes=4, gz=True) -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    tr = toy_images(n_train, size, 1, n_classes, 0)
    te = toy_images(n_test, size, 1, n_classes, 1)
    for prefix, (x, y) in (("train", tr), ("t10k", te)):
        for kind, arr, nd in (("images", x[..., 0], 3), ("labels", y, 1)):
            name = f"{prefix}-{kind}-idx{nd}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return tr, te


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, classes=("cat", "dog", "emu"), per_class=(4, 2), size=8, channels=3) -> dict:
    """<root>/<split>/<class>/<i>.png with known pixels; returns {(split, class, i): array}."""
    rng = np.random.default_rng(3)
    pixels = {}
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
                (root / split / c / f"{i}.png").write_bytes(png_bytes(arr))
                pixels[(split, c, i)] = arr
    return pixels


def zip_folder(root: Path, out: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(root.rglob("*.png")):
            z.write(f, prefix + str(f.relative_to(root)))
    return out


# ================================================================== loaders
def test_idx_gz_and_raw(tmp_path):
    tr, te = write_idx(tmp_path / "gz")
    ds = vdata.load_idx_folder(tmp_path / "gz")
    assert ds.train_images.shape == (40, 8, 8, 1) and ds.train_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_images, tr[0])
    np.testing.assert_array_equal(ds.test_labels, te[1])
    assert ds.train_labels.dtype == np.int64 and ds.classes == ["0", "1", "2", "3"]
    write_idx(tmp_path / "raw", gz=False)
    raw = vdata.load_dataset("folder", tmp_path / "raw")
    np.testing.assert_array_equal(raw.train_images, ds.train_images)
    assert raw.meta["format"] == "idx" and raw.meta["fingerprint"] != ds.meta["fingerprint"]


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # channel planes, as CIFAR stores them


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    names = [f"c{i}".encode() for i in range(10)]
    # The real files hold numpy arrays (pickled with numpy's reconstructor) and byte-string keys.
    (tmp_path / "data_batch_1").write_bytes(
        pickle.dumps({b"data": _cifar_rows(imgs[:3]), b"labels": [0, 1, 9]}, protocol=2)
    )
    (tmp_path / "data_batch_2").write_bytes(
        pickle.dumps({b"data": _cifar_rows(imgs[3:5]), b"labels": [2, 2]}, protocol=2)
    )
    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": _cifar_rows(imgs[5:]).tobytes(), b"labels": [3, 4]}, protocol=2)
    )
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    ds = vdata.load_dataset("folder", tmp_path)
    np.testing.assert_array_equal(ds.train_images, imgs[:5])
    np.testing.assert_array_equal(ds.test_images, imgs[5:])
    assert ds.train_labels.tolist() == [0, 1, 9, 2, 2] and ds.classes[9] == "c9"
    assert ds.meta["format"] == "cifar10-batches"


def test_cifar100_batches(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    for name, sl, fine in (("train", slice(0, 3), [5, 99, 0]), ("test", slice(3, 4), [7])):
        batch = {"data": _cifar_rows(imgs[sl]), "fine_labels": fine, "coarse_labels": [0] * len(fine)}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
    (tmp_path / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"f{i}" for i in range(100)]}, protocol=2))
    ds = vdata.load_cifar_batches(tmp_path)
    assert ds.n_classes == 100 and ds.train_labels.tolist() == [5, 99, 0]
    np.testing.assert_array_equal(ds.test_images, imgs[3:])


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_cifar_pickle_refuses_globals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Boom(), b"labels": [0]}, protocol=2))
    with pytest.raises(ConfigError, match=r"refused to load global (posix|os)\.system"):
        vdata.read_pickle(tmp_path / "data_batch_1")
    assert not (tmp_path / "pwned").exists()
    obj = np.array([object()], dtype=object)
    (tmp_path / "objarr").write_bytes(pickle.dumps({b"data": obj}, protocol=2))
    with pytest.raises(ConfigError, match="objects are not allowed"):
        vdata.read_pickle(tmp_path / "objarr")


def test_image_folder_and_zip_with_cache(tmp_path):
    pixels = write_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    ds = vdata.load_image_folder(tmp_path / "imgs", cache_dir=cache)
    assert ds.classes == ["cat", "dog", "emu"] and ds.train_images.shape == (12, 8, 8, 3)
    assert ds.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    np.testing.assert_array_equal(ds.train_images[4 + 1], pixels[("train", "dog", 1)])  # PNG is lossless
    np.testing.assert_array_equal(ds.test_images[5], pixels[("test", "emu", 1)])
    assert ds.meta["cache_hit"] is False and list((cache).glob("image-folder-*/train_images.npy"))
    z = zip_folder(tmp_path / "imgs", tmp_path / "imgs.zip", prefix="top/")
    zds = vdata.load_dataset("folder", z, cache_dir=cache)
    np.testing.assert_array_equal(zds.train_images, ds.train_images)
    np.testing.assert_array_equal(zds.test_labels, ds.test_labels)
    assert zds.meta["cache_hit"] is False
    again = vdata.load_dataset("folder", z, cache_dir=cache)
    assert again.meta["cache_hit"] is True and again.classes == ds.classes
    np.testing.assert_array_equal(again.train_images, ds.train_images)
    # A folder of zips, one per split (the layout of shared/data/cifar10-jpeg).
    (tmp_path / "zips").mkdir()
    for split in ("train", "test"):
        with zipfile.ZipFile(tmp_path / "zips" / f"{split}.zip", "w") as zf:
            for f in sorted((tmp_path / "imgs" / split).rglob("*.png")):
                zf.write(f, str(f.relative_to(tmp_path / "imgs")))
    both = vdata.load_dataset("folder", tmp_path / "zips", cache_dir=cache)
    np.testing.assert_array_equal(both.test_images, ds.test_images)


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def test_tinyimagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn99\tother\n")
    rng = np.random.default_rng(0)
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(3):
            (root / "train" / w / "images" / f"{w}_{i}.JPEG").write_bytes(
                _jpeg(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            )
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)  # TinyImageNet has some grayscale JPEGs
    (root / "val" / "images" / "val_0.JPEG").write_bytes(_jpeg(gray))
    (root / "val" / "images" / "val_1.JPEG").write_bytes(_jpeg(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t5\t5\nval_1.JPEG\tn01\t1\t1\t9\t9\n")
    ds = vdata.load_dataset("folder", root, cache_dir=tmp_path / "cache")
    assert ds.meta["format"] == "tinyimagenet" and ds.classes == ["goldfish", "tabby"]
    assert ds.train_images.shape == (6, 16, 16, 3) and ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test_labels.tolist() == [1, 0]
    g = ds.test_images[0].astype(int)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()  # gray expanded to RGB
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn77\t0\t0\t5\t5\n")
    with pytest.raises(ConfigError, match="out of range"):
        vdata.load_tinyimagenet(root, cache_dir=tmp_path / "cache2")


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="shared/data/mnist is not present")
def test_real_mnist():
    ds = vdata.load_dataset("mnist", SHARED / "mnist")
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
    assert abs(ds.train_images.mean() / 255 - 0.1307) < 1e-3  # README: train pixel mean/255 = 0.1307
    assert np.bincount(ds.test_labels).tolist()[:2] == [980, 1135]


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg").is_dir(), reason="shared/data/cifar10-jpeg is not present")
def test_real_cifar10_jpeg_zips(tmp_path):
    ds = vdata.load_dataset("cifar10", SHARED / "cifar10-jpeg", cache_dir=tmp_path)  # two zips, one per split
    assert ds.classes[:3] == ["airplane", "automobile", "bird"] and ds.classes[-1] == "truck"
    assert ds.train_images.shape == (10000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    mean = ds.test_images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, [0.4941, 0.4851, 0.4504], atol=2e-3)  # README's test-split means
    assert ds.meta["cache_hit"] is False
    with pytest.raises(ConfigError, match=r"has no 'train' split \(found \['test'\]\)"):
        vdata.load_image_folder(SHARED / "cifar10-jpeg" / "cifar10_test_jpeg.zip", cache_dir=tmp_path)


# ================================================================== loader errors
def test_error_wrong_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "pics").mkdir()
    with pytest.raises(ConfigError, match=r"not in a layout.*notes\.txt.*expected IDX files"):
        vdata.load_dataset("folder", tmp_path)
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "a.png").write_bytes(png_bytes(np.zeros((4, 4, 1), np.uint8)))
    with pytest.raises(ConfigError, match="not in class folders"):
        vdata.load_dataset("folder", tmp_path / "flat")
    with pytest.raises(ConfigError, match=r"needs task\.path"):
        vdata.load_dataset("folder")


def test_error_missing_files(tmp_path, monkeypatch):
    write_idx(tmp_path / "mn")
    (tmp_path / "mn" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match=r"Missing IDX file t10k-labels-idx1-ubyte\[\.gz\] in .*mn"):
        vdata.load_dataset("mnist", tmp_path / "mn")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QKVLAB_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(vdata, "search_roots", lambda: [tmp_path / "nowhere", tmp_path / "data"])
    with pytest.raises(ConfigError, match=r"'cifar100' not found; looked in .*nowhere/cifar-100-python"):
        vdata.load_dataset("cifar100")
    with pytest.raises(ConfigError, match="No file or folder"):
        vdata.load_dataset("folder", tmp_path / "absent")


def test_error_mixed_sizes(tmp_path):
    write_folder(tmp_path / "imgs", classes=("a", "b"), per_class=(1, 1))
    (tmp_path / "imgs" / "train" / "b" / "big.png").write_bytes(png_bytes(np.zeros((9, 9, 3), np.uint8)))
    with pytest.raises(ConfigError, match=r"mixed sizes: .* is 8x8 but .*big\.png' is 9x9"):
        vdata.load_image_folder(tmp_path / "imgs", cache_dir=tmp_path / "c")


def test_error_labels_out_of_range(tmp_path):
    write_idx(tmp_path / "mn", n_classes=4)
    labels = np.array([0, 1, 12] + [0] * 37, np.uint8)
    (tmp_path / "mn" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(ConfigError, match=r"label 12, out of range for its 10 classes"):
        vdata.load_dataset("mnist", tmp_path / "mn")
    write_folder(tmp_path / "imgs", classes=("a", "b"), per_class=(1, 1))
    (tmp_path / "imgs" / "test" / "zebra").mkdir()
    (tmp_path / "imgs" / "test" / "zebra" / "z.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(ConfigError, match=r"labelled 'zebra', a class the training split does not have"):
        vdata.load_image_folder(tmp_path / "imgs", cache_dir=tmp_path / "c")


def test_error_corrupt_idx(tmp_path):
    write_idx(tmp_path / "mn", gz=False)
    f = tmp_path / "mn" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        vdata.read_idx(f)
    f.write_bytes(b"\x12\x34\x56\x78" + b"\0" * 20)
    with pytest.raises(ConfigError, match="not an IDX file"):
        vdata.read_idx(f)
    g = tmp_path / "x-idx1-ubyte.gz"
    g.write_bytes(gzip.compress(idx_bytes(np.arange(50, dtype=np.uint8)))[:-10])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        vdata.read_idx(g)


# ================================================================== the vision task
def vision_config(tmp_path, data: Path, **task) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "task": {"name": "vision", "dataset": "folder", "path": str(data), **task},
            "model": {
                "preset": None,
                "variant": "(Q=K=V)+",
                "d_model": 16,
                "n_layers": 1,
                "n_heads": 2,
                "patch_size": 4,
            },
            "optim": {"lr": 1e-3},
            "schedule": {"warmup_steps": 1},
            "batch_size": 8,
            "max_steps": 2,
            "eval_every": 0,
            "out_dir": str(tmp_path / "run"),
            "device": "cpu",
            "log": {"progress": False, "tensorboard": False},
        }
    )


def test_vision_task_trains_two_steps(tmp_path):
    write_idx(tmp_path / "d", size=8, n_classes=4)
    config = vision_config(tmp_path, tmp_path / "d", n_test=12)
    task = VisionTask(config)
    assert task.model_cfg.image_size == 8 and task.model_cfg.channels == 1 and task.model_cfg.n_classes == 4
    assert task.model_cfg.variant.pos2d
    summary = train(config, task=task, verbose=False)
    assert summary["steps"] == 2 and summary["tokens"] == 16  # count = images
    assert 0.0 <= summary["val_acc"] <= 1.0 and np.isfinite(summary["val_loss"])
    assert summary["val_images"] == 12
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["task"]["dataset"] == "folder" and info["task"]["n_train"] == 40
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_acc"] == summary["val_acc"]


def test_vision_task_learns_and_epochs(tmp_path):
    write_idx(tmp_path / "d", n_train=64, size=8, n_classes=2)
    config = vision_config(tmp_path, tmp_path / "d", epochs=8)
    config.model["variant"] = "QKV"
    config.optim.lr = 1e-2
    task = VisionTask(config)
    assert task.total_steps(config) == 64  # ceil(8 * 64 / 8)
    summary = train(config, task=task, verbose=False)
    assert summary["steps"] == 64 and summary["val_acc"] >= 0.9  # a bright band per class: easy


def test_vision_batches_resume_and_augment(tmp_path):
    write_idx(tmp_path / "d", size=8)
    config = vision_config(tmp_path, tmp_path / "d", augment=True, val_split=0.25, n_train=20)
    task = VisionTask(config)
    assert len(task.data.val_x) == 10 and len(task.data.train_x) == 20
    from qkvlab.train.trainer import RunContext

    a = task.batches(4, seed=3, ctx=RunContext())
    a.next()
    state = a.state_dict()
    want = a.next()
    b = task.batches(4, seed=3, ctx=RunContext())
    b.load_state_dict(state)
    got = b.next()
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    plain = VisionTask(vision_config(tmp_path, tmp_path / "d", val_split=0.25, n_train=20)).batches(
        4, seed=3, ctx=RunContext()
    )
    plain.next()
    assert torch.equal(plain.next()[1], want[1]) and not torch.equal(plain.next()[0], b.next()[0])


def test_vision_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"task.dataset='svhn' is not a dataset; use one of mnist"):
        TrainConfig.from_dict({"task": {"name": "vision", "dataset": "svhn"}})
    with pytest.raises(ConfigError, match=r"without an entry for dataset 'cifar10'"):
        TrainConfig.from_dict({"task": {"name": "vision", "dataset": "cifar10", "epochs": {"mnist": 20}}})
    with pytest.raises(ConfigError, match=r"model.image_size=32 but the mnist data has image_size 28"):
        TrainConfig.from_dict({"task": {"name": "vision", "dataset": "mnist"}, "model": {"image_size": 32}})
    with pytest.raises(ConfigError, match="not divisible by patch_size=7"):
        TrainConfig.from_dict({"task": {"name": "vision", "dataset": "cifar10"}, "model": {"patch_size": 7}})
    write_idx(tmp_path / "d")
    with pytest.raises(ConfigError, match=r"task.n_train=999 but the training split has only 40"):
        VisionTask(vision_config(tmp_path, tmp_path / "d", n_train=999))


# ================================================================== the anomaly task
def toy_features(n_classes=5, per_class=12, dim=6, seed=0) -> SetFeatures:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * 3

    def pool(seed_offset):
        labels = np.repeat(np.arange(n_classes), per_class)
        feats = centers[labels] + np.random.default_rng(seed + seed_offset).normal(size=(len(labels), dim))
        return feats.astype(np.float32), labels.astype(np.int64)

    return SetFeatures(*pool(1), *pool(2), {"extractor": {"kind": "toy"}})


def anomaly_config(tmp_path, **task) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "task": {"name": "anomaly", "dataset": "cifar10", "n_train_sets": 64, "n_test_sets": 40, **task},
            "model": {"preset": None, "variant": "Q-K=V", "d_model": 16, "n_layers": 1, "n_heads": 2},
            "optim": {"lr": 1e-3},
            "schedule": {"warmup_steps": 1},
            "batch_size": 8,
            "max_steps": 2,
            "eval_every": 0,
            "out_dir": str(tmp_path / "run"),
            "device": "cpu",
            "log": {"progress": False, "tensorboard": False},
        }
    )


def test_anomaly_task_trains_two_steps(tmp_path):
    config = anomaly_config(tmp_path)
    task = AnomalyTask(config, features=toy_features())
    assert task.model_cfg.in_features == 6 and task.model_cfg.variant.pos == "none"
    summary = train(config, task=task, verbose=False)
    assert summary["steps"] == 2 and summary["tokens"] == 16  # count = sets
    assert summary["val_sets"] == 40 and 0.0 <= summary["val_acc"] <= 1.0 and np.isfinite(summary["val_loss"])
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["task"]["features"]["extractor"]["kind"] == "toy" and info["task"]["chance_acc"] == 0.1


def test_anomaly_scores_are_permutation_equivariant(tmp_path):
    task = AnomalyTask(anomaly_config(tmp_path), features=toy_features())
    model = task.build_model().eval()
    x = torch.randn(3, 10, 6)
    perm = torch.randperm(10)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, perm]), model(x)[:, perm], rtol=1e-5, atol=1e-5)


def test_sets_have_exactly_one_odd_element():
    labels = np.repeat(np.arange(4), 10)
    sets, odd = make_sets(labels, 200, 10, np.random.default_rng(0))
    assert sets.shape == (200, 10)
    for members, pos in zip(sets, odd, strict=True):
        lab = labels[members]
        normal = lab[(pos + 1) % 10]
        assert (lab != normal).sum() == 1 and lab[pos] != normal
        assert len(set(members.tolist())) == 10  # no image twice
    assert len(np.unique(odd)) == 10  # the odd element is not always in the same place


def test_anomaly_set_size_limit(tmp_path):
    config = anomaly_config(tmp_path, set_size=14)
    with pytest.raises(ConfigError, match=r"set_size=14 needs 13 images of every class .* set_size <= 13"):
        AnomalyTask(config, features=toy_features(per_class=12))
    with pytest.raises(ConfigError, match=r"task\.set_size must be an integer >= 2"):
        anomaly_config(tmp_path, set_size=1)


def test_anomaly_refuses_positions(tmp_path):
    config = anomaly_config(tmp_path)
    config.model["variant"] = "(Q=K-V)+"
    with pytest.raises(ConfigError, match="permutation-equivariant"):
        AnomalyTask.check_config(config)


def test_anomaly_cnn_features_cached_and_checkpoint_backbones(tmp_path):
    folder = tmp_path / "imgs"
    write_folder(folder, classes=("a", "b", "c"), per_class=(6, 4), size=8)
    common = {"dataset": "folder", "path": str(folder), "cache_dir": str(tmp_path / "cache")}
    s = AnomalySettings.from_train_config(
        anomaly_config(tmp_path, **common, backbone_epochs=1, backbone_width=4, set_size=3)
    )
    f = compute_features(s, torch.device("cpu"))
    assert f.train_features.shape == (9, 16) and f.test_features.shape == (12, 16)  # half of train trains the CNN
    assert f.info["extractor"]["kind"] == "cnn" and f.info["cache_hit"] is False
    again = compute_features(s, torch.device("cpu"))
    assert again.info["cache_hit"] is True
    np.testing.assert_array_equal(again.train_features, f.train_features)
    # The same CNN saved as a state dict (.pt, read with weights_only=True) and as TorchScript.
    cnn = SmallCNN(3, 3, 4)
    torch.save(cnn.state_dict(), tmp_path / "cnn.pt")
    s2 = AnomalySettings.from_train_config(anomaly_config(tmp_path, **common, backbone=str(tmp_path / "cnn.pt")))
    f2 = compute_features(s2, torch.device("cpu"))
    assert f2.train_features.shape == (18, 16) and f2.info["extractor"]["kind"] == "state_dict"

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    torch.jit.script(Features()).save(str(tmp_path / "ts.pt"))
    s3 = AnomalySettings.from_train_config(anomaly_config(tmp_path, **common, backbone=str(tmp_path / "ts.pt")))
    f3 = compute_features(s3, torch.device("cpu"))
    assert f3.test_features.shape == (12, 5) and f3.info["extractor"]["kind"] == "torchscript"
    with pytest.raises(ConfigError, match="no such file"):
        anomaly_config(tmp_path, backbone=str(tmp_path / "missing.pt"))


# ================================================================== shipped configs
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in (ROOT / "configs" / "tasks").glob("*.yaml") if p.name.startswith(("vision-", "anomaly-"))),
)
def test_shipped_task_configs_load(name):
    from qkvlab import tasks
    from qkvlab.train.config import load_config

    config = load_config(ROOT / "configs" / "tasks" / name)
    model = tasks.model_config(config)
    if name.startswith("anomaly-"):
        assert config.task["name"] == "anomaly" and model.family == "set" and model.in_features == 128
    else:
        info = vdata.DATASETS[config.task["dataset"]]
        assert config.task["name"] == "vision" and model.family == "vit"
        assert (model.image_size, model.channels, model.n_classes) == (info.image_size, info.channels, info.n_classes)


def test_shipped_vision_studies_expand():
    from qkvlab.study.sweep import expand, load_sweep

    cpu = expand(load_sweep(ROOT / "configs" / "studies" / "vision-cpu.yaml"))
    skipped = [p for p in cpu if p.status == "skipped"]
    assert len(cpu) == 72 and len(skipped) == 12  # patch 7 on 32 px CIFAR-10
    assert all(p.config["task"]["dataset"] == "cifar10" and "patch_size=7" in p.reason for p in skipped)
    paper = load_sweep(ROOT / "configs" / "studies" / "vision-paper.yaml")
    assert paper.metric == "val_acc" and paper.grid["model.d_model"] == [64, 256, 512]
    assert len(list(itertools.product(*paper.grid.values()))) == 2304

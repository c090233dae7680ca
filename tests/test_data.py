"""Language-model data: corpora and their document rules, tokenizers, the token cache, user errors."""

from __future__ import annotations

import json
import sys
import types
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qkvlab.data import (
    CHUNK_CHARS,
    EOT_TEXT,
    ByteTokenizer,
    Tokenizer,
    chunk_text,
    corpus_hash,
    get_tokenizer,
    gpt2_search_dirs,
    load_corpus,
    load_lm_data,
    split_documents,
    stdlib_files,
    train_bpe,
)
from qkvlab.data import tokenizers as tok_mod
from qkvlab.data.corpus import STDLIB_SKIP_DIRS, stdlib_root
from qkvlab.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
DICKENS = SHARED / "dickens" / "dickens.zip"
GPT2_DIR = SHARED / "gpt2-bpe"
needs_gpt2 = pytest.mark.skipif(not (GPT2_DIR / "encoder.json").is_file(), reason="GPT-2 BPE files not staged")

TRICKY = [
    "",
    "Hello world",
    "héllo wörld 🙂\r\n\ttabs",
    "日本語のテキスト",
    "x" * 300,
    f"a {EOT_TEXT} b",
    "\x00\x7f\x80",
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Nothing a test does lands in the user's ~/.cache."""
    monkeypatch.setenv("QKVLAB_CACHE", str(tmp_path / "qkvlab-cache"))


def paragraphs(n: int, width: int = 480, tag: str = "para") -> list[str]:
    """``n`` distinct paragraphs of about ``width`` characters."""
    words = ["the", "of", "and", "to", "in", "that", "it", "was", "he", "for", "on", "are", "as", "with", "his"]
    out = []
    for i in range(n):
        body = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(width // 5))
        out.append(f"{tag} {i}: {body}.")
    return out


def split_at_eot(ids: np.ndarray, eot: int) -> list[np.ndarray]:
    """The documents of a packed split; it must end with eot."""
    assert ids.size == 0 or ids[-1] == eot
    ends = np.flatnonzero(ids == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[s:e] for s, e in zip(starts, ends, strict=True)]


def expect_error(fn, *fragments: str) -> str:
    with pytest.raises(ConfigError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- documents


def test_chunk_text_cuts_at_blank_lines_and_joins_back():
    text = "\n\n".join(paragraphs(60, 300)) + "\n"
    chunks = chunk_text(text, 1000)
    assert "".join(chunks) == text
    assert len(chunks) > 10
    for c in chunks[:-1]:
        assert 1000 <= len(c) <= 2000 and c.endswith("\n\n")
        assert not c.startswith("\n")
    lines = "abc defg\n" * 1000  # no blank line: cut at line ends
    assert all(c.endswith("\n") for c in chunk_text(lines, 500)) and "".join(chunk_text(lines, 500)) == lines
    solid = "x" * 5000  # no line end at all: hard cuts at twice the target
    assert [len(c) for c in chunk_text(solid, 1000)] == [2000, 2000, 1000]
    assert chunk_text("short", 1000) == ["short"]


def test_text_file_is_chunked_split_by_document_and_packed_with_eot(tmp_path):
    text = "\n\n".join(paragraphs(250)) + "\n"
    path = tmp_path / "book.txt"
    path.write_text(text)
    corpus = load_corpus(path)
    assert corpus.documents == chunk_text(text) and len(corpus.documents) >= 10
    assert corpus.name == f"{tmp_path.name}/book.txt" and "chunks" in corpus.rule

    data = load_lm_data(str(path), "byte", val_fraction=0.2, seed=3, cache_dir=tmp_path / "cache")
    meta = data.meta
    assert isinstance(data.train, np.memmap) and isinstance(data.val, np.memmap)
    assert data.train.dtype == np.uint16 and data.train.ndim == 1
    assert (data.vocab_size, data.eot_id) == (257, 256)
    train_docs = split_at_eot(np.asarray(data.train), data.eot_id)
    val_docs = split_at_eot(np.asarray(data.val), data.eot_id)
    assert (len(train_docs), len(val_docs)) == (meta["n_docs_train"], meta["n_docs_val"])
    assert meta["n_docs_val"] == round(0.2 * len(corpus.documents))
    assert meta["n_tokens"] == data.train.size + data.val.size == len(text.encode()) + len(corpus.documents)

    tok = ByteTokenizer()
    train_text = [tok.decode(d) for d in train_docs]
    val_text = [tok.decode(d) for d in val_docs]
    assert not set(train_text) & set(val_text), "a document is in both splits"
    train_idx, val_idx = split_documents(len(corpus.documents), 0.2, 3)
    assert train_text == [corpus.documents[i] for i in train_idx]
    assert val_text == [corpus.documents[i] for i in val_idx]
    assert meta["corpus_hash"] == corpus_hash(corpus.documents) == corpus.hash
    assert meta["tokenizer"] == "byte" and meta["tokenizer_hash"] == tok.hash
    assert Path(meta["cache_path"]).is_dir() and json.loads((Path(meta["cache_path"]) / "meta.json").read_text())


def test_folder_source_one_document_per_text_file(tmp_path):
    root = tmp_path / "texts"
    (root / "b").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / ".git").mkdir()
    files = {"a.txt": "alpha text\n", "b/c.md": "gamma text\n", "b/a.py": "print('beta')\n", "z.txt": "zeta\r\nline\n"}
    for rel, content in files.items():
        (root / rel).write_bytes(content.encode())
    (root / "empty.txt").write_text("  \n")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "config").write_text("git")
    (root / "__pycache__" / "x.txt").write_text("cache")
    corpus = load_corpus(root)
    assert [Path(n).relative_to(root).as_posix() for n in corpus.names] == ["a.txt", "b/a.py", "b/c.md", "z.txt"]
    assert corpus.documents == ["alpha text\n", "print('beta')\n", "gamma text\n", "zeta\nline\n"]
    assert corpus.rule == "one document per file" and any("image.png" in s for s in corpus.skipped)
    data = load_lm_data(str(root), "byte", val_fraction=0.25, cache_dir=tmp_path / "cache")
    assert (data.meta["n_docs_train"], data.meta["n_docs_val"]) == (3, 1)


def test_glob_source(tmp_path):
    for i in range(4):
        (tmp_path / f"part{i}.md").write_text(f"markdown {i}\n")
    (tmp_path / "notes.txt").write_text("not matched\n")
    corpus = load_corpus(str(tmp_path / "*.md"))
    assert corpus.documents == [f"markdown {i}\n" for i in range(4)]
    expect_error(lambda: load_corpus(str(tmp_path / "*.rst")), "matches no files", "*.rst")


def test_zip_sources(tmp_path):
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        zf.writestr("docs/", "")
        zf.writestr("docs/b.txt", "second\n")
        zf.writestr("a.txt", "first\n")
        zf.writestr("__MACOSX/._a.txt", "junk")
        zf.writestr("blob.bin", b"\x00\x01\x02")
    corpus = load_corpus(many)
    assert corpus.documents == ["first\n", "second\n"] and corpus.rule == "one document per zip member"
    assert corpus.names == [f"{many}:a.txt", f"{many}:docs/b.txt"]

    text = "\n\n".join(paragraphs(100)) + "\n"
    one = tmp_path / "one.zip"
    with zipfile.ZipFile(one, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("book", text.replace("\n", "\r\n"))
    corpus = load_corpus(one)
    assert corpus.documents == chunk_text(text) and len(corpus.documents) > 3

    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    expect_error(lambda: load_corpus(bad), "Cannot read zip file", str(bad))
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("dir/", "")
    expect_error(lambda: load_corpus(empty), "holds no files")


def test_stdlib_corpus_is_sorted_filtered_and_hashed(tmp_path):
    root = stdlib_root()
    files = [p.relative_to(root).as_posix() for p in stdlib_files()]
    assert files == sorted(files) and len(files) > 300
    assert "os.py" in files and "json/__init__.py" in files
    for rel in files:
        parts = rel.split("/")
        assert not set(parts[:-1]) & STDLIB_SKIP_DIRS and not parts[-1].startswith("_sysconfigdata"), rel
    corpus = load_corpus("stdlib", max_docs=25)
    assert corpus.name.startswith("stdlib-py") and len(corpus.documents) == 25
    assert corpus.names == sorted(corpus.names) and corpus.hash == load_corpus("stdlib", max_docs=25).hash
    assert corpus.rule.startswith("one document per .py file")
    data = load_lm_data("stdlib", "byte", max_docs=25, cache_dir=tmp_path)
    assert data.meta["corpus"] == corpus.name and data.meta["corpus_hash"] == corpus.hash
    assert data.meta["n_docs_train"] + data.meta["n_docs_val"] == 25


# ---------------------------------------------------------------- the token cache


def _forbid_tokenising(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("tokenised again despite a cache hit")

    for cls in (Tokenizer, ByteTokenizer, tok_mod.BPETokenizer):
        monkeypatch.setattr(cls, "encode_batch", boom)
        monkeypatch.setattr(cls, "encode_batch_np", boom)
    monkeypatch.setattr(tok_mod, "trainers", SimpleNamespace(BpeTrainer=boom))


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_second_call_reads_the_cache_without_tokenising(tmp_path, monkeypatch, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(80)) + "\n")
    first = load_lm_data(str(path), tokenizer, cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert not first.meta["cache_hit"]
    with monkeypatch.context() as m:
        _forbid_tokenising(m)
        second = load_lm_data(str(path), tokenizer, cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert second.meta["cache_hit"] and second.meta["cache_path"] == first.meta["cache_path"]
    assert isinstance(second.train, np.memmap)
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)
    assert (second.vocab_size, second.eot_id) == (first.vocab_size, first.eot_id)

    path.write_text(path.read_text() + "\n\nOne more paragraph.\n")  # new content: a new cache
    third = load_lm_data(str(path), tokenizer, cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert not third.meta["cache_hit"] and third.meta["cache_path"] != first.meta["cache_path"]


def test_a_damaged_cache_is_rebuilt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(40)) + "\n")
    first = load_lm_data(str(path), "byte", cache_dir=tmp_path / "cache", val_fraction=0.1)
    train_file = Path(first.meta["cache_path"]) / "train.bin"
    train_file.write_bytes(train_file.read_bytes()[:100])  # truncated by a crash or a full disk
    again = load_lm_data(str(path), "byte", cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert not again.meta["cache_hit"] and again.train.size == first.train.size


def test_split_is_deterministic_and_by_document(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, para in enumerate(paragraphs(40, 120)):
        (folder / f"{i:02d}.txt").write_text(para)
    a = load_lm_data(str(folder), "byte", seed=0, val_fraction=0.2, cache_dir=tmp_path / "c1")
    b = load_lm_data(str(folder), "byte", seed=0, val_fraction=0.2, cache_dir=tmp_path / "c2")
    c = load_lm_data(str(folder), "byte", seed=1, val_fraction=0.2, cache_dir=tmp_path / "c1")
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert a.meta["cache_path"] != c.meta["cache_path"]
    val_a = {bytes(d.astype(np.uint8)) for d in split_at_eot(np.asarray(a.val), 256)}
    val_c = {bytes(d.astype(np.uint8)) for d in split_at_eot(np.asarray(c.val), 256)}
    assert len(val_a) == len(val_c) == 8 and val_a != val_c

    for n, frac in [(2, 0.05), (10, 0.5), (1000, 0.05), (7, 0.99)]:
        train, val = split_documents(n, frac, seed=5)
        assert sorted(train + val) == list(range(n)) and not set(train) & set(val)
        assert 1 <= len(val) <= n - 1 and val == sorted(val) and train == sorted(train)
    assert split_documents(5, 0.0, 0) == ([0, 1, 2, 3, 4], [])
    no_val = load_lm_data(str(folder), "byte", val_fraction=0.0, cache_dir=tmp_path / "c1")
    assert no_val.val.size == 0 and no_val.meta["n_docs_val"] == 0 and no_val.meta["n_docs_train"] == 40


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    assert (tok.vocab_size, tok.eot_id, tok.id) == (257, 256, "byte") and len(tok.hash) == 64
    for s in TRICKY:
        ids = tok.encode(s)
        assert ids == list(s.encode()) and tok.decode(ids) == s and tok.eot_id not in ids
    assert tok.decode([*tok.encode("a"), tok.eot_id, *tok.encode("b")]) == f"a{EOT_TEXT}b"
    assert [a.tolist() for a in tok.encode_batch_np(["hé", ""])] == [[104, 195, 169], []]


@needs_gpt2
def test_gpt2_bpe_matches_known_ids(tmp_path):
    tok = get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot_id, tok.id) == (50257, 50256, "gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" world") == [995]
    assert tok.encode(EOT_TEXT) == [27, 91, 437, 1659, 5239, 91, 29]  # ordinary text, never the eot id
    assert tok.decode([15496, 995, 50256]) == f"Hello world{EOT_TEXT}"
    for s in TRICKY:
        assert tok.decode(tok.encode(s)) == s
    assert get_tokenizer(f"gpt2:{GPT2_DIR}").hash == tok.hash == get_tokenizer(tok.spec).hash
    if SHAKESPEARE.is_file():  # the staged README's count, made with tiktoken
        assert len(tok.encode(SHAKESPEARE.read_text())) == 338_025

    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(paragraphs(40)))
    data = load_lm_data(str(path), "gpt2", cache_dir=tmp_path / "cache", val_fraction=0.2)
    assert data.train.dtype == np.uint16 and data.eot_id == 50256 and data.vocab_size == 50257
    docs = split_at_eot(np.asarray(data.train), 50256)
    assert tok.decode(docs[0].tolist()) in load_corpus(path).documents


def test_trained_bpe_round_trips_is_deterministic_and_cached(tmp_path, monkeypatch):
    docs = load_corpus("stdlib", max_docs=40).documents
    a = train_bpe(docs, 600, tmp_path / "a")
    b = train_bpe(docs, 600, tmp_path / "b")
    assert a.hash == b.hash and a.vocab_size <= 600 and a.eot_id == 0 and a.id == "bpe:600"
    for s in [*TRICKY, docs[0][:2000], "def f(x):\n    return x ** 2  # 🙂"]:
        ids = a.encode(s)
        assert a.decode(ids) == s and a.eot_id not in ids
    assert len(a.encode(docs[0])) < 0.6 * len(docs[0].encode())  # it really merged
    assert get_tokenizer(a.spec).hash == a.hash  # 'bpe:<folder>' reads a trained one back
    with monkeypatch.context() as m:
        _forbid_tokenising(m)
        assert get_tokenizer("bpe:600", documents=docs, cache_dir=tmp_path / "a").hash == a.hash
    c = get_tokenizer("bpe", documents=docs, vocab_size=700, cache_dir=tmp_path / "a")
    assert c.hash != a.hash and c.id == "bpe:700"

    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(paragraphs(60)))
    data = load_lm_data(str(path), "bpe:300", cache_dir=tmp_path / "cache")
    assert data.eot_id == 0 and data.vocab_size <= 300 and data.train.dtype == np.uint16
    assert data.meta["tokenizer_spec"].startswith("bpe:")
    again = get_tokenizer(data.meta["tokenizer_spec"])
    assert again.decode(split_at_eot(np.asarray(data.train), 0)[0].tolist()) in load_corpus(path).documents


# ---------------------------------------------------------------- Hugging Face datasets


class _FakeDataset:
    def __init__(self, columns: dict[str, list]):
        self._columns = columns

    @property
    def column_names(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return len(next(iter(self._columns.values())))

    def __getitem__(self, key):
        if isinstance(key, str):
            return list(self._columns[key])
        return {c: v[key] for c, v in self._columns.items()}


def test_hf_source_with_a_stand_in_datasets_module(tmp_path, monkeypatch):
    calls = []
    saved = {
        "train": _FakeDataset({"id": [1, 2, 3], "text": ["first row", "", "third row"]}),
        "validation": _FakeDataset({"title": ["a title"], "body": ["val body"]}),
    }

    def load_from_disk(path):
        calls.append(("load_from_disk", path))
        return saved

    def load_dataset(path, split=None):
        calls.append(("load_dataset", path, split))
        if path == "missing/dataset":
            raise FileNotFoundError("not in the cache")
        return _FakeDataset({"content": ["only string column"], "n": [3]})

    fake = types.ModuleType("datasets")
    fake.load_from_disk, fake.load_dataset = load_from_disk, load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    disk = tmp_path / "saved"
    disk.mkdir()
    (disk / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    corpus = load_corpus(f"hf:{disk}")
    assert corpus.documents == ["first row", "third row"] and corpus.rule == "one document per dataset row"
    assert corpus.name == f"hf:{disk}:train:text" and calls[-1] == ("load_from_disk", str(disk))
    assert load_corpus(f"hf:{disk}:validation:body").documents == ["val body"]
    expect_error(lambda: load_corpus(f"hf:{disk}:validation"), "no 'text' column", "body")
    expect_error(lambda: load_corpus(f"hf:{disk}:test"), "no split 'test'", "validation")
    expect_error(lambda: load_corpus(f"hf:{disk}:train:nope"), "no column 'nope'")
    expect_error(lambda: load_corpus(f"hf:{disk}:train:id"), "holds int", "text column")

    assert load_corpus("hf:some/cached:train").documents == ["only string column"]
    assert calls[-1] == ("load_dataset", "some/cached", "train")
    expect_error(lambda: load_corpus("hf:missing/dataset"), "offline", "missing/dataset", "FileNotFoundError")
    expect_error(lambda: load_corpus("hf:"), "hf:<path>[:split][:column]")
    data = load_lm_data(f"hf:{disk}", "byte", val_fraction=0.5, cache_dir=tmp_path / "cache")
    assert data.meta["n_docs_train"] == data.meta["n_docs_val"] == 1


def test_hf_source_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    expect_error(lambda: load_corpus("hf:/some/path"), "datasets", "pip install 'qkvlab[data]'")


def test_hf_source_with_real_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # read when datasets is first imported
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["alpha beta", "gamma delta", "epsilon"], "label": [0, 1, 0]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_corpus(f"hf:{tmp_path / 'dd'}").documents == rows["text"]
    assert load_corpus(f"hf:{tmp_path / 'ds'}::text").documents == rows["text"]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows["text"]))
    assert load_corpus(f"hf:{tmp_path / 'files'}").documents == rows["text"]
    data = load_lm_data(f"hf:{tmp_path / 'dd'}", "byte", cache_dir=tmp_path / "cache")
    assert data.meta["n_docs_train"] + data.meta["n_docs_val"] == 3


# ---------------------------------------------------------------- real staged corpora


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="Tiny Shakespeare not staged")
def test_tiny_shakespeare_loads_as_a_plain_path(tmp_path):
    text = SHAKESPEARE.read_text()
    corpus = load_corpus(SHAKESPEARE)
    assert "".join(corpus.documents) == text
    assert len(corpus.documents) == pytest.approx(len(text) / CHUNK_CHARS, rel=0.1)
    assert all(d.endswith("\n\n") for d in corpus.documents[:-1])  # whole speeches
    data = load_lm_data(str(SHAKESPEARE), "byte", cache_dir=tmp_path)
    assert data.meta["n_tokens"] == len(text) + len(corpus.documents)  # ASCII: one byte per character
    assert data.meta["n_docs_val"] == round(0.05 * len(corpus.documents))


@pytest.mark.skipif(not DICKENS.is_file(), reason="Dickens zip not staged")
def test_dickens_zip_loads_as_a_plain_path(tmp_path):
    with pytest.warns(UnicodeWarning, match=r"8 byte sequence.*line 2914.*Gen"):
        corpus = load_corpus(DICKENS)
    assert corpus.rule.startswith("one zip member, cut into chunks") and 1000 < len(corpus.documents) < 1500
    assert corpus.documents[0].startswith("**The Project Gutenberg Etext of A Child's History of England")
    assert "\r" not in corpus.documents[0] and sum(d.count("\ufffd") for d in corpus.documents) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = load_corpus(DICKENS, max_docs=20, encoding="cp437")  # the file's real code page
    assert "Genêt" in "".join(exact.documents)
    with pytest.warns(UnicodeWarning):
        data = load_lm_data(str(DICKENS), "byte", max_docs=30, cache_dir=tmp_path)
    assert data.meta["corpus"] == "dickens/dickens.zip" and data.meta["n_docs_train"] + data.meta["n_docs_val"] == 30


# ---------------------------------------------------------------- user errors


def test_missing_source_names_the_path_and_the_accepted_forms(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.txt"
    expect_error(lambda: load_lm_data(str(missing), cache_dir=tmp_path), str(missing), "does not exist", "'stdlib'")


def test_missing_gpt2_files_list_where_it_looked(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(lambda: get_tokenizer(f"gpt2:{empty}"), str(empty), "encoder.json", "vocab.bpe")
    places = [tmp_path / "one", tmp_path / "two"]
    monkeypatch.setattr(tok_mod, "gpt2_search_dirs", lambda: places)
    expect_error(lambda: get_tokenizer("gpt2"), str(places[0]), str(places[1]), "QKVLAB_GPT2_BPE")

    monkeypatch.undo()
    monkeypatch.setenv("QKVLAB_GPT2_BPE", str(empty))
    dirs = gpt2_search_dirs()
    assert dirs[0] == empty and Path.home() / ".cache" / "qkvlab" / "gpt2-bpe" in dirs
    assert any(d.parts[-3:] == ("shared", "data", "gpt2-bpe") for d in dirs)


def test_unknown_tokenizer_and_bad_bpe_settings(tmp_path):
    expect_error(lambda: get_tokenizer("gtp2"), "Unknown tokenizer 'gtp2'", "Did you mean 'gpt2'")
    expect_error(lambda: get_tokenizer("sentencepiece"), "Unknown tokenizer", "'byte'", "'bpe:<vocab_size>'")
    expect_error(lambda: get_tokenizer("bpe:512"), "no documents were given")
    expect_error(lambda: get_tokenizer("bpe:100", documents=["text"]), ">= 258", "100")
    expect_error(lambda: get_tokenizer(f"bpe:{tmp_path}"), "No trained BPE", str(tmp_path))
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(paragraphs(30)))
    expect_error(lambda: load_lm_data(str(path), "bpe:12", cache_dir=tmp_path), ">= 258")
    expect_error(lambda: load_lm_data(str(path), "gpt3", cache_dir=tmp_path), "Unknown tokenizer 'gpt3'")


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    expect_error(lambda: load_lm_data(str(empty_file), cache_dir=tmp_path), "has no text", str(empty_file))
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("   \n\n")
    (blank / "b.txt").write_text("")
    expect_error(lambda: load_corpus(blank), "has no text", "2 document(s), all empty")
    (tmp_path / "void").mkdir()
    expect_error(lambda: load_corpus(tmp_path / "void"), "holds no files")
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\x00\x01\x02binary")
    expect_error(lambda: load_corpus(binary), "binary", str(binary))


def test_bad_arguments_are_clear_errors(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just one short document\n")
    expect_error(lambda: load_lm_data(str(tiny), cache_dir=tmp_path), "1 document", "val_fraction=0")
    assert load_lm_data(str(tiny), val_fraction=0, cache_dir=tmp_path).val.size == 0
    expect_error(lambda: load_lm_data(str(tiny), val_fraction=1.0, cache_dir=tmp_path), "val_fraction", "[0, 1)")
    expect_error(lambda: load_lm_data(str(tiny), max_docs=0, cache_dir=tmp_path), "max_docs", "0")
    expect_error(lambda: load_lm_data(str(tiny), encoding="klingon", cache_dir=tmp_path), "'klingon'")


def test_non_utf8_bytes_say_where(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("first line\nsecond: café crème brûlée à la façon\n".encode("latin-1") * 50)
    message = expect_error(lambda: load_corpus(latin), str(latin), "line 2, column 12", "encoding=")
    assert "not UTF-8" in message
    assert "café" in load_corpus(latin, encoding="latin-1").documents[0]

    stray = tmp_path / "stray.txt"
    stray.write_bytes(b"plain text\n" * 200 + b"one bad \xff byte\n" + b"more\n" * 10)
    with pytest.warns(UnicodeWarning, match=r"line 201, column 9"):
        docs = load_corpus(stray).documents
    assert "one bad \ufffd byte" in docs[0]


def test_unreadable_file_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("secret")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    expect_error(lambda: load_corpus(path), "Cannot read corpus file", str(path), "Permission denied")


def test_a_split_of_documents_far_apart_in_size_is_refused_with_a_fix_that_works(tmp_path):
    folder = tmp_path / "shakespeare"
    folder.mkdir()
    speeches = "\n\n".join(f"SPEAKER {i}:\nA line of verse, and another one, number {i}." for i in range(2000))
    (folder / "input.txt").write_text(speeches)  # about 110,000 characters
    (folder / "README.md").write_text("# A corpus\nWhere it came from.\n")
    with pytest.raises(ConfigError) as err:  # the README is the validation split, or the text is
        load_lm_data(str(folder), "byte", val_fraction=0.05, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message and "1 of 2 documents" in message
    assert repr(str(folder / "input.txt")) in message and "val_source" in message
    data = load_lm_data(str(folder / "input.txt"), "byte", val_fraction=0.05, cache_dir=tmp_path / "cache")
    assert 0.02 < len(data.val) / (len(data.train) + len(data.val)) < 0.1  # the fix: chunks of even size
    (folder / "README.md").unlink()
    (folder / "input.txt").unlink()
    for i in range(10):  # ten files of one size: a split of files is fine
        (folder / f"part{i}.txt").write_text(speeches[: len(speeches) // 10])
    load_lm_data(str(folder), "byte", val_fraction=0.2, cache_dir=tmp_path / "cache")

"""Language-model data: a corpus, tokenised once into a memory-mapped cache, split by document.

:func:`load_lm_data` reads the corpus (:mod:`qkvlab.data.corpus` says how each source is cut
into documents), keeps the first ``max_docs`` documents, and splits them by document: a
permutation drawn from ``numpy.random.default_rng(seed)`` picks
``round(val_fraction * n_docs)`` documents (at least one, at most ``n_docs - 1``) for
validation; both splits keep corpus order. A split whose share of the text is more than ten
times off ``val_fraction`` (either way; corpora of 2 to 10 documents and at least 32,768
characters) is refused: it comes from documents of very unequal size, such as a folder
holding a book and its README, and would validate on the wrong text. A trained BPE (``"bpe:<n>"``) learns from the
training documents only. Each split is packed as ``doc, eot, doc, eot, ...`` into one flat
array of token ids (``uint16`` when the vocabulary fits, else ``uint32``); nothing is
padded, so every position is a real token and the trainer never has padding to mask.

A corpus that comes already split (separate training and validation books, say) names its
validation corpus as ``val_source``: then every document of ``source`` trains and every
document of ``val_source`` validates. ``extra`` names further corpora scored with the same
tokenizer (an out-of-domain test set), each packed whole into ``<name>.bin``.

The arrays live in ``<cache_dir>/<corpus>-<tokenizer>-<key>/{train,val}.bin`` with a
``meta.json`` beside them; ``key`` hashes the corpus content, the tokenizer's hash and the
split settings, so a changed file or tokenizer gets a new cache. Each file is written to a
temporary name and renamed (``meta.json`` last), under a file lock, so concurrent
processes (torchrun ranks) and killed runs never leave or read half a cache. The next call
with the same inputs reads the corpus (to hash it) but does not tokenise again: it maps
the files with ``numpy.memmap``.

Example::

    data = load_lm_data("stdlib", "gpt2", max_docs=50)
    data.train[:10], data.vocab_size, data.eot_id, data.meta["corpus_hash"]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock

from qkvlab.checkpoint import atomic_write
from qkvlab.data.corpus import CHUNK_CHARS, Corpus, load_corpus
from qkvlab.data.tokenizers import Tokenizer, default_cache_root, get_tokenizer
from qkvlab.errors import ConfigError

CACHE_FORMAT = "qkvlab-tokens/1"
_BATCH_CHARS = 1 << 20  # characters per encode_batch call


@dataclass
class TokenSplits:
    """Packed token ids of a corpus, split by document.

    ``train`` and ``val`` are 1-D ``np.memmap`` arrays (``uint16`` if ``vocab_size < 65536``,
    else ``uint32``) of the documents joined, each followed by ``eot_id``; ``val`` is an empty
    array when ``val_fraction`` is 0. ``meta`` records the corpus (name, content hash,
    documents per split), the tokenizer (id, hash, spec to rebuild it), token counts and the
    cache path.
    """

    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)
    vocab_size: int
    eot_id: int
    meta: dict = field(repr=False)
    extra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


#: Names an extra corpus may take: they become file names and metric prefixes (``<name>_ppl``).
EXTRA_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def default_token_cache() -> Path:
    """``$QKVLAB_CACHE/tokens`` if ``QKVLAB_CACHE`` is set, else ``~/.cache/qkvlab/tokens``."""
    return default_cache_root() / "tokens"


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and validation documents (each sorted)."""
    if val_fraction == 0:
        return list(range(n_docs)), []
    if n_docs < 2:
        raise ConfigError(
            f"The corpus has {n_docs} document; a validation split needs at least 2. Give more text (one text "
            "file is cut into documents of about 8,192 characters), name a separate validation corpus "
            "(data.val_source in a train config), or in Python pass val_fraction=0 to read it without one."
        )
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    order = np.random.default_rng(seed).permutation(n_docs)
    val = sorted(int(i) for i in order[:n_val])
    chosen = set(val)
    return [i for i in range(n_docs) if i not in chosen], val


#: How far the validation split's share of the text may stray from ``val_fraction`` (either way)
#: before a split of a few documents is refused: documents of very unequal size (a folder holding
#: a long text and its README) make a document split that measures nothing. Many documents
#: average out, and a text of a few chunks is a toy whatever its split.
SPLIT_SHARE_SLACK = 10.0
SPLIT_CHECK_MAX_DOCS = 10
SPLIT_CHECK_MIN_CHARS = 4 * CHUNK_CHARS


def _check_split_share(corpus: Corpus, val_idx: list[int], val_fraction: float, max_docs: int | None) -> None:
    sizes = [len(d) for d in corpus.documents]
    if not val_idx or len(sizes) > SPLIT_CHECK_MAX_DOCS or sum(sizes) < SPLIT_CHECK_MIN_CHARS:
        return
    share = sum(sizes[i] for i in val_idx) / max(1, sum(sizes))
    if val_fraction / SPLIT_SHARE_SLACK <= share <= min(0.5, val_fraction * SPLIT_SHARE_SLACK):
        return
    names = [corpus.names[i] for i in val_idx]
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    fixes = []
    if max_docs is not None and len(sizes) == max_docs:  # more documents would average out
        fixes.append(f"raise data.max_docs (now {max_docs}) past {SPLIT_CHECK_MAX_DOCS}")
    if Path(corpus.source).expanduser().is_dir():  # a folder: its largest file alone is cut into even chunks
        biggest = corpus.names[max(range(len(sizes)), key=sizes.__getitem__)]
        fixes.append(f"point the source at the text itself ({str(Path(corpus.source) / biggest)!r})")
    fixes.append("name a separate validation corpus (data.val_source in a train config)")
    fix = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + ", or " + fixes[-1]
    raise ConfigError(
        f"The validation split of {corpus.source!r} is {len(names)} of {len(sizes)} documents ({listed}), "
        f"{share:.2%} of its text where val_fraction={val_fraction:g} asks for about {val_fraction:.0%}: its "
        f"documents differ too much in size ({corpus.rule}). To fix it, {fix}."
    )


def _check_args(val_fraction: float, seed: int, vocab_size: int) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}; the usual is 0.05.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}.")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size must be a positive integer, got {vocab_size!r}.")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:48] or "corpus"


def _batches(docs: Sequence[str]) -> Iterator[Sequence[str]]:
    start, chars = 0, 0
    for i, doc in enumerate(docs):
        chars += len(doc)
        if chars >= _BATCH_CHARS:
            yield docs[start : i + 1]
            start, chars = i + 1, 0
    if start < len(docs):
        yield docs[start:]


def _write_tokens(path: Path, docs: Sequence[str], tok: Tokenizer, dtype: np.dtype) -> int:
    """Tokenise ``docs`` into ``path`` as ``doc eot doc eot ...``; returns the token count."""
    count = 0
    eot = np.array([tok.eot_id], dtype=dtype)

    def write(tmp: str) -> None:
        nonlocal count
        with open(tmp, "wb") as f:
            for batch in _batches(docs):
                parts: list[np.ndarray] = []
                for ids in tok.encode_batch_np(batch, dtype):
                    parts += [ids, eot]
                packed = np.concatenate(parts)
                f.write(packed.tobytes())
                count += packed.size

    atomic_write(path, write)
    return count


def _map(path: Path, dtype: str, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def _read_meta(folder: Path) -> dict | None:
    """The cache's meta if the cache is complete and consistent, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val", *meta.get("extra", [])):
            if (folder / f"{split}.bin").stat().st_size != meta[f"n_tokens_{split}"] * itemsize:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_lm_data(
    source: str | os.PathLike,
    tokenizer: str = "byte",
    *,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_docs: int | None = None,
    vocab_size: int = 4096,
    encoding: str = "utf-8",
    val_source: str | os.PathLike | None = None,
    extra: dict[str, str | os.PathLike] | None = None,
) -> TokenSplits:
    """Tokenise ``source`` with ``tokenizer`` once (cached) and return the packed splits.

    Args:
        source: ``"stdlib"``, a text file, folder, glob, ``.zip`` or ``"hf:<path>[:split][:column]"``.
        tokenizer: ``"byte"``, ``"gpt2"``, ``"gpt2:<folder>"``, ``"bpe"``, ``"bpe:<vocab_size>"`` or ``"bpe:<folder>"``.
        cache_dir: where token caches go (default ``$QKVLAB_CACHE/tokens`` or ``~/.cache/qkvlab/tokens``);
            trained BPEs go to its ``tokenizers/`` subfolder.
        val_fraction: share of documents held out for validation, in [0, 1).
        seed: picks the validation documents.
        max_docs: keep only the first documents of the corpus (quick runs).
        vocab_size: vocabulary of a BPE trained here (``"bpe"``); ``"bpe:<n>"`` overrides it.
        encoding: text encoding of the corpus files (UTF-8 by default; see :mod:`qkvlab.data.corpus`).
        val_source: a separate validation corpus (any ``source`` form); ``source`` then trains
            whole and ``val_fraction`` and ``seed`` are unused. ``max_docs`` limits both.
        extra: name -> corpus of further evaluation sets, tokenised whole; names are lower-case
            identifiers (``dickens``), used as file names and metric prefixes.
    """
    _check_args(val_fraction, seed, vocab_size)
    extra = dict(extra or {})
    for name in extra:
        if not isinstance(name, str) or not EXTRA_NAME.match(name) or name in ("train", "val"):
            raise ConfigError(
                f"Extra evaluation set name {name!r} must be a lower-case identifier such as 'dickens' "
                "(letters, digits, '_'; not 'train' or 'val')."
            )
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_token_cache()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"Cannot create the token cache folder {str(root)!r}: {e.strerror or e}. "
            "Pass cache_dir= or set QKVLAB_CACHE to a writable folder."
        ) from None
    corpus = load_corpus(source, max_docs=max_docs, encoding=encoding)
    val_corpus = None
    if val_source is not None:
        val_corpus = load_corpus(val_source, max_docs=max_docs, encoding=encoding)
        train_docs, val_docs = list(corpus.documents), list(val_corpus.documents)
    else:
        train_idx, val_idx = split_documents(len(corpus.documents), val_fraction, seed)
        train_docs = [corpus.documents[i] for i in train_idx]
        val_docs = [corpus.documents[i] for i in val_idx]
        _check_split_share(corpus, val_idx, val_fraction, max_docs)
    extra_corpora = {name: load_corpus(src, encoding=encoding) for name, src in sorted(extra.items())}

    # Workers of a sweep that share the cache build it once: the others wait here, then read it.
    with FileLock(root / f".lock-{corpus.hash[:16]}"):
        tok = get_tokenizer(tokenizer, documents=train_docs, vocab_size=vocab_size, cache_dir=root / "tokenizers")
        settings = {
            "format": CACHE_FORMAT,
            "corpus_hash": corpus.hash,
            "tokenizer_hash": tok.hash,
            "val_fraction": float(val_fraction),
            "seed": seed,
            "n_docs": len(corpus.documents),
        }
        if val_corpus is not None:  # a given split: the split settings do not apply
            settings.update(val_fraction=None, seed=None, val_corpus_hash=val_corpus.hash, n_docs_val=len(val_docs))
        if extra_corpora:
            settings["extra"] = {name: c.hash for name, c in extra_corpora.items()}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        folder = root / f"{_slug(corpus.name)}-{_slug(tok.id)}-{key}"
        meta = _read_meta(folder)
        cache_hit = meta is not None
        if meta is None:
            dtype = np.dtype(np.uint16 if tok.vocab_size < 65536 else np.uint32)
            start = time.perf_counter()
            try:
                n_train = _write_tokens(folder / "train.bin", train_docs, tok, dtype)
                n_val = _write_tokens(folder / "val.bin", val_docs, tok, dtype)
                n_extra = {
                    name: _write_tokens(folder / f"{name}.bin", c.documents, tok, dtype)
                    for name, c in extra_corpora.items()
                }
            except OSError as e:
                raise ConfigError(
                    f"Cannot write the token cache in {str(folder)!r}: {e.strerror or e}. Free disk space, or pass "
                    "cache_dir= / set QKVLAB_CACHE to a writable folder."
                ) from None
            meta = {
                **settings,
                "corpus": corpus.name,
                "source": corpus.source,
                "split_rule": corpus.rule,
                "n_skipped": len(corpus.skipped),
                "skipped": corpus.skipped[:10],
                "max_docs": max_docs,
                "n_chars": corpus.n_chars,
                "tokenizer": tok.id,
                "tokenizer_spec": tok.spec,
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                "dtype": dtype.name,
                "n_docs_train": len(train_docs),
                "n_docs_val": len(val_docs),
                "n_tokens_train": n_train,
                "n_tokens_val": n_val,
                "n_tokens": n_train + n_val,
                "val_source": None if val_corpus is None else val_corpus.source,
                "extra": list(n_extra),
                **{f"n_tokens_{name}": n for name, n in n_extra.items()},
                "extra_sources": {name: c.source for name, c in extra_corpora.items()},
                "tokenize_seconds": round(time.perf_counter() - start, 3),
            }
            atomic_write(folder / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))

    meta = {**meta, "cache_path": str(folder), "cache_hit": cache_hit, "tokenizer_spec": tok.spec}
    extras = meta.get("extra", [])
    return TokenSplits(
        train=_map(folder / "train.bin", meta["dtype"], meta["n_tokens_train"]),
        val=_map(folder / "val.bin", meta["dtype"], meta["n_tokens_val"]),
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        meta=meta,
        extra={name: _map(folder / f"{name}.bin", meta["dtype"], meta[f"n_tokens_{name}"]) for name in extras},
    )

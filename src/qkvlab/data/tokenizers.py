"""Tokenizers for language modelling: byte-level, GPT-2 BPE from local files, and a BPE trained here.

:func:`get_tokenizer` takes a name:

``"byte"``
    UTF-8 bytes as ids 0..255, end-of-text 256 (vocab 257). Lossless for any text.
``"gpt2"`` or ``"gpt2:<folder>"``
    OpenAI's GPT-2 BPE (50,257 ids, ``<|endoftext|>`` = 50256) read from ``encoder.json`` +
    ``vocab.bpe`` (Hugging Face's names ``vocab.json`` + ``merges.txt`` work too); nothing is
    downloaded. Without a folder it looks, in order, in ``$QKVLAB_GPT2_BPE``,
    ``../shared/data/gpt2-bpe`` beside the repository and beside the working directory,
    ``$QKVLAB_CACHE/gpt2-bpe`` and ``~/.cache/qkvlab/gpt2-bpe``. Built with the ``tokenizers``
    library: BPE model + byte-level pre-tokenizer (GPT-2's split regex, no prefix space) +
    byte-level decoder; it gives tiktoken's ``gpt2`` ids (e.g. "Hello world" -> [15496, 995]).
``"bpe:<vocab_size>"`` (or ``"bpe"`` with ``vocab_size=``)
    A byte-level BPE trained with ``tokenizers`` on the given documents (the training split):
    all 256 bytes in the base alphabet, so every text round-trips; ``<|endoftext|>`` is id 0;
    merges need a pair seen at least twice, so a small corpus may end below ``vocab_size``.
    Training is deterministic; the result (``vocab.json`` + ``merges.txt``) is cached in
    ``cache_dir`` under a key of the documents' hash and the vocab size.
``"bpe:<folder>"``
    A BPE trained earlier, read back from its folder (what ``Tokenizer.spec`` names).

End-of-text is never produced by ``encode``: text that spells ``<|endoftext|>`` is encoded
as ordinary text (tiktoken's ``encode_ordinary``). The data layer appends :attr:`eot_id`
after each document.
"""

from __future__ import annotations

import abc
import difflib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import __version__ as tokenizers_version
from tokenizers import decoders, models, pre_tokenizers, trainers

from qkvlab.data.corpus import corpus_hash
from qkvlab.errors import ConfigError

EOT_TEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
BPE_MIN_FREQUENCY = 2
_BPE_RECIPE = "qkvlab-bpe/1"  # bump when the training recipe changes (invalidates cached BPEs)
_REPO_ROOT = Path(__file__).resolve().parents[3]


def default_cache_root() -> Path:
    """``$QKVLAB_CACHE`` if set, else ``~/.cache/qkvlab``."""
    env = os.environ.get("QKVLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qkvlab"


class Tokenizer(abc.ABC):
    """Text <-> ids. ``id`` is a readable name, ``hash`` pins the exact vocabulary, ``spec``
    is a string :func:`get_tokenizer` rebuilds this tokenizer from without training data.

    Example::

        tok = get_tokenizer("byte")
        ids = tok.encode("héllo")  # [104, 195, 169, 108, 108, 111]
        tok.decode(ids + [tok.eot_id])  # 'héllo<|endoftext|>'
    """

    id: str
    hash: str
    spec: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """One id list per text; eot is never produced from text."""

    def encode_batch_np(self, texts: Sequence[str], dtype: np.dtype | type = np.uint32) -> list[np.ndarray]:
        """Like :meth:`encode_batch` but one 1-D array per text (the fast path of the token cache)."""
        return [np.asarray(ids, dtype=dtype) for ids in self.encode_batch(texts)]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are the ids 0..255; end-of-text is 256."""

    def __init__(self) -> None:
        self.id = "byte"
        self.spec = "byte"
        self.vocab_size = 257
        self.eot_id = 256
        self.hash = hashlib.sha256(b"qkvlab-byte/1: utf-8 bytes 0..255, eot 256").hexdigest()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def encode_batch_np(self, texts: Sequence[str], dtype: np.dtype | type = np.uint16) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(dtype) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                out.append(run.decode("utf-8", errors="replace") + EOT_TEXT)
                run = bytearray()
            elif 0 <= i < 256:
                run.append(i)
            else:
                raise ConfigError(f"Byte tokenizer got id {i}; its ids are 0..256 (256 = end of text).")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class LibraryTokenizer(Tokenizer):
    """A tokenizer held by the ``tokenizers`` library (``self._tok``): batched encoding on all cores."""

    _tok: HFTokenizer
    default_dtype: type = np.uint32

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._encode(texts)]

    def encode_batch_np(self, texts: Sequence[str], dtype: np.dtype | type | None = None) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=dtype or self.default_dtype) for e in self._encode(texts)]

    def _encode(self, texts: Sequence[str]) -> list:
        # encode_batch_fast skips character offsets (tokenizers >= 0.20); both run on all cores.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return encode(list(texts), add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ConfigError(f"Token id {bad[0]} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1}).")
        return self._tok.decode(ids, skip_special_tokens=False)


class BPETokenizer(LibraryTokenizer):
    """Byte-level BPE (GPT-2 style) on the ``tokenizers`` library, read from vocab + merges files."""

    default_dtype = np.uint16

    def __init__(self, vocab_file: Path, merges_file: Path, *, id: str, spec: str) -> None:
        try:
            model = models.BPE.from_file(str(vocab_file), str(merges_file))
        except Exception as e:  # tokenizers raises plain Exception for unreadable files
            raise ConfigError(
                f"Cannot read BPE files {str(vocab_file)!r} / {str(merges_file)!r}: {e}. They should be a "
                "GPT-2 style vocab (JSON token -> id) and merges (one 'left right' pair per line)."
            ) from None
        tok = HFTokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        vocab = tok.get_vocab()
        eot = vocab.get(EOT_TEXT)
        if eot is None:
            raise ConfigError(
                f"BPE vocab {str(vocab_file)!r} has no {EOT_TEXT!r} token; it is not a GPT-2 style vocab."
            )
        self.eot_id = eot
        self.vocab_size = tok.get_vocab_size()
        merges = [
            line for line in merges_file.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")
        ]
        h = hashlib.sha256(b"qkvlab-bytelevel-bpe/1\n")
        h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
        h.update("\n".join(merges).encode())
        self.hash = h.hexdigest()
        self.id = id
        self.spec = spec
        self.files = (Path(vocab_file), Path(merges_file))


def gpt2_search_dirs() -> list[Path]:
    """Where ``"gpt2"`` looks for its files, in order."""
    dirs = []
    env = os.environ.get("QKVLAB_GPT2_BPE")
    if env:
        dirs.append(Path(env).expanduser())
    dirs += [
        _REPO_ROOT.parent / "shared" / "data" / "gpt2-bpe",
        Path.cwd().parent / "shared" / "data" / "gpt2-bpe",
        default_cache_root() / "gpt2-bpe",
        Path.home() / ".cache" / "qkvlab" / "gpt2-bpe",
    ]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_gpt2_files(folder: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The (vocab, merges) files of GPT-2's BPE in ``folder`` or the default places."""
    dirs = [Path(folder).expanduser()] if folder else gpt2_search_dirs()
    for d in dirs:
        for vocab, merges in GPT2_FILE_PAIRS:
            if (d / vocab).is_file() and (d / merges).is_file():
                return d / vocab, d / merges
    looked = "; ".join(str(d) for d in dirs)
    raise ConfigError(
        f"GPT-2 BPE files (encoder.json + vocab.bpe, or vocab.json + merges.txt) not found; looked in: {looked}. "
        "Copy them into one of these folders, set QKVLAB_GPT2_BPE to their folder, or name it: 'gpt2:<folder>'."
    )


def load_gpt2(folder: str | os.PathLike | None = None) -> BPETokenizer:
    vocab, merges = find_gpt2_files(folder)
    tok = BPETokenizer(vocab, merges, id="gpt2", spec=f"gpt2:{vocab.parent}")
    if tok.eot_id != GPT2_EOT_ID or tok.vocab_size != GPT2_EOT_ID + 1:
        raise ConfigError(
            f"{str(vocab)!r} is not GPT-2's vocabulary ({tok.vocab_size} tokens, {EOT_TEXT} = {tok.eot_id}; "
            f"expected 50257 and {GPT2_EOT_ID}). Use 'bpe:<folder>' for other BPE vocabularies."
        )
    return tok


def load_trained_bpe(folder: str | os.PathLike) -> Tokenizer:
    """A BPE written by :func:`train_bpe`, read back from its folder.

    A folder with a ``tokenizer.json`` (an imported model's tokenizer, whose split rules may
    differ from GPT-2's) is read from that file instead; see :mod:`qkvlab.interop.tokenizer`.
    """
    folder = Path(folder).expanduser()
    if (folder / "tokenizer.json").is_file():
        from qkvlab.interop.tokenizer import JsonTokenizer

        return JsonTokenizer(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise ConfigError(
            f"No trained BPE in {str(folder)!r} (expected vocab.json and merges.txt); "
            "train one with 'bpe:<vocab_size>' or give the folder a trained BPE was cached in."
        )
    try:
        info = json.loads((folder / "meta.json").read_text())
        requested = info["vocab_size_requested"]
    except (OSError, ValueError, KeyError):
        requested = None
    tok = BPETokenizer(vocab, merges, id="bpe", spec=f"bpe:{folder}")
    tok.id = f"bpe:{requested or tok.vocab_size}"
    return tok


def train_bpe(documents: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike | None = None) -> BPETokenizer:
    """Train (or load from ``cache_dir``) a byte-level BPE of ``vocab_size`` on ``documents``."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise ConfigError(
            f"BPE vocab_size must be an integer >= 258 (256 bytes + end-of-text + merges), got {vocab_size!r}; "
            "try 'bpe:4096'."
        )
    if not documents:
        raise ConfigError("A BPE needs training documents, and none were given; load a corpus with text first.")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / "tokenizers"
    key = hashlib.sha256(
        f"{_BPE_RECIPE}|{corpus_hash(documents)}|{len(documents)}|{vocab_size}|{BPE_MIN_FREQUENCY}".encode()
    ).hexdigest()[:16]
    folder = root / f"bpe{vocab_size}-{key}"
    if (folder / "meta.json").is_file():
        return load_trained_bpe(folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    except OSError as e:
        raise ConfigError(
            f"Cannot write the BPE cache in {str(root)!r}: {e.strerror or e}. Pass cache_dir= or set QKVLAB_CACHE."
        ) from None
    try:
        start = time.perf_counter()
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=BPE_MIN_FREQUENCY,
            special_tokens=[EOT_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(documents, trainer, length=len(documents))
        tok.model.save(str(tmp))
        meta = {
            "recipe": _BPE_RECIPE,
            "vocab_size_requested": vocab_size,
            "vocab_size": tok.get_vocab_size(),
            "min_frequency": BPE_MIN_FREQUENCY,
            "trained_on_hash": corpus_hash(documents),
            "trained_on_docs": len(documents),
            "trained_on_chars": sum(len(d) for d in documents),
            "train_seconds": round(time.perf_counter() - start, 3),
            "tokenizers_version": tokenizers_version,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not a lost race with another process: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_trained_bpe(folder)


TOKENIZER_FORMS = "'byte', 'gpt2', 'gpt2:<folder>', 'bpe:<vocab_size>' (e.g. 'bpe:4096') or 'bpe:<folder>'"


def get_tokenizer(
    name: str,
    *,
    documents: Sequence[str] | None = None,
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """The tokenizer called ``name`` (see the module docstring).

    ``documents`` and ``vocab_size`` are used by a BPE trained here (``"bpe"``, or
    ``"bpe:<vocab_size>"`` which overrides ``vocab_size``); ``cache_dir`` is where trained
    BPEs are kept (default ``~/.cache/qkvlab/tokenizers``).
    """
    if not isinstance(name, str):
        raise ConfigError(f"Tokenizer name must be a string such as {TOKENIZER_FORMS}; got {name!r}.")
    kind, _, arg = name.partition(":")
    if kind == "byte" and not arg:
        return ByteTokenizer()
    if kind == "gpt2":
        return load_gpt2(arg or None)
    if kind == "bpe":
        if arg and not arg.isdigit():
            return load_trained_bpe(arg)
        size = int(arg) if arg else vocab_size
        if documents is None:
            raise ConfigError(
                f"Tokenizer {name!r} is trained on a corpus, and no documents were given: use load_lm_data(source, "
                f"{name!r}), pass documents=..., or load a trained one with 'bpe:<folder>'."
            )
        return train_bpe(documents, size, cache_dir)
    near = difflib.get_close_matches(kind, ["byte", "gpt2", "bpe"], n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"Unknown tokenizer {name!r}; expected {TOKENIZER_FORMS}.{hint}")

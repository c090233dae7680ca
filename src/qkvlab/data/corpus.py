"""Text corpora for language modelling: where documents come from and how they are cut.

:func:`load_corpus` turns a source string into an ordered list of documents plus a content
hash (sha256 over the documents in order, each prefixed with its length, so boundaries
count). The rules, per source:

``"stdlib"``
    The embedded default: the Python standard library's own ``.py`` files under
    ``sysconfig.get_paths()["stdlib"]``, **one document per file**, sorted by path relative
    to that folder. Left out: ``site-packages`` / ``dist-packages`` (not the stdlib), test
    suites (``test``, ``tests``, ``idle_test``), ``__pycache__``, the build folder
    ``config-*``, ``_sysconfigdata_*.py`` (machine-specific), and generated data dressed
    as code: ``pydoc_data`` (one 750 KB string of documentation) and the character-map
    codec tables made by ``gencodec.py``. What remains differs between Python versions
    and builds, which is why the hash is recorded with every run.
a text file (Tiny Shakespeare, say)
    One long text is **cut into chunks of about** :data:`CHUNK_CHARS` characters at
    blank-line (paragraph) boundaries: a chunk ends at the first blank line after
    ``CHUNK_CHARS`` characters, at a line end if no blank line comes within twice that, or
    hard at ``2 * CHUNK_CHARS``. The chunks, joined, give back the text exactly. For Tiny
    Shakespeare that is 133 documents that end between speeches.
a folder
    Every regular file below it (recursively, sorted by relative path) that is text, **one
    document per file**; hidden files and folders, ``__pycache__`` and binary files (a NUL
    byte in the first 8 KiB) are skipped and listed in :attr:`Corpus.skipped`. A folder
    holding a single text file is cut like a text file.
a glob (``data/**/*.txt``)
    The matching files, sorted, as for a folder.
a ``.zip``
    **One document per member** (sorted by name; folders, hidden and ``__MACOSX`` members
    and binary members skipped). A zip with one member is one long text and is cut into
    chunks like a text file: Dickens (``dickens.zip``, one member holding ten Gutenberg
    books, 10.2 MB) becomes 1,172 chunks of whole paragraphs.
``"hf:<path>[:split][:column]"``
    A Hugging Face ``datasets`` dataset, offline only (``HF_DATASETS_OFFLINE`` and
    ``HF_HUB_OFFLINE`` are set): a folder written by ``save_to_disk`` is read with
    ``load_from_disk``, anything else with ``load_dataset(path)`` (a local folder of data
    files, or a dataset already in the local cache). ``split`` defaults to ``train`` (or the
    only split), ``column`` to ``text`` (or the only string column). **One document per
    row.**

Everywhere: ``\\r\\n`` becomes ``\\n``, a leading UTF-8 byte-order mark is dropped, and
documents with no non-whitespace character are dropped. Bytes are decoded as UTF-8 (or
``encoding``, ``data.encoding`` in a train config); a file that starts with a UTF-16 or UTF-32
byte-order mark is decoded as such whatever ``encoding`` says, and with ``encoding`` set to a
UTF-16 or UTF-32 codec NUL bytes do not make a file binary. A file with a few stray bytes
that are not UTF-8 -- at most one byte sequence per 1,000 bytes, as in Dickens (eight DOS
code-page accents in 10 MB) -- is decoded with
U+FFFD in their place and a warning that says where; more than that, or a wrong
``encoding``, is a :class:`~qkvlab.errors.ConfigError` that gives the file, line, column and
byte offset and the fix. ``max_docs`` keeps the first documents in corpus order.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import re
import sys
import sysconfig
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qkvlab.errors import ConfigError

CHUNK_CHARS = 8192
"""Target size of a document cut from one long text (about 2,000 GPT-2 tokens of prose)."""

STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
)
SOURCE_FORMS = (
    "'stdlib', a text file, a folder of text files, a glob pattern, a .zip of text files, "
    "or 'hf:<path>[:split][:column]'"
)
_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n(?:[ \t\f\v]*\n)*")


@dataclass(frozen=True)
class Corpus:
    """An ordered list of documents and where each came from.

    Example::

        corpus = load_corpus("stdlib", max_docs=10)
        corpus.names[0], len(corpus.documents[0]), corpus.hash
    """

    name: str
    source: str
    documents: list[str] = field(repr=False)
    names: list[str] = field(repr=False)
    hash: str
    rule: str
    skipped: list[str] = field(default_factory=list, repr=False)

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)


def corpus_hash(documents: Iterable[str]) -> str:
    """sha256 of the documents in order (UTF-8, each prefixed with its byte length)."""
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def chunk_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` characters at paragraph boundaries.

    A piece ends right after the first blank-line run that starts at or beyond
    ``chunk_chars`` characters; failing that within ``2 * chunk_chars``, after a line end;
    failing that, hard at ``2 * chunk_chars``. ``"".join(chunk_text(t)) == t``.
    """
    if chunk_chars < 1:
        raise ConfigError(f"chunk_chars must be >= 1, got {chunk_chars}.")
    pieces: list[str] = []
    start, n = 0, len(text)
    while n - start > chunk_chars:
        limit = start + 2 * chunk_chars
        m = _BLANK_LINE.search(text, start + chunk_chars - 1, limit)
        if m is not None:
            end = m.end()
        else:
            newline = text.find("\n", start + chunk_chars, limit)
            end = newline + 1 if newline >= 0 else min(limit, n)
        pieces.append(text[start:end])
        start = end
    if start < n:
        pieces.append(text[start:])
    return pieces


#: Byte-order marks that name their encoding (UTF-32 first: its little-endian mark starts like UTF-16's).
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
#: The wide encodings, whose text holds NUL bytes.
WIDE_CODECS = ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be")


def _bom_codec(data: bytes) -> str | None:
    return next((codec for bom, codec in BOMS if data.startswith(bom)), None)


def decode_text(data: bytes, where: str, encoding: str = "utf-8") -> str:
    """Decode one file's bytes (see the module docstring for the policy); ``where`` names it."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise ConfigError(
            f"Unknown text encoding {encoding!r}; use a Python codec name such as 'utf-8', 'latin-1' or 'cp1252'."
        ) from None
    codec = _bom_codec(data) or codec  # the codec strips its own byte-order mark
    if codec == "utf-8" and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        text = _decode_lenient(data, where, codec, e)
    return text.replace("\r\n", "\n")


def _decode_lenient(data: bytes, where: str, codec: str, err: UnicodeDecodeError) -> str:
    pos = err.start
    line = data.count(b"\n", 0, pos) + 1
    column = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
    context = data[max(0, pos - 20) : pos + 12]
    at = f"line {line}, column {column} (byte offset {pos}: {data[pos : err.end]!r} in {context!r})"
    if codec != "utf-8":
        raise ConfigError(
            f"{where} is not valid {codec}: first bad byte at {at}. Give the file's real encoding "
            f"({_ENCODING_FIX} utf-8, latin-1, cp1252, ...)."
        )
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.count("\ufffd".encode())
    if bad * 1000 > len(data):
        raise ConfigError(
            f"{where} is not UTF-8 ({bad} bad byte sequences; the first at {at}). Re-encode it as UTF-8, "
            f"or give its encoding ({_ENCODING_FIX} latin-1, cp1252 (Windows), cp437 (DOS) or utf-16)."
        )
    warnings.warn(
        f"{where}: {bad} byte sequence(s) are not UTF-8 (the first at {at}); they were replaced with U+FFFD. "
        f"Re-encode the file as UTF-8, or give its encoding ({_ENCODING_FIX} latin-1), to keep them.",
        UnicodeWarning,
        stacklevel=4,
    )
    return text


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"Cannot read corpus file {str(path)!r}: {e.strerror or e}. Check that it exists and is readable."
        ) from None


# Where the encoding is set: a train config's key, or the Python argument.
_ENCODING_FIX = "data.encoding=NAME in a train config, encoding='NAME' in Python; e.g."


def _is_binary(data: bytes, encoding: str = "utf-8") -> bool:
    """NUL bytes mean binary, except in UTF-16 / UTF-32 text (a byte-order mark, or such an ``encoding``)."""
    if _bom_codec(data) is not None:
        return False
    try:
        if codecs.lookup(encoding).name in WIDE_CODECS:
            return False
    except LookupError:
        pass  # decode_text names the unknown encoding
    return b"\x00" in data[:8192]


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in Path(rel).parts)


def _from_files(
    files: list[tuple[str, bytes]], encoding: str, kind: str, skipped: list[str]
) -> tuple[list[str], list[str], str]:
    """Documents from (name, bytes) pairs: one per file, or chunks when only one file is text."""
    texts: list[tuple[str, str]] = []
    for where, data in files:
        if _is_binary(data, encoding):
            skipped.append(f"{where} (binary)")
            continue
        texts.append((where, decode_text(data, where, encoding)))
    if len(texts) == 1:
        where, text = texts[0]
        chunks = chunk_text(text)
        rule = f"one {kind}, cut into chunks of about {CHUNK_CHARS} characters at blank lines"
        return chunks, [f"{where}#{i}" for i in range(len(chunks))], rule
    return [t for _, t in texts], [w for w, _ in texts], f"one document per {kind}"


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "os.py").is_file():
        raise ConfigError(
            f"The Python standard library was not found at {str(root)!r} (sysconfig 'stdlib'); "
            "this interpreter ships no stdlib sources. Pass a text corpus instead, e.g. a file or folder."
        )
    return root


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in corpus order (see the module docstring)."""
    root = stdlib_root()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith((".", "config-", "lib-dynload"))
        ]
        for fname in filenames:
            if fname.endswith(".py") and not fname.startswith("_sysconfigdata"):
                path = Path(dirpath, fname)
                found.append((path.relative_to(root).as_posix(), path))
    return [p for _, p in sorted(found)]


def _load_stdlib(encoding: str) -> tuple[list[str], list[str], str, list[str]]:
    root = stdlib_root()
    docs, names, skipped = [], [], []
    for path in stdlib_files():
        rel = path.relative_to(root).as_posix()
        text = decode_text(_read_bytes(path), str(path), encoding)
        if "gencodec.py" in text[:400]:
            skipped.append(f"{rel} (generated codec table)")
            continue
        docs.append(text)
        names.append(rel)
    rule = "one document per .py file of the standard library (no tests, site-packages or generated tables)"
    return docs, names, rule, skipped


def _load_folder(root: Path, encoding: str, skipped: list[str]) -> tuple[list[str], list[str], str]:
    files = []
    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        if _hidden(rel) or not path.is_file():
            continue
        files.append((str(path), _read_bytes(path)))
    if not files:
        raise ConfigError(f"Corpus folder {str(root)!r} holds no files; put text files in it or point at another one.")
    return _from_files(files, encoding, "file", skipped)


def _load_glob(pattern: str, encoding: str, skipped: list[str]) -> tuple[list[str], list[str], str]:
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
    if not paths:
        raise ConfigError(
            f"The glob {pattern!r} matches no files. Check the pattern (use '**' with recursive folders) "
            f"or pass one of: {SOURCE_FORMS}."
        )
    files = [(p, _read_bytes(Path(p))) for p in paths]
    return _from_files(files, encoding, "file", skipped)


def _load_zip(path: Path, encoding: str, skipped: list[str]) -> tuple[list[str], list[str], str]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = sorted(
                (info for info in zf.infolist() if not info.is_dir()),
                key=lambda info: info.filename,
            )
            files = []
            for info in members:
                if _hidden(info.filename) or info.filename.startswith("__MACOSX/"):
                    continue
                files.append((f"{path}:{info.filename}", zf.read(info)))
    except (zipfile.BadZipFile, OSError, RuntimeError) as e:
        raise ConfigError(
            f"Cannot read zip file {str(path)!r}: {e}. Check that it is a valid, unencrypted zip."
        ) from None
    if not files:
        raise ConfigError(f"Zip file {str(path)!r} holds no files; it should hold text files.")
    return _from_files(files, encoding, "zip member", skipped)


def _load_hf(spec: str) -> tuple[str, list[str], list[str], str]:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ConfigError(
            f"Bad Hugging Face source {spec!r}; write 'hf:<path>[:split][:column]', e.g. 'hf:/data/wiki:train:text'."
        )
    path = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else None
    column = parts[2] if len(parts) > 2 and parts[2] else None
    # Never reach the hub: these must be set before `datasets` is imported.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError(
            f"The source {spec!r} needs the Hugging Face 'datasets' package, which is not installed: "
            "pip install 'qkvlab[data]'."
        ) from None
    local = Path(path).expanduser()
    try:
        if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(local))
        else:
            ds = datasets.load_dataset(str(local) if local.exists() else path, split=split)
    except Exception as e:  # datasets raises many types; all mean "cannot load this offline"
        raise ConfigError(
            f"Cannot load the Hugging Face dataset {path!r} offline ({type(e).__name__}: {e}). Give a local folder "
            "(written by save_to_disk, or of data files) or a dataset already in the local cache."
        ) from None
    if isinstance(ds, Mapping):
        splits = sorted(ds)
        if split is None:
            split = "train" if "train" in ds else (splits[0] if len(splits) == 1 else None)
        if split not in ds:
            wanted = "no split named" if split is None else f"no split {split!r}"
            raise ConfigError(f"Dataset {path!r} has splits {splits} and {wanted}; name one: 'hf:{path}:<split>'.")
        ds = ds[split]
    columns = list(ds.column_names)
    if column is None:
        if "text" in columns:
            column = "text"
        else:
            first = ds[0] if len(ds) else {}
            strings = [c for c in columns if isinstance(first.get(c), str)]
            if len(strings) != 1:
                raise ConfigError(
                    f"Dataset {path!r} has columns {columns} and no 'text' column; name one: "
                    f"'hf:{path}:{split or 'train'}:<column>'."
                )
            column = strings[0]
    if column not in columns:
        raise ConfigError(f"Dataset {path!r} has no column {column!r}; its columns are {columns}.")
    docs, names = [], []
    for i, value in enumerate(ds[column]):
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(
                f"Column {column!r} of dataset {path!r} holds {type(value).__name__} (row {i}), not text; "
                "name a text column."
            )
        docs.append(value.replace("\r\n", "\n"))
        names.append(f"{path}[{split}]#{i}")
    label = f"hf:{path}" + (f":{split}" if split else "") + f":{column}"
    return label, docs, names, "one document per dataset row"


def load_corpus(source: str | os.PathLike, *, max_docs: int | None = None, encoding: str = "utf-8") -> Corpus:
    """Read ``source`` into documents; see the module docstring for every source's rule.

    Raises :class:`ConfigError` for a missing path, an unreadable or non-text file, or a
    corpus with no text.
    """
    if max_docs is not None and (isinstance(max_docs, bool) or not isinstance(max_docs, int) or max_docs < 1):
        raise ConfigError(f"max_docs must be a positive integer or None, got {max_docs!r}.")
    source = os.fspath(source)
    skipped: list[str] = []
    if source == "stdlib":
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        name = f"stdlib-py{ver}"
        docs, names, rule, skipped = _load_stdlib(encoding)
    elif source.startswith("hf:"):
        name, docs, names, rule = _load_hf(source)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            name = path.name
            docs, names, rule = _load_folder(path, encoding, skipped)
        elif path.is_file() and path.suffix.lower() == ".zip":
            name = f"{path.parent.name}/{path.name}"
            docs, names, rule = _load_zip(path, encoding, skipped)
        elif path.is_file():
            name = f"{path.parent.name}/{path.name}"
            docs, names, rule = _from_files([(str(path), _read_bytes(path))], encoding, "file", skipped)
            if not docs and skipped:
                raise ConfigError(
                    f"Corpus file {str(path)!r} is binary (it has NUL bytes), not text; if it is UTF-16 or UTF-32 "
                    f"text without a byte-order mark, give its encoding ({_ENCODING_FIX} utf-16-le)."
                )
        elif any(c in source for c in "*?["):
            name = source
            docs, names, rule = _load_glob(source, encoding, skipped)
        else:
            raise ConfigError(f"Corpus source {source!r} does not exist. Expected {SOURCE_FORMS}.")
    kept = [(d, n) for d, n in zip(docs, names, strict=True) if d.strip()]
    if max_docs is not None:
        kept = kept[:max_docs]
    if not kept:
        raise ConfigError(
            f"Corpus {source!r} has no text: it gave {len(docs)} document(s), all empty"
            + (f", and skipped {len(skipped)} file(s) ({', '.join(skipped[:3])})" if skipped else "")
            + ". Point it at files that hold text."
        )
    documents = [d for d, _ in kept]
    return Corpus(
        name=name,
        source=source,
        documents=documents,
        names=[n for _, n in kept],
        hash=corpus_hash(documents),
        rule=rule,
        skipped=skipped,
    )

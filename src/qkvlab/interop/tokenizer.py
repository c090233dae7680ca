"""Tokenizers across formats, on the ``tokenizers`` library only (no transformers needed).

- :func:`byte_level_bpe` builds a byte-level BPE ``tokenizers.Tokenizer`` from a vocabulary and
  merges, with the pre-tokenizer a model family uses (``PRE_TOKENIZERS``); :func:`byte_tokenizer`
  spells qkvlab's byte tokenizer (ids 0..255, end-of-text 256) the same way. Saved as
  ``tokenizer.json`` they load in transformers and every other ``tokenizers`` user.
- :func:`write_tokenizer_folder` writes a run's ``tokenizer/`` folder: ``tokenizer.json`` (the
  exact tokenizer), ``vocab.json`` + ``merges.txt`` (for tools that read GPT-2 style files) and
  ``meta.json`` naming the end-of-text token.
- :class:`JsonTokenizer` is a qkvlab :class:`~qkvlab.data.tokenizers.Tokenizer` over such a
  folder; ``get_tokenizer("bpe:<folder>")`` returns one when the folder holds a
  ``tokenizer.json``. As for every qkvlab tokenizer, text that spells a special token is encoded
  as ordinary text; only the data layer inserts end-of-text.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from qkvlab.checkpoint import atomic_write
from qkvlab.data.tokenizers import EOT_TEXT, LibraryTokenizer
from qkvlab.errors import ConfigError

# Split patterns of the byte-level BPE families we read. GPT-2's is the ByteLevel
# pre-tokenizer's own; the others split first with their pattern, then map bytes.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


#: Pre-tokenizers by the names GGUF files give them (``tokenizer.ggml.pre``).
PRE_TOKENIZERS = {
    "gpt2": _gpt2,
    "default": _gpt2,
    # SmolLM / StarCoder: every digit on its own, then GPT-2's split.
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()]),
    "starcoder": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()]),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_bpe(
    vocab: dict[str, int],
    merges: Sequence[tuple[str, str]],
    *,
    pre: str = "gpt2",
    special_tokens: Sequence[str] = (),
    added_tokens: Sequence[str] = (),
) -> HFTokenizer:
    """A byte-level BPE tokenizer; ``pre`` names the split (a key of ``PRE_TOKENIZERS``)."""
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(
            f"Pre-tokenizer {pre!r} is not one qkvlab can rebuild; known: {', '.join(sorted(PRE_TOKENIZERS))}."
        )
    tok = HFTokenizer(models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    if added_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    if special_tokens:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def byte_tokenizer() -> HFTokenizer:
    """qkvlab's ``"byte"`` tokenizer as a ``tokenizers.Tokenizer``: byte b is id b, end-of-text 256."""
    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    vocab[EOT_TEXT] = 256
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    return tok


def bpe_from_files(vocab_file: Path, merges_file: Path) -> HFTokenizer:
    """The GPT-2 style BPE of a qkvlab run (``vocab.json`` + ``merges.txt``) as one tokenizer,
    built as :class:`~qkvlab.data.tokenizers.BPETokenizer` builds it, end-of-text special."""
    try:
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot read the BPE vocabulary {str(vocab_file)!r}: {e}.") from None
    merges = [
        tuple(line.split(" "))
        for line in Path(merges_file).read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    specials = [EOT_TEXT] if EOT_TEXT in vocab else []
    return byte_level_bpe(vocab, merges, pre="gpt2", special_tokens=specials)


def _bpe_parts(tok: HFTokenizer) -> tuple[dict[str, int], list[str]] | None:
    """Vocabulary and merges of a BPE model (None for other models)."""
    model = json.loads(tok.to_str()).get("model", {})
    if model.get("type") != "BPE":
        return None
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return dict(model.get("vocab", {})), merges


def write_tokenizer_folder(
    folder: Path, tok: HFTokenizer, *, eot_token: str, source: str, specials: dict[str, str] | None = None
) -> Path:
    """Write ``tokenizer.json`` (+ ``vocab.json`` / ``merges.txt`` for a BPE) and ``meta.json``.

    ``meta.json`` names the end-of-text token qkvlab's data layer puts between documents and,
    from ``specials``, the ``bos_token`` / ``eos_token`` / ``pad_token`` an export hands on.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tok.token_to_id(eot_token) is None:
        raise ConfigError(f"The tokenizer has no end-of-text token {eot_token!r}.")
    text = tok.to_str()
    atomic_write(folder / "tokenizer.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
    parts = _bpe_parts(tok)
    if parts is not None:
        vocab, merges = parts
        vocab_text = json.dumps(vocab, ensure_ascii=False)
        merges_text = "#version: 0.2\n" + "".join(m + "\n" for m in merges)
        atomic_write(folder / "vocab.json", lambda p: Path(p).write_text(vocab_text, encoding="utf-8"))
        atomic_write(folder / "merges.txt", lambda p: Path(p).write_text(merges_text, encoding="utf-8"))
    meta = {
        "format": "tokenizer.json",
        "eot_token": eot_token,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "source": source,
        **{k: v for k, v in (specials or {}).items() if v is not None and tok.token_to_id(v) is not None},
    }
    atomic_write(folder / "meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return folder


class JsonTokenizer(LibraryTokenizer):
    """A qkvlab tokenizer over a folder with ``tokenizer.json`` (and ``meta.json`` naming end-of-text).

    Example::

        tok = JsonTokenizer("runs/smollm2/tokenizer")
        tok.encode("The capital of France is"), tok.eot_id
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder).expanduser()
        path = folder / "tokenizer.json"
        try:
            raw = path.read_bytes()
            tok = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception for a bad file
            raise ConfigError(f"Cannot read tokenizer {str(path)!r}: {e}.") from None
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        eot_text = meta.get("eot_token") or EOT_TEXT
        eot = tok.token_to_id(eot_text)
        if eot is None:
            raise ConfigError(
                f"Tokenizer {str(path)!r} has no end-of-text token {eot_text!r}; name it as 'eot_token' in "
                f"{str(folder / 'meta.json')!r}."
            )
        tok.encode_special_tokens = True  # text spelling a special token stays text
        self._tok = tok
        self.eot_id = eot
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        h = hashlib.sha256(b"qkvlab-tokenizer-json/1\n")
        h.update(raw)
        h.update(eot_text.encode())
        self.hash = h.hexdigest()
        self.id = f"bpe:{self.vocab_size}"
        self.spec = f"bpe:{folder}"
        self.folder = folder

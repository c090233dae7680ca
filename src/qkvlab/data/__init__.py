"""Data for qkvlab: language-model corpora, tokenizers and the packed, cached token splits.

``load_lm_data(source, tokenizer)`` is the entry point; :mod:`qkvlab.data.corpus` documents
how each source is cut into documents and :mod:`qkvlab.data.tokenizers` the tokenizers.
"""

from qkvlab.data.corpus import CHUNK_CHARS, Corpus, chunk_text, corpus_hash, load_corpus, stdlib_files
from qkvlab.data.lm import TokenSplits, default_token_cache, load_lm_data, split_documents
from qkvlab.data.tokenizers import (
    EOT_TEXT,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    find_gpt2_files,
    get_tokenizer,
    gpt2_search_dirs,
    train_bpe,
)

__all__ = [
    "CHUNK_CHARS",
    "EOT_TEXT",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "TokenSplits",
    "Tokenizer",
    "chunk_text",
    "corpus_hash",
    "default_token_cache",
    "find_gpt2_files",
    "get_tokenizer",
    "gpt2_search_dirs",
    "load_corpus",
    "load_lm_data",
    "split_documents",
    "stdlib_files",
    "train_bpe",
]

"""Interoperability: transformers and GGUF in and out, and conversion of pretrained QKV models.

- :func:`export_hf` (``qkvlab export``): a qkvlab run -> a folder transformers loads, as a
  stock Llama / GPT-2 model or as the native :mod:`qkvlab.hf` class.
- :func:`import_model` (``qkvlab import``): a Llama-architecture transformers folder or a GGUF
  file -> a qkvlab run folder.
- :func:`convert_checkpoint` (``qkvlab convert``): QKV -> Q-K=V with a choice of initialisation
  of the shared projection, and KV-head grouping by mean-pooling (GQA / MQA).

transformers and gguf are optional (``pip install 'qkvlab[hf]'``); only the functions that need
them import them. The modules are imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["convert_checkpoint", "export_hf", "import_model"]


def __getattr__(name: str) -> Any:
    if name == "export_hf":
        from qkvlab.interop.hf_export import export_hf

        return export_hf
    if name == "import_model":
        from qkvlab.interop.hf_import import import_model

        return import_model
    if name == "convert_checkpoint":
        from qkvlab.interop.convert import convert_checkpoint

        return convert_checkpoint
    raise AttributeError(name)

"""qkvlab models as native transformers models (needs ``pip install 'qkvlab[hf]'``).

Importing this package registers ``model_type: "qkvlab"`` with transformers' Auto classes,
so a folder written by ``qkvlab export RUN OUT --format hf --arch native`` loads with the
stock entry points and no ``trust_remote_code``::

    import qkvlab.hf  # noqa: F401  (registers the classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(OUT)   # a QkvlabForCausalLM
    tok = AutoTokenizer.from_pretrained(OUT)
    out = model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=20)

The model runs qkvlab's own attention code, and a K=V variant caches one tensor per layer
inside transformers' ``generate`` (see :mod:`qkvlab.hf.cache`).
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("qkvlab.hf needs transformers; install it with: pip install 'qkvlab[hf]'") from e

from transformers import AutoConfig, AutoModelForCausalLM

from qkvlab.hf.cache import CacheView, SeparateKVLayer, SharedKVLayer, cache_nbytes, cache_tensor_count
from qkvlab.hf.configuration import QkvlabConfig
from qkvlab.hf.modeling import QkvlabForCausalLM, QkvlabPreTrainedModel

AutoConfig.register(QkvlabConfig.model_type, QkvlabConfig, exist_ok=True)
AutoModelForCausalLM.register(QkvlabConfig, QkvlabForCausalLM, exist_ok=True)

__all__ = [
    "CacheView",
    "QkvlabConfig",
    "QkvlabForCausalLM",
    "QkvlabPreTrainedModel",
    "SeparateKVLayer",
    "SharedKVLayer",
    "cache_nbytes",
    "cache_tensor_count",
]

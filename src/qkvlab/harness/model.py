"""The ``qkvlab`` model of lm-evaluation-harness: any qkvlab GPT checkpoint, with its own tokenizer.

Importing this module registers the model under the name ``qkvlab`` in lm-eval's registry
(lm-eval 0.4 finds models only through that registry, filled at import time; see
:mod:`qkvlab.harness`). Example::

    import lm_eval
    import qkvlab.harness  # registers "qkvlab"

    lm_eval.simple_evaluate(model="qkvlab", model_args="path=runs/x,batch_size=8", tasks=[...])

How requests are scored:

* ``loglikelihood``: context and continuation are encoded together and split as lm-eval's
  other causal models do; requests are sorted by length, batched and **right-padded**. With a
  causal mask a padded row's real tokens never see the padding, and every row starts at
  position 0, so learned absolute positions, RoPE, linear attention and every projection
  variant score a row exactly as they would alone.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens,
  the first one conditioned on end-of-text: the same token-level sum that ``qkvlab eval ppl``
  averages over fixed windows of a token stream that starts with end-of-text.
* ``generate_until``: prompts of equal length are batched (no padding at all), prefilled into
  the model's KV cache (``model.new_cache``) and decoded one token per step until every row
  hits a stop string, end-of-text or ``max_gen_toks``.

A request longer than ``max_length`` is refused with a :class:`ConfigError` (``truncate=error``,
the default); ``truncate=left`` drops its oldest context tokens instead, as lm-eval's ``hf``
model does, and counts how many requests were cut (:attr:`QkvlabLM.truncated`).
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry fills itself only when empty)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from qkvlab.errors import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
TRUNCATE = ("error", "left")
GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _as_int(name: str, value: Any, *, minimum: int = 1) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = None
    if out is None or out != float(value) or out < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    name = str(device or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name!r} asked for, but CUDA is not available here; pass device=cpu (--device cpu).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"Device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s).")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` computes in bf16 on a GPU that has it (as training evaluates), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype or "auto")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}; use auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def inspect_checkpoint(path: str | Path, tokenizer: Any = None) -> tuple[Path, dict[str, str], Any]:
    """``(weights file, metadata, tokenizer)`` of a GPT checkpoint, without loading its weights.

    ``tokenizer`` is a tokenizer object, a name, or None for the run's own; a clear
    :class:`ConfigError` for a missing checkpoint, another model family or no tokenizer.
    """
    from qkvlab.checkpoint import read_metadata
    from qkvlab.cli import _checkpoint_file, _tokenizer_for

    file = _checkpoint_file(Path(path))
    meta = read_metadata(file)
    if meta.get("family") != "gpt":
        raise ConfigError(
            f"{str(file)!r} holds a {meta.get('family')!r} model; lm-eval scores causal language models (GPT)."
        )
    if tokenizer is not None and not isinstance(tokenizer, str):
        return file, meta, tokenizer
    trained = (json.loads(meta["train_config"]) if "train_config" in meta else {}).get("data") or {}
    saved = any((d / "tokenizer" / "vocab.json").is_file() for d in (file.parent, *file.parents[:2]))
    try:
        tokenizer = _tokenizer_for(file, meta, tokenizer)
    except ConfigError as e:
        if tokenizer is not None or saved or not str(trained.get("tokenizer", "")).startswith("bpe"):
            raise
        # A BPE trained on the corpus and not saved with the run: say that, not only why the corpus failed.
        raise ConfigError(
            f"{str(file)!r} has no saved tokenizer (tokenizer/vocab.json beside the run) and its BPE could not be "
            f"rebuilt from the training corpus ({e}); pass --tokenizer bpe:<folder> (tokenizer=bpe:<folder>)."
        ) from None
    return file, meta, tokenizer


@register_model("qkvlab")
class QkvlabLM(TemplateLM):
    """lm-eval model over a qkvlab GPT.

    Args:
        path: a run folder, checkpoint folder or ``.safetensors`` file (what ``qkvlab eval``
            takes); or pass ``model`` and ``tokenizer`` objects instead.
        tokenizer: a :class:`qkvlab.data.tokenizers.Tokenizer`, or a name (``byte``, ``gpt2``,
            ``bpe:<folder>``); default: the run's own (its saved ``tokenizer/`` folder).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: compute dtype (autocast), ``auto`` = bf16 on a GPU, fp32 on a CPU.
        batch_size: requests per forward pass.
        max_length: longest input in tokens; default the run's training ``seq_len`` (positions
            past it were never trained), at most the model's ``max_seq_len``.
        max_gen_toks: default number of tokens ``generate_until`` may add.
        truncate: ``error`` (refuse a request longer than ``max_length``) or ``left`` (drop
            its oldest context tokens, as lm-eval's ``hf`` model does).
        data_root: read by the tasks, not the model; accepted because lm-eval's command
            line hands the model arguments to the tasks as well.
        max_batch_size: accepted from lm-eval's interface and unused (no automatic batch size).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        truncate: str = "error",
        data_root: str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(
                f"Unknown qkvlab model argument(s) {sorted(unknown)}; use path, tokenizer, device, dtype, "
                "batch_size, max_length, max_gen_toks, truncate, data_root."
            )
        if str(batch_size).startswith("auto"):
            raise ConfigError("batch_size 'auto' is not supported by the qkvlab model; pass a number, e.g. 16.")
        self._batch_size = _as_int("batch_size", 1 if batch_size is None else batch_size)
        if truncate not in TRUNCATE:
            raise ConfigError(f"truncate must be 'error' or 'left', got {truncate!r}.")
        self.truncate = truncate
        self._device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self._device)
        self.checkpoint: str | None = None
        self.train_step: int | None = None
        trained_len = None
        if model is None:
            if path is None:
                raise ConfigError("The qkvlab model needs path=RUN (a run folder, checkpoint folder or .safetensors).")
            model, tokenizer, trained_len = self._load(Path(path), tokenizer)
        elif tokenizer is None or isinstance(tokenizer, str):
            raise ConfigError(
                "A qkvlab model passed as an object needs a tokenizer object (qkvlab.data.get_tokenizer)."
            )
        if getattr(getattr(model, "config", None), "family", None) != "gpt":
            raise ConfigError(f"lm-eval scores causal language models; {type(model).__name__} is not a qkvlab GPT.")
        self.model = model.to(self._device).eval()
        self.tok = tokenizer
        vocab = model.config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise ConfigError(
                f"The tokenizer {tokenizer.id!r} has {tokenizer.vocab_size} ids but the model only {vocab}; "
                "pass the tokenizer the model was trained with."
            )
        limit = model.config.max_seq_len
        if max_length is None:
            max_length = min(trained_len or limit, limit)
        self._max_length = _as_int("max_length", max_length, minimum=2)
        if self._max_length > limit:
            raise ConfigError(f"max_length={self._max_length} exceeds the model's max_seq_len={limit}; lower it.")
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.truncated = 0  # requests cut to max_length (truncate=left)

    # ------------------------------------------------------------ loading
    def _load(self, path: Path, tokenizer: Any):
        from qkvlab.checkpoint import load_model

        file, meta, tokenizer = inspect_checkpoint(path, tokenizer)
        model = load_model(file, device=self._device)
        self.checkpoint = str(file)
        self.train_step = int(meta["train_step"]) if str(meta.get("train_step", "")).isdigit() else None
        trained = json.loads(meta["train_config"]) if "train_config" in meta else {}
        return model, tokenizer, trained.get("seq_len")

    # ------------------------------------------------------------ lm-eval's interface
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tok.spec

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        spec = self.model.config.variant
        return {
            "qkvlab_checkpoint": self.checkpoint,
            "qkvlab_variant": spec.id,
            "qkvlab_paper_name": spec.paper_name,
            "qkvlab_tokenizer": self.tok.spec,
            "qkvlab_max_length": self.max_length,
            "qkvlab_dtype": str(self.dtype).removeprefix("torch."),
            "qkvlab_truncate": self.truncate,
        }

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=self.dtype)

    # ------------------------------------------------------------ scoring
    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The model input for one request: all tokens but the last, cut to ``max_length``."""
        if len(continuation) > self.max_length:
            raise ConfigError(
                f"A continuation of {len(continuation)} tokens is longer than the model's {self.max_length}-token "
                "context; it cannot be scored (lower the task's target length or use a longer-context model)."
            )
        inp = (context + continuation)[:-1]
        if len(inp) > self.max_length:
            if self.truncate == "error":
                raise ConfigError(
                    f"A request of {len(inp) + 1} tokens (context {len(context)} + continuation "
                    f"{len(continuation)}) is longer than the model's {self.max_length}-token context; use fewer "
                    "few-shot examples, or pass --truncate left (truncate=left) to drop the oldest context tokens "
                    "as lm-eval's hf model does."
                )
            inp = inp[-self.max_length :]
            self.truncated += 1
        return inp

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        work = []  # (request index, input ids, continuation ids)
        for i, (_, context, continuation) in enumerate(requests):  # check every request before any compute
            if not continuation:
                results[i] = (0.0, True)
                continue
            work.append((i, self._fit(list(context), list(continuation)), list(continuation)))
        # Longest first, so a batch's rows are of similar length and the first batch shows the peak memory.
        work.sort(key=lambda w: (-len(w[1]), w[1]))
        chunks = [work[k : k + self.batch_size] for k in range(0, len(work), self.batch_size)]
        for chunk in tqdm(chunks, disable=disable_tqdm, desc="qkvlab loglikelihood", unit="batch"):
            width, longest = len(chunk[0][1]), max(len(c) for _, _, c in chunk)
            batch = torch.full((len(chunk), width), self.eot_token_id, dtype=torch.long)
            targets = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, (_, inp, cont) in enumerate(chunk):  # right padding: real tokens keep positions 0..len-1
                batch[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                targets[row, : len(cont)] = torch.tensor(cont, dtype=torch.long)
            targets = targets.to(self._device)
            with self._autocast():
                logits = self.model(batch.to(self._device))  # (B, width, V)
            scores, greedy = [], []
            for row, (_, inp, cont) in enumerate(chunk):
                n, target = len(inp), targets[row, : len(cont)]
                logp = F.log_softmax(logits[row, n - len(cont) : n].float(), dim=-1)  # (len(cont), V)
                scores.append(logp.gather(-1, target[:, None]).sum())
                greedy.append((logp.argmax(dim=-1) == target).all())
            # One transfer per batch, not two per request.
            for (i, _, _), score, exact in zip(
                chunk, torch.stack(scores).tolist(), torch.stack(greedy).tolist(), strict=True
            ):
                results[i] = (float(score), bool(exact))
                key = requests[i][0]
                if isinstance(key, tuple) and key and key[0] is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        owners, windows = [], []
        texts = [req.args[0] for req in requests]
        for r, text in enumerate(texts):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                owners.append(r)
                windows.append((None, context, continuation))
        totals = [0.0] * len(texts)
        for r, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm), strict=True):
            totals[r] += score
        for text, total in zip(texts, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ------------------------------------------------------------ generation
    def _gen_options(self, gen_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        kw = dict(gen_kwargs or {})
        extra = sorted(set(kw) - set(GEN_KEYS))
        if extra:
            raise ConfigError(
                f"Generation option(s) {extra} are not supported by the qkvlab model; it takes {', '.join(GEN_KEYS)}."
            )
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        do_sample = bool(kw.get("do_sample", False)) and temperature != 0.0
        if kw.get("do_sample") and "temperature" not in kw:  # sampling asked for without a temperature
            do_sample, temperature = True, 1.0
        top_k = kw.get("top_k")
        top_p = kw.get("top_p")
        return {
            "until": until,
            "max_gen_toks": _as_int("max_gen_toks", kw.get("max_gen_toks", self.max_gen_toks)),
            "temperature": temperature if do_sample else 0.0,
            "top_k": None if top_k in (None, 0) else _as_int("top_k", top_k),
            "top_p": None if top_p in (None, 1, 1.0) else float(top_p),
        }

    def _next_tokens(self, logits: torch.Tensor, opts: dict[str, Any]) -> torch.Tensor:
        from qkvlab.models.gpt import sample

        logits = logits.float()
        if opts["temperature"] > 0 and opts["top_p"] is not None:
            # Nucleus sampling: keep the most likely tokens whose probabilities sum to top_p.
            probs, order = torch.sort((logits / opts["temperature"]).softmax(-1), dim=-1, descending=True)
            drop = probs.cumsum(-1) - probs > opts["top_p"]
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return sample(logits, temperature=opts["temperature"], top_k=opts["top_k"])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple[str, int], list[tuple[int, list[int], dict[str, Any]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            opts = self._gen_options(gen_kwargs)
            room = self.max_length - opts["max_gen_toks"]
            if room < 1:
                raise ConfigError(
                    f"max_gen_toks={opts['max_gen_toks']} leaves no room for a prompt in the model's "
                    f"{self.max_length}-token context; lower max_gen_toks."
                )
            ids = self.tok_encode(context) or [self.eot_token_id]
            if len(ids) > room:
                if self.truncate == "error":
                    raise ConfigError(
                        f"A prompt of {len(ids)} tokens plus {opts['max_gen_toks']} to generate is longer than the "
                        f"model's {self.max_length}-token context; use fewer few-shot examples, or pass --truncate "
                        "left (truncate=left) to drop the oldest prompt tokens as lm-eval's hf model does."
                    )
                ids = ids[-room:]
                self.truncated += 1
            # Equal-length prompts batch without padding, so nothing depends on the position scheme.
            groups[(json.dumps(opts, sort_keys=True), len(ids))].append((i, ids, opts))
        batches = [
            group[k : k + self.batch_size] for group in groups.values() for k in range(0, len(group), self.batch_size)
        ]
        for batch in tqdm(batches, disable=disable_tqdm, desc="qkvlab generate_until", unit="batch"):
            texts = self._generate(torch.tensor([ids for _, ids, _ in batch], dtype=torch.long), batch[0][2])
            for (i, _, _), text in zip(batch, texts, strict=True):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs  # type: ignore[return-value]

    @torch.no_grad()
    def _generate(self, idx: torch.Tensor, opts: dict[str, Any]) -> list[str]:
        """Decode rows of equal-length prompts through the KV cache until each stops."""
        rows, steps, until = idx.shape[0], opts["max_gen_toks"], opts["until"]
        idx = idx.to(self._device)
        new: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        with self._autocast():
            cache = self.model.new_cache(rows, idx.shape[1] + steps)
            logits = self.model.prefill(idx, cache)
            for step in range(steps):
                nxt = self._next_tokens(logits, opts)
                for r, token in enumerate(nxt.tolist()):
                    if done[r]:
                        continue
                    if token == self.eot_token_id:
                        done[r] = True
                        continue
                    new[r].append(token)
                    if until and any(s in self.tok_decode(new[r]) for s in until):
                        done[r] = True
                if all(done) or step + 1 == steps:
                    break
                logits = self.model.decode_one(nxt, cache)
        texts = []
        for ids in new:
            text = self.tok_decode(ids)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts

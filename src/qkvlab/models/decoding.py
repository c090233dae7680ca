"""A static decode step, replayed as a CUDA graph.

Eager decoding of a small or medium model at batch 1 is bound by kernel launches, not by
the GPU: a 1B model issues hundreds of small kernels per token. A CUDA graph records the
step once and replays it with one launch, but only if the step has no host synchronisation
and no shape that depends on the position. :class:`StaticDecoder` runs the model's decode
step in that form: the position is a 0-d tensor on the device, new keys/values are written
with ``index_copy_`` into the static :class:`~qkvlab.attention.cache.KVCache`, and
attention reads the whole allocated cache with per-row lengths (the decode backend, the Triton
kernel, which skips tiles past each row's length; masked SDPA where no backend supports the step).
The step advances that position itself, so between two steps the host launches only the token
copy and the graph; it sets the position again only after something else moved the cache. A
graph that draws no random numbers (every step in eval mode) is launched through the CUDA driver,
without ``CUDAGraph.replay``'s write of the random seed and offset before each launch.

Example::

    cache = model.new_cache(batch_size=1, max_len=4096)
    logits = model.prefill(prompt, cache)
    dec = StaticDecoder(model, cache)               # captures on CUDA, eager elsewhere
    for _ in range(n):
        token = logits.argmax(-1)
        logits = dec.step(token)                    # (B, V); the cache advances by one

``model.generate(..., cuda_graph=True)`` does this for you.

A ragged cache (prefilled with ``model.prefill(prompt, cache, attention_mask=mask)``, rows of
different lengths) is stepped the same way with one position per row (``cache.row_lengths``):
the graph reads the positions from a device buffer, so one capture serves every step.

``compile=True`` also runs the step through ``torch.compile`` (one graph; the decode kernel is
the opaque operator ``torch.ops.qkvlab.decode_attention``) before the CUDA graph records it:
Inductor fuses the small kernels around the matrix products (norms, RoPE of the query, the
cache write, SwiGLU, residual adds, casts), which a graph replay still runs one by one. The
first step then pays the compile time. Later decoders of the same model reuse the compiled
code: a second cache size or batch recompiles once, with dynamic shapes, and further ones
reuse that (``torch.compile``'s own cache).

``fuse=True`` (or ``"auto"``: only if the model is in eval mode) also fuses the model for
inference when the decoder is built: each attention layer's projection groups become one matrix
product and the SwiGLU MLP's gate and up projections another
(:func:`~qkvlab.attention.projections.fuse_projections`). At batch 1 these are matrix-vector
products bound by memory bandwidth, and one wider product may run closer to it than two or
three small kernels. It is off by default: the fused weights are a second copy of those
matrices (most of a model's weights) until ``model.train()`` or
:func:`~qkvlab.attention.projections.unfuse_projections` drops them, so it is worth it only
where a benchmark shows the step getting faster. The copy lives in non-persistent buffers (the
state dict is unchanged) and is a snapshot meant for frozen weights. A graphed or compiled step
does no check of its own: change the weights before building a decoder, or build a new one
after (an eager forward notices in-place changes; see
:class:`~qkvlab.attention.projections.FusedLinears`). If the fusion is dropped or re-made
(``model.train()``, ``load_state_dict``), the next :meth:`StaticDecoder.step` fuses again (in
eval mode) and re-records its graph.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from collections.abc import Callable, Iterator

import torch
from torch import nn

from qkvlab.attention.cache import KVCache
from qkvlab.attention.matvec import check_gemv, resolve_gemv, use_gemv
from qkvlab.attention.projections import FusedLinears, check_fuse, fuse_projections, fusion_epoch
from qkvlab.errors import ConfigError
from qkvlab.models.sampling import Sampling, apply_repetition_penalty, check_sampling, sample


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """No automatic garbage collection inside (as it was after): a collection during a CUDA graph
    capture that frees another graph (one held in a reference cycle, by any object) invalidates
    the capture, and with it the process's CUDA random state. PyTorch no longer collects before
    a capture, so a capture must keep collections out itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.cache
def _driver_graph_launch() -> Callable | None:
    """The CUDA driver's ``cuGraphLaunch``, or None where there is no CUDA driver to load (ROCm
    included: its graphs go through PyTorch's replay)."""
    if torch.version.cuda is None:
        return None
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuGraphLaunch
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    return fn


def graph_launcher(graph: torch.cuda.CUDAGraph, device: torch.device) -> Callable[[], None] | None:
    """A launch of ``graph`` on the current stream without PyTorch's replay prologue, or None
    where that would change what the graph computes or cannot be done here.

    ``CUDAGraph.replay`` first writes the random seed and offset the graph's random kernels
    read, two fill kernels on every replay, and advances the generator by what the graph
    draws. A graph that draws nothing needs neither, and at batch 1 they are host time and two
    more launches the GPU waits for whenever the host waits for a step. This replays ``graph``
    once: if that left the default generator's offset where it was, the graph draws no random
    numbers (a step draws from no other generator) and its executable is launched directly.
    """
    launch = _driver_graph_launch()
    if launch is None or not hasattr(graph, "raw_cuda_graph_exec"):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    gen = torch.cuda.default_generators[index]
    before = gen.get_offset()
    graph.replay()
    torch.cuda.synchronize(index)
    if gen.get_offset() != before:
        return None  # the graph draws random numbers: each replay must advance the generator
    handle = graph.raw_cuda_graph_exec()

    def run(graph: torch.cuda.CUDAGraph = graph) -> None:  # keeps the graph, owner of ``handle``, alive
        # the driver launches into the current context: that of the graph's device, as replay's guard makes it
        with contextlib.nullcontext() if torch.cuda.current_device() == index else torch.cuda.device(index):
            code = launch(handle, torch.cuda.current_stream(index).cuda_stream)
        if code:
            raise RuntimeError(f"cuGraphLaunch failed with CUDA driver error {code}")

    return run


#: ``torch.compile`` modes a :class:`StaticDecoder` accepts (its own CUDA graph records the step).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


class StaticDecoder:
    """One-token decode steps of ``model`` over ``cache`` with static shapes.

    Args:
        model: a GPT (anything whose ``forward(idx, cache=..., position=...)`` accepts a
            device position).
        cache: the static cache the prompt was prefilled into; it advances by one per step.
        cuda_graph: ``"auto"`` (capture on CUDA), True (capture; CUDA only) or False (run the
            static step eagerly, e.g. to check it on CPU).
        warmup: eager steps before capture (they compile Triton kernels and settle
            allocations); they write only into the next free cache position, which the first
            real step overwrites.
        compile: run the step through ``torch.compile`` (``fullgraph=True``), graphed or not:
            True (Inductor's default mode) or a mode name, ``"default"`` or
            ``"max-autotune-no-cudagraphs"`` (also tunes the matrix products; a longer compile).
            Modes with their own CUDA graphs are refused: this class records the graph.
        fuse: fuse the model's projections for inference (one matrix product for each attention
            layer's Q/K/V groups, one for SwiGLU's gate and up; the state dict is unchanged):
            False (the default), ``"auto"`` (if the model is in eval mode) or True (requires eval
            mode). It costs a second copy of the fused matrices and stays fused after the decoder (``model.train()`` or
            :func:`~qkvlab.attention.projections.unfuse_projections` undoes it).
        gemv: how a batch-1 step computes its matrix-vector products (projections, MLP, head),
            whose cuBLAS tiles leave most of a large card idle on a narrow output: ``"auto"``
            (the default: the kernel on CUDA with Triton, else ``F.linear``), False
            (``F.linear``), True or ``"kernel"`` (qkvlab's one-row Triton kernel,
            :mod:`qkvlab.kernels.gemv`, on CUDA) or ``"inductor"`` (with ``compile``: Inductor
            generates each product as a reduction and may fuse it with the code around it). See
            :mod:`qkvlab.attention.matvec`. Rows of a larger batch keep ``F.linear``.
        greedy: the step also picks each row's most likely next token (the argmax of its
            logits) and writes it into its own input: :attr:`next_token` holds it until the
            next step, and ``step(decoder.next_token)`` continues without a copy. A greedy loop
            then launches no argmax and no token copy between steps (compiled, Inductor
            generates the argmax as part of the step).
        sampling: a :class:`~qkvlab.models.sampling.Sampling` (temperature, top-k, top-p): the
            step samples each row's next token instead, the same way and into the same input
            (:attr:`next_token`), drawing from the default generator of the cache's device. A
            graph that draws is replayed with that generator's state at each launch, and the
            capture leaves the generator's offset where it found it, so the graphed steps draw
            what uncaptured ones would. Not with ``greedy``.
        penalty: with ``greedy`` or ``sampling``, a repetition penalty the step applies before it
            picks (:func:`~qkvlab.models.sampling.apply_repetition_penalty`) to the tokens marked
            in :attr:`seen` (``(B, V)`` bool), where it then marks its pick. The caller marks the
            prompt's tokens, and a token it picks itself, before the step that follows
            (:meth:`mark_seen`). The capture leaves :attr:`seen` as it found it.
    """

    def __init__(
        self,
        model: nn.Module,
        cache: KVCache,
        *,
        cuda_graph: bool | str = "auto",
        warmup: int = 2,
        compile: bool | str = False,
        fuse: bool | str = False,
        gemv: bool | str = "auto",
        greedy: bool = False,
        sampling: Sampling | None = None,
        penalty: float | None = None,
    ):
        check_fuse(fuse, model)  # "auto" is decided at each fusion sync, as the mode may change
        if cuda_graph not in (True, False, "auto"):
            raise ConfigError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}.")
        if not isinstance(compile, bool) and compile not in COMPILE_MODES:
            raise ConfigError(
                f"compile must be True, False or a mode in {COMPILE_MODES}, got {compile!r} "
                "(modes with CUDA graphs of their own are not offered: StaticDecoder records the graph)."
            )
        if not isinstance(cache, KVCache):
            raise ConfigError(
                f"StaticDecoder runs over a KVCache, got {type(cache).__name__}; a linear-attention "
                "state decodes with model.decode_one (its step is already fixed-size)."
            )
        if not isinstance(greedy, bool):
            raise ConfigError(f"greedy must be True or False, got {greedy!r}.")
        if sampling is not None and not isinstance(sampling, Sampling):
            raise ConfigError(
                f"sampling must be a qkvlab.models.sampling.Sampling or None, got {type(sampling).__name__}."
            )
        if penalty is not None:
            check_sampling(temperature=0.0, top_k=None, top_p=None, repetition_penalty=penalty)
            if not (greedy or sampling is not None):
                raise ConfigError(
                    "A repetition penalty is applied by a decoder that picks its next token: pass greedy=True or "
                    "sampling=... with penalty=."
                )
        if greedy and sampling is not None:
            raise ConfigError(
                "A decoder picks greedily or samples, not both: pass greedy=True or sampling=..., not both."
            )
        device = cache.device
        if cuda_graph is True and device.type != "cuda":
            raise ConfigError(
                f"cuda_graph=True needs the model and cache on a CUDA device, but the cache is on {device}; "
                "use cuda_graph='auto' (eager off CUDA) or move the model to the GPU."
            )
        self.model = model
        self.cache = cache
        self.greedy = greedy
        self.sampling = sampling
        self.penalty = penalty
        self._fuse = bool(fuse)
        self._gemv = resolve_gemv(check_gemv(gemv, compile), cache.device)
        self._fusable = [m for m in model.modules() if isinstance(m, FusedLinears)]
        self._sync_fusion()
        self.use_graph = device.type == "cuda" and cuda_graph in (True, "auto")
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.seen = None  # with a penalty: (B, V), the tokens each row holds
        if penalty is not None:
            self.seen = torch.zeros(cache.batch_size, model.config.vocab_size, dtype=torch.bool, device=device)
        # One position for all rows, or one per row for a ragged cache: the shape is fixed at
        # capture, so a decoder serves the cache in the form it had when it was built.
        self.ragged = cache.row_lengths is not None
        self.pos = torch.zeros((cache.batch_size,) if self.ragged else (), dtype=torch.long, device=device)
        # The cache length a uniform ``pos`` holds, or None where unknown. A uniform step
        # advances ``pos`` itself, so a step that follows a step launches nothing to set it.
        self._pos_at: int | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._launch: Callable[[], None] | None = None  # the graph's launch, set by capture
        self._logits: torch.Tensor | None = None
        self._warmup = warmup
        mode = compile if isinstance(compile, str) else None
        # The step function is kept unbound (called with the decoder): a bound method stored on
        # the decoder would make it a reference cycle, freed only by a garbage collection, and
        # a collection that frees a decoder's graph while another graph is being captured
        # invalidates that capture. Unbound, a decoder and its graph go when the last
        # reference does.
        run = StaticDecoder._run
        # uncompiled, the pick stays one argmax: the two stages would be several more launches
        self._compiled = bool(compile)
        if compile and self._gemv == "inductor" and mode in (None, "default"):
            # the reductions Inductor generates for the products are tuned for their shapes
            self._fn = torch.compile(run, fullgraph=True, options={"coordinate_descent_tuning": True})
        else:
            self._fn = torch.compile(run, fullgraph=True, mode=mode) if compile else run

    def _sync_fusion(self) -> None:
        """Fuse (in eval mode, if asked) and note the fused buffers the step will read."""
        if self._fuse and not self.model.training:
            fuse_projections(self.model)
        self._epoch = fusion_epoch()
        self._fused_refs = self._fused_buffers()

    def _fused_buffers(self) -> list[torch.Tensor | None]:
        return [t for m in self._fusable for t in (m._fused_weight, m._fused_bias)]

    @property
    def fused(self) -> int:
        """How many modules of the model run fused now."""
        return sum(m.fused for m in self._fusable)

    @property
    def picks(self) -> bool:
        """Whether each step picks the next token itself (``greedy`` or ``sampling``)."""
        return self.greedy or self.sampling is not None

    @property
    def next_token(self) -> torch.Tensor:
        """``(B,)``: with ``greedy`` or ``sampling``, the token each row's last step chose; the next
        step's input, which that step overwrites with its own choice (copy it to keep it)."""
        if not self.picks:
            raise ConfigError(
                "next_token is kept by decoders that pick the next token: StaticDecoder(..., greedy=True) "
                "or StaticDecoder(..., sampling=Sampling(temperature=...))."
            )
        return self.token.view(-1)

    def mark_seen(self, tokens: torch.Tensor, *, reset: bool = False) -> None:
        """With ``penalty``: mark ``tokens`` (``(B,)`` or ``(B, T)``) as seen in each row, after
        clearing every mark if ``reset`` (a new prompt)."""
        if self.seen is None:
            raise ConfigError("mark_seen is for decoders with a repetition penalty: StaticDecoder(..., penalty=...).")
        if reset:
            self.seen.zero_()
        self.seen.scatter_(1, tokens.view(self.seen.shape[0], -1).to(self.seen.device), True)

    @torch.no_grad()
    def _run(self) -> torch.Tensor:
        logits = self.model(self.token, cache=self.cache, position=self.pos)[:, -1]
        if not self.ragged:
            # inside the step (and its graph): the host launches no fill before the next step
            self.pos.add_(1)
        if self.picks:  # the next input, chosen inside the step: no sampling or copy between steps
            scores = logits if self.seen is None else apply_repetition_penalty(logits, self.seen, self.penalty)
            picker = self.sampling if self.sampling is not None else sample  # sample's default: greedy
            pick = picker(scores, chunked=self._compiled)
            self.token.copy_(pick.unsqueeze(-1))
            if self.seen is not None:
                self.seen.scatter_(1, pick.unsqueeze(-1), True)
        return logits

    @torch.no_grad()
    def capture(self) -> None:
        """Record the step (called by the first :meth:`step` when graphs are on)."""
        self._check_room()
        device = self.cache.device
        generator = torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ]
        offset = generator.get_offset()
        seen = self.seen.clone() if self.seen is not None else None  # the warmup's picks are not the row's
        stream = torch.cuda.Stream(device=self.cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(stream), use_gemv(self._gemv):
            for _ in range(max(1, self._warmup)):
                # each at the next free position (a step advances its position)
                self._pos_at = None
                self._set_pos()
                self._fn(self)
        torch.cuda.current_stream(self.cache.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with no_gc(), torch.cuda.graph(graph), use_gemv(self._gemv):
            self._logits = self._fn(self)
        # one replay (at the next free position, overwritten by the first real step) tells
        # whether the graph can be launched without PyTorch's random-state prologue
        self._pos_at = None
        self._set_pos()
        self._launch = graph_launcher(graph, self.cache.device) or graph.replay
        self._pos_at = None  # the warmup and that replay moved it
        # what the warmup and that replay drew (a sampling step's draws) is not the caller's: the
        # first real step draws what an uncaptured one would
        generator.set_offset(offset)
        if seen is not None:
            self.seen.copy_(seen)
        self.graph = graph

    def _check_room(self) -> None:
        if self.cache.length + 1 > self.cache.max_len:
            raise ConfigError(
                f"KV cache full: {self.cache.length} positions used, max_len={self.cache.max_len}. "
                "Allocate a longer cache or generate fewer tokens."
            )
        if self.cache.length == 0:
            raise ConfigError("StaticDecoder continues a prefilled cache; run model.prefill(prompt, cache) first.")
        if self.ragged != (self.cache.row_lengths is not None):
            kind = "ragged (one position per row)" if self.ragged else "uniform (one position for all rows)"
            raise ConfigError(
                f"This StaticDecoder was built for a {kind} cache, but the cache was prefilled since in the other "
                "form; build a new StaticDecoder after the prefill."
            )

    def _set_pos(self) -> None:
        if self.ragged:
            self.pos.copy_(self.cache.row_lengths)
        elif self._pos_at != self.cache.length:  # moved by something else: a reset, a prefill
            self.pos.fill_(self.cache.length)
            self._pos_at = self.cache.length

    @torch.no_grad()
    def step(self, token: torch.Tensor, *, copy: bool = True) -> torch.Tensor:
        """Decode ``token`` ``(B,)`` at position ``cache.length``; returns logits ``(B, V)``.

        With a graph the logits live in the graph's output buffer, which the next step
        overwrites: ``copy=True`` returns a copy of them, ``copy=False`` the buffer itself (one
        copy kernel fewer a step, for a caller that has read them before it steps again, as
        ``generate`` does).
        """
        self._check_room()
        if token.numel() != self.cache.batch_size:
            raise ConfigError(
                f"step() got {token.numel()} tokens for a cache of batch {self.cache.batch_size}; pass one per row."
            )
        if fusion_epoch() != self._epoch:  # some module was fused or unfused since (one int compare)
            captured = self._fused_refs
            self._sync_fusion()
            if any(a is not b for a, b in zip(captured, self._fused_refs, strict=True)):
                self.graph = None  # the graph reads the old buffers: record the step again
        in_place = token.data_ptr() == self.token.data_ptr()  # next_token, passed back
        if self.use_graph and self.graph is None:
            if in_place:  # the capture's warmup steps write their own choices over it
                token, in_place = token.clone(), False
            self.capture()
        if not in_place:
            self.token.copy_(token.view(-1, 1))
        self._set_pos()
        self._pos_at = None  # until the step has advanced it
        if self.graph is not None:
            self._launch()
            logits = self._logits.clone() if copy else self._logits
        else:
            with use_gemv(self._gemv):
                logits = self._fn(self)
        self.cache.advance(1)
        if not self.ragged:
            self._pos_at = self.cache.length
        return logits

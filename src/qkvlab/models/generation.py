"""Token generation for :class:`~qkvlab.models.gpt.GPT`: sampling, stopping, streaming, ragged batches.

``GPT.generate`` and ``GPT.stream`` run :func:`run`, the one decode loop: prefill the prompt
into the KV cache (or the linear-attention state), then one token per step through the model's
decode step (the dynamic one, or :class:`~qkvlab.models.decoding.StaticDecoder`).

Per step the logits go through, in this order: the repetition penalty (every token already in
the row, prompt included: ``l / p`` if ``l > 0`` else ``l * p``), then greedy argmax at
temperature 0, or ``softmax(l / temperature)`` restricted to the ``top_k`` most likely tokens
and then to the smallest set whose probability reaches ``top_p``.

A row ends at a stop token id (returned as its last token), at the token that completes a stop
string (matched on the decoded text of the row's new tokens; the text is cut right after it),
or after ``max_new_tokens``. Nothing after a row's end is returned; the batch stops when every
row has ended.

Ragged batches: a prompt ``(B, T)`` with an ``attention_mask`` (True / 1 for real tokens; left
padding, right padding or any mix), or a list of token lists. Each row's real tokens are packed
to the front, so row ``b`` sits at positions ``0 .. len_b - 1`` counted from its own first
token (learned positions and RoPE both see the positions the row has alone), its cache slots
are its positions, and the decode step attends with per-row lengths. Every row gets what it
gets alone, up to floating-point rounding of a different batch shape.

Example::

    out = model.generate([[5, 6, 7], [8, 9]], 20, temperature=0.8, top_p=0.9,
                         stop_token_ids=[tok.eot_id], return_dict=True)
    out.tokens[1], out.lengths[1], out.finish_reasons[1]     # row 1's new tokens, their count, why it ended

    stream = model.stream(prompt, 64, stop_strings=["\\n\\n"], tokenizer=tok)
    for step in stream:
        print(step.text[0], end="", flush=True)              # new text of row 0 as it comes
    stream.result                                            # what generate(..., return_dict=True) returns
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from qkvlab.attention.cache import KVCache, LinearState
from qkvlab.attention.matvec import check_gemv
from qkvlab.attention.projections import check_fuse, fuse_projections
from qkvlab.errors import ConfigError
from qkvlab.models.sampling import Sampling, apply_repetition_penalty, check_sampling, sample

if TYPE_CHECKING:
    from torch import nn

    from qkvlab.models.decoding import StaticDecoder
    from qkvlab.models.gpt import GPT

#: ``GenerateOutput.finish_reasons`` values.
FINISH_REASONS = ("length", "stop_token", "stop_string")
_LENGTH, _STOP_TOKEN, _STOP_STRING = 0, 1, 2


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ConfigError(
            f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}); "
            "encode with the tokenizer the model was trained with."
        )


def as_prompt(
    idx: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None,
    *,
    vocab_size: int,
    device: torch.device,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check a prompt; a list of token lists becomes a left-padded tensor and its mask.

    Returns ``(idx (B, T), mask (B, T) bool or None)``; raises one :class:`ConfigError` for a
    prompt that is not 2-D integer ids, is empty, has a row without real tokens or an id
    outside the vocabulary.
    """
    if not isinstance(idx, torch.Tensor):
        if attention_mask is not None:
            raise ConfigError("Pass attention_mask only with a (batch, seq) tensor; a list of token lists has none.")
        rows = [list(map(int, r.tolist() if isinstance(r, torch.Tensor) else r)) for r in idx]
        if not rows or not all(rows):
            raise ConfigError("The prompt is empty or has an empty row; give every row at least one token.")
        T = max(map(len, rows))
        idx = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):
            idx[b, T - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[b, T - len(r) :] = True
        idx, attention_mask = idx.to(device), mask.to(device)
    if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
        hint = " (a single sequence: idx[None])" if idx.dim() == 1 else ""
        raise ConfigError(
            f"The prompt must be integer token ids of shape (batch, seq){hint}, got shape {tuple(idx.shape)} "
            f"and dtype {idx.dtype}."
        )
    if idx.numel() == 0:
        raise ConfigError(f"The prompt is empty (shape {tuple(idx.shape)}); give every row at least one token.")
    idx = idx.to(device)
    mask = None
    if attention_mask is not None:
        if attention_mask.shape != idx.shape:
            raise ConfigError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the prompt has {tuple(idx.shape)}; "
                "pass one flag per token, True (1) for real tokens."
            )
        mask = attention_mask.to(device=idx.device, dtype=torch.bool)
        empty = (~mask.any(dim=1)).nonzero()
        if empty.numel():
            raise ConfigError(
                f"Row {int(empty[0])} of the prompt has no real token (its attention_mask is all False); "
                "give every row at least one token."
            )
        _check_ids("The prompt", idx[mask], vocab_size)
    else:
        _check_ids("The prompt", idx, vocab_size)
    return idx, mask


def compact_prompt(idx: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real tokens packed to the front: ``(packed (B, L), lengths (B,))``, ``L`` the longest row.

    Past a row's end ``packed`` repeats the row's first token: a causal model never reads it,
    and a repetition penalty sees no token the row does not hold.
    """
    B, T = idx.shape
    idx = idx.long()  # index ops (gather, scatter) take int64
    if mask is None:
        return idx, torch.full((B,), T, dtype=torch.long, device=idx.device)
    lengths = mask.sum(dim=1)
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # real tokens first, in order
    L = int(lengths.max())
    packed = idx.gather(1, order)[:, :L]
    past = torch.arange(L, device=idx.device)[None, :] >= lengths[:, None]
    return torch.where(past, packed[:, :1], packed), lengths


# ----------------------------------------------------------------------------- results
@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict=True)`` returns, and a stream's ``result``.

    Attributes:
        sequences: ``(B, T + max_new_tokens)``: the prompt as given (padding included), then each
            row's new tokens, then ``pad_token_id`` after the row's end.
        tokens: each row's new tokens; a stop token id, or the token that completed a stop
            string, is the row's last.
        lengths: ``len(tokens[b])`` per row.
        finish_reasons: per row ``"stop_token"``, ``"stop_string"`` or ``"length"``.
        texts: with a tokenizer, each row's new text: without a stop token id, cut right after
            a stop string; else None.
    """

    sequences: torch.Tensor
    tokens: list[list[int]]
    lengths: list[int]
    finish_reasons: list[str]
    texts: list[str] | None = None


@dataclass
class GenerationStep:
    """One step of a stream: the token each row sampled, and which rows took it.

    Attributes:
        tokens: ``(B,)`` sampled ids (meaningless where ``emitted`` is False).
        emitted: ``(B,)`` bool: rows for which ``tokens`` is their next token (rows that ended
            at an earlier step are False).
        finished: per row, the finish reason if the row ended at this step, else None.
        text: with a tokenizer, the new text of each row at this step ("" if none yet: an
            unfinished UTF-8 character waits for its next byte); else None.

    In a stream, ``tokens`` and ``emitted`` are on the host, read there while the next step
    already runs on the model's device: reading them waits for nothing.
    """

    tokens: torch.Tensor
    emitted: torch.Tensor
    finished: list[str | None]
    text: list[str] | None = None


class GenerationStream:
    """An iterator of :class:`GenerationStep`, one per decode step; ``result`` once it is exhausted."""

    def __init__(self, steps: Generator[GenerationStep, None, GenerateOutput]):
        self._steps = steps
        self.result: GenerateOutput | None = None

    def __iter__(self) -> Iterator[GenerationStep]:
        if self.result is None:
            self.result = yield from self._steps


class _RowText:
    """A row's decoded new text, watched for stop strings; hands out what is new and final.

    Text up to the last token that ended on a whole character is kept decoded, so a step
    decodes only the tokens after it (usually one), not the whole row.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""
        self.kept = ""  # decoded text of ids[: self.start], final
        self.start = 0
        self.sent = 0  # characters handed out already
        self.checked = 0  # characters of final text already searched for a stop

    def add(self, token: int) -> bool:
        """Append ``token``; True if a stop string is now complete (the text is cut right after it)."""
        self.ids.append(token)
        tail = self.tokenizer.decode(self.ids[self.start :])
        self.text = self.kept + tail
        final = len(self.text.rstrip("\ufffd"))  # an unfinished UTF-8 character may still change
        ends = []
        for s in self.stops:
            at = self.text.find(s, max(0, self.checked - len(s) + 1), final)
            if at >= 0:
                ends.append(at + len(s))
        self.checked = final
        if ends:
            self.text = self.text[: min(ends)]
            return True
        if final == len(self.text):
            self.kept, self.start = self.text, len(self.ids)
        return False

    def delta(self, done: bool) -> str:
        """New text since the last call: all of it once ``done``, else up to an unfinished character."""
        end = len(self.text) if done else len(self.text.rstrip("\ufffd"))
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


# ----------------------------------------------------------------------------- the loop
def run(
    model: GPT,
    idx: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_token_ids: Sequence[int] | torch.Tensor | None = None,
    stop_strings: Sequence[str] | str | None = None,
    tokenizer: Any = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    cache: KVCache | LinearState | None = None,
    use_cache: bool = True,
    cuda_graph: bool | str = "auto",
    compile: bool | str = False,
    fuse: bool | str = False,
    gemv: bool | str = "auto",
    stream: bool = False,
) -> Generator[GenerationStep, None, GenerateOutput]:
    """The decode loop behind ``GPT.generate`` and ``GPT.stream``: checks the arguments now and
    returns a generator that yields one step per token and returns the output.

    ``stream`` fills each step's ``finished`` on the host (a sync per step); without it, and
    without a tokenizer, the steps stay on the device until the end.
    """
    cfg = model.config
    device = next(model.parameters()).device
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0 (an integer), got {max_new_tokens!r}.")
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    if cuda_graph not in (True, False, "auto"):
        raise ConfigError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}.")
    fuse = check_fuse(fuse, model)
    gemv = check_gemv(gemv, compile)
    if compile and (not use_cache or cfg.variant.linear):
        raise ConfigError(
            "compile=True compiles the static decode step over a KV cache: it needs use_cache=True and "
            f"softmax attention (variant {cfg.variant.id!r}, use_cache={use_cache})."
        )
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = list(stop_strings or [])
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ConfigError(f"stop_strings must be non-empty strings, got {stop_strings!r}.")
    if stop_strings and tokenizer is None:
        raise ConfigError("stop_strings are matched on decoded text: pass tokenizer= (anything with .decode(ids)).")
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise ConfigError(f"tokenizer must have a decode(ids) method, got {type(tokenizer).__name__}.")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ConfigError(
                f"generator must be a torch.Generator (e.g. torch.Generator({device.type!r}).manual_seed(0)) or "
                f"None, got {type(generator).__name__}."
            )
        if generator.device.type != device.type:
            raise ConfigError(
                f"generator is on {generator.device.type} but the model is on {device.type}; make it with "
                f"torch.Generator(device={device.type!r})."
            )
    if isinstance(stop_token_ids, torch.Tensor):  # a tensor of ids, as the token ids themselves come
        if stop_token_ids.dim() > 1 or stop_token_ids.dtype.is_floating_point or stop_token_ids.is_complex():
            raise ConfigError(
                f"stop_token_ids must be integers (a list or a 1-D integer tensor), got a {stop_token_ids.dim()}-D "
                f"{stop_token_ids.dtype} tensor."
            )
        stop_token_ids = stop_token_ids.reshape(-1).tolist()
    stop_ids = None
    if stop_token_ids is not None and len(stop_token_ids):
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in stop_token_ids):
            raise ConfigError(f"stop_token_ids must be integers, got {list(stop_token_ids)!r}.")
        stop_ids = torch.tensor([int(t) for t in stop_token_ids], dtype=torch.long, device=device)
        _check_ids("stop_token_ids", stop_ids, cfg.vocab_size)

    idx, mask = as_prompt(idx, attention_mask, vocab_size=cfg.vocab_size, device=device, pad_token_id=pad_token_id)
    B = idx.shape[0]
    packed, lengths = compact_prompt(idx, mask)
    longest = packed.shape[1]
    total = longest + max_new_tokens
    if total > cfg.max_seq_len:
        raise ConfigError(
            f"Prompt of {longest} tokens + {max_new_tokens} new = {total} exceeds max_seq_len="
            f"{cfg.max_seq_len}; shorten the prompt or generate fewer tokens."
        )
    ragged = mask is not None and bool((lengths != longest).any())
    new = torch.full((B, max_new_tokens), pad_token_id, dtype=idx.dtype, device=idx.device)
    texts = [_RowText(tokenizer, stop_strings) for _ in range(B)] if tokenizer is not None else None

    def output(reasons: list[int], counts: list[int]) -> GenerateOutput:
        return GenerateOutput(
            sequences=torch.cat([idx, new], dim=1),
            tokens=[new[b, : counts[b]].tolist() for b in range(B)],
            lengths=counts,
            finish_reasons=[FINISH_REASONS[r] for r in reasons],
            texts=[t.text for t in texts] if texts is not None else None,
        )

    # what the loop's end runs (unless a step raised): the decoder is left for the next call
    hand_back: list[Callable[[], None]] = []

    # The decode loop, run as the generator is consumed; the checks above raise at the call.
    def steps() -> Generator[GenerationStep, None, GenerateOutput]:
        if max_new_tokens == 0:
            return output([_LENGTH] * B, [0] * B)
        state, seq = cache, None
        if fuse:
            fuse_projections(model)  # before the prefill, which runs the same products
        if use_cache:
            if state is None:
                state = model.new_cache(B, total)
            else:
                state.reset()
            # The packed prompt; a mask only where rows differ in length (then the state is ragged).
            packed_mask = torch.arange(longest, device=device)[None, :] < lengths[:, None] if ragged else None
            logits = model.prefill(packed, state, attention_mask=packed_mask)
        else:
            seq = torch.zeros(B, total, dtype=packed.dtype, device=device)
            seq[:, :longest] = packed
            logits = _last_logits(model(packed), lengths)
        step = None
        penalty = repetition_penalty if repetition_penalty not in (None, 1.0) else None
        # The static step itself picks each next token, greedily or by sampling from the default
        # generator, after its repetition penalty if any (StaticDecoder's greedy, sampling and
        # penalty), so between two steps no sampling kernels run and no token is copied into the
        # step's input. A caller's generator is not the one a graph replays its draws from: with
        # one, sampling runs between the steps.
        chosen = None  # that pick, once a step has made one
        in_step = False
        decoder = None
        auto = cuda_graph == "auto" and state is not None and state.device.type == "cuda"
        if use_cache and (compile or cuda_graph is True or (auto and isinstance(state, KVCache))):
            greedy = temperature == 0
            sampled = temperature > 0 and generator is None
            sampling = Sampling(temperature, top_k, top_p) if sampled else None
            in_step = greedy or sampled
            options = dict(
                cuda_graph=cuda_graph,
                compile=compile,
                fuse=fuse,
                gemv=gemv,
                greedy=greedy,
                sampling=sampling,
                penalty=penalty if in_step else None,
            )
            decoder = _take_decoder(model, state, options)
            hand_back.append(functools.partial(_leave_decoder, model, state, options, decoder))
            # the logits are sampled from before the next step overwrites the graph's output
            step = functools.partial(decoder.step, copy=False)
        elif use_cache:
            step = lambda tok: model.decode_one(tok, state)  # noqa: E731

        def advance(nxt: torch.Tensor, i: int) -> torch.Tensor:
            """The next step's logits (the step after token ``nxt``, the ``i``-th new one)."""
            nonlocal chosen
            if step is None:
                return advance_uncached(nxt, i)
            if not in_step:
                return step(nxt)
            # nxt is a copy of the step's own pick (or the prompt's first): passing the pick
            # itself back launches no copy
            logits = step(decoder.next_token if chosen is not None else nxt)
            chosen = decoder.next_token
            return logits

        seen = None  # with a penalty, the tokens each row holds: the step's own where it picks
        if penalty is not None and in_step:
            decoder.mark_seen(packed, reset=True)  # (a kept decoder's marks are the last call's)
            seen = decoder.seen
        elif penalty is not None:
            seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
            seen.scatter_(1, packed, True)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        reason = torch.zeros(B, dtype=torch.long, device=device)
        count = torch.zeros(B, dtype=torch.long, device=device)
        stops = stop_ids is not None or bool(stop_strings)
        # Without stops and text no row ends before the last step: every row takes every token,
        # and the step's bookkeeping (which rows emit, their counts, which ended) is a constant.
        # Skipping its kernels matters on a GPU, where each is a launch beside the graph's. A
        # stream is left out: its caller reads every token, so the host reads it (below).
        every_row = not stops and texts is None and not stream
        all_emit = torch.ones(B, dtype=torch.bool, device=device) if every_row else None
        # Where the host does not read every token, whether every row has ended is a host sync:
        # each step on a CPU, every few steps on a GPU (rows that ended meanwhile decode on, unused).
        sync_every = 1 if device.type == "cpu" else 8
        cur = lengths.clone()  # uncached: each row's length in ``seq``

        def advance_uncached(nxt: torch.Tensor, i: int) -> torch.Tensor:
            seq.scatter_(1, cur[:, None], nxt[:, None])
            cur.add_(1)
            return _last_logits(model(seq[:, : longest + i + 1]), cur)

        pad = torch.full((B,), pad_token_id, dtype=torch.long, device=device)
        # Where the host reads every token (a stream, text) it keeps the rows' bookkeeping
        # itself: it knows each token, so which rows emit, which ended and why, and the counts
        # follow on the host, and between two steps the device runs only the sampling and the
        # step, not the bookkeeping's small kernels. A stream's steps hand out what the host
        # read: a caller reading them waits for nothing, not even the step already launched.
        on_host = stream or texts is not None  # (never with every_row, which leaves both out)
        stop_set = {int(t) for t in stop_token_ids} if stop_ids is not None else set()
        ended_h, reason_h, count_h = [False] * B, [_LENGTH] * B, [0] * B
        columns: list[list[int]] = []  # the host's copy of ``new``, a column a step
        emitted_now = torch.ones(B, dtype=torch.bool) if on_host else None  # remade when a row ends
        for i in range(max_new_tokens):
            if chosen is not None:
                # the step's own pick, which the next step overwrites with its own: the host path
                # copies it out before that launch, the every-row path into its column of ``new``
                # (which it hands out), the device path keeps a copy
                nxt = chosen if on_host or every_row else chosen.clone()
            else:
                scores = apply_repetition_penalty(logits, seen, penalty) if seen is not None else logits
                nxt = sample(scores, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            last = i + 1 == max_new_tokens
            if seen is not None and chosen is None:  # a step's pick is marked by that step
                seen.scatter_(1, nxt[:, None], True)
            if every_row:
                new[:, i] = nxt
                done = [FINISH_REASONS[_LENGTH] if last else None] * B
                yield GenerationStep(tokens=new[:, i], emitted=all_emit, finished=done)
                if last:
                    count.fill_(i + 1)
                    break
                logits = advance(nxt, i)
                continue
            if on_host:
                # The token is copied out before the next step is launched and read after: the
                # step runs while the host decodes text and the caller takes the token.
                read = to_host_later(nxt)
                if not last:
                    logits = advance(nxt, i)
                host_tok = read()
                column = [pad_token_id] * B
                finished_now: list[str | None] = [None] * B
                step_text = [""] * B if texts is not None else None
                for b in range(B):
                    if ended_h[b]:
                        continue
                    column[b] = host_tok[b]
                    count_h[b] += 1
                    if host_tok[b] in stop_set:
                        reason_h[b] = _STOP_TOKEN
                    elif texts is not None and texts[b].add(host_tok[b]):
                        reason_h[b] = _STOP_STRING
                    if reason_h[b] != _LENGTH or last:
                        finished_now[b] = FINISH_REASONS[reason_h[b]]
                    if texts is not None:
                        step_text[b] = texts[b].delta(finished_now[b] is not None)
                columns.append(column)
                yield GenerationStep(
                    tokens=torch.tensor(host_tok), emitted=emitted_now, finished=finished_now, text=step_text
                )
                ended_now = [b for b in range(B) if finished_now[b] is not None and reason_h[b] != _LENGTH]
                if ended_now:
                    for b in ended_now:
                        ended_h[b] = True
                    emitted_now = torch.tensor([not e for e in ended_h])
                if last or (stops and all(ended_h)):
                    break
                continue
            # On the device: no stream and no text (text needs a tokenizer and makes the host read
            # every token), yet some stop, so stop ids are what can end a row here.
            emitted = ~finished
            new[:, i] = torch.where(emitted, nxt, pad)
            count += emitted
            ended = emitted & torch.isin(nxt, stop_ids)
            reason.masked_fill_(ended, _STOP_TOKEN)
            finished |= ended
            finished_now = [None] * B
            if last:
                # the host reads the rows' ends only here: every few steps otherwise
                reasons, emits = reason.tolist(), emitted.tolist()
                finished_now = [FINISH_REASONS[r] if e else None for r, e in zip(reasons, emits, strict=True)]
            yield GenerationStep(tokens=nxt, emitted=emitted, finished=finished_now)
            if last or ((i + 1) % sync_every == 0 and bool(finished.all())):
                break
            logits = advance(nxt, i)
        if on_host:
            if columns:
                new[:, : len(columns)] = torch.tensor(columns, dtype=new.dtype).T
            return output(reason_h, count_h)
        return output(reason.tolist(), count.tolist())

    return _without_grad(steps(), hand_back)


def _without_grad(
    steps: Generator[GenerationStep, None, GenerateOutput],
    at_end: Sequence[Callable[[], None]] = (),
) -> Generator[GenerationStep, None, GenerateOutput]:
    """``steps`` run with autograd off, one resumption at a time; the caller's own code between
    two steps keeps its grad mode. Unlike ``torch.no_grad()`` on the generator function, nothing
    is left to restore while a step is handed out: a stream the caller stops reading and keeps
    until the interpreter exits is closed there without calling into a half torn-down torch.
    ``at_end`` runs once the steps end, or the caller closes the stream between two steps (each
    step is whole); not after a step that raised."""
    try:
        while True:
            with torch.no_grad():
                try:
                    step = next(steps)
                except StopIteration as end:
                    result = end.value
                    break
            yield step
    except GeneratorExit:
        # closed between two steps, perhaps at interpreter exit: what at_end keeps is only a saving
        with contextlib.suppress(Exception):
            for f in at_end:
                f()
        raise
    for f in at_end:
        f()
    return result


# model -> (its last decoder's cache, weakly; what the decoder's step was recorded for; the
# decoder), for the next generate over that cache. The idle decoder holds neither the model nor
# the cache: both go with their users, and the decoder (its graph and buffers) with the model or
# the next call.
_IDLE_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _recorded_for(model: nn.Module, cache: KVCache, options: dict) -> tuple:
    """What a recorded step depends on beyond its code: the options, the form of the cache
    (ragged or not), the memory and dtype of every weight, buffer and cache tensor it reads (a
    graph reads them by address: ``model.to()`` or weights loaded with ``assign=True`` move them),
    the model's mode, the autocast in force and each attention layer's decode backend."""
    device = cache.device.type
    tensors = [*model.parameters(), *model.buffers(), *(t for layer in cache.layers for t in (layer.k, layer.v))]
    return (
        tuple(sorted(options.items(), key=lambda kv: kv[0])),
        cache.row_lengths is not None,
        tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in tensors),
        model.training,
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device),
        tuple(getattr(m, "decode_backend", None) for m in model.modules()),
    )


def _take_decoder(model: nn.Module, cache: KVCache, options: dict) -> StaticDecoder:
    """The decoder an earlier call left for ``model`` over this very ``cache``, recorded for
    what this call would record (:func:`_recorded_for`): its step is compiled and its graph
    captured already. Else a new one (and an idle decoder that does not fit is dropped)."""
    from qkvlab.models.decoding import StaticDecoder

    idle = _IDLE_DECODERS.pop(model, None)
    if idle is not None:
        cache_ref, recorded, decoder = idle
        if cache_ref() is cache and recorded == _recorded_for(model, cache, options):
            decoder.model, decoder.cache = model, cache
            return decoder
    return StaticDecoder(model, cache, **options)


def _leave_decoder(model: nn.Module, cache: KVCache, options: dict, decoder: StaticDecoder) -> None:
    recorded = _recorded_for(model, cache, options)
    decoder.model = decoder.cache = None  # idle: it keeps neither alive
    _IDLE_DECODERS[model] = (weakref.ref(cache), recorded, decoder)


def to_host_later(t: torch.Tensor) -> Callable[[], list]:
    """Start copying ``t`` to the host and return what reads it: on CUDA a copy into pinned
    memory, ordered before whatever is launched next on the stream, and an event to wait for, so
    that reading it does not also wait for the work launched after."""
    if t.device.type != "cuda":  # read now: ``t`` may be a buffer that what runs next overwrites
        values = t.tolist()
        return lambda: values
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> list:
        done.synchronize()
        return host.tolist()

    return read


def _last_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``(B, V)``: each row's logits at its last token (position ``lengths[b] - 1``)."""
    B, _, V = logits.shape
    return logits.gather(1, (lengths - 1).view(B, 1, 1).expand(B, 1, V)).squeeze(1)

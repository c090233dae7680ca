"""Picking each next token from logits: the repetition penalty, top-k and top-p filters,
sampling and the greedy pick, shared by the decode loop (:mod:`qkvlab.models.generation`) and the
static step that picks inside its graph (:class:`~qkvlab.models.decoding.StaticDecoder`).

Everything here runs on the device without a host sync and with static shapes, so that a
captured step can run it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from qkvlab.errors import ConfigError


# ----------------------------------------------------------------------------- logits processing
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens already in the row: ``l / penalty`` where ``l > 0``, ``l * penalty`` otherwise.

    ``seen`` is ``(B, V)`` bool. With ``penalty > 1`` a seen token always becomes less likely
    (dividing a negative logit would raise it), as in Keskar et al. (2019), CTRL.
    """
    logits = logits.float()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits outside the ``top_k`` largest of each row set to ``-inf``."""
    if top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``; the rest ``-inf``.

    A token stays if the tokens sorted ahead of it hold less than ``top_p`` together, so the
    most likely token always stays and ``top_p=1`` keeps everything. Of tokens tied at the cut,
    those the sort puts first stay.
    """
    if top_p >= 1.0:
        return logits
    order, _, drop_sorted = _sorted_nucleus(logits, top_p)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _sorted_nucleus(
    logits: torch.Tensor, top_p: float, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sort's indices, weights in sorted order proportional to ``softmax(logits /
    temperature)``, and which sorted tokens fall past the top-p cut: the one definition of the
    cut, for the filter and the draw.

    The weights are left unnormalised because a sorted row needs neither of a softmax's two
    reductions: its maximum is its first entry and its total is the running sum's last. A token
    is cut if the tokens ahead of it hold ``top_p`` of that total."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    scores = sorted_logits.float()
    weights = ((scores - scores[..., :1]) / temperature).exp()
    mass = weights.cumsum(dim=-1)
    return order, weights, mass - weights >= top_p * mass[..., -1:]


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    chunked: bool = False,
) -> torch.Tensor:
    """Next token ``(B,)`` from logits ``(B, V)``: greedy at temperature 0, else sampled.

    Sampling draws from ``softmax(logits / temperature)`` after :func:`top_k_filter` and then
    :func:`top_p_filter` (each only if given; top-p by :func:`draw_nucleus`). ``chunked``: the
    final argmax is :func:`chunked_argmax` (the same index; for code ``torch.compile`` generates).
    """
    if temperature == 0:
        return chunked_argmax(logits) if chunked else logits.argmax(dim=-1)
    if top_k is not None:  # dividing by a temperature > 0 keeps the order: the same top k
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        return draw_nucleus(logits, temperature, top_p, generator, chunked=chunked)
    return draw((logits.float() / temperature).softmax(dim=-1), generator, chunked=chunked)


def draw_nucleus(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
    *,
    chunked: bool = False,
) -> torch.Tensor:
    """One token a row from ``softmax(logits / temperature)`` after :func:`top_p_filter`, drawn
    in sorted order: the kept set is a prefix of the sorted row, so the draw masks the sorted
    weights and maps its pick back through the sort's indices. That skips what filtering in
    vocabulary order costs a step (scattering the mask back, a second softmax), and the sort runs
    on the logits as they come: half-precision keys take fewer, cheaper radix-sort passes than
    float32 ones, and converting them to float32 and dividing by a temperature > 0 keeps their
    order."""
    order, weights, cut = _sorted_nucleus(logits, top_p, temperature)
    pick = draw(weights.masked_fill(cut, 0.0), generator, chunked=chunked)
    return order.gather(-1, pick[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None, *, chunked: bool = False) -> torch.Tensor:
    """One token a row ``(B,)`` from probabilities ``(B, V)``: the argmax of ``probs / q`` with
    ``q`` standard exponential draws, which picks token ``i`` with probability ``probs[i]`` (for
    weights that do not sum to 1, in proportion to them).

    This is what ``torch.multinomial(probs, 1)`` computes, with the same draws from the same
    generator, less its checks of ``probs`` (device-side asserts, several kernels a call). Without
    them it has no host sync and no assert, so a static decode step can sample inside its graph.
    A softmax of logits needs none of them; a row holding NaN (a model that overflowed) picks its
    first NaN, as the greedy argmax does, where ``multinomial`` would raise. ``chunked``: the
    argmax is :func:`chunked_argmax` (the same pick).
    """
    q = torch.empty_like(probs).exponential_(generator=generator)
    return chunked_argmax(probs / q) if chunked else (probs / q).argmax(dim=-1)


def check_sampling(
    *, temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float | None
) -> None:
    """One :class:`ConfigError` per bad sampling value."""
    if not temperature >= 0 or temperature == float("inf"):  # NaN fails the first test
        raise ConfigError(f"temperature must be >= 0 and finite (0 is greedy), got {temperature}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ConfigError(f"top_k must be >= 1 (an integer; None is no limit), got {top_k!r}.")
    if top_p is not None and not 0 < top_p <= 1:  # NaN fails too
        raise ConfigError(f"top_p must lie in (0, 1] (1 keeps every token; None is off), got {top_p}.")
    if repetition_penalty is not None and not (0 < repetition_penalty < math.inf):
        raise ConfigError(
            f"repetition_penalty must be a finite number > 0 (1 is off, > 1 discourages repeats), got "
            f"{repetition_penalty}."
        )


def chunked_argmax(logits: torch.Tensor, min_width: int = 4096) -> torch.Tensor:
    """``logits.argmax(-1)`` for ``(rows, vocab)`` logits, reduced in two stages: the maximum of each of
    about ``sqrt(vocab)`` chunks of a row, then the best chunk. The same index as ``argmax`` (the first
    of equal maxima, the first NaN), written for ``torch.compile``: Inductor reduces an argmax over
    one row in one program, which leaves a large card mostly idle for the whole vocabulary, while
    each stage here is a reduction over many rows. Rows narrower than ``min_width`` take
    ``argmax`` as it is."""
    rows, vocab = logits.shape
    if vocab < min_width:
        return logits.argmax(-1)
    width = math.isqrt(vocab - 1) + 1
    chunks = -(-vocab // width)
    # -inf after the end is never a row's first maximum: a row of -inf's picks 0 either way
    padded = torch.nn.functional.pad(logits, (0, chunks * width - vocab), value=float("-inf"))
    best, where = padded.view(rows, chunks, width).max(-1)  # the first maximum of each chunk
    chunk = best.argmax(-1, keepdim=True)  # the first chunk holding the row's maximum
    return (chunk * width + where.gather(-1, chunk)).squeeze(-1)


@dataclass(frozen=True)
class Sampling:
    """How a static step samples its next token (:class:`~qkvlab.models.decoding.StaticDecoder`'s
    ``sampling``): :func:`sample`'s arguments, checked, drawing from the default generator of the
    step's device (a graph replays its draws from that generator's state at each launch)."""

    temperature: float
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, repetition_penalty=None)
        if self.temperature == 0:
            raise ConfigError("Sampling needs a temperature > 0; temperature 0 is greedy (StaticDecoder(greedy=True)).")

    def __call__(self, logits: torch.Tensor, *, chunked: bool = False) -> torch.Tensor:
        """The next token ``(B,)``; ``chunked`` as in :func:`sample` (a compiled step's)."""
        return sample(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, chunked=chunked)

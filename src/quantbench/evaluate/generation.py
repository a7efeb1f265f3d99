"""Greedy generation for the hf backend: a static KV cache, and on CUDA each decode step replayed as a CUDA graph.

transformers' ``generate`` decodes one token per Python-driven forward (about a thousand kernel launches for an
8B model), with a growing cache and stop checks that wait for the device every step, so at lm-eval's batch
sizes it is bound by launches and host round trips, not by reading the weights. :class:`GreedyDecoder` makes
the same tokens another way:

- prefill: one forward over the left-padded prompts into a :class:`transformers.StaticCache` (positions from
  the attention mask, as ``generate`` computes them);
- decode: a step function over fixed buffers (current tokens, positions, the cache slot written, an additive
  ``[batch, 1, 1, cache length]`` attention mask, 0 or -inf, that the step extends itself), captured once as a
  CUDA graph per (batch, cache length) and replayed; the argmax and the bookkeeping run inside the graph, so
  the host only queues replays. The cache length is rounded up to :attr:`GreedyDecoder.cache_multiple` so
  batches of similar length reuse one graph. On CUDA the steps run the model's RMSNorms as one fused kernel
  each (:func:`quant.norm_kernel.fused_rms_norms`: the same formula, a float32 sum in another order);
- stopping: the generated tokens come back to the host every :attr:`GreedyDecoder.check_every` steps, while
  the device runs on, and the host replays ``generate``'s own rules on them step by step: once a row emits an
  end-of-sequence token it gets the pad token, the caller's stopping criteria (lm-eval's stop sequences) are
  called on the same ids ``generate`` would pass them, and the output ends at the step where every row is
  finished or ``max_length`` is reached. Steps the device computed past that are dropped.

Decode steps attend with the query heads grouped by their key-value head (``[batch, kv_heads, group, dim]``),
which is the same attention as repeating the keys and values per head but reads the cache once. The tokens
equal ``generate``'s exactly in float32 on the CPU (tests/test_eval_generation.py); on a GPU in bf16 they
may part where two logits are within rounding of each other.
Only greedy decoding without logits processors takes this path (:meth:`GreedyDecoder.handles`), on decoder-only
models whose layers all use full attention; anything else goes to ``generate``.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, GenerationConfig, PreTrainedModel, StaticCache, StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from quantbench.quant.norm_kernel import fused_rms_norms

log = logging.getLogger(__name__)

DECODE_ATTENTION = "quantbench_grouped_decode"

# GenerationConfig fields that make generate() change the logits or the stopping, and the values that do not.
_NEUTRAL = {
    "num_beams": (None, 1),
    "num_return_sequences": (None, 1),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "max_new_tokens": (None,),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "max_time": (None,),
    "stop_strings": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
}


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one query token per row against the cache: ``query [b, heads, 1, d]``, ``key``/``value``
    ``[b, kv_heads, length, d]``, an ``attention_mask [b, 1, 1, length]`` (additive or boolean). The query heads sharing a
    key-value head attend together, so the cache is read as stored (no per-head copy)."""
    batch, heads, length, dim = query.shape
    if length != 1:
        raise ValueError(f"{DECODE_ATTENTION} attends one query token per row, got {length}")
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)


@dataclass
class _Session:
    """The fixed buffers of one (batch, cache length) and, on CUDA, the graph of one decode step over them."""

    cache: StaticCache
    tokens: torch.Tensor  # [batch, 1] token fed to the next step
    positions: torch.Tensor  # [batch, 1] its position id
    slot: torch.Tensor  # [1] cache index the next step writes
    column: torch.Tensor  # [1] column of ``generated`` the next step writes
    mask: torch.Tensor  # [batch, 1, 1, cache length] additive: 0 where attended, -inf elsewhere
    generated: torch.Tensor  # [batch, cache length] tokens produced, column 0 by the prefill
    graph: torch.cuda.CUDAGraph | None = None
    steps_run: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return tuple(self.mask.shape[::3])


@dataclass
class GreedyDecoder:
    """Greedy generation of ``model`` with the results of ``model.generate`` (module docstring).

    ``cache_multiple``: cache lengths are rounded up to this, so batches of similar length share a graph.
    ``check_every``: decode steps between the host's stop checks (and the most steps run past the stop).
    ``graphs``: replay decode steps as CUDA graphs (``None``: on CUDA devices).
    """

    model: PreTrainedModel
    cache_multiple: int = 256
    check_every: int = 16
    graphs: bool | None = None
    _session: _Session | None = field(default=None, repr=False)

    def handles(self, generation_config: GenerationConfig) -> bool:
        """Whether generation under ``generation_config`` is plain greedy search this decoder reproduces."""
        config = self.model.config.get_text_config(decoder=True)
        if self.model.config.is_encoder_decoder or generation_config.do_sample:
            return False
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
            return False
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return False
        return all(getattr(generation_config, name, None) in values for name, values in _NEUTRAL.items())

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        max_length: int,
        generation_config: GenerationConfig,
        stopping_criteria: StoppingCriteriaList | None = None,
    ) -> torch.Tensor:
        """``model.generate(input_ids, attention_mask=..., max_length=..., stopping_criteria=...)`` for greedy
        ``generation_config`` (see :meth:`handles`): prompt and new tokens, ``[batch, <= max_length]``."""
        if not self.handles(generation_config):
            raise ValueError("GreedyDecoder reproduces plain greedy search only; use model.generate")
        batch, prompt = input_ids.shape
        steps = max_length - prompt
        if steps <= 0:
            return input_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = _token_ids(generation_config.eos_token_id)
        pad = generation_config.pad_token_id
        if pad is None and eos:
            pad = eos[0]
        length = -(-max_length // self.cache_multiple) * self.cache_multiple
        with torch.no_grad():
            session = self._prefill(input_ids, attention_mask, length)
            stop = _HostStop(input_ids.cpu(), max_length, eos, pad, stopping_criteria)
            return self._decode(session, stop, steps).to(input_ids.device)

    # --- device side ------------------------------------------------------------------------------

    def _session_for(self, batch: int, length: int, device: torch.device) -> _Session:
        if self._session is not None and self._session.key == (batch, length) and self._session.mask.device == device:
            self._session.cache.reset()
            self._session.mask.fill_(-torch.inf)
            return self._session
        self._session = None  # free the last session's cache and graph before allocating another
        long = {"dtype": torch.long, "device": device}
        return _Session(
            cache=StaticCache(config=self.model.config, max_cache_len=length),
            tokens=torch.zeros(batch, 1, **long),
            positions=torch.zeros(batch, 1, **long),
            slot=torch.zeros(1, **long),
            column=torch.zeros(1, **long),
            mask=torch.full((batch, 1, 1, length), -torch.inf, dtype=self.model.dtype, device=device),
            generated=torch.zeros(batch, length, **long),
        )

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int) -> _Session:
        batch, prompt = input_ids.shape
        session = self._session_for(batch, length, input_ids.device)
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=session.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        first = out.logits[:, -1].float().argmax(-1)
        session.generated[:, 0] = first
        session.tokens.copy_(first[:, None])
        session.positions.copy_(positions[:, -1:] + 1)
        session.mask[:, 0, 0, :prompt].masked_fill_(attention_mask.bool(), 0.0)
        session.slot.fill_(prompt)
        session.column.fill_(1)
        session.steps_run = 0
        self._session = session
        return session

    def _step(self, session: _Session) -> None:
        """One decode step on the session's buffers (the body of the CUDA graph)."""
        session.mask.index_fill_(3, session.slot, 0.0)
        logits = self.model(
            input_ids=session.tokens,
            attention_mask={"full_attention": session.mask},
            position_ids=session.positions,
            past_key_values=session.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        chosen = logits[:, -1].float().argmax(-1)
        session.generated.index_copy_(1, session.column, chosen[:, None])
        session.tokens.copy_(chosen[:, None])
        session.positions.add_(1)
        session.slot.add_(1)
        session.column.add_(1)

    def _run_steps(self, session: _Session, count: int) -> None:
        config = self.model.config
        saved = config._attn_implementation
        config._attn_implementation = DECODE_ATTENTION
        norms = fused_rms_norms(self.model) if session.mask.device.type == "cuda" else nullcontext()
        try:
            with norms:
                for _ in range(count):
                    if session.graph is None and self._use_graphs(session) and session.steps_run >= 2:
                        session.graph = self._capture(session)
                    if session.graph is not None:
                        session.graph.replay()
                    elif self._use_graphs(session):  # warm-up steps off the capture stream, as CUDA graphs need
                        side = torch.cuda.Stream(session.mask.device)
                        side.wait_stream(torch.cuda.current_stream(session.mask.device))
                        with torch.cuda.stream(side):
                            self._step(session)
                        torch.cuda.current_stream(session.mask.device).wait_stream(side)
                    else:
                        self._step(session)
                    session.steps_run += 1
        finally:
            config._attn_implementation = saved

    def _use_graphs(self, session: _Session) -> bool:
        on_cuda = session.mask.device.type == "cuda"
        return on_cuda if self.graphs is None else (self.graphs and on_cuda)

    def _capture(self, session: _Session) -> torch.cuda.CUDAGraph | None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(session)
        except RuntimeError as exc:  # a model whose step synchronises with the host cannot be captured
            log.warning("decode step not capturable as a CUDA graph (%s); decoding without graphs", exc)
            self.graphs = False
            return None
        return graph

    # --- host side --------------------------------------------------------------------------------

    def _decode(self, session: _Session, stop: _HostStop, steps: int) -> torch.Tensor:
        """Queue decode steps a chunk ahead of the host's stop checks; the ids ``generate`` would return."""
        pinned = session.mask.device.type == "cuda"
        queued = 1  # columns of ``generated`` the device has been asked for (column 0 came from the prefill)
        fetched = 0  # columns on their way to the host
        pending: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()
        while True:
            if queued < steps:
                count = min(self.check_every, steps - queued)
                self._run_steps(session, count)
                queued += count
            if fetched < queued:
                host = torch.empty((session.generated.shape[0], queued - fetched), dtype=torch.long, pin_memory=pinned)
                host.copy_(session.generated[:, fetched:queued], non_blocking=pinned)
                event = torch.cuda.Event() if pinned else None
                if event is not None:
                    event.record()
                pending.append((host, event))
                fetched = queued
            if len(pending) < 2 and queued < steps:  # wait only with another chunk queued behind this one
                continue
            host, event = pending.popleft()
            if event is not None:
                event.synchronize()
            if stop.replay(host) or (not pending and queued >= steps):
                return stop.ids


def _token_ids(value: int | list[int] | torch.Tensor | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    return [value] if isinstance(value, int) else list(value)


class _HostStop:
    """``generate``'s stopping rules, replayed on the host one step at a time over fetched tokens."""

    def __init__(
        self,
        prompt: torch.Tensor,
        max_length: int,
        eos: list[int],
        pad: int | None,
        criteria: StoppingCriteriaList | None,
    ) -> None:
        self.ids = prompt
        self.pad = pad
        self.substitute = bool(eos)  # generate pads finished rows only when it has an end-of-sequence criterion
        rules: list[Callable[..., Any]] = list(criteria or [])
        rules.append(MaxLengthCriteria(max_length=max_length))
        if eos:
            rules.append(EosTokenCriteria(eos_token_id=torch.tensor(eos)))
        self.criteria = StoppingCriteriaList(rules)
        self.unfinished = torch.ones(prompt.shape[0], dtype=torch.long)

    def replay(self, columns: torch.Tensor) -> bool:
        """Append each column as ``generate`` would; True once every row is finished (``ids`` is then final)."""
        for j in range(columns.shape[1]):
            chosen = columns[:, j]
            if self.substitute:
                chosen = chosen * self.unfinished + self.pad * (1 - self.unfinished)
            self.ids = torch.cat([self.ids, chosen[:, None]], dim=-1)
            self.unfinished = self.unfinished & ~self.criteria(self.ids, None)
            if self.unfinished.max() == 0:
                return True
        return False


def merged_generation_config(model: PreTrainedModel, **kwargs: Any) -> GenerationConfig:
    """The model's generation config updated with ``generate`` keyword arguments, as ``generate`` merges them."""
    config = copy.deepcopy(model.generation_config)
    config.update(**kwargs)
    return config

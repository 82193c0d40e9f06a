"""Attention replay: ``offload`` and ``swap`` recompute a block without running FlashAttention-3's forward again.

Both modes run each block twice per step: its forward pass without gradients, then again in the backward
pass (the recompute) to build the block's graph. The attention product is most of a block's time, and its
recompute would give the numbers the forward pass gave. So FA3's op (``attention.flash_attention_3_op``, whose
implementation runs eagerly even inside a compiled block) asks ``AttentionReplay`` first: in the forward pass
it computes as usual and copies the output and the softmax's log-sum-exp to a host buffer of the block's,
pinned and reused every step, on a side stream; in the recompute it returns them (copied back, also on the
side stream, the next block down already being loaded) instead of computing, and FA3's registered backward
takes them as it takes its own. The price is host memory: one attention output per block (about 110 MB for
5b at 49x480x720, batch 1: 4.7 GB for its 42 blocks).

The offloaded runner says which block runs, and whether in the forward pass or the recompute, through a
context variable (the recompute runs on the autograd engine's thread). A recompute replays only what the
forward pass of its own graph stored (a ticket per block forward); anything else (no stored product: SDPA
ran, or another forward came in between; other shapes) computes. Forwards outside the offloaded runner
(validation, the eval score, the other modes) neither store nor replay.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

ALIGN = 64  # bytes: the log-sum-exp's view in a block's buffer starts aligned


@dataclass
class _Visit:
    """One run of one block by the offloaded runner: which block, its forward's ticket, and which phase."""

    replay: AttentionReplay
    block: int
    ticket: int
    recompute: bool
    calls: int = 0  # attention products so far in this run of the block


@dataclass
class _Stored:
    """One attention product kept by a forward pass: its inputs' signature, the host copies, and their loading."""

    signature: tuple[Any, ...]
    host: tuple[torch.Tensor, torch.Tensor]  # (out, lse) views of the block's host buffer
    loaded: tuple[torch.Tensor, torch.Tensor] | None = None  # on the device, once a load has been queued
    ready: torch.cuda.Event | None = None  # the load is done (CUDA)


@dataclass
class _Entry:
    ticket: int
    products: list[_Stored] = field(default_factory=list)


_VISIT: contextvars.ContextVar[_Visit | None] = contextvars.ContextVar("cogvx_attention_replay", default=None)


def _signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in (q, k, v))


class AttentionReplay:
    """Per-block host buffers of FA3's (output, log-sum-exp), filled by the forward pass, read by the recompute."""

    def __init__(self):
        self.entries: dict[int, _Entry] = {}  # block key -> what its last forward pass stored
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}  # (block key, product) -> flat host bytes
        self.replayed = 0  # recomputes that skipped FA3's forward
        self.forwarding = False  # inside an offloaded forward pass (its kernel is the training one)
        self._tickets = itertools.count()
        self._stream: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def forward_pass(self, block: int) -> Iterator[int]:
        """Around a block's forward pass (no gradients): its FA3 products are kept; yields the ticket its
        recompute must show. Whatever the block's earlier forward kept is dropped first."""
        self.entries.pop(block, None)
        ticket = next(self._tickets)
        token = _VISIT.set(_Visit(self, block, ticket, recompute=False))
        self.forwarding = True
        try:
            yield ticket
        finally:
            self.forwarding = False
            _VISIT.reset(token)

    @contextlib.contextmanager
    def recompute(self, block: int, ticket: int) -> Iterator[None]:
        """Around a block's recompute: FA3's products kept by the forward pass of ``ticket`` are replayed,
        once; the block's entry is gone afterwards, whatever happened."""
        token = _VISIT.set(_Visit(self, block, ticket, recompute=True))
        try:
            yield
        finally:
            _VISIT.reset(token)
            entry = self.entries.get(block)
            if entry is not None and entry.ticket == ticket:
                del self.entries[block]

    def host_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers.values())

    def recorded(self) -> dict[str, Any]:
        """For the run folder's config.json: whether a recompute has replayed, and the host memory held."""
        pinned = any(b.is_pinned() for b in self.buffers.values())
        return {"active": self.replayed > 0, "host_bytes": self.host_bytes(), "pinned": pinned}

    def product(self, visit: _Visit, q, k, v, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """In a forward pass: ``compute``'s outputs, their copy to the host started. In a recompute: the forward
        pass's outputs where it kept them for these inputs, else ``compute``'s."""
        if visit.recompute:
            stored = self._stored(visit, q, k, v)
            return compute(q, k, v) if stored is None else self._replay(visit, stored, q.device)
        out, lse = compute(q, k, v)
        self._store(visit, q, k, v, out, lse)
        return out, lse

    def _store(self, visit: _Visit, q, k, v, out: torch.Tensor, lse: torch.Tensor) -> None:
        entry = self.entries.get(visit.block)
        if entry is None or entry.ticket != visit.ticket:
            entry = self.entries[visit.block] = _Entry(visit.ticket)
        out_view, lse_view = self._host_views(visit.block, len(entry.products), out, lse)
        if out.is_cuda:
            # The copy reads clones of its own: inside a compiled block Inductor may hand the op's output buffers
            # to later buffers of the graph directly, past the caching allocator (which record_stream informs),
            # and overwrite them while the copy still reads (measured on an H100: wrong gradients, run to run).
            out, lse = out.clone(), lse.clone()
            stream = self._side_stream(out.device)
            stream.wait_stream(torch.cuda.current_stream(out.device))
            with torch.cuda.stream(stream):
                out_view.copy_(out, non_blocking=True)
                lse_view.copy_(lse, non_blocking=True)
            for t in (out, lse):  # the clones' device memory stays alive until the copy has read it
                t.record_stream(stream)
        else:
            out_view.copy_(out)
            lse_view.copy_(lse)
        entry.products.append(_Stored(_signature(q, k, v), (out_view, lse_view)))

    def _host_views(self, block: int, index: int, out: torch.Tensor, lse: torch.Tensor):
        out_bytes = -(-out.numel() * out.element_size() // ALIGN) * ALIGN
        needed = out_bytes + lse.numel() * lse.element_size()
        buffer = self.buffers.get((block, index))
        if buffer is None or buffer.numel() < needed:  # pinned allocation is slow: once per block, or a larger shape
            buffer = torch.empty(needed, dtype=torch.uint8, pin_memory=out.is_cuda)
            self.buffers[(block, index)] = buffer
        out_view = buffer[: out.numel() * out.element_size()].view(out.dtype).view(out.shape)
        lse_view = buffer[out_bytes : out_bytes + lse.numel() * lse.element_size()].view(lse.dtype).view(lse.shape)
        return out_view, lse_view

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _stored(self, visit: _Visit, q, k, v) -> _Stored | None:
        entry = self.entries.get(visit.block)
        if entry is None or entry.ticket != visit.ticket or visit.calls >= len(entry.products):
            return None
        stored = entry.products[visit.calls]
        return stored if stored.signature == _signature(q, k, v) else None

    def _load(self, stored: _Stored, device: torch.device) -> None:
        """Queue the host copies' way back to ``device`` (on the side stream, after their way out there)."""
        if stored.loaded is not None:
            return
        if device.type != "cuda":
            stored.loaded = tuple(t.clone() for t in stored.host)
            return
        stream = self._side_stream(device)
        loaded = tuple(torch.empty(t.shape, dtype=t.dtype, device=device) for t in stored.host)
        stream.wait_stream(torch.cuda.current_stream(device))  # the fresh memory's earlier users are done
        with torch.cuda.stream(stream):
            for into, host in zip(loaded, stored.host, strict=True):
                into.copy_(host, non_blocking=True)
            stored.ready = torch.cuda.Event()
            stored.ready.record(stream)
        for t in loaded:
            t.record_stream(stream)
        stored.loaded = loaded

    def _prefetch(self, ticket: int, device: torch.device) -> None:
        """Start loading the products of the block whose forward came just before (its recompute comes next)."""
        earlier = next((e for e in self.entries.values() if e.ticket == ticket - 1), None)
        if earlier is not None:
            for stored in earlier.products:
                self._load(stored, device)

    def _replay(self, visit: _Visit, stored: _Stored, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self._load(stored, device)
        if stored.ready is not None:
            torch.cuda.current_stream(device).wait_event(stored.ready)
        out, lse = stored.loaded
        stored.loaded = stored.ready = None  # handed over: autograd owns them now
        self.replayed += 1
        self._prefetch(visit.ticket, device)
        return out, lse


def product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA3's (output, log-sum-exp) of q, k, v: ``compute``'s, kept or replayed where an offloaded block runs."""
    visit = _VISIT.get()
    if visit is None:
        return compute(q, k, v)
    try:
        return visit.replay.product(visit, q, k, v, compute)
    finally:
        visit.calls += 1


@contextlib.contextmanager
def outside() -> Iterator[None]:
    """No block of the offloaded runner is running, as far as FA3's op can tell (``auto``'s timing runs)."""
    token = _VISIT.set(None)
    try:
        yield
    finally:
        _VISIT.reset(token)

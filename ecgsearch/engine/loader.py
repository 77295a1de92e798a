"""Batches prepared ahead of the step that uses them: training, validation, evaluation, prediction.

Why: building a batch (memory-map read, maybe resampling, normalisation, copies) on the training
loop's own thread leaves the device idle meanwhile. Here worker threads build the next batches
while the current one computes (numpy's copies and torch's kernels release the GIL).

The fast path (an int16 cache at the model's rate: a native one, or one written at the model's
geometry by `data prepare --target-fs --n-samples`) ships the raw int16 block: half the bytes of
float32 across PCIe, pinned on CUDA, and normalised on the device with the host path's float32
operations in its order (adu * scale + shift, `Normalizer.apply`), so the numbers are bit-identical
to it. On a CPU the worker threads normalise too. Any other cache (float32 storage, or a rate that
still needs resampling) gets the host path (`prep.batch`) on the worker threads: the same overlap
and numbers.

What a batch holds and the order of batches is the caller's: per-rank sharding and the
deterministic, resumable epoch order live in the training loop, untouched by how batches are built.
The workers never touch torch's random state (dropout masks stay where the step draws them).
"""
from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from ecgsearch.data import signal as sig
from ecgsearch.engine.inputs import adu_at



@dataclass
class Batch:
    x: torch.Tensor                 # normalised model input on the device, float32
    y: torch.Tensor                 # encoded targets on the device, float32
    natural: np.ndarray | None      # targets in natural units (evaluation), when asked for
    n: int


def fast_path(prep, data) -> bool:
    """True when batches can travel as raw int16 and be normalised on the device."""
    return adu_at(data, prep.fs)


def auto_threads(device: torch.device) -> int:
    """One worker thread where it has a core to itself, else none.

    A GPU leaves the host cores free, so one thread from 2 CPUs up. Training on the CPU, torch's
    intra-op threads already use the cores: a loader thread beside them preempts one, and the
    others wait for it at every kernel's barrier (resnet1d on 2 cores: 77 samples/s with the
    thread, 85 without, bench/train_throughput.py). So only where a core is spare.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:       # not Linux
        n = os.cpu_count() or 1
    if device.type == "cpu":
        return 1 if n > torch.get_num_threads() else 0
    return 1 if n >= 2 else 0


# Float32 bytes per block of the CPU fast path (`Loader._read_normalised`): a block stays in a
# core's L2 cache from its copy to its scale and shift (2 records at (12, 4096): 45k samples/s on
# one core, against 40k with 5, bench/input_pipeline.py).
BLOCK_BYTES = 2**19


def _check_indices(idx: np.ndarray, n: int) -> None:
    """The fast paths' gathers neither raise nor refuse (mode="clip" clips; a negative row index
    wraps), so an index out of range must be refused here."""
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)]
        raise IndexError(f"record index {int(bad[0])} out of range for a cache of {n} records")


class _Norm:
    """adu -> adu * scale + shift per lead: `Normalizer.apply`'s float32 operations in its order,
    so the numbers are bit-identical to the host path's (an Adam training amplifies even float
    rounding)."""

    def __init__(self, norm, gain: float, device):
        scale, shift = norm.affine(gain)
        self.gain = torch.tensor(np.float32(gain), device=device)
        self.scale = torch.tensor(scale[None, :, None], device=device)
        self.shift = torch.tensor(shift[None, :, None], device=device)

    def __call__(self, adu: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # Into a reused buffer when given: a fresh 12 MB float batch costs more in page faults
        # than the arithmetic itself.
        return self.scale_in_place(adu.to(torch.float32) if out is None else out.copy_(adu))

    def scale_in_place(self, x: torch.Tensor) -> torch.Tensor:
        """float32 adu -> normalised, in place."""
        return x.mul_(self.scale).add_(self.shift)


class Loader:
    """One per (prep, data, device): `loader.batches(index_chunks)` yields `Batch`es in order."""

    def __init__(self, prep, data, device, *, threads: int | None = None, prefetch: int = 2):
        """threads: worker threads building batches ahead; 0 builds each on the caller's thread;
        None: `auto_threads` (on one CPU a worker thread only adds hand-offs: measured 4x slower
        than building in place, bench/input_pipeline.py)."""
        threads = auto_threads(torch.device(device)) if threads is None else threads
        if int(threads) < 0 or int(prefetch) < 1:
            raise ValueError(f"invalid setting loader_threads={threads} / prefetch={prefetch}: threads must be "
                             ">= 0 and prefetch >= 1")
        self.prep, self.data, self.device = prep, data, torch.device(device)
        self.threads, self.prefetch = int(threads), int(prefetch)
        self.fast = fast_path(prep, data)
        # CPU training: the workers normalise too (the "device" is theirs to use); CUDA: int16 is
        # pinned and shipped, and the GPU normalises it.
        self.on_worker = self.device.type == "cpu"
        self.pin = self.device.type == "cuda"
        self._targets: np.ndarray | None = None
        self._ring: dict = {}
        self._ring_busy = False
        if self.fast:
            lead_idx = [data.leads.index(x) for x in prep.source.leads]
            self._lead_idx = None if lead_idx == list(range(len(data.leads))) else lead_idx
            recon = prep.in_pos is not None
            # reconstruction: the input is the kept leads, the target all 12 (its own normaliser)
            self._xnorm = _Norm(prep.norm, data.gain, "cpu" if self.on_worker else self.device)
            self._ynorm = _Norm(prep.target_norm, data.gain, "cpu" if self.on_worker else self.device) \
                if recon else None
            if not recon:
                self._targets = self._all_targets()

    def _all_targets(self) -> np.ndarray | None:
        """Encoded targets of every record, once (a per-batch pandas lookup costs as much as the
        signal read); None when the task cannot encode some record (then per batch, as before)."""
        p = self.prep
        try:
            return np.asarray(p.task.encode_targets(p.task.targets(self.data, np.arange(len(self.data))),
                                                    p.target_state), np.float32)
        except (ValueError, KeyError, TypeError):
            return None

    # -- the worker side: numpy and torch kernels only, no torch random state -----------------
    def _whole_records(self) -> bool:
        """The cache holds the model's input as it is: all its leads, at the model's length."""
        return self._lead_idx is None and self.data.signals.shape[2] == self.prep.n_samples

    def _read_normalised(self, idx: np.ndarray, slot) -> torch.Tensor:
        """The normalised float32 batch, converted and normalised a few records at a time.

        Each record goes from the page cache straight into the batch as float32 (numpy's casting
        copy: exact for int16), and a block of records is scaled and shifted while it is still in
        the core's cache. Gathering the whole batch first and then normalising it walked 6 MB of
        int16 and three times 12 MB of float32 through memory. The operations and their order are
        `_Norm`'s: bit-identical."""
        sig_ = np.asarray(self.data.signals)     # a plain view: memmap's per-row subclassing costs
        _check_indices(idx, len(sig_))
        out = self._buffer(slot, (len(idx), *sig_.shape[1:]))
        flat = out.numpy()
        per = max(1, BLOCK_BYTES // (4 * sig_.shape[1] * sig_.shape[2]))
        for a in range(0, len(idx), per):
            part = idx[a:a + per]
            for i, r in enumerate(part, a):
                np.copyto(flat[i], sig_[r])
            self._xnorm.scale_in_place(out[a:a + len(part)])
        return out

    def _read_adu(self, idx: np.ndarray, slot=None) -> np.ndarray:
        """int16 (n, source leads, model length) in the order asked (one gather: page-cache reads
        need no sorting). The centred zero padding is 0 adu = 0 mV, what the host path pads with."""
        sig_ = self.data.signals
        if slot is not None and self._whole_records():
            out = self._buffer(slot, (len(idx), *sig_.shape[1:]), torch.int16).numpy()
            # Into a reused buffer: no page faults. mode="raise" would gather into a hidden
            # temporary and copy it over (numpy buffers `out` so that a bad index leaves it
            # untouched): 1.30 against 0.44 ms for 64 records at (12, 4096). The indices are
            # checked here instead, so none is ever clipped.
            _check_indices(idx, len(sig_))
            return np.take(sig_, idx, axis=0, out=out, mode="clip")
        raw = sig_[idx] if self._lead_idx is None else sig_[np.ix_(idx, self._lead_idx)]
        if raw.shape[2] != self.prep.n_samples:
            raw = sig.pad_or_crop(raw, self.prep.n_samples)
        return raw

    @staticmethod
    def _buffer(slot: tuple[dict, int] | None, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor | None:
        if slot is None:
            return None
        ring, k = slot
        buf = ring.get((k, dtype))
        if buf is None or buf.shape[0] < shape[0] or tuple(buf.shape[1:]) != tuple(shape[1:]):
            with torch.inference_mode(False):    # shared by training and (inference-mode) validation
                buf = ring[(k, dtype)] = torch.empty(shape, dtype=dtype)
        return buf[:shape[0]]

    def _build(self, idx: np.ndarray, with_natural: bool, slot: tuple[dict, int] | None = None):
        idx = np.asarray(idx)
        p = self.prep
        if not self.fast:
            x, y, *nat = p_batch(p, self.data, idx, with_natural)
            x, y = torch.from_numpy(x), torch.from_numpy(y)
            return (x.pin_memory() if self.pin else x, y, nat[0] if nat else None, len(idx), True)
        if p.in_pos is None and self.on_worker and slot is not None and self._whole_records():
            x = self._read_normalised(idx, slot)
            return (x, *self._labels(idx, with_natural), len(idx), True)
        adu = torch.from_numpy(self._read_adu(idx, slot if self.on_worker else None))
        y, natural = self._labels(idx, with_natural) if p.in_pos is None else (None, None)
        if self.on_worker:
            x, y, natural = self._normalise(adu, y, natural, with_natural, self._buffer(slot, tuple(adu.shape))
                                            if p.in_pos is None else None)
            return x, y, natural, len(idx), True
        return (adu.pin_memory() if self.pin else adu, y, natural, len(idx), False)

    def _labels(self, idx: np.ndarray, with_natural: bool) -> tuple[torch.Tensor, np.ndarray | None]:
        """(encoded targets, targets in natural units when asked or needed) of a non-reconstruction batch."""
        p = self.prep
        natural = p.task.targets(self.data, idx) if with_natural or self._targets is None else None
        y = self._targets[idx] if self._targets is not None else \
            np.asarray(p.task.encode_targets(natural, p.target_state), np.float32)
        return torch.from_numpy(y), natural

    def _normalise(self, adu, y, natural, with_natural: bool, out=None):
        if self.prep.in_pos is None:
            return self._xnorm(adu, out), y, natural
        y = self._ynorm(adu)
        natural = (adu.to(torch.float32) / self._ynorm.gain).cpu().numpy() if with_natural else None
        return self._xnorm(adu[:, self.prep.in_pos]), y, natural

    # -- the consumer side: transfer (and normalise on a GPU) ------------------------------
    def _finish(self, built, with_natural: bool) -> Batch:
        x, y, natural, n, ready = built
        x = x.to(self.device, non_blocking=self.pin)
        if not ready:
            x, y, natural = self._normalise(x, y, natural, with_natural)
        y = y.to(self.device, non_blocking=self.pin)
        return Batch(x, y, natural if with_natural else None, n)

    def batches(self, chunks: Iterable[np.ndarray], with_natural: bool = False,
                reuse: bool = False) -> Iterator[Batch]:
        """Batches for each index array of `chunks`, in order, `prefetch` ahead of the consumer.

        reuse=True: a batch's input tensor is overwritten `prefetch` + 2 batches later, for a
        consumer that is done with each batch when it asks for the next (a training step, a
        prediction loop). When batch j is submitted the consumer has come back for batch
        j - prefetch, so it is done with j - prefetch - 1 and earlier: a ring of prefetch + 2
        buffers is never written while read. Built in place (no worker threads), batch j is
        built only once the consumer is back for it: one buffer, which stays warm in the caches.
        """
        # The buffers outlive the generator (a fresh ring every epoch would page-fault again);
        # a second reusing generator alive at the same time gets a ring of its own.
        own = self._ring_busy
        ring, size = ({} if own else self._ring), (self.prefetch + 2 if self.threads else 1)
        self._ring_busy = self._ring_busy or (reuse and not own)
        try:
            yield from self._generate(chunks, with_natural, ring if reuse else None, size)
        finally:
            if reuse and not own:
                self._ring_busy = False

    def _generate(self, chunks, with_natural: bool, ring: dict | None, size: int) -> Iterator[Batch]:
        reuse = ring is not None
        if self.threads == 0:
            for j, idx in enumerate(chunks):
                yield self._finish(self._build(idx, with_natural, (ring, j % size) if reuse else None), with_natural)
            return
        chunks = iter(chunks)
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="ecgsearch-loader") as pool:
            ahead: collections.deque = collections.deque()
            try:
                for j, idx in enumerate(chunks):
                    ahead.append(pool.submit(self._build, idx, with_natural, (ring, j % size) if reuse else None))
                    if len(ahead) > self.prefetch:
                        yield self._finish(ahead.popleft().result(), with_natural)
                while ahead:
                    yield self._finish(ahead.popleft().result(), with_natural)
            finally:     # a consumer that stops early (break, an error) leaves no work running
                for f in ahead:
                    f.cancel()


def p_batch(prep, data, idx, with_natural):
    """The host path (engine.prep.batch), imported late: prep imports this module."""
    from ecgsearch.engine.prep import batch

    return batch(prep, data, idx, with_natural=with_natural)


def chunked(idx: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


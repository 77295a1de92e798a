"""The loader: the same batches as the host path (the engine before it: `prep.batch` on the loop's
thread), bit for bit and in the same order, on both of its paths; training weights unchanged by it;
a consumer that stops early leaves no work running."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ecgsearch.data.cache import load_cache
from ecgsearch.engine import TrainConfig, train
from ecgsearch.engine import prep as P
from ecgsearch.leads import LEADS
from ecgsearch.engine import loader as L
from ecgsearch.engine.loader import Loader, chunked, fast_path

FAST = dict(batch_size=16, bootstrap=0, precision="fp32", threads=1)


def _batches(prep, data, idx, threads, with_natural=True, reuse=False):
    it = Loader(prep, data, "cpu", threads=threads).batches(chunked(idx, 16), with_natural=with_natural, reuse=reuse)
    # a consumer that keeps batches must clone them when buffers are reused
    return [L.Batch(b.x.clone(), b.y, b.natural, b.n) for b in it]


def _host(prep, data, idx):
    """The engine's batches before the loader: prep.batch per batch on the caller's thread."""
    out = []
    for c in chunked(idx, 16):
        x, y, nat = P.batch(prep, data, c, with_natural=True)
        out.append(L.Batch(torch.from_numpy(x), torch.from_numpy(y), nat, len(c)))
    return out


@pytest.mark.parametrize("task,leads,geometry", [
    ("rhythm", ("I", "AVL", "V2"), {}),                              # int16 fast path, 1000 -> 1024 padding
    ("superclass", LEADS, {"n_samples": 1000}),                     # fast path, all leads: the buffered gather
    ("age", ("II", "V5"), {"n_samples": 800}),                      # fast path, centred crop
    ("reconstruct", ("I", "II", "V2"), {}),                         # x from kept leads, y from all 12
    ("superclass", ("I", "V6"), {"target_fs": 50}),                 # resampling: host path on the workers
])
def test_batches_equal_the_host_path(synth_cache, task, leads, geometry):
    data = load_cache(synth_cache)
    prep, train_idx = P.fit(TrainConfig(task=task, leads=leads, **FAST, **geometry), data)
    assert fast_path(prep, data) == ("target_fs" not in geometry)
    idx = np.random.default_rng(0).permutation(train_idx)[:100]     # unsorted, last batch short
    ref = _host(prep, data, idx)
    for threads in (0, 1, 2):
        for reuse in (False, True):
            got = _batches(prep, data, idx, threads, reuse=reuse)
            assert [b.n for b in got] == [b.n for b in ref] == [16] * 6 + [4]
            for a, b in zip(ref, got):
                assert b.x.dtype == torch.float32 and b.x.shape == a.x.shape == (a.n, len(leads), prep.n_samples)
                assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
                np.testing.assert_array_equal(a.natural, b.natural)


def test_normaliser_is_one_affine_for_adu_and_mv_and_checks_its_leads():
    """x * scale + shift stands for (x / gain - mean) / std: within a few float32 ulps of it in
    float64, from int16 adu or mV alike; a batch of the wrong lead count is refused, naming both."""
    from ecgsearch.engine.inputs import Normalizer

    rng = np.random.default_rng(0)
    norm = Normalizer(("I", "II", "V1"), np.float32([0.02, -0.1, 0.3]), np.float32([0.15, 0.4, 0.9]))
    adu = rng.integers(-32768, 32767, (5, 3, 700), endpoint=True).astype(np.int16)
    exact = (adu / 1000.0 - norm.mean.astype(np.float64)[:, None]) / norm.std.astype(np.float64)[:, None]
    from_adu = norm.apply(adu, gain=1000.0)
    from_mv = norm.apply(adu / np.float32(1000))
    for got in (from_adu, from_mv):
        assert got.dtype == np.float32 and got.shape == adu.shape
        # two roundings of the result plus one of each factor: well inside 8 ulps of the largest value
        np.testing.assert_allclose(got, exact, rtol=0, atol=8 * np.spacing(np.float32(np.abs(exact).max())))
    buf = (adu / np.float32(1000)).astype(np.float32)
    assert norm.apply(buf, out=buf) is buf and np.array_equal(buf, from_mv)     # in place: the same numbers
    with pytest.raises(ValueError, match=r"3 leads \(I,II,V1\) given 12 leads"):
        norm.apply(np.zeros((2, 12, 10), np.float32))


def test_blocked_gather_and_normalise_equals_the_host_path_and_refuses_bad_indices(synth_cache, monkeypatch):
    """The CPU fast path gathers and normalises a few records at a time (`BLOCK_BYTES`): blocks of
    3 records leave a short block in every batch; an index past the cache is refused, never clipped."""
    data = load_cache(synth_cache)
    prep, train_idx = P.fit(TrainConfig(task="superclass", n_samples=1000, **FAST), data)
    monkeypatch.setattr(L, "BLOCK_BYTES", 3 * 4 * 12 * 1000)
    idx = np.random.default_rng(1).permutation(train_idx)[:100]
    ref = _host(prep, data, idx)
    for threads in (0, 2):
        got = _batches(prep, data, idx, threads, reuse=True)
        assert len(got) == len(ref) and all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(ref, got))
    bad = np.array([0, len(data)])
    with pytest.raises(IndexError, match=f"record index {len(data)} out of range for a cache of {len(data)}"):
        list(Loader(prep, data, "cpu", threads=0).batches([bad], reuse=True))
    with pytest.raises(IndexError, match=f"index {len(data)} is out of bounds"):    # numpy's own gather
        list(Loader(prep, data, "cpu", threads=0).batches([bad], reuse=False))


def test_training_weights_are_unchanged_by_the_loader(synth_cache, monkeypatch):
    cfg = TrainConfig(model="resnet1d_tiny", task="rhythm", epochs=2, seed=3, lr=3e-3, **FAST)
    with monkeypatch.context() as m:            # the engine before the loader
        m.setattr(L, "fast_path", lambda prep, data: False)
        ref = train(cfg.replace(loader_threads=0), synth_cache)
    for threads in (0, 1, 2):
        got = train(cfg.replace(loader_threads=threads), synth_cache)
        assert [h["train_loss"] for h in got.history] == [h["train_loss"] for h in ref.history]
        for (name, a), b in zip(ref.model.state_dict().items(), got.model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_a_consumer_that_stops_early_leaves_no_worker_running(synth_cache):
    data = load_cache(synth_cache)
    prep, train_idx = P.fit(TrainConfig(task="rhythm", **FAST), data)
    before = {t.name for t in threading.enumerate()}
    it = Loader(prep, data, "cpu", threads=2, prefetch=3).batches(chunked(train_idx, 8))
    next(it)
    it.close()
    left = [t for t in threading.enumerate() if t.name.startswith("ecgsearch-loader") and t.name not in before]
    assert not left, left
    with pytest.raises(ValueError, match="loader_threads"):
        Loader(prep, data, "cpu", threads=-1)
    with pytest.raises(ValueError, match="loader_threads"):
        TrainConfig(loader_threads=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check runs for real (bench/gpu_check.py)")
def test_the_gpu_check_skips_with_a_reason_and_exit_0_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu_check: skipped: no CUDA device"), proc.stdout

"""2-process gloo DDP: validation runs once (rank 0), every rank steps, stops and ends in lockstep.

The ranks are real processes (this file run as a script), so a rank that left the loop alone
would leave the other waiting in a collective: the gloo timeout and the subprocess timeout
turn that hang into a failure instead of a stuck test.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from ecgsearch.engine import TrainConfig

pytestmark = pytest.mark.slow

# A high LR for so few records makes validation stall early: lr_patience=0 cuts the LR on the
# first epoch without improvement and two in a row stop the run, well before `epochs` (here:
# best epoch 6, LR cut after epoch 7, stop after epoch 8 of 12). 200 records
# leave 161 for training, 81 per rank: 3 full batches of 27 (a last batch of 1 breaks BatchNorm).
CFG = TrainConfig(model="resnet1d_tiny", task="rhythm", epochs=12, batch_size=27, lr=0.05, lr_patience=0,
                  lr_factor=0.1, early_stop_patience=2, n_samples=256, bootstrap=0, precision="fp32",
                  threads=1, seed=1)
RECORDS = 200
WORLD = 2
# A hang fails within these, yet a loaded shared machine (imports alone can take 10 s) does not.
TIMEOUT_S = 120         # per collective (gloo); three times that for the whole run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _float_buffers(model) -> torch.Tensor:
    return torch.cat([b.detach().flatten().double() for b in model.buffers() if b.is_floating_point()])


def _child(rank: int, port: int, cache: str, out: Path, mode: str = "train") -> None:
    """One DDP rank: train, then write what the parent compares (mode "fail": rank 0's validation raises)."""
    import copy
    import importlib

    from ecgsearch.data.cache import load_cache
    from ecgsearch.engine import prep as P

    T = importlib.import_module("ecgsearch.engine.train")   # the module; ecgsearch.engine.train is the function
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
    data = load_cache(cache)
    predict, calls = P.predict, []

    def counted(*a, **kw):
        calls.append(1)
        if mode == "fail":
            raise ValueError("injected validation failure")
        return predict(*a, **kw)

    # What each rank would score on its own, as before the fix: its own BatchNorm statistics.
    prep, _ = P.fit(CFG, data)
    val_idx = P.split_indices(data, prep.task, CFG.splits, "val")
    sync, own = T._sync_buffers, {"buffers": [], "scores": []}

    def recorded_sync(model):
        own["buffers"].append(_float_buffers(model))
        y, p = predict(copy.deepcopy(model), prep, data, val_idx, batch_size=128, device="cpu", precision="fp32")
        own["scores"].append(float(prep.task.compute_metrics(y, p)[prep.task.selection_metric]))
        sync(model)

    P.predict, T._sync_buffers = counted, recorded_sync
    reports = []
    try:
        res = T.train(CFG, data, on_epoch=lambda rep: reports.append(rep.metrics))
    finally:
        torch.distributed.destroy_process_group()
    torch.save({"state": res.model.state_dict(), "own_buffers": own["buffers"]}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "history": res.history, "reports": reports, "best_epoch": res.best_epoch, "best_score": res.best_score,
        "thresholds": res.state.thresholds, "predict_calls": len(calls), "own_scores": own["scores"]}))


def _run_ranks(cache: Path, out: Path, mode: str) -> list[tuple[int, str]]:
    """(exit code, output) of each rank; a rank still running after the timeout fails the test."""
    port = _free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}   # loopback only
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), str(cache), str(out), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    try:
        logs = [p.communicate(timeout=3 * TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, log) for p, log in zip(procs, logs)]


def test_two_ranks_validate_once_and_stay_in_lockstep(make_synth_cache, tmp_path):
    for r, (rc, log) in enumerate(_run_ranks(make_synth_cache(records=RECORDS), tmp_path, "train")):
        assert rc == 0, f"rank {r} failed:\n{log[-3000:]}"
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    sa, sb = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))

    # The schedule really exercised both decisions: an LR cut, then an early stop before `epochs`.
    lrs = [h["lr"] for h in a["history"]]
    stopped = len(a["history"])
    assert lrs[0] == CFG.lr and min(lrs) < CFG.lr, lrs
    assert stopped < CFG.epochs, f"no early stop within {CFG.epochs} epochs"

    # Lockstep: the same stop epoch, LR path, scores, best epoch and thresholds on both ranks...
    assert len(b["history"]) == stopped
    assert [h["lr"] for h in b["history"]] == lrs
    for key in ("score", "train_loss", "val/macro_auprc", "epoch_seconds"):
        assert [h[key] for h in a["history"]] == [h[key] for h in b["history"]], key
    assert (a["best_epoch"], a["best_score"], a["thresholds"]) == (b["best_epoch"], b["best_score"], b["thresholds"])
    # ...every epoch's report (ray.train.report is a barrier) is the same dict on both ranks...
    assert a["reports"] == b["reports"] and len(a["reports"]) == stopped
    # ...and the returned best models are bit-identical, BatchNorm buffers included.
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert torch.equal(sa["state"][k], sb["state"][k]), k

    # Validation ran on rank 0 only, once per epoch.
    assert (a["predict_calls"], b["predict_calls"]) == (stopped, 0)
    # Without the buffer broadcast the ranks would have scored different models: each epoch's
    # BatchNorm statistics differ per rank, and so, in some epoch, would their own scores.
    assert all(not torch.equal(x, y) for x, y in zip(sa["own_buffers"], sb["own_buffers"]))
    assert a["own_scores"] == [h["score"] for h in a["history"]]    # rank 0's own score is the one used
    assert b["own_scores"] != a["own_scores"], "per-rank scores never differed: the check proves nothing"



def test_a_validation_failure_on_rank_0_fails_every_rank_instead_of_hanging(make_synth_cache, tmp_path):
    (rc0, log0), (rc1, log1) = _run_ranks(make_synth_cache(records=RECORDS), tmp_path, "fail")
    assert rc0 != 0 and "ValueError: injected validation failure" in log0
    # rank 1 learns of it through the broadcast, not through a collective timeout
    assert rc1 != 0 and "validation failed on rank 0: ValueError: injected validation failure" in log1
    assert "timed out" not in log1.lower() and not list(tmp_path.glob("rank*.json"))


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5])

"""The progress display (its text, its ETA, what it writes to a terminal and to a log), and what
keeps Ray's own output off the console so that the display is what a command shows."""
from __future__ import annotations

import io
import time

import pytest

from ecgsearch.progress import Progress, format_duration, format_status

CLEAR = "\r\x1b[K"


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (0.4, "0s"), (59.4, "59s"), (60, "1m00s"), (133, "2m13s"),
                                           (340, "5m40s"), (3599, "59m59s"), (3720, "1h02m"), (-5, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_status_with_and_without_step():
    assert format_status("rle", "candidates", 10, 4, elapsed=133, eta=340, left=6, step=3, n_steps=9) == \
        "[rle] step 3/9 | 10 candidates: 4/10 done | elapsed 2m13s | ~5m40s left"
    assert format_status("tune", "trials", 4, 0, elapsed=5, eta=None, left=4) == \
        "[tune] 4 trials: 0/4 done | elapsed 5s | estimating"
    # Nothing left: no estimate at all, rather than "~0s left".
    assert format_status("tune", "trials", 4, 4, elapsed=65, eta=0.0, left=0) == \
        "[tune] 4 trials: 4/4 done | elapsed 1m05s"
    assert format_status("subsets", "subsets", 3, 1, elapsed=1, eta=2, left=2, step=2).startswith(
        "[subsets] step 2 | 3 subsets")


def test_plain_stream_prints_one_line_per_phase_and_finished_unit():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("rle", stream=out, clock=clock)
    clock.t = 10.0                                   # set-up before the first phase is not a unit's cost
    p.phase("candidates", 4, step=1, n_steps=3)
    p.plan(7)                                        # the later steps: 3 + 4 candidates
    clock.t = 40.0
    p.done()                                         # 30 s per unit; 3 + 7 units to come
    clock.t = 70.0
    p.done(2)                                        # (70 - 10) / 3 = 20 s per unit; 1 + 7 to come
    p.note("step 1: dropped V6")
    clock.t = 75.0
    p.phase("candidates", 3, step=2, n_steps=3)      # the plan held these 3: 4 remain planned
    p.close()
    assert out.getvalue().splitlines() == [
        "[rle] step 1/3 | 4 candidates: 0/4 done | elapsed 10s | estimating",
        "[rle] step 1/3 | 4 candidates: 1/4 done | elapsed 40s | ~5m00s left",
        "[rle] step 1/3 | 4 candidates: 3/4 done | elapsed 1m10s | ~2m40s left",
        "step 1: dropped V6",
        "[rle] step 2/3 | 3 candidates: 0/3 done | elapsed 1m15s | ~2m20s left",
    ]
    assert CLEAR not in out.getvalue()


def test_terminal_redraws_in_place_and_notes_stay_above():
    clock, out = FakeClock(), TTY()
    p = Progress("tune", stream=out, clock=clock, refresh_s=0)
    p.phase("trials", 2)
    clock.t = 30.0
    p.done()
    p.note("trial a done: score=0.7")
    p.plan(0)
    clock.t = 50.0
    p.done()
    p.close()
    p.close()                                        # idempotent: nothing more is written
    assert out.getvalue() == (
        CLEAR + "[tune] 2 trials: 0/2 done | elapsed 0s | estimating"
        + CLEAR + "[tune] 2 trials: 1/2 done | elapsed 30s | ~30s left"
        + CLEAR + "trial a done: score=0.7\n"
        + CLEAR + "[tune] 2 trials: 1/2 done | elapsed 30s | ~30s left"
        + CLEAR + "[tune] 2 trials: 1/2 done | elapsed 30s | ~30s left"    # plan() redraws on a terminal
        + CLEAR + "[tune] 2 trials: 2/2 done | elapsed 50s"
        + CLEAR + "[tune] 2 trials: 2/2 done | elapsed 50s\n")


def test_terminal_ticker_moves_elapsed_time_while_a_unit_runs():
    clock, out = FakeClock(), TTY()
    p = Progress("tune", stream=out, clock=clock, refresh_s=0.01)
    p.phase("trials", 2)
    clock.t = 7.0                                    # no event: only the ticker can show this
    for _ in range(500):
        if "elapsed 7s" in out.getvalue():
            break
        time.sleep(0.01)
    p.close()
    assert CLEAR + "[tune] 2 trials: 0/2 done | elapsed 7s | estimating" in out.getvalue()
    assert out.getvalue().endswith("\n")


def test_resumed_units_count_as_done_but_not_in_the_time_per_unit():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("tune", stream=out, clock=clock)
    p.phase("trials", 6, done_before=4)
    assert p.eta() is None                           # 4 units finished in 0 s would say "~0s left"
    clock.t = 60.0
    p.done()
    assert p.eta() == pytest.approx(60.0)
    assert out.getvalue().splitlines()[-1] == "[tune] 6 trials: 5/6 done | elapsed 1m00s | ~1m00s left"


def test_disabled_shows_only_notes_and_misuse_is_reported():
    out = io.StringIO()
    p = Progress("tune", stream=out, enabled=False, clock=FakeClock())
    with pytest.raises(RuntimeError, match="before any phase"):
        p.done()
    p.phase("trials", 2)
    p.done(5)                                        # capped at the phase size
    assert p.text().startswith("[tune] 2 trials: 2/2 done")
    p.note("best trial x")
    p.close()
    assert out.getvalue() == "best trial x\n"
    with pytest.raises(ValueError, match="done_before"):
        p.phase("trials", 2, done_before=3)
    with pytest.raises(ValueError):
        p.plan(-1)


def test_study_display_counts_each_trial_once_and_tracks_the_best(tmp_path):
    from ecgsearch.distributed.study_log import StudyDisplay

    out = io.StringIO()
    p = Progress("tune", stream=out, clock=FakeClock())
    earlier = [{"event": "start", "trial": "a"}, {"event": "complete", "trial": "a", "best_score": 0.5, "epoch": 2}]
    display = StudyDisplay(p, metric="macro_auprc", mode="max", epochs=2, earlier=earlier)
    p.phase("trials", 4, done_before=len(display.finished))
    err = tmp_path / "error.txt"
    err.write_text("Traceback (most recent call last):\n  File 'x'\nValueError: boom\n")
    display({"event": "complete", "trial": "b", "best_score": 0.4, "epoch": 1, "stopped_by": "asha"})
    display({"event": "complete", "trial": "b", "best_score": 0.4, "epoch": 1, "stopped_by": "asha"})  # again
    display({"event": "tracking_error", "error": "x"})
    display({"event": "error", "trial": "c", "error": str(err)})
    display({"event": "complete", "trial": "d", "best_score": 0.9, "epoch": 2, "stopped_by": None})
    lines = out.getvalue().splitlines()
    assert lines == [
        "[tune] 4 trials: 1/4 done | elapsed 0s | estimating",
        "trial b stopped by ASHA after 1/2 epochs: macro_auprc=0.4000 | best so far: trial a macro_auprc=0.5000",
        "[tune] 4 trials: 2/4 done | elapsed 0s | ~0s left",
        f"trial c failed: ValueError: boom (traceback: {err})",
        "[tune] 4 trials: 3/4 done | elapsed 0s | ~0s left",
        "trial d done after 2/2 epochs: macro_auprc=0.9000 | best so far: trial d macro_auprc=0.9000",
        "[tune] 4 trials: 4/4 done | elapsed 0s",
    ]


def test_route_ray_output_keeps_ray_off_the_console_and_restores_everything(tmp_path, capsys, monkeypatch):
    import logging
    import os

    import ray._private.worker as ray_worker

    from ecgsearch.distributed import cluster

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    capsys.readouterr()
    ray_handlers = list(logging.getLogger("ray").handlers)
    with cluster.route_ray_output(tmp_path / "ray.log", verbose=False) as path:
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"              # Tune's legacy engine: silent at verbose=0
        assert cluster._quiet["log_to_driver"] is False             # what ensure_ray connects with
        for name in ("ray", "ray.data", "optuna", "mlflow", "ecgsearch.ray"):
            lg = logging.getLogger(name)
            assert not lg.propagate and not [h for h in lg.handlers if _console_handler(h)], name
        logging.getLogger("ray.tune").warning("tune says hi")
        logging.getLogger("ray.data").warning("data says hi")
        logging.getLogger("optuna").warning("optuna says hi")
        cluster.ray_log.warning("cluster says hi")
        ray_worker.print_to_stdstream({"lines": ["WARNING: 8 PYTHON workers"], "pid": "raylet", "is_err": False},
                                      ignore_prefix=False)        # what the raylet pushes to a driver
    quiet = capsys.readouterr()
    assert "says hi" not in quiet.out + quiet.err and "PYTHON workers" not in quiet.out + quiet.err
    logged = path.read_text()
    for line in ("tune says hi", "data says hi", "optuna says hi", "cluster says hi", "(raylet) WARNING: 8 PYTHON"):
        assert logged.count(line) == 1, logged
    # Restored on exit: the next command in this process (the demo runs several) starts clean.
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ and cluster._quiet["log_to_driver"] is True
    assert logging.getLogger("ray").handlers == ray_handlers and logging.getLogger("ray").propagate is False

    with cluster.route_ray_output(tmp_path / "verbose.log", verbose=True) as path:
        assert "RAY_AIR_NEW_OUTPUT" not in os.environ and cluster._quiet["log_to_driver"] is True
        assert set(ray_handlers) < set(logging.getLogger("ray").handlers)   # Ray's console handler stays
        logging.getLogger("ray.tune").warning("tune is loud")
    assert path.read_text().count("tune is loud") == 1          # on the console and, once, in the file


def _console_handler(h) -> bool:
    import logging

    return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)


def test_the_estimate_prices_each_kind_of_unit_at_its_own_rate():
    """Minutes-long trainings then seconds-long predictions: the prediction phase's estimate
    uses the prediction rate, not the trainings'."""
    t = [0.0]
    p = Progress("rle", stream=io.StringIO(), clock=lambda: t[0])
    p.phase("trainings", 2, kind="train")
    t[0] += 100.0
    p.done()
    t[0] += 100.0
    p.done()
    p.phase("candidates", 10, kind="predict")
    p.plan(20)
    t[0] += 2.0
    p.done()
    assert p.eta() == pytest.approx(2.0 * (9 + 20))

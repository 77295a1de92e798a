"""What a training process loads: each heavy import it skips is memory every concurrent trial saves."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_training_from_a_cache_at_the_model_rate_imports_neither_dynamo_nor_scipy_signal(synth_cache, tmp_path):
    """torch's optimizer would import torch._dynamo (~120 MB, ~1 s: engine.optim avoids it) and the
    data package scipy.signal (~40 MB, only resampling needs it): a fresh process trains,
    checkpoints and scores without either. Resampling on the fly still loads scipy.signal."""
    code = ("import json, sys\n"
            "from ecgsearch.engine import TrainConfig, train\n"
            "cfg = TrainConfig(model='resnet1d_tiny', task='rhythm', epochs=2, bootstrap=0, threads=1,\n"
            "                  target_fs=int(sys.argv[3]) or None)\n"
            "r = train(cfg, sys.argv[1], out_dir=sys.argv[2])\n"
            "print(json.dumps({'dynamo': 'torch._dynamo' in sys.modules, 'scipy.signal': 'scipy.signal' in sys.modules,\n"
            "                  'epochs': len(r.history)}))\n")

    def run(target_fs: int) -> dict:
        out = subprocess.run([sys.executable, "-c", code, str(synth_cache), str(tmp_path / f"run{target_fs}"),
                              str(target_fs)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert run(0) == {"dynamo": False, "scipy.signal": False, "epochs": 2}
    assert run(200) == {"dynamo": False, "scipy.signal": True, "epochs": 2}    # 100 -> 200 Hz on the fly

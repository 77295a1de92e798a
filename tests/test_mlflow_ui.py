"""The MLflow UI as users open it: a real `mlflow server`, headless Chromium, the lead-search
experiment filtered to three-lead runs. The screenshot stays in the test's output folder."""
from __future__ import annotations

import pytest
from mlflow import MlflowClient
from browser import Page, find_chromium
from servers import MlflowServer

from ecgsearch.engine import TrainConfig
from ecgsearch.search.context import SearchSettings
from ecgsearch.search.pipeline import run_subsets

pytestmark = pytest.mark.slow

POOL = ("I", "AVL", "V2", "V5")
FILTER = "params.n_leads = '3'"


def test_the_lead_search_experiment_shows_the_three_lead_subsets_in_the_training_view(make_synth_cache, tmp_path):
    browser = find_chromium()
    cache = make_synth_cache(records=360, seed=0, informative_leads=("V2", "AVL"))
    base = TrainConfig(batch_size=16, lr=5e-3, n_samples=512, bootstrap=0, precision="fp32", threads=1,
                       model_kwargs={"stem_stride": 2})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"     # the store the server below serves
    sub = run_subsets(SearchSettings(data=str(cache), task="superclass", model="mlresnet_tiny", out=tmp_path / "sub",
                                     base=base, mode="eval", eval_model="per-step", start_leads=POOL, repeats=1,
                                     epochs=1, executor="local", tracking_uri=uri, progress=False), 3)
    assert len(sub["ranking"]) == 4
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("ecgsearch-superclass")
    names = sorted(r.info.run_name for r in c.search_runs([exp.experiment_id], filter_string=FILTER))
    assert len(names) == 4 and all(n.startswith("subset-") for n in names), names
    check_best_subset_model(sub, uri, cache, tmp_path / "sub")

    server = MlflowServer(tmp_path)
    server.start()
    page = None
    try:
        page = Page(browser, tmp_path / "profile")
        page.open(f"{server.uri}/#/experiments/{exp.experiment_id}")
        # MLflow 3.17 opens every experiment in its GenAI view (traces, sessions, judges: a browser-wide
        # preference, whatever the experiment's kind); a user switches to "Model training" once.
        toggle = "[...document.querySelectorAll('[role=button]')].find(e => e.textContent.trim() === 'Model training')"
        page.wait_for(toggle, what="the 'Model training' switch")
        page.js(f"{toggle}.click()")
        page.wait_for("document.body.innerText.includes('subsets-superclass')", what="the search's parent run")
        # filter as a user does: type into the runs search box, press Enter
        page.type_into('input[data-testid="search-box"]', FILTER)
        page.press_enter()
        page.wait_for(f"document.body.innerText.includes('{len(names) + 1} matching runs')",
                      what=f"{len(names) + 1} matching runs (the parent and its {len(names)} three-lead subsets)")
        # open the parent row: the subsets are its children
        page.js("""document.querySelector('button[data-component-id$="runnamecellrenderer.tsx_46"]').click()""")
        page.wait_for(" && ".join(f"document.body.innerText.includes({n!r})" for n in names), what=", ".join(names))
        shot = page.screenshot(tmp_path / "mlflow-ui-n_leads-3.png")
        text, html = page.text(), page.js("document.documentElement.outerHTML")
        url = page.js("location.href")
    finally:
        if page is not None:
            page.close()
        server.kill()
    (tmp_path / "mlflow-ui.html").write_text(html)
    print(f"\nMLflow UI screenshot: {shot}")
    assert shot.stat().st_size > 20_000
    assert "searchFilter=" in url and "n_leads" in url          # the filter is the page's own state
    for name in names:
        assert name in text
    others = sorted(r.info.run_name for r in c.search_runs([exp.experiment_id])
                    if r.info.run_name not in names and r.data.params.get("n_leads") not in (None, "3"))
    assert not any(o in text for o in others), others   # runs with other lead counts are filtered out
    # the training view's navigation (runs, models, registry), not the GenAI one (sessions, judges)
    assert "Model registry" in text and "Judges" not in text and "Sessions" not in text
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def check_best_subset_model(sub: dict, uri: str, cache, out) -> None:
    """The best-ranked subset's model is an MLflow model on the search's parent run that reads raw mV
    of its three leads exactly as the search scored it (the pool's model reading only those leads)."""
    from pathlib import Path

    import mlflow.artifacts
    import mlflow.pyfunc

    import numpy as np

    from ecgsearch.data.cache import load_cache
    from ecgsearch.engine import Predictor
    from ecgsearch.leads import LEADS

    best = sub["ranking"][0]
    entry = sub["mlflow"]["models"]["3"]
    assert entry["leads"] == best["leads"] and entry["artifact"] == "models/3-leads"
    model = mlflow.pyfunc.load_model(mlflow.artifacts.download_artifacts(
        run_id=sub["mlflow"]["parent_run_id"], artifact_path=entry["artifact"], tracking_uri=uri))
    meta = model.metadata.metadata["ecgsearch"]
    assert meta["leads"] == best["leads"]
    x = load_cache(cache).signals_mv(np.arange(3))[:, [LEADS.index(k) for k in best["leads"]], :meta["n_samples"]]
    x = np.ascontiguousarray(x, dtype=np.float32)
    ckpt = Path(out) / entry["folder"] / "artifacts" / "model.ckpt"     # one seed: the ensemble is one model
    own = Predictor(ckpt, device="cpu", keep=best["leads"])
    np.testing.assert_allclose(model.predict(x), own(x), rtol=1e-5, atol=1e-6)
    assert ("registered_model" in sub["mlflow"]) == best["noninferiority"]["noninferior"]

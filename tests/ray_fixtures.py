"""One local Ray for every Ray test in the session (start-up costs ~10 s on two cores).

Test modules import the fixture: `from ray_fixtures import ray_session  # noqa: F401`
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A local 2-CPU Ray started the way `ecgsearch tune` starts one; yields its GCS address.

    Started through `ensure_ray`, so the workers import this working tree and the dashboard's
    state API is up (Ray Train's placement-group cleaner needs it when Tune stops a trial).
    """
    import ray

    from ecgsearch.distributed.cluster import ClusterSettings, ensure_ray, stop_ray

    started = ensure_ray(ClusterSettings(num_cpus=2))
    yield ray.get_runtime_context().gcs_address
    if started == "started":
        stop_ray()

"""The soak, shortened for CI (the full run: python -m stablekit.bench.soak, 1000 requests, figures in the
README): mixed requests from 4 clients are all answered with the status each must get, file descriptors
do not grow, and resident memory is flat after the warm-up."""

from __future__ import annotations

import sys

import pytest

from stablekit.bench.soak import soak

pytest.importorskip("fastapi")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_short_soak_answers_everything_without_leaks(tiny_models, tmp_path):
    r = soak(str(tiny_models["sd1"].single_file), requests=180, clients=4, sample_every=18, workdir=tmp_path)
    print(f"\n[soak] {r.requests} requests in {r.seconds:.0f} s, statuses {r.statuses}, memory "
          f"{r.rss_mib[1][1]:.0f} -> {r.rss_mib[-1][1]:.0f} MiB ({r.slope_mib_per_1000:+.1f} MiB per 1000), "
          f"fds {r.fds[0][1]} -> {r.fds[-1][1]}")
    assert r.unanswered == 0 and r.unexpected == []
    assert sum(r.statuses.values()) == 180 and set(r.statuses) == {200, 400, 404, 422}
    assert r.fds[-1][1] <= r.fds[0][1] + 4  # at most the clients' connections in flight
    assert r.slope_mib_per_1000 < 60  # flat: a leak of one picture per request would be hundreds

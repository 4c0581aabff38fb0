"""The site template planned over synthetic listings (`jobs.bench.scale_dryrun`): every
stage fits the scheduler, the structure stages come from the inventories' counts."""

from __future__ import annotations

import math

from jobs.bench.scale_dryrun import OTHER_LISTINGS, rehearse
from jobs.clusters import load_profile
from jobs.stages.config import load_config


def test_site_example_plans_a_large_afdb_within_the_schedulers_limits(tmp_path):
    n = 300_000
    got = rehearse(n, scratch=str(tmp_path))
    stages = {r["stage"]: r for r in got["stages"]}
    profile = load_profile("site-example")
    site = {d.name: d for d in load_config("site-example").datasets}
    shards = math.ceil(n / site["afdb"].shard_size)
    shards += math.ceil(OTHER_LISTINGS["pdb"][0] / site["pdb"].shard_size)
    shards += OTHER_LISTINGS["esmatlas"][1] * site["esmatlas"].split
    assert stages["structures"]["items"] == stages["tokenize"]["items"] == shards
    for r in got["stages"]:
        assert r["tasks"] <= profile.max_tasks_per_stage, r
        assert r["arrays"] == math.ceil(r["tasks"] / 1000), r  # MaxArraySize 1001
        assert r["items_per_task"] * r["tasks"] >= r["items"], r
    assert stages["structures"]["tasks"] > 1000  # several arrays with their dependencies
    assert "list:" not in got["plan"]  # every listing current: nothing to walk

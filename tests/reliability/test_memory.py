"""Long-run memory: 2 000 steps of a tiny toy run (checkpoints every 500, the JSONL tracker) in a
fresh process; its resident set size must not grow after warm-up."""

from __future__ import annotations

import pytest

STEPS = 2000
AT = [200, 500, 1000, 1500, 2000]
BOUND_MB = 30


@pytest.mark.slow
def test_rss_does_not_grow_over_2000_steps(tmp_path, toy_store, rel):
    overrides = [*rel.tiny_overrides(toy_store, tmp_path / "run", STEPS),
                 "checkpoint.every=500", "checkpoint.keep=2", "log_every=500",
                 "tracker.kind=jsonl", "sampling.every=0"]
    summary = rel.run_driver("memory", {"overrides": overrides, "at": AT}, tmp_path / "driver",
                             timeout=900)
    rss = {int(k): v for k, v in summary["rss_mb"].items()}
    assert summary["steps"] == STEPS and sorted(rss) == AT
    growth = rss[STEPS] - rss[AT[0]]
    print(f"\nRSS over {STEPS} steps ({summary['seconds']:.0f}s): "
          + ", ".join(f"step {s}: {mb:.1f} MB" for s, mb in sorted(rss.items()))
          + f"; growth after step {AT[0]}: {growth:+.1f} MB")
    assert growth < BOUND_MB, rss
    assert max(rss.values()) - rss[AT[0]] < BOUND_MB, rss

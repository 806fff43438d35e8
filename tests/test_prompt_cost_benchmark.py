"""The prompt-cost benchmark runs end to end on a tiny size, and pairs the DiT with an MMDiT of
about its parameter count."""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prompt_cost_runs_every_variant_at_matched_parameters(monkeypatch):
    import prompt_cost

    written = {}
    monkeypatch.setattr(prompt_cost, "write_json", lambda name, payload: written.update(payload))
    monkeypatch.setattr(sys, "argv", ["prompt_cost.py", "--width", "32", "--heads", "4",
                                      "--depth", "3", "--tokens", "8", "--batch", "2",
                                      "--text-len", "8", "--text-dim", "16", "--repeats", "1",
                                      "--inner", "1"])
    prompt_cost.main()
    variants = written["variants"]
    assert set(variants) == {"dit", "mmdit_no_text", "mmdit_bytes_online", "mmdit_precomputed"}
    dit, mm = variants["dit"]["params"], variants["mmdit_no_text"]["params"]
    assert abs(mm - dit) / dit < 0.15
    assert variants["dit"]["ratio_vs_dit"] == 1.0
    assert all(v["median_s"] > 0 for v in variants.values())

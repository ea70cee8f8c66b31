"""The one registry of the comparisons that matter (`comparisons.toml`) and the `cogprobe ls` listings."""
from __future__ import annotations

import pytest

from cogprobe.core.errors import CogprobeError
from cogprobe.selection.folders import rules
from cogprobe.study import comparisons, config, rows, verdicts


def test_the_report_and_the_headline_read_the_same_comparisons():
    assert verdicts.DIFFERENCES == {"cogsym": ("middle", "bottom", "top", "random", "blocks"),
                                    "budget": ("cogsym",), "cogsym-ends": ("cogsym",)}
    assert verdicts.RELATIVE_TO == {"cogsym": "blocks", "cogsym-lora": "lora", "cogsym-lora-matched": "lora"}
    assert set(comparisons.REPORT) <= set(comparisons.COMPARISONS) and verdicts.BAR == 0.03
    listed = comparisons.table()
    assert len(listed) == 17 and listed["question"].str.contains("{", regex=False).sum() == 0
    # the paper's question on the two matched readings first, the unmatched pair after them, labelled
    assert list(zip(listed["row"], listed["other"]))[:6:2] == [("cogsym", "blocks"), ("cogsym-ends", "full"),
                                                                ("cogsym", "full")]
    assert listed["question"][4].startswith("Unmatched")


def test_a_bad_registry_names_what_to_fix(tmp_path):
    good = comparisons.FILE.read_text()
    path = tmp_path / "c.toml"
    path.write_text(good.replace('other = "middle"', 'other = "centre"'))
    with pytest.raises(CogprobeError, match="cogsym/centre"):
        comparisons.read(path)
    path.write_text(good.replace('"cogsym/top", ', '"cogsym/nowhere", '))
    with pytest.raises(CogprobeError, match="cogsym/nowhere"):
        comparisons.read(path)


def test_the_listings_cover_every_row_preset_and_rule():
    plans = rows.table(30, 8).set_index("row")
    assert list(plans.index) == list(rows.ROWS)
    assert plans.loc["cogsym-lora-matched", "lora_r"] == 30 and plans.loc["full", "layers"] == ""
    assert "select stage" in plans.loc["budget", "layers"]   # no study folder: why it cannot run yet
    assert {"quick", "standard", "paper"} <= set(config.presets()["preset"])
    resolving = config.presets().query("preset == 'quick'").set_index("knob")["value"]
    assert int(resolving["probe_pairs"]) >= 48 and resolving["sweep_grid"] == "adaptive"   # issue 41 item 2
    assert rules()[:3] == ["fixed", "curves", "budget"] and "taylor" in rules()

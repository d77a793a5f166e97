"""The image bench task on the shipped model: every variant reports speed, steps, acceptance and
quality; the speedup is against ar from the same run; bad variants are one clear error."""

import json

import pytest

from semiar.bench.image import ImageBenchConfig, parse_variant, run_image_bench, split_variants
from semiar.errors import InvalidArgumentError


def test_image_bench_reports_every_figure(tmp_path):
    cfg = ImageBenchConfig(methods=["ar", "sjd", "lantern:8,0.2", "gsd:8"], classes=[1, 7], n_per_class=1,
                           out=str(tmp_path), threads=1)
    res = run_image_bench(cfg, progress=False)
    s = res["summary"]
    assert s["ar"]["speedup"] == 1.0 and s["ar"]["steps_per_image"] == 49 and s["ar"]["acceptance"] is None
    for spec in ("sjd", "lantern:8,0.2", "gsd:8"):
        assert s[spec]["steps_per_image"] <= 49 and 0 <= s[spec]["acceptance"] <= 1
        assert 0 <= s[spec]["accuracy"] <= 1 and s[spec]["fd"] >= 0
    assert not s["sjd"]["lossy"] and s["lantern:8,0.2"]["lossy"] and s["gsd:8"]["lossy"]
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == s
    assert "| lantern:8,0.2 (lossy) |" in (tmp_path / "report.md").read_text()


def test_variants():
    assert parse_variant("gsd:4") == ("gsd", {"group": 4})
    assert parse_variant("sjd:8") == ("sjd", {"k": 8})
    assert split_variants("ar,sjd,lantern:8,0.2,gsd:4,lantern:16,.3") == ["ar", "sjd", "lantern:8,0.2", "gsd:4",
                                                                            "lantern:16,.3"]
    for bad in ("pld", "lantern:8", "gsd:x"):
        with pytest.raises(InvalidArgumentError):
            parse_variant(bad)

"""The quality report renders: JSON plus PNG pictures."""
from __future__ import annotations

import json

from PIL import Image

from vlit.quality.report import quality_report


def test_report_renders(tmp_path):
    rows = [{"task_name": t, "conversations": [{"from": "human", "value": f"What colour is shape {i}?"},
                                               {"from": "gpt", "value": "red"}]}
            for t, n in (("colour", 3), ("count", 1)) for i in range(n)]
    report = quality_report(rows, str(tmp_path), {"judge": [4.0, 5.0, 3.5, 2.0]})
    assert report["tasks"] == {"colour": 3, "count": 1} and report["balance_variance"] == 1.0
    assert json.loads((tmp_path / "report.json").read_text())["rows"] == 4
    for name in ("tasks.png", "scores.png"):
        assert Image.open(tmp_path / name).size[0] > 100

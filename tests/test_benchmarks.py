"""The benchmark suite runs end to end in its quickest configuration and writes results.json.

No test asserts on wall-clock time or on ratios: those belong to benchmarks/RESULTS.md.
"""

import json
import math

from benchmarks.__main__ import SECTIONS, main


def test_quick_suite_writes_every_figure(tmp_path):
    out = tmp_path / "results.json"
    main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    for key in ("date", "command", "machine", "torch", "threads", "figures", "skipped", "section_s"):
        assert key in result, key
    assert result["machine"]["cpu_count"] >= 1 and result["threads"] >= 1
    sections = {f["section"] for f in result["figures"]}
    assert sections >= {*SECTIONS, "flops"}
    names = [f["name"] for f in result["figures"]]
    assert len(names) == len(set(names))
    for f in result["figures"]:
        assert f["unit"] and f["detail"], f
        for key in ("value", "reference", "ratio"):
            if f[key] is not None:
                assert math.isfinite(f[key]) and f[key] > 0, (f["name"], key, f[key])
        assert (f["reference"] is None) == (f["ratio"] is None)
    with_reference = {f["section"] for f in result["figures"] if f["reference"] is not None}
    assert with_reference >= {"synth", "train", "flops", "infer", "recognition"}
    assert any("real micrographs" in s["name"] for s in result["skipped"])

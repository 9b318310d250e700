"""apical bench speed: the recurrent section runs and a partial run keeps the other sections."""

import json

from apical.bench import speed


def test_recurrent_section_and_kept_sections(tmp_path, capsys):
    previous = {"machine": {"cpu": "Old CPU", "date": "2026-01-01 00:00 UTC", "load_average": [1.0],
                            "git": "abc"}, "command": "python benchmarks/speed.py", "settings": {},
                "e": {"status": "perforatedai is not installed"},
                "d": [{"model": "m", "C": 1, "measure": "live bytes", "peak_difference_mib": 0.0, "flat": True,
                       "short": {"samples": 1, "peak_mib": 1.0, "stats_kib": 1, "rss_peak_mib": 1},
                       "long": {"samples": 2, "peak_mib": 1.0, "stats_kib": 1, "rss_peak_mib": 1}}]}
    (tmp_path / "s.json").write_text(json.dumps(previous))
    assert speed.main(["--sections", "r", "--quick", "--out-dir", str(tmp_path), "--name", "s"]) == 0
    md = (tmp_path / "s.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| GRU 32-64")]
    assert [r.split("|")[2].strip() for r in rows] == ["0", "1", "2"]
    assert all(float(r.split("|")[6]) > 0 for r in rows)
    assert "Sections d, e are kept from an earlier run" in md and "Old CPU" in md and "## (d)" in md
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["d"] == previous["d"] and len(data["r"]) == 3

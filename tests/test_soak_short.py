"""A short run of the soak (tests/soak.py): 16 clients for 15 seconds, every answer and
every byte verified, no growth of memory or open files. The long run is the script's."""

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent / "soak.py"


def test_a_short_soak_has_no_errors_and_no_growth(tmp_path):
    summary_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--clients", "16", "--duration", "15", "--json", str(summary_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["errors"] == 0 and summary["relay_exit_status"] == 0
    assert summary["requests"] > 500  # it did work (a loaded CI machine still manages far more)
    assert all(count > 0 for count in summary["operations"].values()), summary["operations"]
    assert all(check["ok"] for check in summary["growth"].values()), summary["growth"]

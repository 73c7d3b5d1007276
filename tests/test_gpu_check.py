"""``benchmarks/gpu_check.sh --quick --device cpu``: the GPU node's one-call check runs here.

Speed is not checked (tiny slides and counts); the script is: every mode measured or skipped
with a reason, the decode check against OpenSlide passes, JSON and markdown are written.
"""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_cpu_writes_the_table(tmp_path):
    out = tmp_path / "check"
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["encoders"]["mobilenetv3_small_050"]
    for mode in ("model", "e2e_pixels", "e2e_cpu", "baseline"):
        assert rows[mode]["tiles"] > 0 and rows[mode]["tiles_per_s"] > 0, (mode, rows[mode])
        assert rows[mode]["ratio_to_model"] > 0 and rows[mode]["cpu_cores"] > 0
    assert rows["e2e_cpu"]["tiles"] == rows["e2e_pixels"]["tiles"] >= 16
    assert "no CUDA" in rows["e2e_gpu"]["skipped"]
    checks = report["decode_check"]
    assert len(checks) == 2 and all(c["ok"] and c["max"] <= 2 for c in checks.values())
    table = (out / "gpu_check.md").read_text()
    assert "| mobilenetv3_small_050 | e2e --decode cpu | " in table and table in res.stdout


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path, capsys):
    import sys

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse([str(tmp_path), "--device", "cuda"])
    assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err

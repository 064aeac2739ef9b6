"""The benchmark scripts run (tiny configs, CPU): the prepared GPU run (benchmarks/gpu_check.sh)
calls them with the 7B, and a script that breaks only shows there, where device time is scarce."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(args, tmp_path, env=None):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, *args, "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_compare_official_runs_both_loops(tmp_path):
    data = run_script(["benchmarks/compare_official.py", "--config", "tiny", "--batch-sizes", "1",
                       "--steps", "2", "--warmup", "1", "--device", "cpu", "--threads", "1"], tmp_path)
    row, = data["rows"]
    assert set(row) >= {"official", "openmoshi", "ratio"} and row["ratio"]["frame"] > 0


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_official_kwargs_build_the_same_model(name):
    """compare_official builds the official LM from our config: same parameter names and shapes."""
    import torch
    from moshi.models import loaders

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare_official import official_kwargs

    from openmoshi.loading.files import canonical_keys
    from openmoshi.loading.lm import load_lm
    from openmoshi.lm.config import BUILTIN_CONFIGS

    cfg = BUILTIN_CONFIGS[name]
    official = loaders.get_moshi_lm(None, lm_kwargs=official_kwargs(cfg), device="meta", dtype=torch.float32)
    theirs = {k: tuple(v.shape) for k, v in canonical_keys(dict(official.state_dict())).items()}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in load_lm(None, cfg, device="meta").state_dict().items()}
    assert theirs == ours


def test_kernel_count_runs(tmp_path):
    pytest.importorskip("triton")
    data = run_script(["benchmarks/kernel_count.py", "--config", "tiny"], tmp_path, env={"TRITON_INTERPRET": "1"})
    assert 0 < data["fused"]["lm_step"] < data["eager"]["lm_step"]


def test_finetune_speed_runs_both_models(tmp_path):
    data = run_script(["benchmarks/finetune_speed.py", "--config", "tiny", "--batch-size", "1", "--seconds", "2",
                       "--steps", "1", "--warmup", "0", "--device", "cpu", "--threads", "1"], tmp_path)
    assert data["openmoshi"]["tokens_per_s"] > 0 and data["official"]["tokens_per_s"] > 0
    assert data["openmoshi"]["peak_mem_gb"] > 0 and data["ratio"]["step"] > 0


def test_finetune_memory_on_paper(tmp_path):
    data = run_script(["benchmarks/finetune_speed.py", "--paper"], tmp_path)
    rows = {(r["rank"], r["seconds"]): r for r in data["paper"]}
    assert set(rows) == {(16, 30), (16, 100), (128, 30), (128, 100)}
    assert rows[(16, 30)]["weights_gb"] == pytest.approx(15.4, abs=0.2)  # the 7B in bf16
    assert rows[(128, 30)]["adapters_gb"] > rows[(16, 30)]["adapters_gb"]
    assert rows[(16, 100)]["total_ckpt_gb"] < rows[(16, 100)]["total_gb"]


def test_server_load_runs(tmp_path):
    data = run_script(["benchmarks/server_load.py", "--sizes", "1", "4", "--occupied", "1", "4", "--frames", "2",
                       "--warmup", "0", "--threads", "1", "--all-slots"], tmp_path)
    rows = {(r["size"], r["occupied"]): r for r in data["rows"]}
    assert set(rows) == {(1, 1), (4, 1), (4, 4)}
    assert rows[(4, 1)]["p50_ms"] > 0 and rows[(4, 1)]["all_slots_p50_ms"] > 0


def test_self_check_script_runs(tmp_path):
    row = run_script(["benchmarks/self_check.py", "--config", "tiny", "--device", "cpu"], tmp_path)
    assert row["ok"] and row["config"] == "tiny"


def test_tts_speed_runs_both_implementations(tmp_path):
    data = run_script(["benchmarks/tts_speed.py", "--config", "tiny", "--streams", "1", "--repeats", "1",
                       "--threads", "1"], tmp_path)
    row, = data["rows"]
    for name in ("openmoshi", "official"):
        assert row[name]["ttfa_s"] > 0 and row[name]["rtf"] > 0 and row[name]["audio_s"] > 1

def test_stt_streams_runs_both_loops(tmp_path):
    data = run_script(["benchmarks/stt_streams.py", "--config", "tiny", "--batch-sizes", "1", "2", "--steps", "4",
                       "--warmup", "1"], tmp_path)
    assert [r["streams"] for r in data["rows"]] == [1, 2]
    assert all(r["tokens_equal"] and r["openmoshi_ms"] > 0 and r["official_ms"] > 0 for r in data["rows"])


def test_inject_latency_runs(tmp_path):
    data = run_script(["benchmarks/inject_latency.py", "--trials", "1"], tmp_path)
    assert 0 < data["summary"]["created_ms"]["p50"] <= data["summary"]["first_audio_ms"]["p50"] < 30_000


def test_transcript_latency_runs(tmp_path):
    data = run_script(["benchmarks/transcript_latency.py", "--trials", "1", "--seconds", "1.5"], tmp_path)
    assert data["summary"]["statuses"] == ["completed"] and data["rows"][0]["words"] > 0
    assert 0 < data["summary"]["completed_ms"]["p50"] < 30_000 and data["summary"]["stt_delay_ms"] == 500


def test_tts_serving_runs(tmp_path):
    data = run_script(["benchmarks/tts_serving.py", "--config", "tiny", "--streams", "2"], tmp_path)
    row, = data["rows"]
    assert 0 < row["openmoshi_server"]["ttfa_median_s"] <= row["openmoshi_server"]["ttfa_max_s"] < 30
    assert row["official_model_loop"]["rtf"] > 0

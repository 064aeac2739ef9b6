"""benchmarks/quant_quality.py (issue 5's quality report) on a tiny config: the report has its fields,
sane values, and int8 stays closer to bf16 than int4."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_quality.py"


def load_script():
    spec = importlib.util.spec_from_file_location("quant_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quant_quality_report(tmp_path):
    out = tmp_path / "q.json"
    # 12 streamed frames: on 4, one flipped token among near-uniform random logits is 25% of top-1.
    report = load_script().main(["--config", "tiny", "--frames", "24", "--stream-frames", "12", "--group-size", "32",
                                 "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["random_weights"] and report["int4_group_size"] == 32 and not report["cut"]
    assert 0 < report["weight_rel_err"]["int8"] < report["weight_rel_err"]["int4"] < 0.2
    results = report["results"]
    assert set(results) == {"fp32_vs_bf16", "int8_vs_bf16", "int4_vs_bf16", "bf16_step_vs_forward"}
    for name, kinds in results.items():
        for kind, streams in kinds.items():
            assert {"text", "audio", "audio_semantic", "audio_acoustic"} <= set(streams)
            assert len(streams["audio_per_codebook"]) == 8
            for m in [streams["text"], streams["audio"], *streams["audio_per_codebook"]]:
                assert 0 <= m["top1"] <= 1 and m["kl"] >= 0 and m["positions"] > 0
                assert 0 < m["ref_entropy"] <= m["max_entropy"] + 1e-6
    for kind in ("forward", "step"):
        for stream in ("text", "audio"):
            int8, int4 = results["int8_vs_bf16"][kind][stream], results["int4_vs_bf16"][kind][stream]
            assert int8["kl"] < int4["kl"] and int8["rel_logit_err"] < int4["rel_logit_err"]
            assert int8["top1"] > 0.8
    # Step by step computes the same function as the whole sequence (bf16 rounding apart).
    step = results["bf16_step_vs_forward"]["step"]
    assert step["text"]["kl"] < 1e-3 and step["audio"]["rel_logit_err"] < 0.05

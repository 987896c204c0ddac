"""The issue-31 benchmarks run and report: benchmarks/bench_flow.py on the tiny flow models, and
bench_gpu.py's Flux- and SD3.5-shaped part as a shrunken CPU dry run (both slow: `-m slow`)."""

import pytest

from test_benchmark_scripts import run_script


@pytest.mark.slow
def test_bench_flow_runs_and_reports(tmp_path):
    result = run_script("bench_flow.py", "--steps", "2", "--batch", "1", "--train-steps", "2", "--repeats", "1",
                        cwd=tmp_path)
    assert set(result["finetune_ours_over_script"]) == {"tiny-flux", "tiny-sd3"}
    assert result["ratio_to_plain"]["tiny-flux plain"] == 1.0
    assert all(v > 0 for v in result["finetune_steps_per_s"].values())


@pytest.mark.slow
@pytest.mark.parametrize("kind,shrink", [("flux", "24")])  # sd35 (--flow-shrink 38) runs the same code path
def test_bench_gpu_flow_part_dry_runs_on_cpu(tmp_path, kind, shrink):
    result = run_script("bench_gpu.py", "--flow-only", "--flow", kind, "--flow-shrink", shrink, "--flow-size", "32",
                        "--flow-steps", "1", cwd=tmp_path)
    shaped = result[f"{kind}_shaped"]
    assert result["device"] == "cpu" and not result["any_nan_image"]
    assert shaped["ratio_to_plain"]["fp32 plain"] == 1.0 and len(shaped["ratio_to_plain"]) >= 2
    assert shaped["size"] == 32 and all(v > 0 for v in shaped["s_per_image"].values())

"""The issue-31 CPU benchmark runs and reports: benchmarks/bench_flow.py on the tiny flow models.
(bench_gpu.py's Flux/SD3.5-shaped part dry-runs on a CPU with ``--flow-only --flow flux
--flow-shrink 24 --flow-size 32``; not part of the suite, for time.)"""

import pytest

from test_benchmark_scripts import run_script


@pytest.mark.slow
def test_bench_flow_runs_and_reports(tmp_path):
    result = run_script("bench_flow.py", "--steps", "2", "--batch", "1", "--train-steps", "2", "--repeats", "1",
                        cwd=tmp_path)
    assert set(result["finetune_ours_over_script"]) == {"tiny-flux", "tiny-sd3"}
    assert result["ratio_to_plain"]["tiny-flux plain"] == 1.0
    assert all(v > 0 for v in result["finetune_steps_per_s"].values())
    for kind in ("tiny-flux", "tiny-sd3"):  # one pair: its ratio is the best-against-best ratio
        low, high = result["finetune_pair_ratio_range"][kind]
        assert low == high == result["finetune_pair_ratio_median"][kind] > 0

"""The benchmark scripts run end to end at toy sizes and end with a parseable ``RESULT {json}``.

(Their figures are not checked here: speed and quality targets live in the benchmarks themselves.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout[-2000:]
    return json.loads(last[len("RESULT "):])


@pytest.mark.slow
def test_toy_tradeoff_runs_and_reports(tmp_path):
    result = run_script("toy_tradeoff.py", "--base", "tiny", "--out", str(tmp_path / "t"),
                        "--finetune-steps", "2", "--checkpoints", "1,2", "--backgrounds", "1",
                        "--seeds", "2", "--steps", "2", "--alphas", "0.25", "--windows", "0.5",
                        "--eta-schedules", "constant", "--confirm-seeds", "1", cwd=tmp_path)
    assert result["guidance_step"] == 1 and result["edit_step"] == 2
    assert result["best_dreamblend"]["alpha"] == 0.25 and result["best_dreamblend"]["schedule"] == "constant"
    assert {"prompt_ratio_to_g", "subject_ratio_to_e", "target_met"} <= set(result)
    confirmed = result["confirmed"]
    assert confirmed["seeds"] == [1000, 1000] and confirmed["alpha"] == 0.25 and confirmed["schedule"] == "constant"
    assert 0.0 <= confirmed["dreamblend_prompt_fidelity"] <= 1.0
    for name in ("tradeoff.png", "images.png", "tradeoff.json"):
        assert (tmp_path / "t" / name).is_file()
    rows = json.loads((tmp_path / "t" / "tradeoff.json").read_text())
    assert [r["kind"] for r in rows] == ["checkpoint", "checkpoint", "dreamblend"]
    for row in rows:
        assert 0.0 <= row["context_right"] <= 1.0
        assert (row["subject_when_context_right"] is None) == (row["context_right"] == 0.0)
    assert "g_subject_when_context_right" in confirmed and "subject_ratio_bound" in confirmed


def test_steering_bound_mixes_e_likeness_by_the_context_share_g_allows():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from toy_tradeoff import steering_bound

    e = {"subject_fidelity": 0.4, "subject_when_context_right": 0.3, "subject_when_context_wrong": 0.5}
    # G draws the context in every image: 90% of images at 0.3, 10% at 0.5 -> 0.32 / 0.4
    assert steering_bound({"context_right": 1.0}, e) == pytest.approx(0.8)
    assert steering_bound({"context_right": 0.5}, e) == pytest.approx((0.45 * 0.3 + 0.55 * 0.5) / 0.4)
    assert steering_bound({"context_right": 1.0}, e, share=1.0) == pytest.approx(0.75)
    assert steering_bound({"context_right": 1.0}, {**e, "subject_when_context_wrong": None}) is None


@pytest.mark.slow
def test_attention_profile_runs_and_reports(tmp_path):
    result = run_script("attention_profile.py", "--seeds", "2", "--steps", "10", cwd=tmp_path)
    assert 0.0 < result["mean_entropy_fraction"] <= 1.0
    assert "3:circle" in result["inside_outside_ratio"]


@pytest.mark.slow
def test_bench_gpu_runs_on_cpu(tmp_path):
    result = run_script("bench_gpu.py", "--finetune-steps", "4", "--steps", "2", cwd=tmp_path)
    assert result["device"] == "cpu" and result["all_losses_finite"] and not result["any_nan_image"]
    assert set(result["finetune_steps_per_s"]) == {"fp32 lora", "fp32 full"}


@pytest.mark.slow
def test_bench_serve_runs_and_reports(tmp_path):
    """The many-subjects suite (issue 20) at toy size: 2 subjects, both batchings, one open-loop load."""
    result = run_script("bench_serve.py", "--suite", "subjects", "--subject-counts", "1", "2", "--clients", "2",
                        "--requests", "4", "--open-requests", "3", "--floor-requests", "1", "--steps", "1",
                        "--loads", "0.8", cwd=tmp_path)
    assert (result["suite"], result["subjects"], result["subject_counts"]) == ("subjects", 2, [1, 2])
    assert result["peak_images_per_s"] == result["results"]["static"]["closed"][-1]["images_per_s"] > 0
    for name in ("static", "continuous"):
        run = result["results"][name]
        assert "error" not in run, run.get("error")
        assert [r["subjects"] for r in run["closed"]] == [1, 2] and [r["load"] for r in run["open"]] == [0.8]
        for row in [run["floor"], *run["closed"], *run["open"]]:
            assert row["images_per_s"] > 0 and row["mean_batch"] >= 1, row
            assert 0 < row["p50_s"] <= row["p95_s"] <= row["p99_s"], row
        assert [r["errors"] for r in run["open"]] == [0] and all(r["arrivals_per_s"] > 0 for r in run["open"])
    assert set(result["ratios"]) == {"continuous_to_static_throughput", "continuous_many_to_one_subject_throughput",
                                     "continuous_many_to_static_one_subject_throughput",
                                     "continuous_to_static_one_subject_throughput",  # issue 33
                                     "p95_continuous_to_static_at_80pct", "peak_rss_continuous_to_static"}
    assert all(value > 0 for value in result["ratios"].values()) and result["floor_p50_s"] > 0
    assert set(result["targets_met"]) == set(result["targets"]) == set(result["ratios"])


@pytest.mark.slow
def test_bench_serve_metrics_suite_runs_and_reports(tmp_path):
    """The metrics on/off suite (issue 30) at toy size: one round of each variant, 2 clients."""
    result = run_script("bench_serve.py", "--suite", "metrics", "--rounds", "1", "--clients", "2",
                        "--requests", "2", "--steps", "1", cwd=tmp_path)
    assert (result["suite"], result["rounds"], result["clients"], result["requests"]) == ("metrics", 1, 2, 2)
    assert [(r["round"], r["order"], r["metrics"]) for r in result["runs"]] == [(1, 1, "on"), (1, 2, "off")]
    for row in result["runs"]:
        assert row["images_per_s"] > 0 and row["mean_batch"] >= 1 and 0 < row["p50_s"] <= row["p95_s"], row
    for name in ("on", "off"):
        variant = result["variants"][name]
        assert variant["images_per_s_rounds"] == [variant["images_per_s"]] and variant["spread"] == 0.0
    ratio = result["ratios"]["metrics_on_to_off_throughput"]
    assert ratio > 0 and result["on_to_off_rounds"] == [ratio]
    assert result["targets"] == {"metrics_on_to_off_throughput": ">= 0.98"}
    assert result["targets_met"] == {"metrics_on_to_off_throughput": ratio >= 0.98}


# --------------------------------------------------------------------------------------------
# issue 18: the benchmarks on an SDXL base


def test_bench_sampler_runs_on_tiny_sdxl(tmp_path):
    result = run_script("bench_sampler.py", "--base", "tiny-sdxl", "--steps", "2", "--batch", "1",
                        "--repeats", "1", "--threads", "1", cwd=tmp_path)
    assert (result["family"], result["size"]) == ("sdxl", 32)
    assert result["plain_s_per_image"] > 0 and result["dreamblend_default_ratio"] > 0
    assert result["attend_and_excite_ratio"] is None  # diffusers has it for Stable Diffusion only
    assert set(result["peak_mb"]) == {"plain (E, alpha=0)", "DreamBlend default (K=1)",
                                      "DreamBlend every step (K=2)"}


def test_bench_finetune_runs_on_tiny_sdxl_against_the_sdxl_script(tmp_path):
    result = run_script("bench_finetune.py", "--base", "tiny-sdxl", "--steps", "4", "--warmup", "1",
                        "--rounds", "1", cwd=tmp_path)
    assert (result["family"], result["size"], result["timed_steps"]) == ("sdxl", 32, 2)
    assert result["reference"]["lora"] == "train_dreambooth_lora_sdxl.py"
    assert set(result["variants"]) == {"lora", "lora+prior", "full", "full+prior"}
    for row in result["variants"].values():
        assert row["ours"]["steps_per_s"] > 0 and row["reference"]["steps_per_s"] > 0
        assert row["steps_per_s_ratio"] > 0


@pytest.mark.slow
def test_bench_gpu_sdxl_part_dry_runs_on_cpu(tmp_path):
    result = run_script("bench_gpu.py", "--sdxl-only", "--sdxl-shrink", "8", "--sdxl-size", "64",
                        "--sdxl-steps", "2", "--sdxl-batch", "1", cwd=tmp_path)
    sdxl = result["sdxl_shaped"]
    assert result["device"] == "cpu" and not result["any_nan_image"] and result["finetune_steps_per_s"] == {}
    assert sdxl["image_size"] == 64 and sdxl["vae_dtype"] == {"fp32": "float32"}
    assert set(sdxl["ratio_to_plain"]) == {"fp32 plain", "fp32 DreamBlend K=1", "fp32 DreamBlend K=2",
                                           "fp32 rows K=1", "fp32 rows co_batch K=1"}  # issue 20's serving path


def test_s3_exit_runs_and_reports(tmp_path):
    result = run_script("s3_exit.py", "--runs", "2", "--variants", "exit_process", cwd=tmp_path)
    assert result["results"]["exit_process"] == {"runs": 2, "aborts": 0, "failed_reads": 0}


@pytest.mark.slow
def test_attention_collapse_runs_and_reports(tmp_path):
    result = run_script("attention_collapse.py", "--subjects", "striped-star", "--out", str(tmp_path / "a"),
                        "--finetune-steps", "2", "--checkpoints", "1,2", "--contexts", "1", "--seeds", "1",
                        "--eval-seeds", "1", "--probe-seeds", "1", "--probe-steps", "2", "--steps", "2",
                        "--tolerances", "0.1", cwd=tmp_path)
    assert result["subjects"] == ["striped-star"]
    assert set(result["choices_mean"]) == {"attention@0.1", "embedded", "fixed"}
    assert set(result["spearman_step"]["striped-star"]) == {"collapse", "sharpness", "subject_mass", "correlation"}
    for scores in result["choices_mean"].values():
        assert 0.0 <= scores["prompt_fidelity"] <= 1.0 and 0.0 <= scores["subject_fidelity"] <= 1.0
    assert (tmp_path / "a" / "attention_collapse.json").is_file()


def test_bench_rows_runs_and_reports(tmp_path):
    result = run_script("bench_rows.py", "--images", "2", "--subjects", "1", "2", "--steps", "2", "--repeats", "1",
                        cwd=tmp_path)
    variants = {"per-subject", "rows", "rows co_batch", "rows gather solo", "rows gather"}
    assert result["subjects"] == [1, 2] and set(result["images_per_s"]) == {"1", "2"}
    for rates in result["images_per_s"].values():
        assert set(rates) == variants and all(rate > 0 for rate in rates.values())
    assert result["unet_calls"]["2"]["rows"] < result["unet_calls"]["2"]["per-subject"]  # rows share calls
    ratios = result["ratios"]
    assert {"rows_to_per_subject", "rows_to_single_subject_batch", "co_batch_to_no_co_batch",
            "per_row_lora_overhead", "gather_to_peft", "per_row_lora_overhead_gather"} <= set(ratios)
    assert all(value > 0 for key, value in ratios.items() if not key.endswith("_by_subjects"))
    assert result["faster_on_cpu"] in {"co_batch=True", "co_batch=False"}
    assert result["sanity_ok"] and result["max_abs_diff_x255"] <= 1.0  # rows match the per-subject images


@pytest.mark.slow
def test_bench_lifecycle_runs_and_reports(tmp_path):
    result = run_script("bench_lifecycle.py", "--toy", cwd=tmp_path)
    upload = result["upload"]
    assert upload["files"] >= 2 and upload["rss_peak_mib"] >= upload["rss_before_mib"] > 0
    ready = result["create_to_ready"]
    assert len(ready["create_to_ready_s"]) == 2 and ready["median_s"] >= ready["train_s_median"] > 0
    serving = result["serving_while_training"]
    assert serving["alone"] > 0 and serving["shared_cores_trainings_ran_throughout"]
    assert {"shared_over_alone", "own_core_over_alone"} <= set(serving)


@pytest.mark.slow
def test_bench_quotas_runs_and_reports(tmp_path):
    result = run_script("bench_quotas.py", "--calls", "20", "--warmup", "2", "--concurrency", "4", cwd=tmp_path)
    for variant in ("in_process", "actor"):
        assert result[variant]["calls"] == 20 and 0 < result[variant]["median_us"] <= result[variant]["p95_us"]
    assert result["actor_throughput"]["checks_per_s"] > 0
    assert result["ratio_actor_to_in_process_median"] > 0


@pytest.mark.slow
def test_bench_hostage_runs_and_reports(tmp_path):
    result = run_script("bench_hostage.py", "--repeats", "1", "--maps-prompts", "1", "--maps-steps", "8",
                        "--short-steps", "2", cwd=tmp_path)
    medians = result["median_s"]
    assert set(medians) == {"alone", "behind maps, whole-call lock", "behind maps, step lock"}
    assert all(value > 0 for value in medians.values())
    assert result["maps_step_when_short_answered"]["behind maps, whole-call lock"] == [8]  # it waited to the end
    assert result["behind_to_alone_step_lock"] > 0 and result["behind_to_alone_whole_call"] > 0

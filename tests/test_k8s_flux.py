"""k8s/overlays/flux (issue 31): the endpoint and the fine-tuning job on a FLUX.1 base, on 80 GB GPUs.
It validates against the KubeRay CRDs, changes only the Serve config, the job's entrypoint and the
GPU groups' placement and sizes, and the job writes what the service serves."""

import shlex

import pytest
import yaml

from test_k8s import (K8S, REPO, _one, _strip_sdxl_changes, app_of, crds_or_skip, flag, gpu_groups, gpus,
                      manifests, parse_job_argv, vm)  # noqa: F401 - manifests is a fixture

FLUX = K8S / "overlays" / "flux"
GPU_MEMORY_MIB = {"A100-40GB": 40960, "A100-80GB": 81920, "H100": 81559, "H200": 143771, "L4": 23034}


@pytest.fixture(scope="module")
def docs() -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in vm.build(FLUX)}


@pytest.fixture(scope="module")
def flux_served(docs) -> dict:
    return yaml.safe_load(docs[("RayService", "dreamblend")]["spec"]["serveConfigV2"])


def test_overlay_validates_and_changes_only_the_service_and_the_job(docs, manifests):
    crds_or_skip()
    assert sorted(docs) == sorted([("RayJob", "dreamblend-finetune"), ("RayService", "dreamblend"),
                                   ("RayCluster", "dreamblend-shared"), ("ServiceAccount", "dreamblend")])
    for key, doc in docs.items():
        assert vm.validation_errors(doc) == [], (key, vm.validation_errors(doc))
    assert docs[("RayCluster", "dreamblend-shared")] == _one(manifests, "raycluster.yaml")
    for key, filename in ((("RayService", "dreamblend"), "rayservice.yaml"),
                          (("RayJob", "dreamblend-finetune"), "rayjob-finetune.yaml")):
        base = _one(manifests, filename)
        assert _strip_sdxl_changes(docs[key]) == _strip_sdxl_changes(base), key


def test_serve_args_are_a_flux_base_in_bf16_with_continuous_batching(docs, flux_served):
    from ray.serve.schema import ServeDeploySchema

    from dreamblend_ray.serving.requests import AppArgs

    ServeDeploySchema.model_validate(flux_served)
    args = AppArgs.model_validate(app_of(flux_served)["args"])
    assert args.base.startswith("s3://") and "FLUX" in args.base and args.storage_root.endswith("personalized-flux")
    assert args.dtype == "bf16" and args.batching == "continuous" and args.num_gpus == 1.0 and args.auth_enabled
    assert args.request_timeout_s < flux_served["http_options"]["request_timeout_s"]
    capacity = sum(g["maxReplicas"] * gpus(g) for g in gpu_groups(docs[("RayService", "dreamblend")]))
    assert args.max_replicas * args.num_gpus <= capacity


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_gpu_groups_land_on_80_gb_gpus_only(docs, kind):
    doc = next(d for (k, _), d in docs.items() if k == kind)
    for group in gpu_groups(doc):
        (term,) = group["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        (expr,) = term["matchExpressions"]
        assert expr["key"] == "nvidia.com/gpu.memory" and expr["operator"] == "Gt"
        fits = {name for name, mib in GPU_MEMORY_MIB.items() if mib > int(expr["values"][0])}
        assert fits == {"A100-80GB", "H100", "H200"}
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["memory"].removesuffix("Gi")) >= 96  # fp32 host copy while loading


@pytest.mark.slow  # importing the job CLI takes seconds here
def test_job_writes_what_the_service_serves(docs, flux_served):
    from dreamblend_ray.jobs.cli import finetune_config_from_args

    job = docs[("RayJob", "dreamblend-finetune")]
    argv, args = shlex.split(job["spec"]["entrypoint"]), app_of(flux_served)["args"]
    assert flag(argv, "--base") == args["base"] and flag(argv, "--output") == args["storage_root"]
    parsed = parse_job_argv(REPO / "jobs" / "finetune_subjects.py", argv[2:])
    assert finetune_config_from_args(parsed).mixed_precision == "bf16"
    assert int(flag(argv, "--num-actors")) * float(flag(argv, "--gpus-per-actor")) <= \
        sum(g["maxReplicas"] * gpus(g) for g in gpu_groups(job))

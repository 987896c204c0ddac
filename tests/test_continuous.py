"""The replica's continuous batch (issue 20): requests of several subjects share steps, join a
running batch at its next step, leave when done, and each gets the images it gets served alone.

Drives the real replica class (``DreamBlendModel``, built as its ``__init__`` builds it, without a
Serve context) on the tiny model with three really fine-tuned LoRA subjects. The static path
(``_sample``, one sampler call per group) is the reference for "served alone".
"""

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from ball_subjects import SUBJECTS, finetune_balls  # tests/ is on sys.path
from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.models.components import build_tiny_components
from dreamblend_ray.serving.app import DreamBlendModel, LoadedPair
from dreamblend_ray.serving.batching import GenerationJob
from dreamblend_ray.serving.continuous import ContinuousBatch
from dreamblend_ray.serving.requests import AppArgs, DeadlineExceeded, FieldError
from dreamblend_ray.training.checkpoints import remove_adapters

CONFIG = SamplingConfig(num_inference_steps=6, alpha=0.5, step_size=3.0)


@pytest.fixture(scope="module")
def storage_root(tmp_path_factory, tiny_components, one_torch_thread):
    return finetune_balls(tiny_components, str(tmp_path_factory.mktemp("continuous")))


@pytest.fixture()
def replica(storage_root, tiny_components):
    """The model replica as ``__init__`` builds it (continuous batching), minus Serve."""
    model = DreamBlendModel.func_or_class.local(AppArgs(base="tiny", storage_root=storage_root, max_batch_size=4),
                                                tiny_components)
    yield model
    remove_adapters(tiny_components.unet, list(getattr(tiny_components.unet, "peft_config", None) or {}))


def job(subject: str, prompt: str, seed: int, config: SamplingConfig = CONFIG, **fields) -> GenerationJob:
    return GenerationJob(subject, [prompt], [seed], config, **fields)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def alone(replica, generation_job: GenerationJob) -> np.ndarray:
    """The job's image from the static path, in a sampler call of its own."""
    return pixels(replica._sample(LoadedPair(generation_job.model_id, replica), [generation_job], None)[0].pngs[0])


def adapters(pair) -> tuple[str, str]:
    return pair.guidance_adapter, pair.edit_adapter


async def staggered(replica, jobs, after_steps, handles):
    """Submit each job once the batch has taken ``after_steps`` steps; the (output, jobs, rows) of each."""
    pairs = {h.model_id: await asyncio.to_thread(h.pin) for h in handles}

    async def submit(generation_job, steps):
        while replica.continuous.steps < steps:
            await asyncio.sleep(0.005)
        return await replica.continuous.submit(generation_job, adapters(pairs[generation_job.model_id]))
    return await asyncio.gather(*[submit(j, s) for j, s in zip(jobs, after_steps)])


def test_three_subjects_share_steps_and_late_arrivals_join_with_the_images_they_get_alone(replica):
    jobs = [job("red", "a sks ball on grass", 1), job("green", "a sks ball in snow", 2),
            job("blue", "a sks ball at night", 3, SamplingConfig(num_inference_steps=4, alpha=0.0)),
            job("red", "a sks ball on a table", 4, negative_prompts=["blurry"])]
    handles = [LoadedPair(subject, replica) for subject in SUBJECTS]
    results = asyncio.run(staggered(replica, jobs, [0, 2, 4, 5], handles))  # later jobs join mid-batch
    assert replica.continuous.steps < sum(j.config.num_inference_steps for j in jobs)  # steps were shared
    assert max(shared for _, shared, _ in results) >= 2
    for generation_job, (output, _, _) in zip(jobs, results):
        diff = np.abs(pixels(output.pngs[0]) - alone(replica, generation_job))
        assert diff.max() <= 1, (generation_job.model_id, generation_job.prompts, diff.max())
    guided = results[0][0].distances[0]
    assert guided > 0 and results[2][0].distances == [0.0]  # alpha 0: no guided step, no distance


def test_an_evicted_pair_stays_loaded_until_its_rows_finish_and_shared_adapters_survive(replica):
    red, red_early = LoadedPair("red", replica), LoadedPair("red@e2", replica)  # both use red--g2

    async def scenario():
        pair = await asyncio.to_thread(red.pin)
        await asyncio.to_thread(red_early.pin)
        running = asyncio.create_task(replica.continuous.submit(job("red", "a sks ball", 5), adapters(pair)))
        while replica.continuous.steps < 2:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(red.close)  # the LRU evicts red mid-sampling
        assert "red--e4" in replica.components.unet.peft_config  # still pinned: still loaded
        output, _, _ = await running
        await asyncio.to_thread(red.unpin)
        return output
    output = asyncio.run(scenario())
    assert len(output.pngs) == 1
    loaded = set(replica.components.unet.peft_config)
    assert "red--e4" not in loaded and "red--g2" in loaded  # G's adapter is red@e2's too
    assert replica.loaded_models() == ["red@e2"]


def test_a_job_past_its_deadline_leaves_at_the_next_step_and_the_others_finish(replica):
    handle = LoadedPair("green", replica)
    config = SamplingConfig(num_inference_steps=10, alpha=0.0)
    late_job = job("green", "a sks ball", 1, config)

    async def scenario():
        pair = adapters(await asyncio.to_thread(handle.pin))
        late = asyncio.create_task(replica.continuous.submit(late_job, pair))
        on_time = asyncio.create_task(replica.continuous.submit(job("green", "a sks ball", 2, config), pair))
        while replica.continuous.steps < 2:
            await asyncio.sleep(0.005)
        late_job.deadline = time.time() - 1  # its deadline passes mid-sampling
        return await late, await on_time, replica.continuous.steps
    (late, _, _), (on_time, _, _), steps = asyncio.run(scenario())
    assert isinstance(late, DeadlineExceeded)
    assert len(on_time.pngs) == 1 and steps == 10


def test_a_cancelled_caller_leaves_and_a_failing_step_fails_only_its_jobs(replica, monkeypatch):
    handle = LoadedPair("blue", replica)

    async def cancel_one():
        pair = adapters(await asyncio.to_thread(handle.pin))
        longer = SamplingConfig(num_inference_steps=12, alpha=0.0)
        gone = asyncio.create_task(replica.continuous.submit(job("blue", "a sks ball", 1, longer), pair))
        kept = asyncio.create_task(replica.continuous.submit(job("blue", "a sks ball", 2), pair))
        while replica.continuous.steps < 1:
            await asyncio.sleep(0.005)
        gone.cancel()  # its caller went away mid-sampling
        return await kept
    output, _, _ = asyncio.run(cancel_one())
    assert len(output.pngs) == 1 and replica.continuous.active == []
    assert replica.continuous.steps == CONFIG.num_inference_steps  # the 12-step job left at once

    engine = replica.continuous.engine
    real_step = engine.step
    calls = []

    def fail_once(rows, joining=()):
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step(rows, joining)
    monkeypatch.setattr(engine, "step", fail_once)

    async def fail_then_serve():
        pair = adapters(await asyncio.to_thread(handle.pin))
        failed, _, _ = await replica.continuous.submit(job("blue", "a sks ball", 3), pair)
        served, _, _ = await replica.continuous.submit(job("blue", "a sks ball", 3), pair)
        return failed, served
    failed, served = asyncio.run(fail_then_serve())
    assert isinstance(failed, RuntimeError) and "boom" in str(failed)
    assert len(served.pngs) == 1


def test_admission_bounds_the_batch_and_keeps_arrival_order_across_row_keys(replica):
    small = SamplingConfig(num_inference_steps=3, alpha=0.0, height=32, width=32)
    other = SamplingConfig(num_inference_steps=3, alpha=0.0, height=64, width=64)
    batch = ContinuousBatch(replica.continuous.engine, replica.unet_lock, max_requests=2)
    handle = LoadedPair("red", replica)

    async def scenario():
        pair = adapters(await asyncio.to_thread(handle.pin))
        jobs = [job("red", "a", 1, small), job("red", "b", 2, small), job("red", "c", 3, other),
                job("red", "d", 4, small)]
        return await asyncio.gather(*[batch.submit(j, pair) for j in jobs])
    results = asyncio.run(scenario())
    shared = [jobs for _, jobs, _ in results]
    assert max(shared) == 2  # never more than max_requests jobs in a step
    assert shared[2] == 1  # the other size ran on its own, and "d" (after it) did not jump ahead of it
    assert pixels(results[2][0].pngs[0]).shape == (64, 64, 3)
    assert batch.steps == 3 + 3 + 3
    odd = SamplingConfig(num_inference_steps=3, alpha=0.0, height=33, width=33)

    async def one_bad():
        pair = adapters(await asyncio.to_thread(handle.pin))
        return await asyncio.gather(batch.submit(job("red", "e", 5, odd), pair),
                                    batch.submit(job("red", "f", 6, small), pair))
    (bad, _, _), (good, _, _) = asyncio.run(one_bad())
    assert isinstance(bad, FieldError) and "divisible" in bad.message
    assert len(good.pngs) == 1  # a job that cannot start fails alone
    flux_only = SamplingConfig(num_inference_steps=3, alpha=0.0, true_cfg_scale=2.0)

    async def not_this_family():  # no row key: refused before admission, the batch keeps serving
        pair = adapters(await asyncio.to_thread(handle.pin))
        return await asyncio.gather(batch.submit(job("red", "g", 7, flux_only), pair),
                                    batch.submit(job("red", "h", 8, small), pair))
    (bad, _, _), (good, _, _) = asyncio.run(not_this_family())
    assert isinstance(bad, FieldError) and "true_cfg_scale is FLUX.1's" in bad.message
    assert len(good.pngs) == 1
    with pytest.raises(ValueError, match="max_requests"):
        ContinuousBatch(replica.continuous.engine, replica.unet_lock, max_requests=0)


@pytest.mark.parametrize("maps", [False, True])  # the continuous path, and the static one (heat maps)
def test_settings_of_another_family_are_refused_by_field_before_any_batch(replica, tmp_path, maps):
    flux_only = SamplingConfig(num_inference_steps=3, true_cfg_scale=2.0, attention_maps=maps)
    refused = asyncio.run(replica.generate(job("red", "a", 1, flux_only)))
    assert isinstance(refused, FieldError) and refused.field == "true_cfg_scale" and "FLUX.1" in refused.message
    flux = DreamBlendModel.func_or_class.local(AppArgs(base="tiny-flux", storage_root=str(tmp_path)),
                                               build_tiny_components(name="tiny-flux"))
    config = SamplingConfig(num_inference_steps=3, attention_maps=maps)
    refused = asyncio.run(flux.generate(job("red", "a", 1, config, negative_prompts=["blurry"])))
    assert isinstance(refused, FieldError) and refused.field == "negative_prompt"
    assert "true_cfg_scale > 1" in refused.message


def test_a_continuous_request_finishes_while_a_long_maps_request_runs(replica):
    """Issue 33: the static path (heat maps, full fine-tunes) holds the UNet lock one step at a time,
    so the continuous rows step between its steps instead of waiting for its whole sampler call."""
    maps = SamplingConfig(num_inference_steps=40, alpha=0.5, step_size=3.0, attention_maps=True)
    long_job = GenerationJob("red", [f"a sks ball, view {k}" for k in range(4)], [11, 12, 13, 14], maps)
    short_job = job("blue", "a sks ball at night", 3, SamplingConfig(num_inference_steps=4, alpha=0.5, step_size=3.0))
    static_steps = []

    async def scenario():
        blue = adapters(await asyncio.to_thread(LoadedPair("blue", replica).pin))
        red = LoadedPair("red", replica)
        long_call = asyncio.create_task(asyncio.to_thread(
            replica._sample, red, [long_job], lambda step, total: static_steps.append(step)))
        while len(static_steps) < 2:
            await asyncio.sleep(0.005)
        output, _, _ = await replica.continuous.submit(short_job, blue)
        at_short_end = len(static_steps)
        return output, at_short_end, await long_call
    output, at_short_end, long_outputs = asyncio.run(scenario())
    assert len(output.pngs) == 1 and at_short_end < 40, at_short_end  # done while the maps request ran
    assert len(long_outputs[0].pngs) == 4 and long_outputs[0].attention
    diff = np.abs(pixels(output.pngs[0]) - alone(replica, short_job))  # interleaving changed nothing
    assert diff.max() <= 1


def test_a_loaded_pair_is_pinned_and_unpinned_without_waiting_for_the_running_step(replica):
    """Issue 33: counting a request in and out of a loaded pair must not wait for the UNet lock
    (held by the running step), or every request pays up to two steps of latency."""
    handle = LoadedPair("green", replica)
    handle.pin()  # loads it (this takes the lock)
    handle.unpin()
    held, release = threading.Event(), threading.Event()

    def running_step():
        with replica.unet_lock:
            held.set()
            release.wait(10)
    stepper = threading.Thread(target=running_step)
    stepper.start()
    held.wait(10)
    try:
        start = time.perf_counter()
        pinned = threading.Thread(target=lambda: (handle.pin(), handle.unpin()))
        pinned.start()
        pinned.join(2)
        assert not pinned.is_alive(), "pin/unpin waited for the UNet lock"
        assert time.perf_counter() - start < 2 and handle.pins == 0
    finally:
        release.set()
        stepper.join()
    handle.close()  # evicted while idle: unloaded at once (this takes the lock)
    assert handle.pair is None and "green" not in replica.loaded_models()

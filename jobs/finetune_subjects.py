"""Ray job entry point: fine-tune every subject of a manifest (see dreamblend_ray/jobs/finetune.py;
its flags: dreamblend_ray/jobs/cli.py).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/finetune_subjects.py --subjects s3://bucket/subjects.jsonl --output s3://bucket/out \
        --num-actors 4 --gpus-per-actor 1

or `dreamblend submit finetune --address http://HEAD:8265 -- --subjects ... --output ...`.
"""

import dreamblend_ray.embedded.scorer  # noqa: F401 - registers the "embedded" pair-choice scorer (--choose-pair embedded)
from dreamblend_ray.runtime import lifecycle
from dreamblend_ray.jobs.cli import finetune_main

if __name__ == "__main__":
    lifecycle.exit_process(finetune_main())

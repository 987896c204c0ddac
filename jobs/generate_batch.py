"""Ray job entry point: DreamBlend images for rows of (subject, prompt, seed, ...) (see
dreamblend_ray/jobs/generate.py; its flags: dreamblend_ray/jobs/cli.py).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/generate_batch.py --requests s3://bucket/prompts.jsonl --checkpoints s3://bucket/out \
        --output s3://bucket/out --num-actors 2 --gpus-per-actor 1

or `dreamblend submit generate --address http://HEAD:8265 -- --requests ... --output ...`.
"""

from dreamblend_ray.runtime import lifecycle
from dreamblend_ray.jobs.cli import generate_main

if __name__ == "__main__":
    lifecycle.exit_process(generate_main())

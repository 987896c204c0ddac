"""Ray job entry point: the DreamBooth-protocol evaluation (see dreamblend_ray/jobs/evaluate.py).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --subjects s3://bucket/eval/subjects.jsonl --checkpoints s3://bucket/out \
        --output s3://bucket/eval/run1 --base s3://bucket/models/sd15 \
        --clip-model s3://bucket/models/clip --dino-model s3://bucket/models/dino-vits16 \
        --num-actors 2 --gpus-per-actor 1
"""

from dreamblend_ray.runtime import lifecycle
from dreamblend_ray.commands.evaluate import main

if __name__ == "__main__":
    lifecycle.exit_process(main())

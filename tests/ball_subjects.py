"""Three ball subjects (red, green, blue), really LoRA-fine-tuned on the tiny model: the serving
tests' subjects (tests/test_serve.py over HTTP, tests/test_continuous.py on the replica class)."""

from PIL import Image, ImageDraw

from dreamblend_ray.config import FinetuneConfig

SUBJECTS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def ball_images(color) -> list:
    images = []
    for shift in range(3):
        image = Image.new("RGB", (32, 32), (0, 0, 0))
        ImageDraw.Draw(image).ellipse((6 + shift, 6, 24 + shift, 24), fill=color)
        images.append(image)
    return images


def finetune_balls(components, root: str) -> str:
    """Each subject fine-tuned 4 LoRA steps into ``root``, checkpoints at steps 2 (G) and 4 (E)."""
    from dreamblend_ray.training.finetune import finetune_subject

    config = FinetuneConfig(steps=4, learning_rate=5e-2, prior_preservation=False, checkpoint_steps=(2, 4),
                            device="cpu")
    for subject_id, color in SUBJECTS.items():
        finetune_subject(components, ball_images(color), "ball", subject_id, root, config, progress=False)
    return root

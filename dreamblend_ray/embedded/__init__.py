"""The embedded base model and its world.

- :mod:`.world`: the synthetic shapes world (scenes, renderer, caption grammar, vocabulary);
- :mod:`.metrics`: exact analytic metrics (prompt fidelity, subject fidelity, diversity);
- :mod:`.subjects`: three demo subjects the base model never saw;
- :mod:`.train`: the seeded CPU training script that produced ``weights/``;
- :mod:`.evaluate`: plain DDIM sampling through StableDiffusionPipeline, scored by the metrics.

Load the model like any Stable Diffusion directory: ``load_components("embedded")``.
"""

"""The embedded base model and its world.

- :mod:`.world`: the synthetic shapes world (scenes, renderer, caption grammar, vocabulary);
- :mod:`.metrics`: exact analytic metrics (prompt fidelity, subject fidelity, diversity);
- :mod:`.subjects`: three demo subjects the base model never saw;
- :mod:`.train`: the seeded CPU training script that produced ``weights/``;
- :mod:`.evaluate`: plain DDIM sampling through StableDiffusionPipeline, scored by the metrics;
- :mod:`.grow`: attention grown at the UNet's 16x16 level, output unchanged until trained;
- :mod:`.gates`: what a new base must reach before it replaces ``weights/``.

Load the model like any Stable Diffusion directory: ``load_components("embedded")``.
"""

"""dreamblend-ray: DreamBlend personalized text-to-image generation at scale on Ray."""

__version__ = "0.1.0"

"""The DreamBlend Ray Serve application: ``serve run deployments/serve_config.yaml``.

``import_path: deployments.app:build_app`` with ``args:`` validated into ``AppArgs`` (base model,
storage root, request limits, batching, multiplexing, autoscaling, back-pressure, auth). The
deployments themselves live in ``dreamblend_ray.serve_app`` so that ``dreamblend serve`` can start
the same application from an installed package:

    HTTP -> DreamBlendIngress (FastAPI: /v1/generate, /v1/subjects/{id}, /healthz, /docs)
         -> DreamBlendModel (autoscaled; @serve.multiplexed subject pairs, @serve.batch requests)

Build it in Python with ``build_app({"base": "tiny", "storage_root": "/data"})`` or
``build_app(AppArgs(...))`` and pass the result to ``serve.run``. ``app`` is the application with
default arguments, for tools that want a built application rather than a builder
(``serve build deployments.app:app -o config.yaml``).
"""

from dreamblend_ray.serve_app import DreamBlendIngress, DreamBlendModel, build_app
from dreamblend_ray.serving import AppArgs

app = build_app(AppArgs())

__all__ = ["AppArgs", "DreamBlendIngress", "DreamBlendModel", "app", "build_app"]

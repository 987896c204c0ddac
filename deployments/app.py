"""Thin re-export of the DreamBlend Ray Serve application (``dreamblend_ray.serve_entry``).

Serve configs name ``import_path: dreamblend_ray.serve_entry:build_app``, which resolves wherever
the package is installed (``serve deploy`` on a cluster without this repository). This module keeps
the old ``deployments.app:build_app`` path working inside a checkout, and offers ``app``, the
application with default arguments, for tools that want a built application rather than a builder
(``serve build deployments.app:app -o config.yaml``).

    HTTP -> DreamBlendIngress (FastAPI: /v1/generate, /v1/subjects/{id}, /healthz, /docs)
         -> DreamBlendModel (autoscaled; @serve.multiplexed subject pairs, @serve.batch requests)
"""

from dreamblend_ray.serve_entry import AppArgs, DreamBlendIngress, DreamBlendModel, build_app

app = build_app(AppArgs())

__all__ = ["AppArgs", "DreamBlendIngress", "DreamBlendModel", "app", "build_app"]

"""The Serve application's import path inside the package: ``dreamblend_ray.serve_entry:build_app``.

``serve deploy`` (and ``serve run``, KubeRay's ``serveConfigV2``) imports ``import_path`` on the
cluster, in processes that do not run from this repository: the path must resolve wherever the
``dreamblend-ray`` package is installed (pip on every node, or the project's image), so it names
this module rather than the repository's ``deployments/`` folder (which re-exports it).

    applications:
    - name: dreamblend
      import_path: dreamblend_ray.serve_entry:build_app
      args: {base: s3://bucket/model, storage_root: s3://bucket/personalized}

``build_app`` validates ``args`` into ``AppArgs``; see ``dreamblend_ray.serving.app`` for the deployments.
"""

from dreamblend_ray.serving.app import DreamBlendIngress, DreamBlendModel, build_app
from dreamblend_ray.serving.requests import AppArgs

IMPORT_PATH = "dreamblend_ray.serve_entry:build_app"

__all__ = ["IMPORT_PATH", "AppArgs", "DreamBlendIngress", "DreamBlendModel", "build_app"]

# syntax=docker/dockerfile:1
# The dreamblend-ray image the KubeRay manifests (k8s/base/*.yaml) run: Ray's GPU image + this package.
#   docker build -t ghcr.io/dreamblend/dreamblend-ray:0.1.0 .
# Pinned, never `latest`: the base tag's Ray version equals constraints.txt's ray== pin and the
# rayVersion of every manifest (tests/test_k8s.py checks all three), and its Python (py311) is the
# one the project is tested with.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu
ARG RAY_VERSION

LABEL org.opencontainers.image.title="dreamblend-ray" \
      org.opencontainers.image.description="DreamBlend personalized text-to-image on Ray (Data, Serve, KubeRay)" \
      org.opencontainers.image.licenses="Apache-2.0"

# The repository lives here; the RayJob entrypoint is /home/ray/dreamblend/jobs/finetune_subjects.py.
# Everything runs from the installed package (no PYTHONPATH): Serve imports
# dreamblend_ray.serve_entry:build_app, exactly as on a cluster where only the package is installed.
WORKDIR /home/ray/dreamblend
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch: constraints.txt pins torch==2.13.0, which on the project's (CPU-only) machines resolves to
# a local +cpu wheel. The image must get the CUDA build of the same version instead, so torch is
# installed on its own from PyPI (its Linux x86_64 wheels are CUDA builds) or from TORCH_INDEX_URL
# (e.g. https://download.pytorch.org/whl/cu128 for another CUDA), and its line is filtered out of
# the constraints below. TORCH_VERSION must equal constraints.txt's pin (a test checks it). Its own
# layer: the largest download, rebuilt only when the version changes. The build fails if torch
# came without CUDA.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch has no CUDA build')"

COPY --chown=ray:users . .
RUN grep -v -i -E '^torch([=<>!~ ;\[]|$)' constraints.txt > /tmp/constraints-image.txt \
 && pip install -c /tmp/constraints-image.txt "torch==${TORCH_VERSION}" . \
 && python -c "import ray, dreamblend_ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
 && rm /tmp/constraints-image.txt

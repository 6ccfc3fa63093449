# bertjob image for KubeRay (k8s/) and for `ray job submit`: Ray's own image plus this repo, installed.
#
#   docker build -t bertjob:0.1.0 .                                   # CPU: FROM rayproject/ray:2.60.0-py311
#   docker build -t bertjob:0.1.0-gpu --build-arg RAY_VARIANT=py311-gpu --build-arg TORCH_INDEX_URL= .
#
# RAY_VERSION must equal rayVersion in k8s/ (tests/test_k8s_manifests.py checks it): Ray refuses to join
# nodes or clients of another version. Runs as Ray's non-root user `ray` (uid 1000, gid 100), the user the
# manifests' securityContext names.
ARG RAY_VERSION=2.60.0
ARG RAY_VARIANT=py311
FROM rayproject/ray:${RAY_VERSION}-${RAY_VARIANT}

ARG RAY_VERSION
# The CPU image takes torch from PyTorch's CPU wheel index (about 200 MB rather than several GB of CUDA
# libraries). Empty (GPU image): torch comes from the default index with `pip install .`, CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

USER root
RUN mkdir -p /app && chown 1000:100 /app
USER 1000:100
WORKDIR /app

RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch>=2.4"; \
    fi

# Dependencies first, from pyproject.toml alone, so that a code change doesn't reinstall them. The
# constraint keeps the image's Ray: pip may add Ray's extras but must not move Ray to another version.
COPY --chown=1000:100 pyproject.toml README.md ./
RUN echo "ray==${RAY_VERSION}" > /tmp/constraints.txt \
    && mkdir -p bertjob && touch bertjob/__init__.py \
    && pip install --no-cache-dir -c /tmp/constraints.txt . \
    && pip uninstall -y bertjob \
    && rm -rf build bertjob bertjob.egg-info

COPY --chown=1000:100 bertjob/ bertjob/
RUN pip install --no-cache-dir --no-deps -c /tmp/constraints.txt . \
    && rm -rf build \
    && python -c "import ray, bertjob; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# The RayJob entrypoints run `python jobs/<stage>.py --config configs/<name>.yaml` from here.
COPY --chown=1000:100 jobs/ jobs/
COPY --chown=1000:100 configs/ configs/

ENV PYTHONUNBUFFERED=1

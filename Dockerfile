# voteflow's image: one image for every role. The command picks the role:
#   docker run IMAGE            -> voteflow edge (the default CMD)
#   docker run IMAGE worker     -> voteflow worker
#   docker run IMAGE migrate    -> voteflow migrate (a one-shot, before edges and workers)
# Settings come from VOTEFLOW_* environment variables (docs/operations.md, "Settings").
#
# Build: docker build -t voteflow .   (tests/unit/test_deploy_files.py checks what
# this file promises: two stages, a slim final image without compilers, a
# non-root numeric user, the console script as the entrypoint.)

# -- build: a virtualenv with voteflow and its dependencies -------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md requirements.lock ./
COPY sql ./sql
COPY voteflow ./voteflow
COPY ingest ./ingest
COPY workers ./workers
# voteflow itself, not its dev or loadtest extras, at the versions the suite
# passed with (requirements.lock). Every dependency ships a manylinux wheel, so
# no compiler is needed here either.
RUN pip install -c requirements.lock . \
    && voteflow --help >/dev/null

# -- runtime: the virtualenv alone, run by an unprivileged user ---------------
FROM python:3.11-slim-bookworm AS runtime

# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it and
# volumes can be owned by it (infra/k8s/base sets the same runAsUser).
RUN groupadd --system --gid 10001 voteflow \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin voteflow

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    # In a container the edge must listen beyond loopback (the default is 127.0.0.1).
    VOTEFLOW_HOST=0.0.0.0

USER 10001:10001
WORKDIR /tmp
# The edge's API (VOTEFLOW_PORT) and a worker's /metrics (VOTEFLOW_WORKER_METRICS_PORT).
EXPOSE 8080 9464

# Exec form: voteflow is PID 1 and gets SIGTERM itself, which it answers by
# draining (edge: finish requests in flight; worker: commit the batch in hand).
ENTRYPOINT ["voteflow"]
CMD ["edge"]

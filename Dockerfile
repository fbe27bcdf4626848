# orderflow's image: one image, three roles (compose: migrate, api, worker).
#   docker build -t orderflow .
#   docker run orderflow alembic upgrade head | uvicorn api.main:app --host 0.0.0.0 | python worker.py

# --- build: a virtualenv with the project and its dependencies (compilers stay in this stage) ---
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" > requirements.txt \
    && pip install -r requirements.txt
COPY api ./api
COPY core ./core
COPY workflows ./workflows
COPY activities ./activities
COPY devsinks ./devsinks
# Top-level modules (worker.py, and the operator CLI when present).
COPY *.py ./
RUN pip install --no-deps .

# --- runtime: the virtualenv, the migrations and the entry points; runs as a non-root user ---
FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 orderflow \
    && useradd --system --uid 10001 --gid orderflow --home-dir /app --shell /usr/sbin/nologin orderflow
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY alembic.ini worker.py ./
COPY migrations ./migrations
USER 10001:10001
EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]

# One image for every handoff process: the chain worker and each agent's worker.
FROM python:3.11-slim
WORKDIR /app
# The dependencies in a layer of their own, from pyproject.toml alone: a code change does not
# reinstall them. (The `server` extra, the embedded Temporal server's binary, is not needed here.)
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY handoff ./handoff
COPY workflows ./workflows
COPY activities ./activities
COPY workers ./workers
COPY examples ./examples
RUN pip install --no-cache-dir --no-deps .
# a numeric user and group, not root: Kubernetes' runAsNonRoot can check it
USER 10001:10001
ENTRYPOINT ["handoff"]
CMD ["--help"]

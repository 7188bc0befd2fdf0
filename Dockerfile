# One image for every handoff process: the chain worker and each agent's worker.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY handoff ./handoff
COPY workflows ./workflows
COPY activities ./activities
COPY workers ./workers
COPY examples ./examples
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["handoff"]
CMD ["--help"]

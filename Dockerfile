# conveyor: capture / apply / verify / replicate in one image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY conveyor ./conveyor
COPY capture ./capture
COPY apply ./apply
COPY verify ./verify
COPY schemas ./schemas
RUN pip install --no-cache-dir .
ENTRYPOINT ["conveyor"]
CMD ["--help"]

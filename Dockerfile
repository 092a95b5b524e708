# conveyor: capture / apply / verify / replicate in one image, run as an unprivileged user.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY conveyor ./conveyor
COPY capture ./capture
COPY apply ./apply
COPY verify ./verify
COPY schemas ./schemas
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /var/lib/conveyor --create-home conveyor
USER 10001
WORKDIR /var/lib/conveyor
EXPOSE 9108
ENTRYPOINT ["conveyor"]
CMD ["--help"]

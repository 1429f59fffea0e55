# syntax=docker/dockerfile:1
# Build stage: build a wheel of mdlogger and of its dependencies at the tested versions (constraints.txt).
FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.py setup.cfg README.md constraints.txt ./
COPY mdlogger ./mdlogger
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt . && cp constraints.txt /wheels/

# Runtime stage: only the wheels, a non-root user, the data volume.
FROM python:3.11-slim
RUN groupadd --system --gid 10001 mdlogger && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/mdlogger --shell /usr/sbin/nologin mdlogger \
    && mkdir -p /var/lib/mdlogger /etc/mdlogger \
    && chown mdlogger:mdlogger /var/lib/mdlogger
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels -c /wheels/constraints.txt /wheels/mdlogger-*.whl \
    && rm -rf /wheels
COPY etc/logger.yaml /etc/mdlogger/logger.yaml
ENV LOGGER_DATA_PATH=/var/lib/mdlogger \
    LOGGER_HEALTH_CHECK_HOST=0.0.0.0 \
    LOGGER_HEALTH_CHECK_PORT=8080 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/mdlogger"]
EXPOSE 8080
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["mdlogger-supervisor", "--config", "/etc/mdlogger/logger.yaml"]
CMD ["run"]

# Test-only stand-in for prom/prometheus (no image can be pulled here): Debian's prometheus package
# on the local base image, run as nobody like the official image.
ARG BASE=local/python-base:bookworm
FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]

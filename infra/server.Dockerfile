# The Prefect server image of docker-compose.yml (prefect-server, prefect-services): the official
# image plus what its settings need.
#
# - prefect-redis: the compose settings move messaging, the event ordering, the concurrency
#   leases and the Docket queue to Redis (PREFECT_MESSAGING_BROKER=prefect_redis.messaging, ...);
#   the official image does not ship that package, and the server refuses to start without it.
# - sqlalchemy<2.1: Prefect 3.8.8's scheduler fails in every loop under SQLAlchemy 2.1 ("Can't
#   evaluate bulk DML statement") and no scheduled run is ever created.
#
# The same versions as pyproject.toml, which `make test-stack` runs the same server layout with.
FROM prefecthq/prefect:3.8.8-python3.11
RUN pip install --no-cache-dir "prefect==3.8.8" "prefect-redis==0.3.0" "sqlalchemy>=2.0,<2.1" \
 && python -c "import prefect_redis, sqlalchemy; assert sqlalchemy.__version__ < '2.1', sqlalchemy.__version__"

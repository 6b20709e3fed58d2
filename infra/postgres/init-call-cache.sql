-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d): the
-- database of the judge call cache that every worker shares (a build's
-- cache_url: postgresql://prefect@postgres:5432/longreward; the password is PGPASSWORD).
CREATE DATABASE longreward OWNER prefect;

#!/bin/sh
# Runs once, on the first start of the postgresql service (docker-entrypoint-initdb.d): a login
# role and a database of orderflow's own, so the app does not connect as the superuser that
# Temporal's schema tool uses.
set -eu
: "${ORDERFLOW_DB_PASSWORD:?set ORDERFLOW_DB_PASSWORD}"
role="${ORDERFLOW_DB_USER:-orderflow}"
database="${ORDERFLOW_DB_NAME:-orderflow}"
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  -v role="$role" -v database="$database" -v password="$ORDERFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"database" OWNER :"role";
SQL

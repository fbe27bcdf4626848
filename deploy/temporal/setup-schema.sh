#!/bin/sh
# One-shot (compose service temporal-admin-tools): creates Temporal's two databases on the shared
# PostgreSQL server and brings their schemas to the version this admin-tools image ships.
# Safe to run again: `create` tolerates an existing database and update-schema only moves forward.
set -eu
: "${POSTGRES_SEEDS:?}" "${POSTGRES_USER:?}" "${SQL_PASSWORD:?}"
schemas=/etc/temporal/schema/postgresql/v12
sql() { temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -p "${DB_PORT:-5432}" -u "$POSTGRES_USER" "$@"; }

for db in temporal temporal_visibility; do
  sql --db "$db" create || echo "database $db exists"
done
if ! sql --db temporal update-schema -d "$schemas/temporal/versioned"; then
  sql --db temporal setup-schema -v 0.0
  sql --db temporal update-schema -d "$schemas/temporal/versioned"
fi
if ! sql --db temporal_visibility update-schema -d "$schemas/visibility/versioned"; then
  sql --db temporal_visibility setup-schema -v 0.0
  sql --db temporal_visibility update-schema -d "$schemas/visibility/versioned"
fi
echo "Temporal schemas are up to date"

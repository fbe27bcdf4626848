#!/bin/sh
# One-shot (compose service temporal-setup): waits for the frontend, creates the namespace and
# registers the OrderStatus search attribute the workflow upserts (a workflow start that sets an
# unregistered attribute is refused). Safe to run again. Also works against any cluster the
# `temporal` CLI can reach with TEMPORAL_ADDRESS / TEMPORAL_API_KEY / TEMPORAL_TLS_* set.
set -eu
namespace="${TEMPORAL_NAMESPACE:-default}"
retention="${TEMPORAL_NAMESPACE_RETENTION:-30d}"

tries=0
until temporal operator cluster health >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge "${SETUP_WAIT_SECONDS:-120}" ]; then
    echo "Temporal at ${TEMPORAL_ADDRESS:-localhost:7233} is not healthy" >&2
    exit 1
  fi
  sleep 1
done

temporal operator namespace describe --namespace "$namespace" >/dev/null 2>&1 ||
  temporal operator namespace create --namespace "$namespace" --retention "$retention"

# A fresh namespace can take a moment to be usable by the search attribute API: retry briefly.
tries=0
until temporal operator search-attribute list --namespace "$namespace" 2>/dev/null |
  grep -qw OrderStatus; do
  temporal operator search-attribute create --namespace "$namespace" \
    --name OrderStatus --type Keyword >/dev/null 2>&1 || true
  tries=$((tries + 1))
  if [ "$tries" -ge 30 ]; then
    echo "could not register OrderStatus in namespace $namespace" >&2
    exit 1
  fi
  sleep 1
done
echo "namespace $namespace ready, OrderStatus registered"

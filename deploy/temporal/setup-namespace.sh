#!/bin/sh
# One-shot (compose service temporal-setup): waits for the frontend, creates the namespace (or
# brings an existing one to the retention below) and registers the OrderStatus search attribute
# the workflow upserts (a workflow start that sets an unregistered attribute is refused). Safe to
# run again. Also works against any cluster the `temporal` CLI can reach with TEMPORAL_ADDRESS /
# TEMPORAL_API_KEY / TEMPORAL_TLS_* set (Temporal Cloud sets retention in its own console).
#
# Retention: how long Temporal keeps a closed workflow's history (an order's workflow closes when
# its steps are settled, or after PARK_TIMEOUT_SECONDS, 14 days, parked). Longer than that park
# timeout, so an order's history is still there while anyone may ask about it; the order and its
# dead letters stay in orderflow's database for good either way.
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

if temporal operator namespace describe --namespace "$namespace" >/dev/null 2>&1; then
  temporal operator namespace update --namespace "$namespace" --retention "$retention" >/dev/null
else
  temporal operator namespace create --namespace "$namespace" --retention "$retention"
fi

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
echo "namespace $namespace ready (retention $retention), OrderStatus registered"

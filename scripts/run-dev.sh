#!/usr/bin/env bash
# Starts the embedded stack in the foreground: Temporal dev server (with its Web UI), the local mail
# and warehouse sinks, the worker and the API. Ctrl-C stops all of them.
set -euo pipefail
mkdir -p .data/logs

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping orderflow..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

wait_for_port() {
  local port=$1 name=$2
  for _ in $(seq 1 100); do
    if (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$name did not open port $port; see .data/logs/" >&2
  exit 1
}

temporal server start-dev \
  --ip 127.0.0.1 --port 7233 --ui-ip 127.0.0.1 --ui-port 8233 \
  --db-filename .data/temporal.db \
  --search-attribute OrderStatus=Keyword \
  --sqlite-pragma journal_mode=wal --sqlite-pragma synchronous=normal \
  --log-level warn >.data/logs/temporal.log 2>&1 &
pids+=($!)
wait_for_port 7233 "Temporal dev server"

python -m devsinks >.data/logs/sinks.log 2>&1 &
pids+=($!)
wait_for_port "${SMTP_PORT:-1025}" "SMTP sink"

python worker.py >.data/logs/worker.log 2>&1 &
pids+=($!)

uvicorn api.main:app --host 127.0.0.1 --port 8000 --log-level warning &
pids+=($!)
wait_for_port 8000 "API"

if [ -z "${API_KEYS:-}" ]; then
  echo "WARNING: API_KEYS is not set: the API accepts requests from anyone (dev mode only)."
fi
cat <<TXT

orderflow is running (Ctrl-C stops everything; logs in .data/logs/)
  API docs        http://127.0.0.1:8000/docs
  Temporal UI     http://127.0.0.1:8233/namespaces/default/workflows
  Mail received   .data/mail/*.eml  (or http://127.0.0.1:8025/mail)
  Warehouse log   .data/warehouse.jsonl  (or http://127.0.0.1:8025/webhooks/deliveries)

Place an order:
  curl -i -X POST http://127.0.0.1:8000/orders \\
    -H 'Content-Type: application/json' -H "Idempotency-Key: \$(uuidgen || date +%s%N)" \\
    -d '{"customer_email":"ada@example.com","currency":"USD","payment_token":"tok_visa","items":[{"sku":"BOOK-1","quantity":2,"unit_price_cents":1250}]}'
TXT
wait -n "${pids[@]}"

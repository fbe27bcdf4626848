"""The review page for parked orders: server-rendered HTML over the same DeadLetterOperator the
API and the CLI use, so the page can do nothing the API could not.

`pages` renders, `actions` takes the forms' POSTs, `guards` holds their same-origin check and
who is acting, `views` the templates, filters and flash messages, `workflow` what Temporal says
about an order's run, `redrives` the bulk retries that run in the background."""

"""HTTP: the aiohttp application's middlewares and endpoints (the transport of /rpc,
/webhooks/payments, /readyz, /docs)."""

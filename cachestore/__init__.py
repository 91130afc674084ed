"""erllama's KV-row store: the ``erllama-cachestore`` daemon (``server``) and the library workers use
to reach it (``client.CacheClient``). See cachestore/README.md."""

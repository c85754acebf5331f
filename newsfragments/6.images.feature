zwrm-control serves an OCI Distribution registry at `/v2/`; `zwrm images push|list|rm` and any
OCI client (e.g. oras) use it. Agents pull images by digest, verify SHA-256 while streaming,
resume dropped downloads and keep them in an LRU cache with watermarks; `zwrm host status` shows
the cache's size, limit, hits and misses.

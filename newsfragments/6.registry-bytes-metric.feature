The control plane's `/metrics` has `zwrm_registry_bytes`, the disk the image registry's blobs take.

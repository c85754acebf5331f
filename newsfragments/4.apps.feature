Apps: `zwrm apps create|list`, `zwrm deploy` (image, vCPUs, memory, replicas, region and
datacenter, service port and health check, local volumes), `zwrm scale`, `zwrm status`,
`zwrm destroy`, `zwrm machines`, `zwrm logs`, `zwrm volumes create|list|destroy`. A replica's
volume pins it to the host it was created on; scaling down never deletes a volume.

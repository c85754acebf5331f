Sparse raw disks are stored sparse in the registry and cached sparse on agents (blocks of zeros are
left as holes): a 1 GiB disk with 369 MB of data costs about 369 MB, not 1.1 GB, on each host.

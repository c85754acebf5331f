A real Debian 12 cloud image for tests and benchmarks (`python -m zwrm.testing.debian`): built with
mmdebstrap (systemd, cloud-init, openssh-server, a small HTTP service) into kernel + initrd + a
qcow2 root disk, cached under /var/cache/zwrm-ci/images/<recipe hash>/ (about 10 minutes the first
time).

Debian packages (zwrm, zwrm-control, zwrm-agent) with hardened systemd units, `install.sh` to add a
control plane or a worker host in one command, and zwrm.pki: the cluster CA, host certificates and
join tokens that carry the CA's fingerprint, so agents verify the control plane before sending
anything. `zwrm tokens create|list|revoke`. See docs/install.md.

`install.sh --control-plane` writes `/etc/zwrm/cli.toml` (URL, CA file, operator token file; 0640 root:zwrm), so the `zwrm host list` it prints works as shown on the control-plane host.

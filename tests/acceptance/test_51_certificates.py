"""
Step: a host whose certificate expired while it was off, on the installed TLS cluster.

A worker's machine off for most of a year comes back with a host certificate that has
expired (docs/install.md, "TLS and join tokens"):

 - its agent stopped, its certificate replaced by one from the cluster CA that expired a
   minute ago (as the machine would find it), then started: it connects with its credential
   alone, registers, and renews at once (new key, a year's certificate for its own host id,
   the files still private to the zwrm user); both lines are in its log;
 - the app answers through both workers' ingresses, the renewed one's volume endpoint
   included in the cluster's network again.

No service logs a traceback or a critical line meanwhile.
"""

import datetime
import os
import stat

import pytest

from tests.acceptance.cluster import AGENTS, poll
from zwrm import pki

pytestmark = pytest.mark.acceptance


def test_a_host_certificate_that_expired_is_renewed(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    host = AGENTS[-1]
    host_id = cluster.host_ids[host]
    tls = cluster.host_dir(host, "lib", "agent", pki.AGENT_TLS_DIR)
    offsets = cluster.log_offsets()

    with cluster.phase("its agent stopped, its host certificate expired meanwhile"):
        cluster.agents[host].stop()
        ca = pki.CertificateAuthority.load(cluster.host_dir("cp", "lib", "control", "pki"))
        owner = os.stat(os.path.join(tls, "host.pem"))
        expired = pki.HostCredentials(ca.certificate_pem, *ca.issue_host(
            host_id, lifetime=datetime.timedelta(seconds=-60)))
        expired.save(tls)
        for name in ("ca.pem", "host.pem", "host.key"):
            os.chown(os.path.join(tls, name), owner.st_uid, owner.st_gid)

    with cluster.phase("started: in with its credential, renewed at once"):
        service = cluster.agents[host] = cluster.start(host, "zwrm-agent.service")
        cluster.wait_ready(f"{host} back with an expired certificate")
        poll(lambda: "host certificate renewed" in service.log(), 60, interval=0.5,
             what=f"{host}'s certificate renewed")
        log = service.log()
        assert "expired" in log and "connecting without it, to renew it" in log, log[-2000:]
        renewed = pki.HostCredentials.load(tls)
        assert renewed.host_id == host_id
        assert renewed.key_pem != expired.key_pem
        left = renewed.not_valid_after - datetime.datetime.now(datetime.UTC)
        assert left > datetime.timedelta(days=360), left
        for name in ("host.pem", "host.key"):
            st = os.stat(os.path.join(tls, name))
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, owner.st_uid), name

    with cluster.phase("the app answers through both workers"):
        for body in cluster.app_everywhere("/cgi-bin/read?index.txt", wait=60).values():
            assert body.encode() == web["data"]

    cluster.check_logs_since(offsets)

"""
zwrm's public-key infrastructure: the cluster CA, server and host certificates, and join tokens.

Every connection between hosts is TLS from the first byte:

  - On first start the control plane creates a certificate authority in its data directory
    (L{CertificateAuthority.load_or_create}) and a server certificate signed by it. Its TLS
    listeners use L{CertificateAuthority.server_context}, which sends the CA certificate along
    with the server certificate, so that a client can see which CA signed the server.
  - An operator creates a join token (L{JoinTokens.create}); its text carries the CA's
    fingerprint (L{JoinToken}). A joining agent connects with L{pinned_client_context}: the
    handshake is refused unless the server's certificate is signed by the CA whose SHA-256
    fingerprint the token names, so the agent verifies the control plane before it sends
    anything (as C{kubeadm join --discovery-token-ca-cert-hash} does).
  - The agent makes a key and a certificate request for its host id (L{make_host_request}); the
    control plane checks the token (L{JoinTokens.check}) and signs the request
    (L{CertificateAuthority.sign_host_request}). The certificate names the host id as SAN URI
    C{zwrm:host:<id>}; L{host_id_of} reads it back from a peer certificate, and
    L{check_host_certificate} refuses a certificate for another host id.
  - Agents keep their credentials in L{HostCredentials}, which builds the contexts for the
    control-plane connection (client certificate) and for volume transfers between agents
    (both sides present host certificates from the same CA and check each other's host id).

By responsibility:

  - L{zwrm.pki.ca}: the CA and certificates (control plane);
  - L{zwrm.pki.agent_tls}: the agent's pinned TLS and its credentials;
  - L{zwrm.pki.join_tokens}: join tokens, their text, checks and table;
  - L{zwrm.pki.main}: C{python -m zwrm.pki} (install.sh).

This module re-exports their public names, so C{from zwrm import pki; pki.X} keeps working.
"""

from zwrm.pki.agent_tls import (
    AGENT_TLS_DIR,
    CertificateRejected,
    HostCredentials,
    PinnedClientTLSOptions,
    agent_client_options,
    pinned_client_context,
    save_ca,
)
from zwrm.pki.ca import (
    CA_LIFETIME,
    CLOCK_SKEW,
    CONTROL_PKI_DIR,
    HOST_LIFETIME,
    HOST_URI_PREFIX,
    RENEW_BEFORE,
    SERVER_LIFETIME,
    CertificateAuthority,
    RenewableServerOptions,
    check_host_certificate,
    check_host_id,
    expiry_of,
    expiry_time,
    fingerprint_of,
    host_id_of,
    make_host_request,
    normalize_fingerprint,
    renewal_time,
    server_options,
)
from zwrm.pki.join_tokens import (
    DEFAULT_TOKEN_TTL,
    TOKEN_PREFIX,
    JoinToken,
    JoinTokens,
    check_join_token,
    token_state,
)
from zwrm.pki.main import main
from zwrm.tokens import hash_secret

__all__ = [
    "AGENT_TLS_DIR",
    "CA_LIFETIME",
    "CLOCK_SKEW",
    "CONTROL_PKI_DIR",
    "DEFAULT_TOKEN_TTL",
    "HOST_LIFETIME",
    "HOST_URI_PREFIX",
    "RENEW_BEFORE",
    "SERVER_LIFETIME",
    "TOKEN_PREFIX",
    "CertificateAuthority",
    "CertificateRejected",
    "RenewableServerOptions",
    "HostCredentials",
    "JoinToken",
    "JoinTokens",
    "PinnedClientTLSOptions",
    "agent_client_options",
    "check_host_certificate",
    "check_host_id",
    "check_join_token",
    "expiry_of",
    "expiry_time",
    "fingerprint_of",
    "hash_secret",
    "host_id_of",
    "main",
    "make_host_request",
    "normalize_fingerprint",
    "pinned_client_context",
    "renewal_time",
    "save_ca",
    "server_options",
    "token_state",
]

"""
Secrets that more than one part of zwrm makes or checks: the control plane, the agent and the
CLI may all import this module (it imports nothing of theirs).

 - L{mint_token}: a new one-time volume-transfer token (the control plane mints it, both
   agents of a transfer receive it).
 - L{hash_secret}: the stored form of every token and credential (join tokens, operator
   tokens, host credentials): what the store keeps instead of the secret.
"""

import hashlib
import secrets


def mint_token():
    """
    @return: a new one-time transfer token (URL-safe text, 256 bits of randomness).
    """
    return secrets.token_urlsafe(32)


def hash_secret(secret):
    """
    The stored form of a token or credential.

    @param secret: the secret as given to a client.
    @type secret: L{str}
    @return: its SHA-256, hex.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


__all__ = ["hash_secret", "mint_token"]

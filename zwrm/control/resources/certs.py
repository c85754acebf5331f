"""
The certificates resource: the TLS certificates (and their private keys) that the ingress
uses to terminate TLS for published ports in C{https} mode (C{zwrm deploy --publish
443:8080/https --domain NAME}; see docs/networking.md).

A row of C{certs}: C{id} (the domain, lower case: C{www.example.com} or a wildcard
C{*.example.com}), C{cert} (PEM: the certificate, then its chain), C{key} (PEM, never on
the wire but to agents), C{names} (JSON text: the DNS names it is valid for), C{subject},
C{issuer}, C{not_before}, C{not_after}, C{fingerprint} (SHA-256 of the certificate, hex),
C{created_at}, C{updated_at}.  The store's file is private (0600 in a 0700 directory).

A certificate is checked before it is stored (L{check_certificate}): the certificate and
key parse as PEM, the key matches the certificate, it has not expired, and its names cover
the domain.  A bad one is a C{zwrm.error.invalid_argument} naming the argument, and nothing
is stored.

Events (C{zwrm.event.cert}): C{added}, C{replaced}, C{removed}; the payload is the wire
form (L{wire}: never the key) with C{reason}.

The operator's procedures (L{CertAPI}): C{zwrm.cert.add(domain, cert, key)},
C{zwrm.cert.list()}, C{zwrm.cert.remove(domain)}.  L{CertPublisher} gives every agent the
whole set (C{zwrm.agent.<host>.ingress.certs}) after each change and when the agent
registers.
"""

import json
import re

from autobahn import wamp
from twisted.internet import defer
from twisted.logger import Logger

from zwrm import errors
from zwrm.control.resources import Resource, update_method

TOPIC = "zwrm.event.cert"
TABLE = "certs"
MAX_CERT = 64 * 1024
MAX_KEY = 16 * 1024
DOMAIN_RE = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")

#: What an agent's ingress procedure is called (under C{zwrm.agent.<host_id>.}).
AGENT_VERB = "ingress.certs"


def schema_v6(db):
    """The C{certs} table (store schema version 6)."""
    db[TABLE].create(
        {
            "id": str,
            "cert": str,
            "key": str,
            "names": str,
            "subject": str,
            "issuer": str,
            "not_before": float,
            "not_after": float,
            "fingerprint": str,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
    )


def check_domain(domain):
    """
    @return: C{domain} in lower case.
    @raise errors.InvalidArgument: (argument C{domain}) unless it is a DNS name, or
        C{*.} and one.
    """
    if not isinstance(domain, str) or len(domain) > 253 or not DOMAIN_RE.match(domain.lower()):
        raise errors.InvalidArgument(
            f"domain must be a DNS name such as www.example.com (or *.example.com), "
            f"not {domain!r}", argument="domain")
    return domain.lower()


def name_covers(name, domain):
    """
    Whether a certificate's DNS C{name} covers C{domain} (RFC 6125: a wildcard stands for
    exactly one left-most label; a wildcard domain needs a wildcard name).
    """
    name, domain = name.lower().rstrip("."), domain.lower()
    if name == domain:
        return True
    if name.startswith("*.") and not domain.startswith("*."):
        head, _, rest = domain.partition(".")
        return bool(head) and rest == name[2:]
    return False


def check_certificate(domain, cert_pem, key_pem, now):
    """
    Check a certificate and key for C{domain} at time C{now}.

    @return: C{{"names", "subject", "issuer", "not_before", "not_after", "fingerprint"}}.
    @raise errors.InvalidArgument: naming the argument at fault (C{domain}, C{cert} or
        C{key}): a PEM that does not parse, an encrypted or unsupported key, a key that is
        not the certificate's, an expired certificate, names that do not cover the domain.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    domain = check_domain(domain)
    if not isinstance(cert_pem, str) or not cert_pem.strip():
        raise errors.InvalidArgument("cert must be the certificate in PEM", argument="cert")
    if not isinstance(key_pem, str) or not key_pem.strip():
        raise errors.InvalidArgument("key must be the private key in PEM", argument="key")
    if len(cert_pem) > MAX_CERT:
        raise errors.InvalidArgument(f"cert is at most {MAX_CERT} characters", argument="cert")
    if len(key_pem) > MAX_KEY:
        raise errors.InvalidArgument(f"key is at most {MAX_KEY} characters", argument="key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem.encode())
    except ValueError as e:
        raise errors.InvalidArgument(f"cert is not a PEM certificate: {e}",
                                     argument="cert") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except TypeError:
        raise errors.InvalidArgument("key is encrypted: give it without a passphrase "
                                     "(e.g. openssl pkey -in KEY -out PLAIN)",
                                     argument="key") from None
    except (ValueError, Exception) as e:
        raise errors.InvalidArgument(f"key is not a PEM private key: {e}",
                                     argument="key") from None

    def spki(public_key):
        return public_key.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)

    try:
        leaf_key = leaf.public_key()
    except Exception as e:
        raise errors.InvalidArgument(f"cert has a public key zwrm cannot use: {e}",
                                     argument="cert") from None
    if spki(key.public_key()) != spki(leaf_key):
        raise errors.InvalidArgument("key does not belong to the certificate (their public "
                                     "keys differ)", argument="key")
    not_after = leaf.not_valid_after_utc.timestamp()
    not_before = leaf.not_valid_before_utc.timestamp()
    if not_after <= now:
        raise errors.InvalidArgument(
            f"cert expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
            argument="cert")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                 if isinstance(a.value, str)]
    if not any(name_covers(n, domain) for n in names):
        raise errors.InvalidArgument(
            f"cert is for {', '.join(names) or 'no DNS name'}, not {domain}", argument="cert")
    return {"names": list(names), "subject": leaf.subject.rfc4514_string(),
            "issuer": leaf.issuer.rfc4514_string(), "not_before": not_before,
            "not_after": not_after,
            "fingerprint": leaf.fingerprint(hashes.SHA256()).hex()}


def wire(row):
    """
    The wire form of a certificate: C{domain, names, subject, issuer, not_before,
    not_after, fingerprint, created_at, updated_at} (never its key).
    """
    names = row.get("names")
    if isinstance(names, str):
        names = json.loads(names)
    return {"domain": row["id"], "names": names or [], "subject": row.get("subject"),
            "issuer": row.get("issuer"), "not_before": row.get("not_before"),
            "not_after": row.get("not_after"), "fingerprint": row.get("fingerprint"),
            "created_at": row.get("created_at"), "updated_at": row.get("updated_at")}


class Certs(Resource):
    """The certificates of the ingress: rows, update methods, events."""

    topic = TOPIC

    def all(self):
        """Every row, by domain, keys included (a Deferred)."""
        return self._store.select(TABLE, order_by="id")

    def get(self, domain):
        """The row of C{domain}, or L{None} (a Deferred)."""
        return self._store.get(TABLE, domain)

    @update_method
    async def put(self, domain, cert, key, info):
        """
        Store the certificate of C{domain} (checked: L{check_certificate} gave C{info}),
        replacing one it had; event C{added} or C{replaced}.
        """
        now = self._clock.seconds()
        old = await self.get(domain)
        row = {"id": domain, "cert": cert, "key": key, "names": json.dumps(info["names"]),
               "subject": info["subject"], "issuer": info["issuer"],
               "not_before": info["not_before"], "not_after": info["not_after"],
               "fingerprint": info["fingerprint"],
               "created_at": old["created_at"] if old else now, "updated_at": now}
        kind = "replaced" if old else "added"
        await self.store_with_event(self._store.upserting(TABLE, row), kind, domain,
                                    dict(wire(row), reason=kind))
        return row

    @update_method
    async def remove(self, domain):
        """
        Delete the certificate of C{domain}; event C{removed}.

        @raise errors.NotFound: there is none.
        """
        row = await self.get(domain)
        if row is None:
            raise errors.NotFound(f"no certificate for {domain}")
        await self.store_with_event(self._store.deleting(TABLE, domain), "removed", domain,
                                    dict(wire(row), reason="removed"))
        return row


class CertAPI:
    """
    The operator's C{zwrm.cert.*} procedures.

    @param certs: the L{Certs} resource.
    """

    def __init__(self, clock, certs):
        self.clock = clock
        self.certs = certs

    @wamp.register("zwrm.cert.add")
    async def add(self, domain, cert, key):
        """
        Store (or replace) the certificate and key the ingress serves for C{domain}.

        @return: the certificate's wire form.
        @raise errors.InvalidArgument: naming C{domain}, C{cert} or C{key} (L{check_certificate}).
        """
        domain = check_domain(domain)
        info = check_certificate(domain, cert, key, self.clock.seconds())
        return wire(await self.certs.put(domain, cert, key, info))

    @wamp.register("zwrm.cert.list")
    async def list(self):
        """Every certificate's wire form (never a key), by domain."""
        return [wire(r) for r in await self.certs.all()]

    @wamp.register("zwrm.cert.remove")
    async def remove(self, domain):
        """Remove the certificate of C{domain}. @return: C{{"domain", "removed": True}}."""
        domain = check_domain(domain)
        await self.certs.remove(domain)
        return {"domain": domain, "removed": True}


def bundle(rows):
    """What an agent gets: C{{"certs": [{"domain", "cert", "key", "fingerprint"}]}}."""
    return {"certs": [{"domain": r["id"], "cert": r["cert"], "key": r["key"],
                       "fingerprint": r.get("fingerprint")} for r in rows]}


class CertPublisher:
    """
    Gives every agent the ingress certificates: the whole set, on every change (to every
    host whose executor can be called) and when an agent registers (to that host).  A call
    that fails (the host went away, a user-mode agent without an ingress) is logged; the
    host gets the set again when it registers.

    Hosts that need the set wait in one batch: one push at a time reads the set once and
    sends it to every host of its batch (L{CONCURRENT} calls at a time), so a later set is
    never overtaken, and 20,000 agents registering at once cost a few reads of the store,
    not one each, in turn.

    @param certs: the L{Certs} resource.
    @param hosts: the hosts resource (C{entries()}, C{subscribe}).
    @param call: C{call(host_id, verb, *args)}: an executor call
        (L{zwrm.control.registry.HostRegistry.call_executor}).
    @param available: C{available(host_id)} -> whether its executor may be called now.
    """

    log = Logger()
    CONCURRENT = 256  # calls of a push in flight at once

    def __init__(self, certs, hosts, call, available=lambda host_id: True):
        self._certs = certs
        self._hosts = hosts
        self._call = call
        self._available = available
        self.sent = 0
        self.reads = 0  # reads of the set (one per push)
        self._pending = set()  # hosts waiting for the next push
        self._pushing = False  # whether pushes are running
        self._waiters = []  # Deferreds fired when they stop
        self._closed = False
        self._unsubscribe = [certs.subscribe(self._cert_event),
                             hosts.subscribe(self._host_event)]

    def close(self):
        """Stop: no push starts after this (one running finishes its calls)."""
        self._closed = True
        self._pending.clear()
        for u in self._unsubscribe:
            u()
        self._unsubscribe = []

    def _cert_event(self, event):
        self.push([e.record["id"] for e in self._hosts.entries()])

    def _host_event(self, event):
        payload = event.get("payload") or {}
        if payload.get("reason") == "agent_registered":
            self.push([event.get("subject")])

    def push(self, host_ids):
        """
        Send the current set to each of C{host_ids} that can be called (with the next push).

        @return: a Deferred firing when the pushes that run from now on are done.
        """
        if self._closed:
            return defer.succeed(None)
        self._pending.update(h for h in host_ids if h)
        done = defer.Deferred()
        self._waiters.append(done)
        if not self._pushing:
            self._pushing = True
            defer.ensureDeferred(self._pushes())
        return done

    async def _pushes(self):
        try:
            while self._pending and not self._closed:
                batch, self._pending = self._pending, set()
                await self._push(sorted(batch))
        except Exception:
            self.log.failure("giving the ingress certificates")
        finally:
            self._pushing = False
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    async def _push(self, host_ids):
        host_ids = [h for h in host_ids if self._available(h)]
        if not host_ids:
            return 0
        try:
            rows = await self._certs.all()
        except Exception:
            if not self._closed:  # else the store closed under the read: shutting down
                self.log.failure("reading the ingress certificates")
            return 0
        if self._closed:
            return 0
        self.reads += 1
        doc = bundle(rows)
        sent = 0

        async def give(host_id):
            nonlocal sent
            try:
                await self._call(host_id, AGENT_VERB, doc)
            except Exception as e:
                self.log.info("host {host_id}: ingress certificates not given ({e}); "
                              "again when it registers", host_id=host_id, e=e)
                return
            sent += 1
            self.sent += 1

        for i in range(0, len(host_ids), self.CONCURRENT):
            await defer.gatherResults([defer.ensureDeferred(give(h))
                                       for h in host_ids[i:i + self.CONCURRENT]])
        return sent

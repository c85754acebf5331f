"""
An agent's side of volume moves (L{VolumeTransfers}): its receiver and its sender, addressed
by volume id in its volume store.
"""


from twisted.application import service

from zwrm import errors
from zwrm.agent.transfer.receiver import VolumeReceiver
from zwrm.agent.transfer.sender import VolumeSender


class VolumeTransfers(service.MultiService):
    """
    An agent's side of volume moves: its receiver endpoint and its sender, addressed by volume
    id in its volume store. The agent's executor exposes these as procedures for the control
    plane (which mints the tokens).

    @ivar receiver: the L{VolumeReceiver}.
    @ivar sender: the L{VolumeSender}.
    """

    def __init__(
        self,
        reactor,
        store,
        credentials,
        endpoint="tcp:0:interface=127.0.0.1",
        clock=None,
        **options,
    ):
        """
        @param store: the agent's L{zwrm.agent.volumes.VolumeStore}.
        @param credentials: the agent's L{zwrm.pki.HostCredentials}.
        @param endpoint: where the receiver listens (loopback unless configured).
        @param options: passed to L{VolumeReceiver} (C{idle_timeout}, C{ttl}) and
            L{VolumeSender} (C{retries}, C{backoff}, C{connect_timeout}, C{verify_timeout}).
        """
        service.MultiService.__init__(self)
        self.store = store
        receiving = {k: options.pop(k) for k in ("ttl",) if k in options}
        sending = {
            k: options.pop(k)
            for k in ("retries", "backoff", "connect_timeout", "verify_timeout")
            if k in options
        }
        if "idle_timeout" in options:
            receiving["idle_timeout"] = sending["idle_timeout"] = options.pop("idle_timeout")
        if options:
            raise TypeError(f"unknown options {sorted(options)}")
        self.receiver = VolumeReceiver(
            reactor,
            store,
            credentials.server_context(),
            endpoint=endpoint,
            clock=clock,
            **receiving,
        )
        self.receiver.setServiceParent(self)
        self.sender = VolumeSender(reactor, credentials.peer_client_context, clock=clock, **sending)

    def use_credentials(self, credentials):
        """
        Present C{credentials} (the host's renewed L{zwrm.pki.HostCredentials}) from now
        on: to the connections the receiver accepts (its L{zwrm.pki.RenewableServerOptions})
        and to the receivers the sender connects to.  Connections made before keep the
        certificate they had.
        """
        self.receiver.tls.renew(credentials.cert_pem, credentials.key_pem)
        self.sender.tls = credentials.peer_client_context

    def listen(self):
        """
        Start the receiver's listener (outside a service hierarchy).

        @return: a L{Deferred} firing with the listening port.
        """
        return self.receiver.listen()

    def receive(self, token, volume_id, size, source=None, ttl=None, snapshot_id=None):
        """
        Expect volume C{volume_id} (or its snapshot C{snapshot_id}) from host C{source}
        for C{token}.

        @return: C{{"port": <the receiver's TCP port>}}: the sender connects there.
        @raise errors.Unavailable: the receiver is not listening.
        @raise errors.Conflict: the volume exists here or is already being received.
        @raise errors.InvalidArgument: bad token, volume id or size.
        """
        if self.receiver.port is None:
            raise errors.Unavailable("the volume receiver is not listening")
        self.receiver.expect(token, volume_id, size, ttl=ttl, peer=source,
                             snapshot_id=snapshot_id)
        return {"port": self.receiver.port.getHost().port}

    def send(self, volume_id, host, port, token, target, mode="bulk", commit=True, progress=None,
             snapshot_id=None):
        """
        Stream local volume C{volume_id} (or its snapshot C{snapshot_id}, which never
        changes) to host C{target} at C{host}:C{port}.

        @return: the L{Deferred} of L{VolumeSender.send}.
        @raise errors.NotFound: no such volume (or snapshot) here.
        """
        if snapshot_id is not None:
            path = self.store.snapshot_info(volume_id, snapshot_id)["path"]
        elif not self.store.exists(volume_id):
            raise errors.NotFound(f"no volume {volume_id!r} on this host")
        else:
            path = self.store.path(volume_id)
        return self.sender.send(
            host, port, token, path, target, mode=mode, commit=commit, progress=progress
        )

    def cancel(self, token):
        """
        Cancel an incoming transfer (see L{VolumeReceiver.cancel}).
        """
        return self.receiver.cancel(token)

    def status(self, token):
        """
        @return: the state of an incoming transfer (see L{IncomingTransfer.status}).
        @raise errors.NotFound: no such token.
        """
        return self.receiver.transfer(token).status()

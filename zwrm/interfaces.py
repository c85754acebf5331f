"""
The contracts between zwrm's parts, and between zwrm and its plugins.

Each interface's docstrings are its specification: implementations (ours, third-party,
and the fakes used in unit tests) are held to them by contract test suites in tests/
that run against every implementation.

Sections, each owned by the part it describes:
 - WAMP router: authentication and authorization.
 - Placement: scheduler strategies (plugins).
 - Hypervisor drivers (plugins).
 - Images.
"""

from zope.interface import Attribute, Interface  # noqa: F401

# --- WAMP router -----------------------------------------------------------------------


class IAuthenticator(Interface):
    """
    Decides who a joining WAMP session is.  The control plane implements it; the
    router (L{zwrm.wamp.router.Router}) calls it during HELLO / CHALLENGE /
    AUTHENTICATE.  Every method may fail with L{zwrm.errors.AuthenticationFailed},
    whose message the client sees in the ABORT.
    """

    def authmethods():
        """
        The authmethods offered, in preference order: any of C{'cryptosign'},
        C{'wampcra'}, C{'ticket'}, C{'anonymous'}.  A client is accepted with the
        first of its own HELLO authmethods that is in this list.  C{'anonymous'}
        sessions get a random authid and the role C{'anonymous'}.
        """

    def authenticate_ticket(realm, authid, ticket):
        """
        Deferred firing with a L{zwrm.wamp.auth.Principal}, or failing with
        L{zwrm.errors.AuthenticationFailed}.
        """

    def wampcra_secret(realm, authid):
        """
        Deferred firing with C{(secret: bytes, Principal)} or failing with
        L{zwrm.errors.AuthenticationFailed}.
        """

    def cryptosign_principal(realm, authid, pubkey_hex):
        """
        Deferred firing with a Principal for that Ed25519 public key (64 hex
        digits), or failing with L{zwrm.errors.AuthenticationFailed}.  C{authid}
        is what the client asked for and may be C{None}.
        """


class IAuthorizer(Interface):
    """
    Decides whether a joined session may do something.
    """

    def authorize(session, uri, action):
        """
        C{True} if C{session} (has C{.authid}, C{.authrole}, C{.authextra},
        C{.session_id}) may C{action} (C{'call'}, C{'register'}, C{'publish'},
        C{'subscribe'}) C{uri}.  Synchronous, called on every message, must be
        fast.

        Pattern-based subscriptions and registrations (prefix or wildcard) are
        only allowed if the authorizer also has
        C{authorize_pattern(session, pattern, action, match)} and it returns
        C{True}; otherwise they are denied.
        """

# --- Placement -------------------------------------------------------------------------


class IPlacementStrategy(Interface):
    """
    Ranks the hosts a machine could run on.  The contract for strategy plugin authors.

    A strategy never decides whether a host I{can} take a machine: the scheduler core
    (L{zwrm.scheduler.Scheduler}) has already removed every host that is not ready,
    is in the wrong region or datacenter, lacks a required label, lacks the vCPUs, memory
    or disk, is excluded, or is not the host a volume pins the machine to.  The strategy
    only orders what is left; the core takes the first host in that order, and breaks
    ties by host id (so equal keys give a deterministic choice).

    A strategy is an object providing this interface and C{twisted.plugin.IPlugin}, bound
    to a name in a module of a plugin directory (see docs/plugins.md)::

        @implementer(IPlugin, IPlacementStrategy)
        class LeastRecentlyUsed:
            name = "least-recently-used"
            description = "the host that received a machine longest ago first"
            def key(self, host):
                return host.last_placed

        least_recently_used = LeastRecentlyUsed()

    Speed: L{key} depends on the host alone, so the core keeps every host sorted by it
    and updates only the one host a placement changes; a placement then costs about
    O(log n) instead of a scan of all n hosts.  A strategy whose order depends on the
    request too provides L{IRequestAwarePlacementStrategy} and is scanned exhaustively.
    """

    name = Attribute(
        "The name operators write in the configuration (C{[scheduler] strategy = ...}): "
        "lower case, digits and dashes.  Unique among the installed strategies."
    )

    description = Attribute("One line for operators, shown when they list strategies.")

    def key(host):
        """
        The rank of C{host}: hosts with smaller keys are chosen first.

        Called by the core whenever the host's state, capacity, labels or allocation
        change (never during a placement's search), so it must be a pure function of the
        host's attributes, cheap, and never raise.  Keys of all hosts must be mutually
        comparable (numbers, or tuples of numbers and strings of the same shape).

        @param host: a read-only view of one host (L{zwrm.scheduler.Host}) with:
            C{id}, C{region}, C{datacenter}, C{labels} (a dict of str to str);
            capacity C{vcpus}, C{memory_mb}, C{disk_mb}; in use C{used_vcpus},
            C{used_memory_mb}, C{used_disk_mb}; free C{free_vcpus}, C{free_memory_mb},
            C{free_disk_mb}; C{machines}, the number of machines placed there;
            C{utilization}, the largest of the used/capacity fractions (0.0 to 1.0);
            C{last_placed}, a counter that grows with every placement anywhere, as it
            was at this host's latest placement (0 if none).
        @return: a value comparable with every other host's key.
        """


class IRequestAwarePlacementStrategy(IPlacementStrategy):
    """
    A strategy whose ranking depends on what is being placed (e.g. a machine's soft
    label preferences).  Simpler to write, slower to run: for every placement the core
    calls L{score} on every host that passed the filters, which is O(n) in the number
    of hosts.  Prefer L{IPlacementStrategy.key} when the order can do without the
    request.
    """

    def score(host, request):
        """
        The rank of C{host} for C{request}: smaller first; ties are broken by
        L{IPlacementStrategy.key}, then by host id.

        @param host: as for L{IPlacementStrategy.key}; it already fits C{request}.
        @param request: the L{zwrm.scheduler.PlacementRequest}: C{vcpus},
            C{memory_mb}, C{disk_mb}, C{region}, C{datacenter}, C{pinned_host},
            C{constraints} (labels the host must have) and C{preferences} (labels it
            should have).
        @return: a value comparable with the other hosts' scores for this request.
        """


# --- Hypervisor drivers ----------------------------------------------------------------

#: The states a hypervisor driver reports for a machine.
#:  - C{running}: the hypervisor process is up (the guest may still be booting);
#:  - C{stopped}: it ended because it was asked to (L{IHypervisorDriver.stop}) or because the
#:    guest powered itself off;
#:  - C{failed}: it ended any other way (crashed, killed, failed to start, vanished while the
#:    agent was down).
MACHINE_STATES = ("running", "stopped", "failed")


class IHypervisorDriverPlugin(Interface):
    """
    A hypervisor driver plugin: what C{zwrm.plugins.find(IHypervisorDriverPlugin, name)} finds.

    A plugin module in C{zwrm/plugins/} (or an operator's plugin directory) defines an object
    providing C{twisted.plugin.IPlugin} and this interface. The agent creates one driver per
    process with L{create}.
    """

    name = Attribute("The name operators configure (C{[agent] driver = \"qemu\"}), a str.")
    description = Attribute("One line for C{zwrm-agent --help} and docs, a str.")

    def create(reactor, config):
        """
        Make a driver.

        @param reactor: the reactor (process, time and UNIX-socket interfaces) the driver uses;
            never the global one.
        @param config: a dict; C{config["root"]} is the directory under which the driver keeps
            one directory per machine (it exists and belongs to the driver). Other keys are the
            driver's own (for qemu: C{accel}, C{qemu_binary}, C{stop_timeout}).
        @return: an L{IHypervisorDriver} provider.
        @raise zwrm.errors.InvalidArgument: if the configuration is unusable; the message says
            which key and why.
        """


class IHypervisorDriver(Interface):
    """
    Runs virtual machines on this host.

    The agent's executor is the only caller. It gives each machine an id unique on the host
    and a driver-level spec whose paths are local files. The driver keeps whatever it needs
    to find a machine again (pid file, control socket, console log) in C{<root>/<id>/}, so a
    new agent process can L{recover} machines an old one started; machines must survive the
    agent process exiting.

    A machine spec is a dict:
     - C{id}: the machine id (str: letters, digits, C{-}, C{_}, C{.}; at most 64);
     - C{kernel}, C{initrd}: paths or C{None}; C{disk}: path of a boot disk image or C{None}
       (at least one of C{kernel} and C{disk});
     - C{cmdline}: the kernel command line (str, used with C{kernel});
     - C{vcpus} (int >= 1), C{memory_mb} (int >= 32);
     - C{volumes}: a list of C{{"id", "path"}}: raw ext4 images attached in this order as
       virtio-blk devices (the guest sees C{vda}, C{vdb}, ...);
     - C{forwards}: a list of C{{"guest": port, "host": port}}: TCP ports of the guest reachable
       at C{127.0.0.1:host} on this host.

    A machine status is a dict: C{id}, C{state} (one of L{MACHINE_STATES}), C{pid} (int or
    C{None}), C{reason} (str: why it is in that state, for people), C{console} (path of the
    serial console log), C{forwards} (as in the spec).

    Every method that fails for a reason a client can act on raises (or fails its Deferred
    with) a C{zwrm.errors} error: C{NotFound} for an unknown id, C{Conflict} for a state that
    forbids the call, C{InvalidArgument} for a bad spec, C{Unavailable} when the hypervisor
    cannot run.
    """

    name = Attribute("The driver's name, as its plugin's.")

    def start(spec):
        """
        Start a machine.

        @param spec: a machine spec (see the class docstring).
        @return: a Deferred that fires with the machine's status once its hypervisor process
            is up and controllable (not when the guest has booted), or fails with
            C{InvalidArgument} (bad spec), C{Conflict} (the id is running already) or
            C{Unavailable} (the hypervisor could not start; the message carries its error).
            A machine that fails to start ends in state C{failed}.
        """

    def stop(machine_id, timeout=None):
        """
        Stop a machine: ask the guest to power off (ACPI), and if it has not within
        C{timeout} seconds (the driver's default if C{None}), stop it hard.

        Stopping a machine that is not running is not an error.

        @return: a Deferred firing with its status (C{stopped}) once it has ended.
        @raise NotFound: for an unknown id.
        """

    def destroy(machine_id):
        """
        End a machine at once, if it runs, and forget it: remove its directory (console log
        included). Volumes are never touched. Destroying an unknown id is not an error.

        @return: a Deferred firing with C{None} once it is gone.
        """

    def status(machine_id):
        """
        @return: the machine's status (a dict, see the class docstring), synchronously.
        @raise NotFound: for an unknown id.
        """

    def list():
        """
        @return: the ids of every machine the driver knows (running or not), a list.
        """

    def recover():
        """
        Find the machines a previous agent process left in C{root}: take control of those
        that still run, mark the others C{failed} (reason: it ended while the agent was away).

        @return: a Deferred firing with the list of their statuses.
        """

    def console(machine_id, max_bytes=65536):
        """
        The tail of the machine's serial console log.

        @return: a Deferred firing with at most C{max_bytes} bytes (the most recent), decoded as
            UTF-8 with replacement.
        @raise NotFound: for an unknown id.
        """

    def subscribe(listener):
        """
        Call C{listener(status)} with a machine's new status each time it changes state on its
        own or because of a call: started, stopped, failed (a crash or a kill is noticed at
        once, not at the next poll).

        @return: a callable that unsubscribes.
        """

    def facts():
        """
        @return: a dict describing what this driver can do on this host, for the control
            plane: at least C{driver} (name) and C{accel} (the accelerator in use, e.g.
            C{"kvm"} or C{"tcg"}, once known, else C{None}).
        """

    def close():
        """
        Let go of every machine without stopping it (the agent is shutting down): close
        control connections, stop watching processes, report nothing more. The machines keep
        running; a new driver's L{recover} takes them over.

        @return: a Deferred firing with C{None}.
        """

# --- Images ----------------------------------------------------------------------------


class IImageCache(Interface):
    """
    An agent's local cache of zwrm VM images (see docs/images.md), filled from the control
    plane's registry. Implemented by L{zwrm.agent.images.ImageCache}; the executor uses it
    to turn an image reference into local files before starting a machine.

    Blobs are content-addressed (C{sha256:<hex>}). A blob is only ever used after its
    bytes were verified against its digest. Pinned blobs are never evicted.
    """

    def resolve(ref, pin=False):
        """
        Make image C{ref} (C{NAME[:TAG]} or C{NAME@sha256:<hex>}) available locally,
        pulling its manifest, config and layers as needed.

        @param pin: keep every blob of the image pinned after returning (the caller then
            calls L{unpin} once for each digest in C{digests}, e.g. when the machine is
            destroyed); without it the blobs are only pinned while this runs.
        @return: a Deferred (or coroutine) firing with a dict: C{kernel}, C{initrd}, C{disk}
            (local paths or C{None}), C{cmdline} (str), C{service_port} (int or C{None}),
            C{manifest} (the manifest digest), C{digests} (list of every blob digest).
            Fails with C{zwrm.errors}: C{InvalidArgument} (bad reference, not a zwrm image),
            C{NotFound}, C{Corrupt} (verification failed repeatedly), C{Unavailable}
            (registry unreachable), C{ResourceExhausted} (cache full of pinned/young blobs),
            C{AuthenticationFailed} / C{NotAuthorized} (credentials refused).
        """

    def pin(digest):
        """Protect C{digest} from eviction until a matching L{unpin} (pins count)."""

    def unpin(digest):
        """Release one pin; the blob counts as used now (kept at least C{min_age} more)."""

    def stats():
        """
        @return: a dict with at least C{size} and C{limit} (bytes), C{hits} and C{misses}
            (blob lookups served locally / downloaded), for C{zwrm host status}.
        """

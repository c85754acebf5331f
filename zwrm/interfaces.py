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
    serial console log), C{forwards} (as in the spec), C{paused} (C{None}, or for a
    C{running} machine that its hypervisor holds: C{"disk-full"} while a write to one of its
    disks waits for room on the host's file system; the driver resumes it once there is
    room, L{zwrm.drivers.diskfull}).

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
        once, not at the next poll), and each time a running machine is paused on a full disk
        or resumed.

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

class ILiveMigration(Interface):
    """
    Optional, for hypervisor drivers: move a running machine with its local disks to
    another host's driver while it runs, with a pause of milliseconds (docs/live-migration.md).
    A driver that provides it says so with C{@implementer(IHypervisorDriver, ILiveMigration)};
    callers check C{ILiveMigration.providedBy(driver)}.

    Roles: the B{source} driver runs the machine; the B{target} driver (another host) starts
    the same machine paused, over blank volumes of the same size, waiting for it. The steps,
    each a Deferred, in order:

     1. target: L{start_incoming} -> where it listens;
     2. source: L{start_mirror} into the target's exports; each disk's mirror sends
        C{BLOCK_JOB_READY} once in sync (from then on every guest write reaches both);
     3. source: L{start_migration} (RAM) with C{pause-before-switchover}; it sends
        C{MIGRATION} events (C{status}: C{setup}, C{active}, C{pre-switchover}, C{device},
        C{completed}, C{failed}, C{cancelled}) and C{MIGRATION_PASS} (C{pass}) per RAM pass;
     4. source, at C{pre-switchover} (the guest is paused): L{complete_switchover}: each
        mirror's final sync, then the migration continues to C{completed}; the source
        stays paused (C{postmigrate}) and is never resumed;
     5. target, when its own C{MIGRATION} event says C{completed}: L{finish_incoming}
        (exports closed, dirty bitmap started, guest resumed).

    Before step 5 the source can always be rolled back with L{cancel_migration}: it runs
    on, untouched; the target's machine ends (or is destroyed by the caller). Events are
    delivered to L{live_subscribe} listeners as C{listener(name, data)}, with QMP's event
    names and data (a fake driver sends the same).

    TLS: C{tls} arguments are C{None} or C{{"ca", "cert", "key", "peer"}}: PEM texts of the
    cluster CA and of this host's certificate and key, and the peer's host id; the two
    hypervisors then accept only each other (a target refuses any other source, a source any
    other target: the step fails with C{NotAuthorized}).

    Errors as for L{IHypervisorDriver}: C{NotFound}, C{Conflict} (the machine is not in a
    state for that step), C{InvalidArgument} (a bad argument, named), C{Unavailable}
    (the hypervisor or the peer failed), C{NotAuthorized} (TLS refused).

    C{recover()} of a driver that provides this interface resolves what a live migration
    left when the agent restarted: a target that had not completed its incoming migration
    is ended (the source still holds the machine); a source whose migration was under way
    is rolled back and runs on; a source whose migration completed stays paused and is
    reported so (the target holds the machine); a target whose incoming migration completed
    but that was not resumed stays paused until L{finish_incoming}.
    """

    def migration_facts():
        """
        @return: C{{"live": bool, "reason": str or None, "cpu_model", "machine_type",
            "accel"}}: whether machines here can migrate live, and what must be equal on
            both hosts of a migration.
        """

    def live_subscribe(machine_id, listener):
        """
        Call C{listener(name, data)} for each migration event of the machine: C{MIGRATION},
        C{MIGRATION_PASS}, C{BLOCK_JOB_READY}, C{BLOCK_JOB_COMPLETED}, C{BLOCK_JOB_CANCELLED},
        C{BLOCK_JOB_ERROR}, C{RESUME}, C{STOP} (QMP names and data).

        @return: a callable that unsubscribes. @raise NotFound: unknown machine.
        """

    def start_incoming(spec, listen, tls=None, postcopy=False):
        """
        Start machine C{spec} (a machine spec, its volumes blank files of the source's sizes)
        paused, as the target of a live migration, with an NBD server exporting each disk
        (writable) and a migration listener, both on address C{listen}, on free ports (a
        port taken meanwhile is retried). C{postcopy}: accept a post-copy migration (the
        source's L{start_migration} must say the same).

        @return: a Deferred firing with C{{"host", "nbd_port", "migration_port", "exports"}}
            (C{exports}: volume id, or C{"root"}, -> export name): what L{start_mirror} and
            L{start_migration} of the source take as C{target}.
        """

    def start_mirror(machine_id, target, tls=None, speed=None):
        """
        Start mirroring every disk of the running machine into the target's exports
        (write-blocking: once in sync, a guest write completes only when on both sides),
        at most C{speed} bytes/s until in sync.

        @return: a Deferred firing with C{{"jobs": [...]}} once the mirrors run; each sends
            C{BLOCK_JOB_READY} when in sync. On failure nothing is left running;
            C{ResourceExhausted} if this host's disk has no room to record the migration
            (the cold path needs none).
        """

    def start_migration(machine_id, target, tls=None, downtime_limit_ms=300,
                        auto_converge=False, postcopy=False, max_bandwidth=None):
        """
        Start the RAM migration to the target, pausing before the switchover.  Every
        mirror must be ready (else C{Conflict}).  C{auto_converge} lets the hypervisor slow
        the guest's CPUs when it dirties memory faster than the link; C{postcopy} allows
        L{start_postcopy} later.

        @return: a Deferred firing once the migration started.
        """

    def complete_switchover(machine_id, timeout=30.0):
        """
        At C{pre-switchover}: the mirrors' final sync (no pivot), then continue the
        migration. A mirror that does not complete fails it (the caller rolls back).

        @return: a Deferred.
        """

    def start_postcopy(machine_id):
        """Switch a migration started with C{postcopy=True} to post-copy. @return: a Deferred."""

    def finish_incoming(machine_id, announce=True):
        """
        Target: once the incoming migration completed, close the exports, start the
        verification's dirty bitmap and resume the guest (then announce its network
        addresses, C{announce-self}, unless C{announce} is false).

        @return: a Deferred firing with C{{"resumed": True, "already": bool}}.
            @raise Conflict: the incoming migration is not complete.
        """

    def cancel_migration(machine_id):
        """
        Source: roll back a migration that has not completed: cancel it and the mirrors and
        resume the guest if paused. Idempotent.

        @return: a Deferred. @raise Conflict: the migration completed already.
        """

    def migration_status(machine_id):
        """
        @return: a Deferred firing with C{{"runstate", "migration" (QMP status or "none"),
            "role", "phase", "mirrors": [{"job", "offset", "len", "ready", "speed"}],
            "ram": {"transferred", "remaining", "total", "mbps", "passes"},
            "downtime_ms", "expected_downtime_ms", "total_ms", "setup_ms"}}.
        """

    def dirty_extents(machine_id, volume_id):
        """
        Target, after L{finish_incoming}: the extents of the volume written since the guest
        resumed (the verification's dirty bitmap, 64 KiB granularity).

        @return: a Deferred firing with C{[[offset, length], ...]}.
        """

class IVolumeBackup(Interface):
    """
    Optional, for hypervisor drivers: copy a volume of a running machine as it is at one
    moment, while its guest runs on (a volume snapshot, L{zwrm.agent.volumes.VolumeStore}).
    The copy is crash-consistent: what the disk held at that moment, as after a power cut.
    """

    def backup_volume(machine_id, volume_id, target):
        """
        Copy volume C{volume_id} of the running machine C{machine_id} into the new file
        C{target}, as the volume is at the moment the copy starts (guest writes after it
        are not in the copy); the copy is on disk (fsynced) when the Deferred fires.

        @return: a Deferred firing with C{None}.
        @raise NotFound: no such machine, or it has no volume C{volume_id}.
        @raise Conflict: the machine is not running, is moving live, or is being copied
            already; or C{target} exists.
        @raise ResourceExhausted: C{target}'s file system filled up (C{target} is removed).
        @raise Unavailable: the hypervisor failed (C{target} is removed).
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

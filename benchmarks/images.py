"""
Image pull throughput and cached-image machine start, beside baselines from the same run.

    .venv/bin/python benchmarks/images.py [--size-mib 1024] [--runs 3] [--no-vm]

1. Pull throughput. The control plane's registry (L{zwrm.registry.RegistryResource} on a
   plain twisted.web Site) runs in a child process on loopback; a C{--size-mib} blob of
   random bytes is pushed to it (that push is timed too, for information). Then, C{--runs}
   times each, alternating:

   - B{pull}: this process plays the agent: L{zwrm.agent.images.ImageCache.fetch_blob} into
     an empty cache, timed until it returns, i.e. after the bytes were streamed to a
     temporary file while hashed, verified against the digest, fsynced and renamed. The agent
     authenticates with Basic auth as a host, as agents do.
   - B{fair baseline}: the same blob file (the registry's own copy, so the same page cache)
     served by C{python3 -m http.server}, fetched with C{curl -s URL | tee FILE | openssl dgst
     -sha256} (OpenSSL's SHA-256, with SHA-NI where the CPU has it, as zwrm's hashlib), then
     C{sync FILE} (fsync), checked against the digest;
   - B{old baseline} (printed one more release): the same with coreutils C{sha256sum}, which
     has no SHA-NI and is several times slower, so its ratio flattered zwrm;
   - for information, the fair baseline with the file written by C{dd oflag=direct} instead
     of C{tee} (C{curl | tee >(openssl dgst) | dd oflag=direct; sync}): the pull writes with
     O_DIRECT where the file system takes it, and this shows how much of its lead that is.

   The medians are printed with their ratios (goal: at least 1.0x the fair baseline), each
   run with the load average, and the CPU seconds each side spent per GiB: the pull's are
   this process's (the agent: reactor and threads) and the registry's; a baseline's are its
   pipeline's processes' and the http.server's.

2. Cached-image start (skipped with C{--no-vm}): the test VM image (L{zwrm.testing.image},
   a Debian kernel and a busybox initramfs) is pushed as C{bench/vm:v1}; an
   L{zwrm.agent.executor.Executor} with the QEMU driver (TCG) and an L{ImageCache} starts a
   machine from that reference once (pulling it), then C{--runs} times, alternating, times
   C{start_machine} until it returns (QEMU process running and controllable over QMP):

   - B{cached}: the spec names the image C{bench/vm:v1} (the cache resolves the tag with the
     registry, finds every blob local and pins them);
   - B{baseline}: the spec gives the same files as local paths (no cache involved).

   Each machine is destroyed after its run.

Everything is made in a temporary directory (C{--dir}, default under /var/tmp) and removed.
"""

import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
HOST, HOST_TOKEN, OPERATOR = "bench-host", "bench-host-secret", "bench-operator"


def serve_registry(root, portfile):
    """Child process: the registry on 127.0.0.1, port written to C{portfile}."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from zwrm.registry import TokenAuthorizer, make_registry_resource
    from zwrm.registry.guard import registry_request_factory

    auth = TokenAuthorizer(
        tokens={OPERATOR: ("operator", ("pull", "push", "delete"))},
        basic={HOST: (HOST_TOKEN, ("pull",))},
    )
    top = Resource()
    registry = make_registry_resource(reactor, root, auth)
    top.putChild(b"v2", registry)
    # Requests as the control plane's site makes them (its timeouts, its body spooling).
    site = Site(top, requestFactory=registry_request_factory(reactor, registry))
    site.noisy = False
    site.log = lambda request: None
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    with open(portfile + ".tmp", "w") as f:
        f.write(str(port.getHost().port))
    os.rename(portfile + ".tmp", portfile)
    reactor.run()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path_or_port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if isinstance(path_or_port, str):
            if os.path.exists(path_or_port):
                with open(path_or_port) as f:
                    return int(f.read())
        else:
            try:
                socket.create_connection(("127.0.0.1", path_or_port), 0.2).close()
                return path_or_port
            except OSError:
                pass
        time.sleep(0.05)
    raise SystemExit(f"benchmark: {path_or_port} did not come up within {timeout}s")


def make_blob(path, size):
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 16 * MiB))
            f.write(block)
            h.update(block)
            left -= len(block)
    return "sha256:" + h.hexdigest()


def cpu_seconds(pid=None):
    """User + system CPU seconds of process C{pid} (all its threads), or of this one."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def baseline_pull(url, out, digest, hasher="openssl dgst -sha256 -r", direct=False):
    """
    @return: C{(seconds, CPU seconds of the pipeline's processes)}.
    @param direct: write C{out} with C{dd oflag=direct} (bypassing the page cache, as the
        pull does where it can) instead of C{tee}'s page-cache writes.
    """
    if direct:
        hashfile = out + ".sha256"
        script = (f"curl -sf '{url}' | tee >({hasher} > '{hashfile}') | dd of='{out}' bs=4M "
                  f"iflag=fullblock oflag=direct status=none; wait $!; sync '{out}'")
    else:
        script = f"curl -sf '{url}' | tee '{out}' | {hasher} && sync '{out}'"
    cpu0 = children_cpu_seconds()
    start = time.perf_counter()
    res = subprocess.run(["bash", "-o", "pipefail", "-c", script],
                         capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    cpu = children_cpu_seconds() - cpu0
    if direct:
        with open(hashfile) as f:
            res.stdout = f.read()
        os.unlink(hashfile)
    if "sha256:" + res.stdout.split()[0] != digest:
        raise SystemExit("benchmark: baseline download does not match the digest")
    os.unlink(out)
    return elapsed, cpu


async def bench(reactor, args, work, reg_url, blob_file, digest, size):
    from twisted.internet import threads

    from zwrm.agent.images import ImageCache
    from zwrm.registry.client import RegistryClient, push_image

    client = RegistryClient(reactor, reg_url, OPERATOR)
    t0 = time.perf_counter()
    got, _ = await client.push_file("bench/blob", blob_file)
    push_s = time.perf_counter() - t0
    assert got == digest
    store_copy = os.path.join(work, "registry", "blobs", "sha256", digest[7:])
    print(f"push (zwrm RegistryClient, streamed PUT, verified, fsynced): {push_s:.2f} s, "
          f"{size / MiB / push_s:.0f} MiB/s", flush=True)

    http_port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(http_port),
         "--directory", os.path.dirname(store_copy)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(http_port)
        static_url = f"http://127.0.0.1:{http_port}/{digest[7:]}"
        pulls, bases, olds, directs = [], [], [], []
        cpu = {"pull": [], "fair": [], "old": [], "direct": []}
        load0 = os.getloadavg()[0]
        out = os.path.join(work, "baseline.out")

        def baseline(kind, **kw):
            served0 = cpu_seconds(server.pid)
            t, c = baseline_pull(static_url, out, digest, **kw)
            cpu[kind].append(c + cpu_seconds(server.pid) - served0)
            return t

        for run in range(args.runs):
            cache_dir = os.path.join(work, f"cache{run}")
            cache = ImageCache(reactor, cache_dir, reg_url, (HOST, HOST_TOKEN), 4 * size + MiB)
            own0, reg0 = cpu_seconds(), cpu_seconds(args.registry_pid)
            t0 = time.perf_counter()
            path = await cache.fetch_blob("bench/blob", digest, size)
            pulls.append(time.perf_counter() - t0)
            cpu["pull"].append(cpu_seconds() - own0 + cpu_seconds(args.registry_pid) - reg0)
            cache.unpin(digest)
            assert os.path.getsize(path) == size
            await cache.close()
            shutil.rmtree(cache_dir)
            bases.append(await threads.deferToThread(baseline, "fair"))
            olds.append(await threads.deferToThread(baseline, "old", hasher="sha256sum"))
            directs.append(await threads.deferToThread(baseline, "direct", direct=True))
            print(f"run {run + 1} (load {os.getloadavg()[0]:.1f}): "
                  f"pull {size / MiB / pulls[-1]:.0f} MiB/s ({pulls[-1]:.2f} s, "
                  f"CPU {cpu['pull'][-1]:.2f} s), "
                  f"fair baseline {size / MiB / bases[-1]:.0f} MiB/s ({bases[-1]:.2f} s, "
                  f"CPU {cpu['fair'][-1]:.2f} s), "
                  f"old baseline {size / MiB / olds[-1]:.0f} MiB/s ({olds[-1]:.2f} s), "
                  f"fair with O_DIRECT {size / MiB / directs[-1]:.0f} MiB/s "
                  f"({directs[-1]:.2f} s, CPU {cpu['direct'][-1]:.2f} s)", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
    p, b, o = statistics.median(pulls), statistics.median(bases), statistics.median(olds)
    d = statistics.median(directs)
    gib = size / (1 << 30)

    def per_gib(kind):
        return f"{statistics.median(cpu[kind]) / gib:.2f} CPU s/GiB"

    print()
    print(f"image pull, {size / MiB:.0f} MiB blob over loopback, medians of {args.runs} interleaved runs"
          f" (load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores):")
    print(f"  zwrm registry -> agent ImageCache (treq, hash, verify, fsync, rename):   "
          f"{size / MiB / p:8.0f} MiB/s   {per_gib('pull')} (agent + registry)")
    print(f"  fair: python3 -m http.server -> curl | tee | openssl dgst -sha256, sync: "
          f"{size / MiB / b:8.0f} MiB/s   zwrm/fair {b / p:.2f}x (goal >= 1.0)   {per_gib('fair')}")
    print(f"  old (one more release): the same with coreutils sha256sum (no SHA-NI):  "
          f"{size / MiB / o:8.0f} MiB/s   zwrm/old {o / p:.2f}x")
    print(f"  for information, fair with the file written O_DIRECT (dd oflag=direct):  "
          f"{size / MiB / d:8.0f} MiB/s   zwrm/this {d / p:.2f}x   {per_gib('direct')}", flush=True)

    if args.no_vm:
        await client.close()
        return
    from zwrm.agent.executor import Executor
    from zwrm.agent.volumes import VolumeStore
    from zwrm.drivers.qemu import QemuDriver
    from zwrm.testing import image as test_image

    img = await threads.deferToThread(test_image.build)
    await push_image(client, "bench/vm:v1", kernel=img.kernel, initrd=img.initrd,
                     cmdline=img.cmdline)
    await client.close()
    cache = ImageCache(reactor, os.path.join(work, "vmcache"), reg_url, (HOST, HOST_TOKEN), 1 << 30)
    driver = QemuDriver(reactor, os.path.join(work, "machines"), accel=args.accel, stop_timeout=5)
    volumes = VolumeStore(reactor, os.path.join(work, "volumes"))

    def report(event):
        from twisted.internet.defer import succeed

        return succeed(None)

    ex = Executor(reactor, HOST, driver, volumes, report, images=cache, data_dir=work)
    spec = {"app": "bench", "vcpus": 1, "memory_mb": 256, "volumes": [], "service_port": None,
            "health": None}
    local = {"kernel": img.kernel, "initrd": img.initrd, "disk": None, "cmdline": img.cmdline}

    async def start(mid, image_ref):
        t0 = time.perf_counter()
        status = await ex.start_machine(dict(spec, id=mid, image=image_ref))
        elapsed = time.perf_counter() - t0
        assert status["state"] == "running", status
        await ex.destroy_machine(mid)
        return elapsed

    cold = await start("cold", "bench/vm:v1")
    cached, base = [], []
    for run in range(args.runs):
        cached.append(await start(f"c{run}", "bench/vm:v1"))
        base.append(await start(f"b{run}", local))
    st = cache.stats()
    await cache.close()
    ex.close()
    print()
    print(f"machine start -> QEMU running ({args.accel}), median of {args.runs}:")
    print(f"  image bench/vm:v1 from the agent cache (already cached): {statistics.median(cached) * 1000:7.0f} ms")
    print(f"  baseline: same kernel/initrd as local paths, no cache:    {statistics.median(base) * 1000:7.0f} ms")
    print(f"  (first start, pulling the image: {cold * 1000:.0f} ms; cache hits {st['hits']}, "
          f"misses {st['misses']})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--no-vm", action="store_true", help="skip the machine start figure")
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm", "auto"))
    parser.add_argument("--serve-registry", nargs=2, metavar=("ROOT", "PORTFILE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_registry:
        serve_registry(*args.serve_registry)
        return
    for tool in ("curl", "sha256sum", "openssl", "tee", "sync"):
        if shutil.which(tool) is None:
            raise SystemExit(f"benchmark: {tool} is not installed")
    work = tempfile.mkdtemp(prefix="zwrm-bench-images-", dir=args.dir)
    child = None
    try:
        size = args.size_mib * MiB
        blob_file = os.path.join(work, "blob")
        print(f"making a {args.size_mib} MiB random blob in {work} ...", flush=True)
        digest = make_blob(blob_file, size)
        portfile = os.path.join(work, "port")
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-registry",
             os.path.join(work, "registry"), portfile],
        )
        reg_url = f"http://127.0.0.1:{wait_for(portfile)}"
        args.registry_pid = child.pid

        from twisted.internet import defer, task

        task.react(lambda reactor: defer.Deferred.fromCoroutine(
            bench(reactor, args, work, reg_url, blob_file, digest, size)))
    finally:
        if child is not None:
            child.send_signal(signal.SIGTERM)
            child.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

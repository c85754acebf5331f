"""
The cloud-init NoCloud seed: what goes into meta-data, user-data and network-config, its
validation, and a real seed ISO built with genisoimage and read back with isoinfo; the QEMU
driver attaches it after the root disk and the volumes.
"""

import email
import json
import os
import shutil
import subprocess
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm.agent.network import addressing
from zwrm.drivers import cloudinit, qemu
from zwrm.drivers import spec as _spec
from zwrm.errors import InvalidArgument

BRIDGE_NET = {"address": "10.80.3.7", "prefix": 16, "gateway": "10.80.3.1", "dns": "10.80.3.1",
              "mtu": 1450, "domain": "zwrm.internal", "hostname": "web-0"}
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKz0cUjYjpbRDxCw7lV7Sxvz4JwfE3XQz+rQpvzYd9zE op@laptop"


def cloud_config(text):
    assert text.startswith("#cloud-config\n"), text[:40]
    return json.loads(text.split("\n", 1)[1])


class DocumentTests(SynchronousTestCase):
    def docs(self, **cfg):
        return cloudinit.documents(
            "web-1_a", cloudinit.validate(cfg),
            [{"serial": "v-data", "mount": "/srv/data"}, {"serial": "v-raw"}],
            "52:54:00:aa:bb:cc",
        )

    def test_meta_data(self):
        meta = json.loads(self.docs()["meta-data"])
        self.assertEqual(meta, {"instance-id": "web-1_a", "local-hostname": "web-1-a"})

    def test_keys_mounts_env(self):
        d = self.docs(ssh_keys=[KEY + "\n"], env={"GREETING": 'hi "there" $HOME'})
        cfg = cloud_config(d["user-data"].decode())
        self.assertEqual(cfg["ssh_authorized_keys"], [KEY])
        self.assertEqual(cfg["mounts"], [[
            "/dev/disk/by-id/virtio-v-data", "/srv/data", "ext4",
            "defaults,nofail,x-systemd.device-timeout=30s", "0", "2"]])
        self.assertEqual(cfg["bootcmd"], [["mkdir", "-p", "/srv/data"]])
        env = {f["path"]: f for f in cfg["write_files"]}
        self.assertEqual(env["/etc/zwrm/env"]["content"], 'GREETING="hi \\"there\\" \\$HOME"\n')
        self.assertEqual(env["/etc/zwrm/env"]["permissions"], "0600")
        self.assertTrue(env["/etc/environment"]["append"])
        self.assertEqual(cfg["hostname"], "web-1-a")

    def test_user_data_is_a_second_part(self):
        d = self.docs(ssh_keys=[KEY], user_data="#!/bin/sh\necho hello > /root/hello\n")
        msg = email.message_from_bytes(d["user-data"])
        parts = [p for p in msg.walk() if not p.is_multipart()]
        self.assertEqual([p.get_content_type() for p in parts],
                         ["text/cloud-config", "text/x-shellscript"])
        self.assertEqual(cloud_config(parts[0].get_payload(decode=True).decode())
                         ["ssh_authorized_keys"], [KEY])
        self.assertIn("echo hello", parts[1].get_payload(decode=True).decode())

    def test_network_config(self):
        net = json.loads(self.docs()["network-config"])
        self.assertEqual(net["version"], 1)
        self.assertEqual(net["config"][0]["mac_address"], "52:54:00:aa:bb:cc")
        self.assertEqual(net["config"][0]["subnets"], [{"type": "dhcp"}])

    def test_static_network_config(self):
        # A machine with an address on the cluster network (bridge mode) gets its static
        # configuration, byte for byte what the agent computed; no DHCP.
        cfg = addressing.cloud_init_network_config(BRIDGE_NET)
        d = cloudinit.documents("web-1_a", cloudinit.validate({}), [], "0a:58:0a:50:03:07", cfg)
        net = json.loads(d["network-config"])
        self.assertEqual(net, {"version": 2, "ethernets": {"eth0": {
            "match": {"macaddress": "0a:58:0a:50:03:07"}, "set-name": "eth0",
            "addresses": ["10.80.3.7/16"], "gateway4": "10.80.3.1",
            "mtu": 1450,
            "nameservers": {"addresses": ["10.80.3.1"], "search": ["zwrm.internal"]}}}})
        self.assertNotIn(b"dhcp", d["network-config"])
        # The resolver, for images where nothing renders the nameservers (a plain file).
        boot = cloud_config(d["user-data"].decode())["bootcmd"]
        self.assertEqual(boot, [["sh", "-c", '[ -L /etc/resolv.conf ] || printf "%s\\n" "$@"'
                                 ' > /etc/resolv.conf', "sh", "nameserver 10.80.3.1",
                                 "search zwrm.internal"]])
        out = subprocess.run(boot[0][:2] + ['printf "%s\\n" "$@"'] + boot[0][3:],
                             capture_output=True, text=True, check=True).stdout
        self.assertEqual(out, "nameserver 10.80.3.1\nsearch zwrm.internal\n")
        # User mode: none.
        self.assertEqual(cloud_config(self.docs()["user-data"].decode())["bootcmd"],
                         [["mkdir", "-p", "/srv/data"]])

    def test_driver_spec_carries_the_network_config(self):
        cfg = addressing.cloud_init_network_config(BRIDGE_NET)
        base = {"id": "m1", "disk": "/d", "vcpus": 1, "memory_mb": 64}
        nic = {"tap": "zt0123456789ab", "mac": "0a:58:0a:50:03:07"}
        self.assertEqual(_spec.validate(dict(base, nic=dict(nic, network_config=cfg)))["nic"],
                         dict(nic, network_config=cfg))
        self.assertEqual(_spec.validate(dict(base, nic=nic))["nic"], nic)
        for bad in ({"version": 1, "config": []}, "eth0", {"version": 2},
                    {"version": 2, "ethernets": {"x": "y" * 17000}}):
            with self.assertRaises(InvalidArgument) as cm:
                _spec.validate(dict(base, nic=dict(nic, network_config=bad)))
            self.assertIn("network_config", cm.exception.message)

    def test_validation(self):
        bad = [
            "nope",
            {"ssh_keys": ["not a key"]},
            {"ssh_keys": [KEY + "\nssh-rsa AAAA injected"]},
            {"ssh_keys": [KEY] * 33},
            {"user_data": "x" * (16 * 1024 + 1)},
            {"env": {"1BAD": "x"}},
            {"env": {"OK": "two\nlines"}},
            {"env": {"OK": 5}},
            {"hostname": "Not_Valid"},
            {"other": 1},
        ]
        for cfg in bad:
            with self.assertRaises(InvalidArgument, msg=repr(cfg)):
                cloudinit.validate(cfg)
        self.assertIsNone(cloudinit.validate(None))

    def test_hostnames(self):
        self.assertEqual(cloudinit.hostname_for("M1.example_x"), "m1-example-x")
        self.assertEqual(cloudinit.hostname_for("_._"), "zwrm")
        self.assertEqual(len(cloudinit.hostname_for("a" * 64)), 63)


class SeedTests(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zwrm-ci-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)

    async def test_real_seed_iso(self):
        docs = cloudinit.documents("m1", cloudinit.validate({"ssh_keys": [KEY]}), [], None)
        path = await cloudinit.build_seed(reactor, os.path.join(self.dir, "seed.iso"), docs)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(self.dir), ["seed.iso"])
        pvd = subprocess.run(["isoinfo", "-d", "-i", path], capture_output=True, text=True,
                             check=True).stdout
        self.assertIn("Volume id: cidata", pvd)
        for name, body in docs.items():
            got = subprocess.run(["isoinfo", "-J", "-i", path, "-x", f"/{name}"],
                                 capture_output=True, check=True).stdout
            self.assertEqual(got, body, name)

    async def test_missing_tool_is_a_clear_error(self):
        from zwrm.errors import Unavailable

        with self.assertRaises(Unavailable) as cm:
            await cloudinit.build_seed(reactor, os.path.join(self.dir, "s.iso"),
                                       {"meta-data": b"{}"}, program="/nonexistent/genisoimage")
        self.assertIn("cloud-init seed", cm.exception.message)

    async def test_driver_attaches_the_seed_last(self):
        drv = qemu.QemuDriver(reactor, self.dir, accel="tcg")
        spec = _spec.validate({
            "id": "m1", "disk": "/d", "disk_format": "raw", "vcpus": 1, "memory_mb": 64,
            "volumes": [{"id": "data", "path": "/v", "mount": "/data"}],
            "cloud_init": {"ssh_keys": [KEY]},
        })
        m = qemu._Machine("m1", os.path.join(self.dir, "m1"))
        os.makedirs(m.dir)
        docs = cloudinit.documents("m1", spec["cloud_init"], spec["volumes"], spec["mac"])
        await cloudinit.build_seed(reactor, m.path(qemu.SEED), docs)
        argv = drv._argv(m, spec, "tcg")
        devs = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
        self.assertEqual(devs[:3], ["virtio-blk-pci,drive=root,bootindex=0",
                                    "virtio-blk-pci,drive=vol0,serial=data",
                                    "virtio-blk-pci,drive=seed,serial=cidata"])
        self.assertIn(f"mac={spec['mac']}", devs[3])
        cfg = cloud_config(docs["user-data"].decode())
        self.assertEqual(cfg["mounts"][0][:2], ["/dev/disk/by-id/virtio-data", "/data"])

    def test_a_cmdline_no_process_argument_can_hold_is_refused(self):
        """QEMU takes it as one argument of its command, which cannot hold a NUL."""
        for cmdline in ("console=ttyS0\0x", "a\nb", 7):
            with self.assertRaises(InvalidArgument) as cm:
                _spec.validate({"id": "m1", "kernel": "/k", "vcpus": 1, "memory_mb": 64,
                                "cmdline": cmdline})
            self.assertEqual(cm.exception.message,
                             f"cmdline must be one line of text, not {cmdline!r}")

    def test_a_mount_no_fstab_line_can_hold_is_refused(self):
        """The driver refuses it as the control plane's deploy does (one check for both)."""
        for mount in ("/my data", "/a,b", "/a:b", "/x\n/etc", "/d" * 128, "/", "d"):
            with self.assertRaises(InvalidArgument) as cm:
                _spec.validate({"id": "m1", "disk": "/d", "disk_format": "raw", "vcpus": 1,
                                "memory_mb": 64,
                                "volumes": [{"id": "data", "path": "/v", "mount": mount}]})
            self.assertEqual(cm.exception.message, (
                f"volume data: mount must be an absolute path other than / (at most 255"
                f" characters; no blanks, commas or colons), not {mount!r}"))

    async def seed_of_a_start(self, nic):
        """Start a disk machine through the QEMU driver (its QEMU a stand-in that exits at
        once) and return the network-config of the seed the driver built."""
        disk = os.path.join(self.dir, "disk.raw")
        with open(disk, "wb") as f:
            f.truncate(1024 * 1024)
        fake = os.path.join(self.dir, "qemu")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\nexit 1\n")
        os.chmod(fake, 0o700)
        drv = qemu.QemuDriver(reactor, os.path.join(self.dir, "machines"), accel="tcg",
                              qemu_binary=fake)
        self.addCleanup(drv.close)
        try:
            await drv.start({"id": "m1", "disk": disk, "disk_format": "raw", "vcpus": 1,
                             "memory_mb": 64, "cloud_init": {}, "nic": nic})
        except Exception:
            pass  # the stand-in QEMU exits; the seed was written before it ran
        seed = os.path.join(self.dir, "machines", "m1", qemu.SEED)
        return json.loads(subprocess.run(["isoinfo", "-J", "-i", seed, "-x", "/network-config"],
                                         capture_output=True, check=True).stdout)

    async def test_driver_writes_the_static_address_for_a_bridged_machine(self):
        cfg = addressing.cloud_init_network_config(BRIDGE_NET)
        net = await self.seed_of_a_start({"tap": "zt0123456789ab", "mac": "0a:58:0a:50:03:07",
                                          "network_config": cfg})
        self.assertEqual(net, cfg)

    async def test_driver_writes_dhcp_in_user_mode(self):
        net = await self.seed_of_a_start(None)
        self.assertEqual(net["version"], 1)
        self.assertEqual(net["config"][0]["subnets"], [{"type": "dhcp"}])
        self.assertEqual(net["config"][0]["mac_address"], _spec.machine_mac("m1"))


class DeployOptionTests(SynchronousTestCase):
    """zwrm deploy --ssh-key/--user-data/--env reach the deploy spec, checked by the control plane."""

    def test_cli_options(self):
        import argparse

        from zwrm.cli import apps as cli_apps

        d = tempfile.mkdtemp(prefix="zwrm-cio-", dir="/tmp")
        self.addCleanup(shutil.rmtree, d, True)
        keyfile = os.path.join(d, "id.pub")
        with open(keyfile, "w") as f:
            f.write("# mine\n" + KEY + "\n")
        ud = os.path.join(d, "ud")
        with open(ud, "w") as f:
            f.write("#cloud-config\n{}\n")
        args = argparse.Namespace(ssh_key=[keyfile, keyfile], user_data=ud,
                                  env=["A=1", "B=x=y"])
        self.assertEqual(cli_apps._cloud_init(args), {
            "ssh_keys": [KEY, KEY], "user_data": "#cloud-config\n{}\n",
            "env": {"A": "1", "B": "x=y"}})
        self.assertIsNone(cli_apps._cloud_init(argparse.Namespace(ssh_key=[], user_data=None,
                                                                  env=[])))
        with self.assertRaises(cli_apps.CliError):
            cli_apps._cloud_init(argparse.Namespace(ssh_key=[], user_data=None, env=["NOEQ"]))
        with self.assertRaises(cli_apps.CliError):
            cli_apps._cloud_init(argparse.Namespace(ssh_key=[os.path.join(d, "missing")],
                                                    user_data=None, env=[]))

    def test_control_plane_checks_it(self):
        from zwrm.control.apps import validate_spec

        out = validate_spec({"image": "os/deb:12", "cloud_init": {"ssh_keys": [KEY]}})
        self.assertEqual(out["cloud_init"]["ssh_keys"], [KEY])
        with self.assertRaises(InvalidArgument):
            validate_spec({"image": "os/deb:12", "cloud_init": {"ssh_keys": ["nope"]}})

"""
install.sh's argument handling: a wrong flag is one clear line (plus a hint) and exit status 2,
and --dry-run shows the configuration it would write. Runs without root and changes nothing.
"""

import os
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTALL_SH = os.path.join(ROOT, "install.sh")
TOKEN = "zwrm1.abc123." + "s" * 32 + "." + "f" * 64
AGENT = [
    "--agent",
    "--control-plane-url=https://cp.example.com:8080",
    "--region=eu-central",
    "--datacenter=dc1",
    f"--join-token={TOKEN}",
]


def run(*args, env=None):
    return subprocess.run(
        ["bash", INSTALL_SH, *args], capture_output=True, text=True, timeout=30, check=False,
        env=dict({k: v for k, v in os.environ.items() if k != "ZWRM_JOIN_TOKEN"}, **(env or {})),
    )


class BadArgumentsTests(SynchronousTestCase):
    def assertBadUsage(self, args, message):
        result = run(*args)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(
            result.stderr.splitlines(), [f"install.sh: {message}", "Try 'install.sh --help'."]
        )
        self.assertEqual(result.stdout, "")

    def test_no_role(self):
        self.assertBadUsage([], "give --agent or --control-plane")

    def test_unknown_flag(self):
        self.assertBadUsage(["--agent", "--regoin=eu"], "unknown option '--regoin=eu'")

    def test_both_roles(self):
        self.assertBadUsage(
            ["--agent", "--control-plane"], "give either --agent or --control-plane, not both"
        )

    def test_missing_value(self):
        self.assertBadUsage(["--agent", "--region"], "--region needs a value (--region=VALUE)")
        self.assertBadUsage(["--agent", "--region="], "--region needs a value (--region=VALUE)")

    def test_agent_needs_everything(self):
        for missing, message in [
            ("--control-plane-url", "--agent needs --control-plane-url=URL"),
            ("--region", "--agent needs --region=NAME"),
            ("--datacenter", "--agent needs --datacenter=NAME"),
            (
                "--join-token",
                "--agent needs --join-token-file=FILE, $ZWRM_JOIN_TOKEN or --join-token=TOKEN"
                " (create one with 'zwrm tokens create' on the control plane)",
            ),
        ]:
            args = [a for a in AGENT if not a.startswith(missing + "=")]
            self.assertBadUsage(args, message)

    def test_malformed_token(self):
        args = AGENT[:-1] + ["--join-token=zwrm1.abc123.short." + "f" * 64]
        self.assertBadUsage(
            args,
            "--join-token: not a zwrm join token (expected zwrm1.<id>.<secret>.<ca-fingerprint>,"
            " as printed by 'zwrm tokens create')",
        )

    def test_bad_url(self):
        args = ["--agent", "--control-plane-url=cp.example.com:8080"] + AGENT[2:]
        self.assertBadUsage(
            args,
            "--control-plane-url: 'cp.example.com:8080' is not a URL like https://cp.example.com:8080",
        )

    def test_plain_url_beyond_loopback(self):
        args = ["--agent", "--control-plane-url=http://cp.example.com:8080"] + AGENT[2:]
        self.assertBadUsage(
            args,
            "--control-plane-url: http://cp.example.com:8080 is not encrypted; use https:// or"
            " wss:// (or --allow-insecure)",
        )

    def test_agent_flags_on_control_plane(self):
        self.assertBadUsage(
            ["--control-plane", f"--join-token={TOKEN}"], "--join-token is only for --agent"
        )
        self.assertBadUsage(AGENT + ["--listen=tcp:8080"], "--listen is only for --control-plane")

    def test_token_file_problems(self):
        base = [a for a in AGENT if not a.startswith("--join-token=")]
        self.assertBadUsage(base + ["--join-token-file=/nonexistent/token"],
                            "--join-token-file: cannot read /nonexistent/token")
        self.assertBadUsage(AGENT + ["--join-token-file=/dev/null"],
                            "give --join-token-file or --join-token, not both")
        self.assertBadUsage(base + ["--join-token-file=/dev/null"],
                            "--join-token-file: /dev/null is empty")
        self.assertBadUsage(["--control-plane", "--join-token-file=/dev/null"],
                            "--join-token-file is only for --agent")

    def test_bad_address(self):
        self.assertBadUsage(AGENT + ["--address=cp.example.com"],
                            "--address: 'cp.example.com' is not an IPv4 address")
        self.assertBadUsage(["--control-plane", "--address=10.0.0.1"],
                            "--address is only for --agent")

    def test_bad_fence_after(self):
        for bad in ("5", "-1", "1.5", "soon", "86401", "999999"):
            self.assertBadUsage(AGENT + [f"--fence-after={bad}"],
                                f"--fence-after: '{bad}' must be 0 (never) or whole seconds from"
                                " 10 to 86400")
        self.assertBadUsage(["--control-plane", "--fence-after=60"],
                            "--fence-after is only for --agent")

    def test_bad_network(self):
        self.assertBadUsage(AGENT + ["--address=10.0.0.1", "--network=bridged"],
                            "--network: 'bridged' must be user or bridge")
        self.assertBadUsage(AGENT + ["--network=bridge"],
                            "--network=bridge needs --address=IP (the overlay's source address,"
                            " where published ports listen)")
        self.assertBadUsage(["--control-plane", "--network=bridge"],
                            "--network is only for --agent")
        self.assertBadUsage(AGENT + ["--network"], "--network needs a value (--network=VALUE)")

    def test_apt_repo_needs_a_key(self):
        self.assertBadUsage(AGENT + ["--apt-repo=https://apt.example.com"],
                            "--apt-repo needs --apt-key=FILE (the repository's signing key)")
        self.assertBadUsage(AGENT + ["--apt-repo=https://apt.example.com", "--apt-key=/nonexistent"],
                            "--apt-key: cannot read /nonexistent")
        self.assertBadUsage(AGENT + ["--apt-key=/dev/null"], "--apt-key is only for --apt-repo")

    def test_bad_region(self):
        args = AGENT[:2] + ["--region=eu central"] + AGENT[3:]
        self.assertBadUsage(args, "--region: 'eu central' must be letters, digits, '-' or '_'")


class DryRunTests(SynchronousTestCase):
    def test_agent(self):
        result = run(*AGENT, "--dry-run")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('control_plane_url = "wss://cp.example.com:8080/ws"', result.stdout)
        self.assertIn('region = "eu-central"', result.stdout)
        self.assertIn('datacenter = "dc1"', result.stdout)
        self.assertIn('join_token_file = "/etc/zwrm/join-token"', result.stdout)
        self.assertIn("would write the join token (zwrm1.abc123.<secret>." + "f" * 64
                      + ") to /etc/zwrm/join-token", result.stdout)
        self.assertNotIn("join_token =", result.stdout)
        self.assertNotIn("s" * 32, result.stdout)
        self.assertIn("would enable and start zwrm-agent.service", result.stdout)

    def test_token_from_a_file_or_the_environment(self):
        base = [a for a in AGENT if not a.startswith("--join-token=")]
        with tempfile.NamedTemporaryFile("w", suffix=".token") as f:
            f.write(TOKEN + "\n")
            f.flush()
            from_file = run(*base, f"--join-token-file={f.name}", "--dry-run")
        from_env = run(*base, "--dry-run", env={"ZWRM_JOIN_TOKEN": TOKEN})
        from_flag = run(*AGENT, "--dry-run")
        for result in (from_file, from_env):
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stdout, from_flag.stdout)
        bad = run(*base, "--dry-run", env={"ZWRM_JOIN_TOKEN": "zwrm1.nope"})
        self.assertEqual(bad.returncode, 2)
        self.assertIn("--join-token: not a zwrm join token", bad.stderr)

    def test_agent_address(self):
        result = run(*AGENT, "--address=192.0.2.21", "--dry-run")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('address = "192.0.2.21"', result.stdout)
        self.assertIn('volume_endpoint = "tcp:7443:interface=192.0.2.21"', result.stdout)

    def test_agent_network(self):
        bridge = run(*AGENT, "--address=192.0.2.21", "--network", "bridge", "--dry-run")
        self.assertEqual(bridge.returncode, 0, bridge.stderr)
        self.assertIn('network = "bridge"', bridge.stdout)
        self.assertIn("would write /etc/sysctl.d/60-zwrm-agent.conf and apply it:", bridge.stdout)
        self.assertIn("    net.ipv4.ip_forward = 1", bridge.stdout)
        self.assertIn("    net.bridge.bridge-nf-call-iptables = 0", bridge.stdout)
        user = run(*AGENT, "--network=user", "--dry-run")
        self.assertEqual(user.returncode, 0, user.stderr)
        self.assertIn('network = "user"', user.stdout)
        self.assertNotIn("sysctl", user.stdout)
        self.assertNotIn("network =", run(*AGENT, "--dry-run").stdout)  # the agent's default

    def test_agent_fence_after(self):
        fencing = run(*AGENT, "--fence-after=60", "--dry-run")
        self.assertEqual(fencing.returncode, 0, fencing.stderr)
        self.assertIn("\n    fence_after = 60\n", fencing.stdout)
        self.assertNotIn("fence_after", run(*AGENT, "--dry-run").stdout)  # off: the default
        self.assertIn("\n    fence_after = 0\n",
                      run(*AGENT, "--fence-after", "0", "--dry-run").stdout)
        self.assertIn("\n    fence_after = 90\n",
                      run(*AGENT, "--fence-after=090", "--dry-run").stdout)

    def test_agent_url_forms(self):
        for given, used in [
            ("wss://cp.example.com:8443/ws", "wss://cp.example.com:8443/ws"),
            ("https://cp.example.com/", "wss://cp.example.com/ws"),
            ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws"),
        ]:
            result = run("--agent", f"--control-plane-url={given}", *AGENT[2:], "--dry-run")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(f'control_plane_url = "{used}"', result.stdout)

    def test_control_plane_with_tls(self):
        result = run(
            "--control-plane", "--control-plane-url=https://cp.example.com:8443", "--dry-run"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        pki = "/var/lib/zwrm/control/pki"
        self.assertIn(
            f'listen = ["ssl:8443:privateKey={pki}/server.key:certKey={pki}/server.pem:'
            f'extraCertChain={pki}/ca.pem"]',
            result.stdout,
        )
        self.assertIn(
            "would create the CA and a server certificate for cp.example.com", result.stdout
        )
        # the CLI's settings for root on the control-plane host
        self.assertIn("would write /etc/zwrm/cli.toml:", result.stdout)
        self.assertIn('    url = "https://cp.example.com:8443"', result.stdout)
        self.assertIn(f'    ca_file = "{pki}/ca.pem"', result.stdout)
        self.assertIn('    token_file = "/var/lib/zwrm/control/operator.token"', result.stdout)

    def test_control_plane_loopback_by_default(self):
        result = run("--control-plane", "--dry-run", "--no-start")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('listen = ["tcp:8080:interface=127.0.0.1"]', result.stdout)
        self.assertIn('    url = "ws://127.0.0.1:8080/ws"', result.stdout)
        self.assertNotIn("would enable", result.stdout)

    def test_help(self):
        result = run("--help")
        self.assertEqual(result.returncode, 0)
        self.assertIn("Usage: install.sh (--agent | --control-plane) [options]", result.stdout)

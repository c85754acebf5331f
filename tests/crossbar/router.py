"""
Crossbar.io for zwrm's tests: installed in its own virtualenv (cached; never a dependency of
zwrm) and run as a real process with the sample configuration of docs/wamp-clients.md.

    python3 tests/crossbar/router.py --install    # what .ci/run does before the tests

Where the virtualenv is: C{$ZWRM_CROSSBAR_VENV}, else C{/opt/crossbar-venv} (where
benchmarks/router.py looks for it) when it holds Crossbar.io {CROSSBAR_VERSION} or when it
can be created there, else C{~/.cache/zwrm/crossbar-venv}.  A virtualenv that already runs
that version is used as it is (the cache); otherwise it is made with C{python3 -m venv} and
C{pip install crossbar==<version>}.
"""

import json
import os
import re
import subprocess
import sys

CROSSBAR_VERSION = "26.10.1"
DEFAULT_VENV = "/opt/crossbar-venv"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "wamp-clients.md")
CONTROL_TICKET_ENV = "ZWRM_CONTROL_TICKET"


def _installed(venv):
    """The version of Crossbar.io in C{venv}, or L{None}."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, "bin", "crossbar")):
        return None
    try:
        out = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('crossbar'))"],
            capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def venv_path(environ=os.environ):
    """Where Crossbar.io's virtualenv is (or will be made); see the module docstring."""
    if environ.get("ZWRM_CROSSBAR_VENV"):
        return environ["ZWRM_CROSSBAR_VENV"]
    if _installed(DEFAULT_VENV) == CROSSBAR_VERSION:
        return DEFAULT_VENV
    parent = os.path.dirname(DEFAULT_VENV)
    if os.access(parent, os.W_OK) and (not os.path.exists(DEFAULT_VENV)
                                       or os.access(DEFAULT_VENV, os.W_OK)):
        return DEFAULT_VENV
    return os.path.join(os.path.expanduser("~"), ".cache", "zwrm", "crossbar-venv")


def ensure_crossbar(log=sys.stderr, timeout=900):
    """
    The C{crossbar} executable, installing Crossbar.io first if its virtualenv does not run
    L{CROSSBAR_VERSION} (a few minutes, once).

    @raise RuntimeError: the installation failed (with pip's last lines).
    """
    venv = venv_path()
    exe = os.path.join(venv, "bin", "crossbar")
    if _installed(venv) == CROSSBAR_VERSION:
        return exe
    log.write(f"installing Crossbar.io {CROSSBAR_VERSION} in {venv} (once; cached)\n")
    steps = [[_base_python(), "-m", "venv", venv],
             [os.path.join(venv, "bin", "pip"), "install", "-q", "--upgrade", "pip"],
             [os.path.join(venv, "bin", "pip"), "install", "-q", f"crossbar=={CROSSBAR_VERSION}"]]
    if os.path.exists(os.path.join(venv, "bin", "pip")):
        steps = steps[1:]
    for argv in steps:
        # the virtualenv must not inherit ours (a test run's sys.executable is .venv's python)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"installing Crossbar.io failed: {' '.join(argv)}:\n{tail}")
    if _installed(venv) != CROSSBAR_VERSION:
        raise RuntimeError(f"Crossbar.io {CROSSBAR_VERSION} is not in {venv} after installing it")
    return exe


def _base_python():
    """The interpreter ours was made from, if ours is a virtualenv's (a venv needs a real one)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def sample_config(doc=DOC, marker="crossbar-config"):
    """
    A Crossbar configuration of docs/wamp-clients.md: the JSON block after its marker
    (C{crossbar-config}: plain WebSocket; C{crossbar-config-tls}: TLS with host certificates).
    """
    with open(doc) as f:
        text = f.read()
    m = re.search(rf"<!-- {re.escape(marker)} -->\s*```json\n(.*?)\n```", text, re.S)
    if m is None:
        raise AssertionError(f"{doc} has no ```json block after <!-- {marker} -->")
    return json.loads(m.group(1))


SAMPLE_PKI_DIR = "/var/lib/zwrm/control/pki"
"""Where the TLS sample configuration reads the certificate files."""


def configure_tls(config, client_port, control_port, agent_port, pki_dir):
    """
    The TLS sample configuration with its three ports (clients' C{8081}, the control
    component's C{8082}, agents' C{8083}) and the certificates' directory changed: nothing
    else.
    """
    text = json.dumps(config)
    for old, new in ((8081, client_port), (8082, control_port), (8083, agent_port)):
        text = text.replace(f'"port": {old}', f'"port": {new}')
    text = text.replace(SAMPLE_PKI_DIR + "/", pki_dir.rstrip("/") + "/")
    return json.loads(text)


def configure(config, client_port, control_port):
    """
    The sample configuration with its two ports changed (clients' C{8081}, the control
    component's C{8082}): nothing else.
    """
    text = json.dumps(config)
    text = text.replace('"port": 8081', f'"port": {client_port}')
    text = text.replace('"port": 8082', f'"port": {control_port}')
    return json.loads(text)


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        raise SystemExit("usage: tests/crossbar/router.py --install")
    print(ensure_crossbar())

"""
The operator's side of interactive serial consoles: C{zwrm.machine.console} and
C{zwrm.machine.console_write}, relayed to the machine's agent
(L{zwrm.agent.console.ConsoleRelay}). Only operators may call them (the role table gives
them C{zwrm.machine.*}; viewers have neither).

C{zwrm.machine.console(machine_id)} streams what the guest writes as progressive results
(base64 text) until the caller cancels its call (C{zwrm console}'s Ctrl-] detaches so) or
the console closes (the machine stopped); it then returns C{{"machine_id", "ended"}}.
Cancelling the operator's call cancels the call to the agent.
"""

from autobahn import wamp
from autobahn.wamp.types import CallOptions, RegisterOptions

from zwrm import errors
from zwrm.wamp.procedures import cancellable


class ConsoleAPI:
    """
    @param apps: the L{zwrm.control.apps.Apps} (its C{machine_status} finds the host).
    @param hosts: the L{zwrm.control.registry.HostRegistry} (its C{call_executor}).
    """

    def __init__(self, apps, hosts):
        self._apps = apps
        self._hosts = hosts

    async def _host_of(self, machine_id):
        m = await self._apps.machine_status(machine_id)
        if m.get("state") != "running":
            raise errors.Unavailable(f"machine {machine_id} is {m.get('state')}: its console "
                                     "is closed")
        return m["host_id"]

    async def _call(self, host_id, verb, *args, **kwargs):
        try:
            return await self._hosts.call_executor(host_id, verb, *args, **kwargs)
        except Exception as e:
            raise errors.from_wire(e) from None

    @wamp.register("zwrm.machine.console", options=RegisterOptions(details_arg="details"))
    @cancellable  # the CLI detaches by cancelling: the agent's attachment ends with it
    async def console(self, machine_id, details=None):
        """Attach to a machine's serial console (progressive results, base64 text)."""
        host = await self._host_of(machine_id)
        progress = getattr(details, "progress", None)
        options = CallOptions(on_progress=progress) if progress else None
        return await self._call(host, "machine.console.attach", machine_id, options=options)

    @wamp.register("zwrm.machine.console_write")
    async def console_write(self, machine_id, data):
        """Send keystrokes (base64 text, at most 4 KiB) to a machine's serial console."""
        host = await self._host_of(machine_id)
        return await self._call(host, "machine.console.write", machine_id, data)

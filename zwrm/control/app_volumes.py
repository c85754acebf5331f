"""
Apps' volumes made and deleted on their own (C{zwrm.volume.*}): a volume created before
an app's first deploy, on the host the scheduler picks by disk, pins that replica there;
a volume is deleted only on request, never while a live machine uses it.
"""

from zwrm import errors
from zwrm.control.appspec import check_name, error_text, new_id, whole_number
from zwrm.control.resources.machines import LIVE, placement_request


class AppVolumes:
    """Create, list and delete apps' volumes."""

    def __init__(self, clock, data, placements, replicas):
        """
        @param clock: an L{IReactorTime}.
        @param data: the control plane's resource layer.
        @param placements: the L{zwrm.control.placements.Placements} (a new volume's host).
        @param replicas: the L{zwrm.control.replicas.Replicas} (executor calls).
        """
        self._clock = clock
        self._data = data
        self._placements = placements
        self._replicas = replicas

    async def create(self, app, name, size_mb, mount, replica=0, region=None,
                     datacenter=None, host_id=None):
        """
        Create volume C{name} for replica C{replica} of the app row C{app}: the scheduler
        picks its host (by disk), or C{host_id} if given.
        """
        check_name(name, "volume name")
        size_mb = whole_number({"size_mb": size_mb}, "size_mb", 2, 16 * 1024 * 1024, 64)
        if not isinstance(mount, str) or not mount.startswith("/") or mount == "/":
            raise errors.InvalidArgument(f"mount must be an absolute path other than /, not {mount!r}")
        if await self._data.volumes.find(app_id=app["id"], name=name, replica=replica):
            raise errors.Conflict(f"app {app['name']!r} has a volume {name!r} for replica {replica}")
        # only a host with the disk is wanted: machines reserve their vCPUs and memory later
        request = placement_request({"vcpus": 1, "memory_mb": 1, "region": region,
                                     "datacenter": datacenter},
                                    pinned_host=host_id, disk_mb=size_mb)
        placement = self._placements.place(request)
        self._placements.unplace(placement)
        row = {"id": new_id("v"), "app_id": app["id"], "host_id": placement.host_id,
               "name": name, "replica": replica, "size_mb": size_mb, "mount": mount,
               "state": "creating", "created_at": self._clock.seconds()}
        await self._data.volumes.add(row)
        try:
            await self._replicas.call(row["host_id"], "volume.create", row["id"], size_mb)
        except Exception as e:
            await self._data.volumes.creation_failed(row, error_text(e))
            raise
        await self._data.volumes.set_state(row, "ready")
        return row

    async def destroy(self, row):
        """
        Delete the volume of row C{row} and its data.

        @raise zwrm.errors.Conflict: while a live machine uses it.
        """
        for m in await self._data.machines.find(app_id=row["app_id"]):
            if m["state"] in LIVE and any(v["id"] == row["id"] for v in m["spec"]["volumes"]):
                raise errors.Conflict(f"volume {row['id']} is used by machine {m['id']}")
        try:
            await self._replicas.call(row["host_id"], "volume.delete", row["id"])
        except errors.NotFound:
            pass
        await self._data.volumes.delete(row)

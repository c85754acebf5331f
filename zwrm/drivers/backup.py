"""
Volume snapshots of running machines for the QEMU driver: L{zwrm.interfaces.IVolumeBackup}
over QMP.

A point-in-time copy while the guest runs, as Proxmox VE's and libvirt's backups make it:
the target file is made at the volume's size, opened by QEMU as a raw node
(C{blockdev-add}), and a C{blockdev-backup} job with C{sync=full} copies the volume's
drive into it. From the job's start, QEMU's copy-before-write filter saves each block the
guest is about to overwrite into the target first, so the copy is the volume as it was at
that moment (crash-consistent: what the disk held, as after a power cut). The job ends
with C{BLOCK_JOB_COMPLETED}; the node is removed (C{blockdev-del}), the zeros the job
allocated are freed again (L{sparsify}) and the file fsynced.
A failed job, a machine that ends meanwhile or a full disk removes the target.
"""

import os

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from zwrm.agent.blockmap import data_extents, punch_hole
from zwrm.drivers.qmp import QMPError
from zwrm.errors import Conflict, NotFound, ResourceExhausted, Unavailable

log = Logger()

#: How often a backup job's machine is checked while the job runs (seconds).
BACKUP_POLL = 0.2
#: The phases of a live migration (its C{live.json}) after which a machine's disks are its
#: own again: a target that resumed, a cancelled migration.
SETTLED = ("resumed", "cancelled")
#: The node name and job id of a volume's copy: C{<PREFIX><its index in the spec>}.
PREFIX = "zwrm-backup-"
#: The events that end a block job.
JOB_ENDED = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


def sparsify(path):
    """
    Free what the copy holds only as zeros the job allocated, then fsync it (blocking: run
    in a thread). QEMU 7.2's backup writes the zeros it copies (the volume's holes among
    them) as C{FALLOC_FL_ZERO_RANGE}: unwritten extents that read as zeros but take their
    room. C{SEEK_DATA} skips them, so every range it calls a hole is punched: a snapshot
    takes the room of the volume's data, not of its size.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
        pos = 0
        for start, end in data_extents(fd, size) + [(size, size)]:
            if start > pos:
                punch_hole(fd, pos, start - pos)
            pos = end
        os.fsync(fd)
    finally:
        os.close(fd)


class QemuVolumeBackup:
    """
    The L{zwrm.interfaces.IVolumeBackup} part of L{zwrm.drivers.qemu.QemuDriver} (it uses
    the driver's machines, QMP connections and the live-migration part's event listeners).
    """

    def backup_volume(self, machine_id, volume_id, target):
        return ensureDeferred(self._backup_volume(machine_id, volume_id, target))

    async def _backup_volume(self, machine_id, volume_id, target):
        m = self._get(machine_id)
        volumes = (m.spec or {}).get("volumes") or []
        index = next((i for i, v in enumerate(volumes) if v["id"] == volume_id), None)
        if index is None:
            raise NotFound(f"machine {machine_id} has no volume {volume_id!r}")
        if m.state != "running" or m.starting or m.qmp is None:
            raise Conflict(f"machine {machine_id} is {m.state}: its volume cannot be copied "
                           "while it runs")
        record = self._live_record(m) or {}
        if record.get("role") and record.get("phase") not in SETTLED:
            raise Conflict(f"machine {machine_id} is moving live: its volume cannot be "
                           "copied now")
        backups = getattr(m, "backups", None)
        if backups is None:
            backups = m.backups = set()
        if volume_id in backups:
            raise Conflict(f"volume {volume_id!r} of machine {machine_id} is being copied "
                           "already")
        size = os.path.getsize(volumes[index]["path"])
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise Conflict(f"{target} exists already") from None
        backups.add(volume_id)
        try:
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            await self._backup_job(m, index, target)
            await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), sparsify,
                                    target)
        except BaseException:
            try:
                os.unlink(target)
            except OSError:
                pass
            raise
        finally:
            backups.discard(volume_id)
        log.info("machine {id}: volume {vol} copied at a point in time to {target}",
                 id=machine_id, vol=volume_id, target=target)

    async def _clear_stale_backups(self, m, q, index):
        """
        End the backup jobs and remove the copy nodes an agent that stopped during a copy
        left in the machine's QEMU (all but those of this process's other copies under way;
        C{index}'s is the copy about to start) (its copy's file is gone: the store removes unfinished
        copies when it starts), so their names are free and their room is given back.
        """
        ours = {f"{PREFIX}{i}" for i in range(len((m.spec or {}).get("volumes") or []))}
        busy = {f"{PREFIX}{i}" for i, v in enumerate((m.spec or {}).get("volumes") or [])
                if v["id"] in m.backups and i != index}  # this process's other copies
        try:
            jobs = [j["device"] for j in await q.execute("query-block-jobs")
                    if j.get("device") in ours - busy]
            nodes = [n.get("node-name") for n in await q.execute(
                "query-named-block-nodes", {"flat": True}) if n.get("node-name") in ours - busy]
        except QMPError as e:
            raise Unavailable(f"machine {m.id}: cannot list its block jobs: {e.desc}") from None
        for job in jobs:
            log.info("machine {id}: cancelling the copy {job} an earlier agent left", id=m.id,
                     job=job)
            try:
                await q.execute("block-job-cancel", {"device": job, "force": True})
            except QMPError:
                pass
        if jobs:
            await self._until_jobs_end(m, q, set(jobs))
        for node in nodes:
            await self._remove_node(m, q, node)

    async def _backup_job(self, m, index, target):
        q = m.qmp
        node = job = f"{PREFIX}{index}"
        await self._clear_stale_backups(m, q, index)
        try:
            await q.execute("blockdev-add", {
                "driver": "raw", "node-name": node,
                "file": {"driver": "file", "filename": target},
            })
        except QMPError as e:
            raise Unavailable(f"machine {m.id}: cannot open the copy's file: {e.desc}") from None
        try:
            ended = self._wait_event(
                m, lambda name, data: name in JOB_ENDED and data.get("device") == job)
            try:
                await q.execute("blockdev-backup", {
                    "job-id": job, "device": f"vol{index}", "target": node, "sync": "full",
                })
            except QMPError as e:
                ended.cancel()
                ended.addErrback(lambda _: None)
                raise Unavailable(f"machine {m.id}: blockdev-backup: {e.desc}") from None
            while not ended.called:
                if m.state != "running" or m.qmp is not q:
                    ended.cancel()
                    ended.addErrback(lambda _: None)
                    raise Unavailable(f"machine {m.id} ended while its volume was copied")
                await deferLater(self.reactor, BACKUP_POLL, lambda: None)
            name, data = await ended
            error = data.get("error")
            if name != "BLOCK_JOB_COMPLETED" or error:
                if error and ("No space left" in error or "Disk quota" in error):
                    raise ResourceExhausted(
                        f"the disk filled up while copying a volume of machine {m.id}")
                raise Unavailable(f"machine {m.id}: the volume's copy failed: "
                                  f"{error or 'cancelled'}")
        finally:
            if m.qmp is q and m.state == "running":
                await self._remove_node(m, q, node)

"""
What a deploy would do, changing nothing (C{zwrm.app.plan}, as C{nomad job plan}): the
spec's diff against the current version, and the replicas it would create, replace
(and where to), destroy or keep, or why it does not fit.
"""

from zwrm import errors
from zwrm.control.appspec import merge_spec, same_version, validate_spec
from zwrm.control.resources.apps import public_spec
from zwrm.control.resources.machines import LIVE


class Planner:
    """Dry runs of deploys."""

    def __init__(self, data, placements, images):
        """
        @param data: the control plane's resource layer.
        @param placements: the L{zwrm.control.placements.Placements} (placed, then given
            back at once).
        @param images: the L{zwrm.control.appspec.ImageCheck}.
        """
        self._data = data
        self._placements = placements
        self._images = images

    async def plan(self, app, given):
        """
        What deploying C{given} to the app row C{app} would do (see
        L{zwrm.control.apps.Apps.plan}).

        @raise zwrm.errors.InvalidArgument: the spec is refused (as deploy would).
        """
        placements = self._placements
        new = validate_spec(merge_spec(app["spec"], given))
        await self._images.check(new)
        old_pub, new_pub = public_spec(app["spec"] or {}), public_spec(new)
        diff = {k: {"old": old_pub.get(k), "new": new_pub.get(k)}
                for k in sorted(set(old_pub) | set(new_pub)) if old_pub.get(k) != new_pub.get(k)}
        rows = await self._data.machines.find(app_id=app["id"], order_by="created_at")
        going, kept, keep, destroy = [], set(), [], []
        for m in rows:
            if m["state"] not in LIVE and m["state"] not in ("failed", "stopped"):
                continue
            replica = m["spec"]["replica"]
            entry = {"machine_id": m["id"], "replica": replica, "host_id": m["host_id"],
                     "state": m["state"]}
            if replica >= new["replicas"]:
                destroy.append(entry)
                going.append(m)
            elif not same_version(m["spec"].get("app_spec"), new) \
                    or m["state"] in ("failed", "stopped"):
                going.append(m)
            else:
                kept.add(replica)
                keep.append(entry)
        missing = [i for i in range(new["replicas"]) if i not in kept]
        unplaceable, placed = None, {}
        await placements.lock.acquire()
        try:
            lent = placements.lend(going)
            try:
                planned = await placements.plan_all(app, new, missing)
                placed = {replica: p.host_id for replica, p, _ in planned}
                for _, p, _ in planned:
                    placements.unplace(p)
            except errors.Unplaceable as e:
                unplaceable = e.message
            finally:
                placements.give_back(lent)
        finally:
            placements.lock.release()
        replace, by_replica = [], {}
        for m in going:
            if m["spec"]["replica"] < new["replicas"]:
                by_replica[m["spec"]["replica"]] = m
                replace.append({"machine_id": m["id"], "replica": m["spec"]["replica"],
                                "host_id": m["host_id"], "state": m["state"],
                                "to_host": placed.get(m["spec"]["replica"])})
        create = [{"replica": i, "host_id": placed.get(i)} for i in missing if i not in by_replica]
        return {"app": app["name"], "version": (app.get("spec_version") or 0) + (1 if diff else 0),
                "changed": bool(diff), "diff": diff, "create": create, "replace": replace,
                "destroy": destroy, "keep": keep, "unplaceable": unplaceable}

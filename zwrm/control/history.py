"""
An app's spec versions (C{zwrm.app.history}) and going back to one
(C{zwrm.app.rollback}: deployed again as a new version, checked and rolled out as any
deploy).  The versions themselves are the apps resource's (C{app_specs}).
"""

from zwrm import errors
from zwrm.control.resources.apps import public_spec


class History:
    """Spec versions and rollbacks."""

    def __init__(self, data, rollout):
        """
        @param data: the control plane's resource layer.
        @param rollout: the L{zwrm.control.rollout.Rollout} (a rollback is a deploy).
        """
        self._data = data
        self._rollout = rollout

    async def versions(self, app):
        """
        Every spec version of the app row C{app}, oldest first: C{[{version, spec,
        created_at, current}]} (specs without their secrets).
        """
        current = app.get("spec_version") or 0
        return [{"version": v["version"], "spec": public_spec(v["spec"]),
                 "created_at": v["created_at"],
                 "current": v["version"] == current and app["spec"] is not None}
                for v in await self._data.apps.spec_versions(app["id"])]

    async def rollback(self, app, version):
        """
        Deploy spec version C{version} of the app row C{app} again (L{None}: the one before
        the current one); its lock held.

        @raise zwrm.errors.NotFound: no such version.
        """
        version, spec = await self.spec_of(app, version)
        await self._rollout.deploy(app, spec, merge=False, rolled_back_to=version)

    async def spec_of(self, app, version):
        """
        C{(version, spec)} of the app row C{app}'s spec version C{version} (L{None}: the
        one before the current one).

        @raise zwrm.errors.NotFound: no such version.
        """
        name = app["name"]
        versions = {v["version"]: v["spec"] for v in await self._data.apps.spec_versions(app["id"])}
        if version is None:
            version = (app.get("spec_version") or 0) - 1
            if app["spec"] is not None and version < 1:
                raise errors.NotFound(f"app {name!r} has no version before its current one")
        if version not in versions:
            raise errors.NotFound(f"app {name!r} has no spec version {version}")
        return version, versions[version]

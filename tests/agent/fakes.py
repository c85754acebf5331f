"""
Fakes of the agent's parts for unit tests. Each passes the same contract as the real part
(tests/agent/test_image_cache_contract.py for L{FakeImages}).
"""

import re

from zope.interface import implementer

from zwrm.errors import InvalidArgument, NotFound
from zwrm.interfaces import IImageCache

_REF = re.compile(r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?")


@implementer(IImageCache)
class FakeImages:
    """
    Stands in for the image cache: one image, C{demo:1}, whose kernel is the file
    C{kernel}; resolve() and pin counting as the real cache does them.
    """

    DIGESTS = ("sha256:" + "a" * 64, "sha256:" + "b" * 64)

    def __init__(self, kernel):
        self.kernel = kernel
        self.pins = {}
        self.hits = self.misses = 0
        self._cached = False

    async def resolve(self, ref, pin=False):
        if not isinstance(ref, str) or not _REF.fullmatch(ref):
            raise InvalidArgument(f"image reference {ref!r} is malformed")
        if ref != "demo:1":
            raise NotFound(f"no image {ref}")
        if self._cached:
            self.hits += len(self.DIGESTS)
        else:
            self.misses += len(self.DIGESTS)
            self._cached = True
        if pin:
            for d in self.DIGESTS:
                self.pin(d)
        return {"kernel": self.kernel, "initrd": None, "disk": None, "cmdline": "console=ttyS0",
                "service_port": None, "manifest": self.DIGESTS[1],
                "digests": list(self.DIGESTS)}

    def pin(self, d):
        self.pins[d] = self.pins.get(d, 0) + 1

    def unpin(self, d):
        self.pins[d] -= 1

    def stats(self):
        return {"size": 0, "limit": 1 << 30, "hits": self.hits, "misses": self.misses,
                "pinned": sum(1 for n in self.pins.values() if n > 0)}

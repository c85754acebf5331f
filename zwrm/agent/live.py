"""
Live migration on the agent (placeholder; see below).
"""

import os

from twisted.internet.threads import deferToThread

from zwrm.agent.blockmap import file_blockmap
from zwrm.drivers.live import VERIFY_BLOCK


def _covered(index, block, extents):
    start, end = index * block, (index + 1) * block
    return any(o < end and start < o + n for o, n in extents)


def compare_blocks(source_hashes, target_hashes, extents, block=VERIFY_BLOCK):
    """
    The blocks where the target's image differs from the source's frozen image and that
    the target's dirty bitmap (C{extents}) does not cover.

    @return: a list of block indices (empty: the verification passes).
    """
    bad = []
    if len(source_hashes) != len(target_hashes):
        return list(range(max(len(source_hashes), len(target_hashes))))
    for i, (a, b) in enumerate(zip(source_hashes, target_hashes, strict=True)):
        if a != b and not _covered(i, block, extents):
            bad.append(i)
    return bad


def image_hashes(path, block=VERIFY_BLOCK):
    """Blocking: the size and per-block hashes (holes hash as zeros) of an image file."""
    return file_blockmap(path, block)


async def verify_images(reactor, source_path, target_path, extents, block=VERIFY_BLOCK):
    """Compare two local images (tests, benchmarks); see L{compare_blocks}."""
    (size_a, a), (size_b, b) = await deferToThread(
        lambda: (image_hashes(source_path, block), image_hashes(target_path, block)))
    bad = compare_blocks(a, b, extents, block) if size_a == size_b else ["size"]
    return {"ok": not bad, "bad_blocks": bad[:100], "blocks": len(a),
            "dirty_blocks": sum(1 for i in range(len(b)) if _covered(i, block, extents)),
            "size": os.path.getsize(target_path)}

"""
What zwrm's HTTP sites share: a root that answers anything it does not hold with a plain
404 (L{twisted.web.pages.notFound}, not C{Resource}'s deprecated default page).
"""

from twisted.web import pages, resource


class Root(resource.Resource):
    """A site's root: the children put on it, and a 404 for every other path."""

    def getChild(self, path, request):
        return pages.notFound()

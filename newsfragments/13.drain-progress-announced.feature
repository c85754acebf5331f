A drain no longer polls the source agent's `volume.progress` while a volume is copied: the
agent announces the copy's progress as progressive results of `volume.send` (at most two a
second, plus the final figures) and the drain stores them as before (`bytes_sent`,
`detail.bytes_done`). An agent from before this is read every `poll` seconds after 10 s
without an announcement. The drain's `poll` option now only sets that, and how soon an
unanswered call to a host is tried again.

"""
The QMP commands the QEMU driver's live-migration verbs send, and their order, against a
scripted QMP connection (no QEMU): the orders that make the pause short and the move safe
(tests/drivers/test_live.py runs them against real QEMU).
"""

import gc
import json
import os
import shutil
import socket
import tempfile

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from zwrm.drivers import live, qemu
from zwrm.drivers.qmp import QMPError
from zwrm.errors import Conflict, NotAuthorized, Unavailable


class ScriptedQMP:
    """Answers QMP commands from C{answers}; records them; events after some commands."""

    def __init__(self, driver, machine, answers):
        self.driver = driver
        self.machine = machine
        self.answers = answers
        self.sent = []
        self.fds = []

    def execute(self, command, arguments=None):
        self.sent.append((command, arguments))
        answer = self.answers.get(command)
        if isinstance(answer, QMPError):
            return fail(answer)
        if command == "block-job-cancel" and not (arguments or {}).get("force"):
            d = succeed({})
            d.addCallback(lambda r: (self.driver._live_event(
                self.machine, "BLOCK_JOB_COMPLETED", {"device": arguments["device"]}), r)[1])
            return d
        if callable(answer):
            answer = answer(arguments)
            if isinstance(answer, QMPError):
                return fail(answer)
        return succeed(answer)

    def execute_with_fd(self, command, arguments, fd):
        self.fds.append(fd)
        return self.execute(command, arguments)

    def names(self):
        return [c for c, _a in self.sent]


class LiveQMPTests(SynchronousTestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="zwrm-liveqmp-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.clock = Clock()
        self.driver = qemu.QemuDriver(self.clock, self.root, accel="tcg")
        self.driver.accel = "tcg"
        # The NBD connections the driver makes: one end of a socket pair each, the other
        # end (the target's) kept in self.peers.
        self.peers, self.connected = [], []

        def connect(m, host, port):
            ours, theirs = socket.socketpair()
            self.addCleanup(ours.close)
            self.addCleanup(theirs.close)
            theirs.setblocking(False)
            self.peers.append(theirs)
            self.connected.append((host, port))
            return succeed(ours)

        self.driver._nbd_connect = connect

    def machine(self, answers, role=None):
        m = qemu._Machine("m1", os.path.join(self.root, "m1"))
        os.makedirs(m.dir)
        m.state = "running"
        vol = os.path.join(self.root, "v1.img")
        with open(vol, "wb") as f:
            f.truncate(1 << 20)
        m.spec = {"id": "m1", "disk": None, "volumes": [{"id": "v1", "path": vol}]}
        m.qmp = ScriptedQMP(self.driver, m, answers)
        self.driver._machines["m1"] = m
        if role:
            with open(m.path("live.json"), "w") as f:
                json.dump({"role": role, "phase": "incoming"}, f)
        return m

    def result(self, d):
        out = []
        d.addBoth(out.append)
        self.clock.advance(0)
        self.assertTrue(out, "did not fire")
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    def test_the_target_starts_its_bitmap_before_it_resumes(self):
        m = self.machine({"query-status": {"status": "paused"},
                          "query-migrate": {"status": "completed"},
                          "query-block": [{"device": "vol0", "inserted": {"node-name": "n0"}}]},
                         role="target")
        self.assertEqual(self.result(self.driver.finish_incoming("m1")),
                         {"resumed": True, "already": False})
        names = m.qmp.names()
        self.assertEqual(names, ["query-status", "query-migrate", "nbd-server-stop",
                                 "query-block", "block-dirty-bitmap-add", "cont",
                                 "announce-self"])
        self.assertEqual(dict(m.qmp.sent)["block-dirty-bitmap-add"],
                         {"node": "n0", "name": "zwrm-verify", "granularity": 65536})

    def test_the_target_does_not_resume_before_its_incoming_migration_completed(self):
        m = self.machine({"query-status": {"status": "inmigrate"},
                          "query-migrate": {"status": "active"}}, role="target")
        self.assertRaises(Conflict, self.result, self.driver.finish_incoming("m1"))
        self.assertNotIn("cont", m.qmp.names())

    def test_the_source_syncs_its_mirrors_before_it_continues(self):
        m = self.machine({"query-migrate": {"status": "pre-switchover"},
                          "query-block-jobs": [{"device": "zwrm-mirror-vol0", "ready": True}]})
        self.result(self.driver.complete_switchover("m1"))
        names = m.qmp.names()
        self.assertEqual(names, ["query-migrate", "query-block-jobs", "block-job-cancel",
                                 "migrate-continue"])
        self.assertEqual(dict(m.qmp.sent)["block-job-cancel"], {"device": "zwrm-mirror-vol0"})
        self.assertEqual(dict(m.qmp.sent)["migrate-continue"], {"state": "pre-switchover"})

    def test_a_mirror_not_ready_at_the_switchover_does_not_continue(self):
        m = self.machine({"query-migrate": {"status": "pre-switchover"},
                          "query-block-jobs": [{"device": "zwrm-mirror-vol0", "ready": False}]})
        self.assertRaises(Conflict, self.result, self.driver.complete_switchover("m1"))
        self.assertNotIn("migrate-continue", m.qmp.names())

    def test_the_migration_pauses_before_its_switchover(self):
        m = self.machine({"query-block-jobs": [{"device": "zwrm-mirror-vol0", "ready": True}]})
        target = {"host": "127.0.0.1", "nbd_port": 1, "migration_port": 2,
                  "exports": {"v1": "vol0"}}
        self.result(self.driver.start_migration("m1", target, downtime_limit_ms=250))
        names = m.qmp.names()
        self.assertEqual(names, ["query-block-jobs", "migrate-set-capabilities",
                                 "migrate-set-parameters", "migrate"])
        caps = {c["capability"]: c["state"] for c in
                dict(m.qmp.sent)["migrate-set-capabilities"]["capabilities"]}
        self.assertEqual(caps, {"events": True, "pause-before-switchover": True,
                                "auto-converge": False, "postcopy-ram": False})
        self.assertEqual(dict(m.qmp.sent)["migrate-set-parameters"]["downtime-limit"], 250)
        self.assertEqual(dict(m.qmp.sent)["migrate"], {"uri": "tcp:127.0.0.1:2"})

    def test_the_mirror_is_write_blocking_and_rate_limited(self):
        m = self.machine({})
        target = {"host": "127.0.0.1", "nbd_port": 1, "migration_port": 2,
                  "exports": {"v1": "vol0"}}
        self.assertEqual(self.result(self.driver.start_mirror("m1", target, speed=12345)),
                         {"jobs": ["zwrm-mirror-vol0"]})
        mirror = dict(m.qmp.sent)["blockdev-mirror"]
        self.assertEqual(mirror, {"job-id": "zwrm-mirror-vol0", "device": "vol0",
                                  "target": "zwrm-nbd-vol0", "sync": "full", "speed": 12345,
                                  "copy-mode": "write-blocking"})

    def test_the_nbd_connection_is_the_driver_s_given_to_qemu(self):
        m = self.machine({})
        target = {"host": "127.0.0.1", "nbd_port": 1, "migration_port": 2,
                  "exports": {"v1": "vol0"}}
        self.result(self.driver.start_mirror("m1", target))
        self.assertEqual(self.connected, [("127.0.0.1", 1)])
        self.assertEqual(m.qmp.names()[1:4], ["getfd", "blockdev-add", "blockdev-mirror"])
        sent = dict(m.qmp.sent)
        self.assertEqual(sent["getfd"], {"fdname": "zwrm-nbd-vol0"})
        self.assertEqual(m.qmp.fds, [self.driver._nbd_sockets["m1"]["zwrm-nbd-vol0"].fileno()])
        self.assertEqual(sent["blockdev-add"]["server"], {"type": "fd", "str": "zwrm-nbd-vol0"})

    def test_a_handshake_not_answered_is_shut_down(self):
        # QEMU's blockdev-add waits in the NBD handshake (on its main thread): after
        # nbd_open_timeout the driver shuts its copy of the connection down, and QEMU's
        # read ends (here: the scripted QEMU answers once the target's end sees the EOF).
        m = self.machine({})
        pending = Deferred()
        original = m.qmp.execute

        def execute(command, arguments=None):
            if command == "blockdev-add":
                m.qmp.sent.append((command, arguments))
                return pending
            return original(command, arguments)

        m.qmp.execute = execute
        target = {"host": "127.0.0.1", "nbd_port": 1, "migration_port": 2,
                  "exports": {"v1": "vol0"}}
        d = self.driver.start_mirror("m1", target)
        out = []
        d.addBoth(out.append)
        self.clock.advance(self.driver.nbd_open_timeout - 1)
        self.assertEqual(out, [])
        with self.assertRaises(BlockingIOError):
            self.peers[0].recv(1)  # still open
        self.clock.advance(1)
        self.assertEqual(self.peers[0].recv(1), b"")  # shut down
        pending.errback(QMPError("GenericError", "Failed to read initial magic"))
        self.assertEqual(len(out), 1)
        self.assertIsInstance(out[0].value, Unavailable)
        self.assertIn("did not answer within 30 s", out[0].value.message)
        self.assertNotIn("blockdev-mirror", m.qmp.names())
        self.assertEqual(self.driver._nbd_sockets, {})

    def test_a_refused_nbd_connection_leaves_nothing(self):
        m = self.machine({"blockdev-add": QMPError("GenericError",
                                                   "TLS handshake failed: authorization denied")})
        target = {"host": "127.0.0.1", "nbd_port": 1, "migration_port": 2,
                  "exports": {"v1": "vol0"}}
        with self.assertRaises(NotAuthorized):
            self.result(self.driver.start_mirror("m1", target))
        self.assertNotIn("blockdev-mirror", m.qmp.names())

    def test_rollback_cancels_mirrors_and_resumes(self):
        m = self.machine({"query-migrate": {"status": "none"},
                          "query-block-jobs": [{"device": "zwrm-mirror-vol0", "ready": True}],
                          "query-status": {"status": "running"}})

        def cancel(args):
            self.driver._live_event(m, "BLOCK_JOB_CANCELLED", {"device": args["device"]})
            return {}

        m.qmp.answers["block-job-cancel"] = cancel
        m.qmp.execute = self._forced(m.qmp)
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        theirs.setblocking(False)
        self.driver._nbd_sockets["m1"] = {"zwrm-nbd-vol0": ours}
        shut = []

        def cancel_after_shutdown(args):
            shut.append(theirs.recv(1) == b"")  # the connection was shut down first
            return cancel(args)

        m.qmp.answers["block-job-cancel"] = cancel_after_shutdown
        self.assertEqual(self.result(self.driver.cancel_migration("m1")), {"cancelled": True})
        self.assertEqual(m.qmp.names(), ["query-migrate", "query-status", "query-block-jobs",
                                         "block-job-cancel", "blockdev-del", "query-status"])
        self.assertEqual(shut, [True])
        self.assertEqual(ours.fileno(), -1)  # this process's copy closed
        self.assertEqual(self.driver._nbd_sockets, {})
        self.assertEqual(dict(m.qmp.sent)["block-job-cancel"],
                         {"device": "zwrm-mirror-vol0", "force": True})

    def record(self, m, **doc):
        with open(m.path("live.json"), "w") as f:
            json.dump(doc, f)

    def test_a_machine_that_arrived_by_migration_rolls_its_next_one_back(self):
        # QEMU still says "completed" of the migration that brought it here; its own began
        # with its mirrors and stopped there: rolled back, its mirror cancelled.
        m = self.machine({"query-migrate": {"status": "completed"},
                          "query-block-jobs": [{"device": "zwrm-mirror-vol0", "ready": False}],
                          "query-status": {"status": "running"}})
        self.record(m, role="source", phase="mirroring")
        m.qmp.answers["block-job-cancel"] = lambda args: (self.driver._live_event(
            m, "BLOCK_JOB_CANCELLED", {"device": args["device"]}), {})[1]
        m.qmp.execute = self._forced(m.qmp)
        self.assertEqual(self.result(self.driver.cancel_migration("m1")), {"cancelled": True})
        self.assertIn("block-job-cancel", m.qmp.names())
        self.assertNotIn("cont", m.qmp.names())
        # and an agent restart at that point cancels it too, not "the target holds it"
        self.record(m, role="source", phase="mirroring")
        m.qmp.sent = []
        self.assertEqual(self.result(Deferred.fromCoroutine(self.driver.live_recover(m))),
                         "recovered: its interrupted live migration was cancelled; it runs here")

    def test_a_completed_migration_is_not_cancelled(self):
        # (at its end the run state says so, whatever the record says, or without one)
        for run, phase in (("postmigrate", "switching"), ("finish-migrate", None),
                           ("running", "migrating")):
            m = self.machine({"query-migrate": {"status": "completed"},
                              "query-status": {"status": run}})
            if phase is not None:
                self.record(m, role="source", phase=phase)
            self.assertRaises(Conflict, self.result, self.driver.cancel_migration("m1"))
            self.assertNotIn("cont", m.qmp.names())
            self.assertEqual(self.result(Deferred.fromCoroutine(self.driver.live_recover(m))),
                             "paused: its live migration completed; the target holds the machine")
            shutil.rmtree(m.dir)

    def test_a_target_whose_migration_completed_is_not_cancelled(self):
        # its guest is here: the caller learns so from the Conflict
        for run in ("running", "paused"):
            m = self.machine({"query-migrate": {"status": "completed"},
                              "query-status": {"status": run}})
            self.record(m, role="target", phase="resumed" if run == "running" else "incoming")
            self.assertRaises(Conflict, self.result, self.driver.cancel_migration("m1"))
            self.assertNotIn("query-block-jobs", m.qmp.names())
            shutil.rmtree(m.dir)

    def test_a_target_that_arrived_held_on_a_full_disk_waits_after_a_restart(self):
        m = self.machine({"query-status": {"status": "io-error"},
                          "query-migrate": {"status": "completed"}}, role="target")
        self.assertEqual(self.result(Deferred.fromCoroutine(self.driver.live_recover(m))),
                         "paused: its incoming migration completed; waiting to be resumed")
        self.assertNotIn("cont", m.qmp.names())

    def test_a_target_that_arrives_held_on_a_full_disk_resumes(self):
        # its source was paused on its full disk: the write that waited is retried here
        m = self.machine({"query-status": {"status": "io-error"},
                          "query-migrate": {"status": "completed"},
                          "query-block": [{"device": "vol0", "inserted": {"node-name": "n0"}}]},
                         role="target")
        self.assertEqual(self.result(self.driver.finish_incoming("m1")),
                         {"resumed": True, "already": False})
        self.assertIn("cont", m.qmp.names())

    @staticmethod
    def _forced(qmp):
        original = ScriptedQMP.execute

        def execute(command, arguments=None):
            if command == "block-job-cancel":
                qmp.sent.append((command, arguments))
                return succeed(qmp.answers["block-job-cancel"](arguments))
            return original(qmp, command, arguments)

        return execute

    def rolled_back(self, answers):
        """A machine mirroring (its connection given to QEMU), and its answers."""
        m = self.machine(dict({"query-migrate": {"status": "none"},
                               "query-status": {"status": "running"},
                               "query-block-jobs": [{"device": "zwrm-mirror-vol0"}]},
                              **answers))
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        self.driver._nbd_sockets["m1"] = {"zwrm-nbd-vol0": ours}
        return m

    @staticmethod
    def answers(*them):
        """A scripted answer: C{them} in turn, then the last again."""
        them = list(them)
        return lambda args: them.pop(0) if len(them) > 1 else them[0]

    def test_a_job_the_cut_failed_is_not_waited_for_and_nothing_is_left(self):
        # The cut connection failed the mirror before its cancel: QEMU lists it no more.
        m = self.rolled_back({
            "block-job-cancel": QMPError("DeviceNotActive",
                                         "Block job 'zwrm-mirror-vol0' not found"),
            "query-block-jobs": self.answers([{"device": "zwrm-mirror-vol0"}], [])})
        self.assertEqual(self.result(self.driver.cancel_migration("m1")), {"cancelled": True})
        self.assertEqual(m.qmp.names(), ["query-migrate", "query-status", "query-block-jobs",
                                         "block-job-cancel", "query-block-jobs", "blockdev-del",
                                         "query-status"])
        self.assertEqual(self.driver._live_listeners["m1"], [])
        gc.collect()  # the event no longer waited for is not an unhandled error
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_job_still_ending_is_waited_for_before_its_node_goes(self):
        # The cut is failing the mirror: QEMU refuses its cancel ("aborting") and its node
        # ("in use") until the job has ended.
        jobs = [[{"device": "zwrm-mirror-vol0"}]] * 3 + [[]]
        m = self.rolled_back({
            "block-job-cancel": QMPError("GenericError", "Job 'zwrm-mirror-vol0' in state "
                                         "'aborting' cannot accept command verb 'cancel'"),
            "query-block-jobs": self.answers(*jobs)})
        d = self.driver.cancel_migration("m1")
        self.clock.advance(0)
        self.assertNotIn("blockdev-del", m.qmp.names())
        self.clock.advance(live.UNDO_POLL)
        self.assertNotIn("blockdev-del", m.qmp.names())
        self.clock.advance(live.UNDO_POLL)
        self.assertEqual(self.result(d), {"cancelled": True})
        self.assertEqual(m.qmp.names()[-3:], ["query-block-jobs", "blockdev-del",
                                              "query-status"])
        self.assertEqual(m.qmp.names().count("query-block-jobs"), 4)

    def test_a_node_refused_while_its_job_ends_is_removed_on_a_later_try(self):
        busy = QMPError("GenericError", "Node 'zwrm-nbd-vol0' is busy: block device is in "
                        "use by block job: mirror")
        m = self.rolled_back({"blockdev-del": self.answers(busy, {}),
                              "query-named-block-nodes": [{"node-name": "zwrm-nbd-vol0"}]})
        m.qmp.answers["block-job-cancel"] = lambda args: (self.driver._live_event(
            m, "BLOCK_JOB_CANCELLED", {"device": args["device"]}), {})[1]
        m.qmp.execute = self._forced(m.qmp)
        d = self.driver.cancel_migration("m1")
        self.clock.advance(0)
        self.assertEqual(m.qmp.names().count("blockdev-del"), 1)
        self.clock.advance(live.UNDO_POLL)
        self.assertEqual(self.result(d), {"cancelled": True})
        self.assertEqual(m.qmp.names().count("blockdev-del"), 2)
        self.assertEqual(dict(m.qmp.sent)["query-named-block-nodes"], {"flat": True})

    def test_a_node_that_stays_is_logged_and_removed_before_the_next_mirror(self):
        busy = QMPError("GenericError", "Node 'zwrm-nbd-vol0' is busy")
        m = self.rolled_back({"blockdev-del": busy,
                              "query-named-block-nodes": [{"node-name": "zwrm-nbd-vol0"}]})
        m.qmp.answers["block-job-cancel"] = lambda args: (self.driver._live_event(
            m, "BLOCK_JOB_CANCELLED", {"device": args["device"]}), {})[1]
        m.qmp.execute = self._forced(m.qmp)
        logged = []
        observer = logged.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        d = self.driver.cancel_migration("m1")
        self.clock.pump([live.UNDO_POLL] * int(live.UNDO_TIMEOUT / live.UNDO_POLL + 2))
        self.assertEqual(self.result(d), {"cancelled": True})
        [warning] = [formatEvent(e) for e in logged if "could not be removed" in formatEvent(e)]
        self.assertIn("its NBD node zwrm-nbd-vol0 could not be removed within 30 s: Node "
                      "'zwrm-nbd-vol0' is busy", warning)
        # The next mirror: QEMU refuses the node's name; the old node goes, the new comes.
        m.qmp.sent = []
        m.qmp.answers.update({
            "blockdev-del": {},
            "blockdev-add": self.answers(
                QMPError("GenericError", "Duplicate nodes with node-name='zwrm-nbd-vol0'"),
                {})})
        target = {"host": "127.0.0.1", "nbd_port": 1, "migration_port": 2,
                  "exports": {"v1": "vol0"}}
        self.result(self.driver.start_mirror("m1", target))
        self.assertEqual(m.qmp.names()[1:6], ["getfd", "blockdev-add", "blockdev-del",
                                              "blockdev-add", "blockdev-mirror"])

    def test_a_node_that_cannot_go_fails_the_next_mirror(self):
        m = self.machine({"blockdev-add": QMPError(
            "GenericError", "Duplicate nodes with node-name='zwrm-nbd-vol0'"),
            "blockdev-del": QMPError("GenericError", "Node 'zwrm-nbd-vol0' is busy"),
            "query-named-block-nodes": [{"node-name": "zwrm-nbd-vol0"}]})
        target = {"host": "127.0.0.1", "nbd_port": 1, "migration_port": 2,
                  "exports": {"v1": "vol0"}}
        d = self.driver.start_mirror("m1", target)
        self.clock.pump([live.UNDO_POLL] * int(live.UNDO_TIMEOUT / live.UNDO_POLL + 2))
        e = self.assertRaises(Unavailable, self.result, d)
        self.assertIn("an earlier mirror's node zwrm-nbd-vol0 is still there and cannot be "
                      "removed", e.message)
        self.assertNotIn("blockdev-mirror", m.qmp.names())

    def test_a_gone_connection_is_unavailable(self):
        self.machine({"query-status": QMPError("Disconnected", "gone")}, role="target")
        self.assertRaises(Unavailable, self.result, self.driver.finish_incoming("m1"))

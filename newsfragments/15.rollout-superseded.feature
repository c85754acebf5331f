A deploy of another version, `zwrm rollback` or `zwrm destroy` supersedes the rolling update
under way instead of queueing behind it, as a new job version cancels a Nomad deployment: the
update stops waiting, removes its batch's new machines and fails with `zwrm.error.conflict`
("superseded by a later deploy"). The fix for a bad health path rolled out in 55 s on the
local cluster, where it waited 5 min 39 s before (the bad update's deadline and revert). A
spec that is refused stops nothing.

`zwrm status` shows the app's spec version and its last rolling update (`update    under way
(...): 2 of 3 machine(s) replaced`, `completed`, `failed`, `reverted`); `zwrm.app.status` gives
it as `rollout` (`state`, `version`, `replaced`, `total`, `reason`, `at`).

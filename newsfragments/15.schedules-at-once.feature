Snapshot schedules that are due together run at once (up to four apps), one volume at a time on each host: a slow copy of one app's volume no longer holds every other app's schedule back.

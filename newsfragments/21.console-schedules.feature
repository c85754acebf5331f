The console's Volumes view shows each volume's app snapshot schedule and how its last run went, live.

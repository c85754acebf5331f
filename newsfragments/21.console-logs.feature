The web console has a Logs button on each machine (operators only): the tail of its serial console, as `zwrm logs`, with Refresh.

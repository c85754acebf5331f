zwrm host list says "ready (agent not connected)" for a host whose agent stopped, restarts or is cut off, until it is offline (the console said "agent not callable"; the CLI showed "ready").

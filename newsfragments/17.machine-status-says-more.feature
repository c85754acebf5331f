`zwrm machines status ID` now gives the machine's image, volumes and restarts (with the next
restart's time and reason when one is due), and its recent events with their times, as
`zwrm host status` does.

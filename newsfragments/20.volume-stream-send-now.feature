The volume stream's sender moves its encrypted records out of OpenSSL into one reused buffer and
sends them straight to the socket while nothing is queued, instead of through two new objects per
64 KiB and a reactor turn per write: about 0.4 CPU-seconds less per GiB at the two ends together.
See docs/performance.md.

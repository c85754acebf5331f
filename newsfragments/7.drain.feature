`zwrm host drain|drain-status|undrain|activate`: a drain moves every VM off a host. Volumes are
copied agent to agent over TLS while the VM runs, then only the changed blocks after it stops;
the replacement must pass its health check before the original and the source volume are
destroyed. Any failure rolls the migration back, and a control-plane restart resumes it.

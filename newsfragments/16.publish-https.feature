The control plane accepts `--publish PORT[:GUESTPORT]/https` (with `--domain`), which the agents' ingress already terminated: routed by domain like http; without a domain the deploy is refused.

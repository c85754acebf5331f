"""
The acceptance suite: the production path of docs/install.md, run as an operator runs it.

Run it with ``pytest tests/acceptance`` (or ``-m acceptance``) as root.  conftest.py builds one
cluster per run (tests/acceptance/cluster.py: .debs cached by source hash, install.sh over TLS,
hosts in network namespaces from zwrm.testing.netns, services from their units); each
``test_NN_<step>.py`` is a step group using the ``cluster`` fixture, run in name order.

To add a step for a new feature: a new ``test_NN_<name>.py`` (NN after the steps it needs),
driving the cluster through ``cluster.zwrm(...)`` / ``cluster.zwrm_json(...)`` (the installed
CLI on the client host), ``cluster.cli_on_cp(...)`` (as root on the control-plane host),
``cluster.sh(host, argv)``, ``cluster.app_request(machine, path)``; time its slow part with
``with cluster.phase("..."):`` so it shows in the summary; leave what later steps need in
``cluster.state``.  Keep the whole suite within a few minutes.
"""

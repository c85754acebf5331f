`/metrics` counts the network views sent with the whole hosts list by reason
(`zwrm_network_view_full_list_reasons_total{reason=...}`: a new agent session, a list changed
meanwhile, a lost or refused view, answers out of order, ...), so an operator can tell a
cluster that resumes its agents' lists from one that keeps resending them.

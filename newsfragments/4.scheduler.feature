Placement scheduler: hard filters (host ready, region, datacenter, required labels, vCPUs,
memory, disk after reservations, volume pin, exclusion list) before the strategy ranks hosts;
`zwrm.error.unplaceable` says how many hosts each filter removed ("0/12 hosts fit: 3 not ready,
5 wrong region, 4 insufficient memory"). Strategies are plugins: `spread` and `pack` built in,
third-party ones in `[scheduler] plugin_dirs` (examples: `plugins/zwrm_label_affinity.py`,
`plugins/zwrm_least_recent.py`; guide: docs/plugins.md). Exact placement at over 100,000
placements/s with 10,000 hosts (docs/performance.md).

#!/usr/bin/env bash
# Installs zwrm on this host as a worker (agent) or as the control plane, from the Debian
# packages, writes its configuration, enables and starts the service. Safe to run again:
# an unchanged configuration is left alone, a changed one is written and the service restarted.
#
#   curl -fsSL https://releases.zwrm.eu/zwrmd/install.sh | sudo bash -s -- \
#       --agent --control-plane-url=https://cp.example.com:8080 --region=eu-central \
#       --datacenter=dc1 --join-token-file=/root/join-token
#
# See docs/install.md.
set -euo pipefail

# The whole script is one block, read entirely before it runs: piped into `bash -s`, nothing it
# runs (apt-get, dpkg) can read the rest of the script from standard input.
{

PROG=install.sh
ZWRM_ETC=${ZWRM_ETC:-/etc/zwrm}
ZWRM_LIB=${ZWRM_LIB:-/var/lib/zwrm}
# The kernel settings bridge networking needs, which the agent's unit may not change itself
# (ProtectKernelTunables=yes): applied now and at every boot by systemd-sysctl.
SYSCTL_CONF=/etc/sysctl.d/60-zwrm-agent.conf
VENV=/opt/zwrm/venv

usage() {
    cat <<EOF
Usage: $PROG (--agent | --control-plane) [options]

Role (exactly one):
  --agent                     install zwrm-agent: join a control plane and run VMs here
  --control-plane             install zwrm-control: the control plane

Options:
  --control-plane-url=URL     agent: where the control plane is (https://cp.example.com:8080,
                              or wss://cp.example.com:8080/ws); required.
                              control plane: the URL agents will use; its host name goes into
                              the TLS certificate and the control plane listens with TLS.
  --region=NAME               agent: the host's region (required), e.g. eu-central
  --datacenter=NAME           agent: the host's datacenter (required), e.g. dc1
  --join-token-file=FILE      agent: a file holding a token from \`zwrm tokens create\`
                              (or the token in \$ZWRM_JOIN_TOKEN, or --join-token=TOKEN);
                              written to $ZWRM_ETC/join-token (0640 root:zwrm)
  --join-token=TOKEN          agent: the token itself (visible in the process list while
                              this script runs: prefer the file or \$ZWRM_JOIN_TOKEN)
  --address=IP                agent: the address other hosts reach this one at; volumes
                              are streamed to it there (drains between hosts need it)
  --network=user|bridge       agent: the VMs' networking (docs/networking.md): user (the
                              agent's default: QEMU user mode, each service port forwarded
                              on this host's 127.0.0.1) or bridge (the cluster network, the
                              overlay between hosts, published ports on --address; needs
                              --address; writes $SYSCTL_CONF)
  --fence-after=SECONDS       agent: stop this host's machines with volumes once the control
                              plane has not answered for this long (10-86400; default: never);
                              a cut-off host then runs no copy of a machine whose volume is
                              recovered elsewhere (docs/operators.md, "Fencing")
  --listen=ENDPOINT           control plane: a Twisted endpoint to listen on instead of the
                              one derived from --control-plane-url (repeatable)
  --deb=PATH                  install from this .deb file or directory of .deb files
  --apt-repo=URL              install from this APT repository (adds it to sources.list.d)
  --apt-key=FILE              the repository's signing key (OpenPGP, armored or binary):
                              needed with --apt-repo; written to /etc/apt/keyrings
  --allow-insecure            allow a plain ws:// / http:// URL to a non-loopback host
  --no-start                  write the configuration but do not enable or start the service
  --dry-run                   check the arguments and print what would be done
  -h, --help                  show this help
EOF
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

bad_usage() {
    echo "$PROG: $*" >&2
    echo "Try '$PROG --help'." >&2
    exit 2
}

role=""
url=""
region=""
datacenter=""
token=""
token_file=""
address=""
network=""
fence_after=""
apt_key=""
listen=()
debs=()
apt_repo=""
allow_insecure=0
start=1
dry_run=0

need_value() {
    # $1 = flag, $2 = value
    [ -n "$2" ] || bad_usage "$1 needs a value ($1=VALUE)"
}

while [ $# -gt 0 ]; do
    arg=$1
    shift
    case "$arg" in
        --agent | --control-plane)
            r=${arg#--}
            [ -z "$role" ] || [ "$role" = "$r" ] || bad_usage "give either --agent or --control-plane, not both"
            role=$r
            ;;
        --control-plane-url=* | --region=* | --datacenter=* | --join-token=* | --join-token-file=* | --address=* | --network=* | --fence-after=* | --listen=* | --deb=* | --apt-repo=* | --apt-key=*)
            name=${arg%%=*}
            value=${arg#*=}
            need_value "$name" "$value"
            case "$name" in
                --control-plane-url) url=$value ;;
                --region) region=$value ;;
                --datacenter) datacenter=$value ;;
                --join-token) token=$value ;;
                --join-token-file) token_file=$value ;;
                --address) address=$value ;;
                --network) network=$value ;;
                --fence-after) fence_after=$value ;;
                --apt-key) apt_key=$value ;;
                --listen) listen+=("$value") ;;
                --deb) debs+=("$value") ;;
                --apt-repo) apt_repo=$value ;;
            esac
            ;;
        --control-plane-url | --region | --datacenter | --join-token | --join-token-file | --address | --network | --fence-after | --listen | --deb | --apt-repo | --apt-key)
            [ $# -gt 0 ] && [ "${1#--}" = "$1" ] || bad_usage "$arg needs a value ($arg=VALUE)"
            set -- "$arg=$1" "${@:2}"
            ;;
        --allow-insecure) allow_insecure=1 ;;
        --no-start) start=0 ;;
        --dry-run) dry_run=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) bad_usage "unknown option '$arg'" ;;
    esac
done

[ -n "$role" ] || bad_usage "give --agent or --control-plane"

# --- checking the arguments -------------------------------------------------------------

name_re='^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$'
token_re='^zwrm1\.[a-z0-9]{6}\.[a-z0-9]{32}\.[0-9a-f]{64}$'
url_re='^(https?|wss?)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$'

url_host=""
url_port=""
url_scheme=""
if [ -n "$url" ]; then
    [[ $url =~ $url_re ]] || bad_usage "--control-plane-url: '$url' is not a URL like https://cp.example.com:8080"
    url_scheme=${BASH_REMATCH[1]}
    url_host=${BASH_REMATCH[2]}
    url_port=${BASH_REMATCH[3]#:}
    url_path=${BASH_REMATCH[4]}
    if [ -n "$url_port" ] && { [ "$url_port" -lt 1 ] || [ "$url_port" -gt 65535 ]; }; then
        bad_usage "--control-plane-url: port $url_port is out of range"
    fi
fi

is_loopback() {
    case "$1" in
        localhost | 127.* | "[::1]" | ::1) return 0 ;;
        *) return 1 ;;
    esac
}

if [ "$role" = agent ]; then
    [ ${#listen[@]} -eq 0 ] || bad_usage "--listen is only for --control-plane"
    # The token: --join-token-file, else --join-token, else $ZWRM_JOIN_TOKEN.
    if [ -n "$token_file" ]; then
        [ -z "$token" ] || bad_usage "give --join-token-file or --join-token, not both"
        [ -r "$token_file" ] || bad_usage "--join-token-file: cannot read $token_file"
        token=$(tr -d ' \t\r\n' <"$token_file")
        [ -n "$token" ] || bad_usage "--join-token-file: $token_file is empty"
    elif [ -z "$token" ]; then
        token=${ZWRM_JOIN_TOKEN:-}
    fi
    [ -n "$url" ] || bad_usage "--agent needs --control-plane-url=URL"
    [ -n "$region" ] || bad_usage "--agent needs --region=NAME"
    [ -n "$datacenter" ] || bad_usage "--agent needs --datacenter=NAME"
    [ -n "$token" ] || bad_usage "--agent needs --join-token-file=FILE, \$ZWRM_JOIN_TOKEN or --join-token=TOKEN (create one with 'zwrm tokens create' on the control plane)"
    [[ $region =~ $name_re ]] || bad_usage "--region: '$region' must be letters, digits, '-' or '_'"
    [[ $datacenter =~ $name_re ]] || bad_usage "--datacenter: '$datacenter' must be letters, digits, '-' or '_'"
    if [ -n "$address" ]; then
        [[ $address =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || bad_usage "--address: '$address' is not an IPv4 address"
    fi
    case "$network" in
        "" | user) ;;
        bridge) [ -n "$address" ] || bad_usage "--network=bridge needs --address=IP (the overlay's source address, where published ports listen)" ;;
        *) bad_usage "--network: '$network' must be user or bridge" ;;
    esac
    if [ -n "$fence_after" ]; then
        [[ $fence_after =~ ^[0-9]{1,5}$ ]] && { [ "$fence_after" -eq 0 ] || { [ "$fence_after" -ge 10 ] && [ "$fence_after" -le 86400 ]; }; } \
            || bad_usage "--fence-after: '$fence_after' must be 0 (never) or whole seconds from 10 to 86400"
    fi
    [[ $token =~ $token_re ]] || bad_usage "--join-token: not a zwrm join token (expected zwrm1.<id>.<secret>.<ca-fingerprint>, as printed by 'zwrm tokens create')"
    # The agent speaks WebSocket: https -> wss, http -> ws, and /ws unless a path is given.
    case "$url_scheme" in
        https) ws_scheme=wss ;;
        http) ws_scheme=ws ;;
        *) ws_scheme=$url_scheme ;;
    esac
    if [ "$ws_scheme" = ws ] && ! is_loopback "$url_host" && [ $allow_insecure -eq 0 ]; then
        bad_usage "--control-plane-url: $url is not encrypted; use https:// or wss:// (or --allow-insecure)"
    fi
    [ -n "$url_path" ] && [ "$url_path" != / ] || url_path=/ws
    agent_url="$ws_scheme://$url_host${url_port:+:$url_port}$url_path"
    package=zwrm-agent
    unit=zwrm-agent.service
    config="$ZWRM_ETC/agent.toml"
else
    [ -z "$region" ] || bad_usage "--region is only for --agent"
    [ -z "$datacenter" ] || bad_usage "--datacenter is only for --agent"
    [ -z "$token" ] || bad_usage "--join-token is only for --agent"
    [ -z "$token_file" ] || bad_usage "--join-token-file is only for --agent"
    [ -z "$address" ] || bad_usage "--address is only for --agent"
    [ -z "$network" ] || bad_usage "--network is only for --agent"
    [ -z "$fence_after" ] || bad_usage "--fence-after is only for --agent"
    package=zwrm-control
    unit=zwrm-control.service
    config="$ZWRM_ETC/control.toml"
    pki_dir="$ZWRM_LIB/control/pki"
    port=${url_port:-8080}
    if [ ${#listen[@]} -eq 0 ]; then
        if [ -z "$url" ]; then
            listen=("tcp:8080:interface=127.0.0.1")
        elif [ "$url_scheme" = https ] || [ "$url_scheme" = wss ]; then
            listen=("ssl:$port:privateKey=$pki_dir/server.key:certKey=$pki_dir/server.pem:extraCertChain=$pki_dir/ca.pem")
        elif is_loopback "$url_host"; then
            listen=("tcp:$port:interface=127.0.0.1")
        elif [ $allow_insecure -eq 1 ]; then
            listen=("tcp:$port")
        else
            bad_usage "--control-plane-url: $url is not encrypted; use https:// (or --allow-insecure)"
        fi
    fi
    for l in "${listen[@]}"; do
        [[ $l != *\"* && $l != *\\* ]] || bad_usage "--listen: '$l' must not contain quotes or backslashes"
    done
fi

[ ${#debs[@]} -eq 0 ] || [ -z "$apt_repo" ] || bad_usage "give --deb or --apt-repo, not both"
if [ -n "$apt_repo" ]; then
    [ -n "$apt_key" ] || bad_usage "--apt-repo needs --apt-key=FILE (the repository's signing key)"
    [ -r "$apt_key" ] || bad_usage "--apt-key: cannot read $apt_key"
else
    [ -z "$apt_key" ] || bad_usage "--apt-key is only for --apt-repo"
fi

# --- the configuration ------------------------------------------------------------------

render_config() {
    if [ "$role" = agent ]; then
        cat <<EOF
# Written by install.sh; see docs/install.md. The join token is in $token_path.
[agent]
control_plane_url = "$agent_url"
region = "$region"
datacenter = "$datacenter"
join_token_file = "$token_path"
data_dir = "$ZWRM_LIB/agent"
EOF
        if [ -n "$address" ]; then
            echo "address = \"$address\""
            echo "volume_endpoint = \"tcp:7443:interface=$address\""
        fi
        [ -z "$network" ] || echo "network = \"$network\""
        [ -z "$fence_after" ] || echo "fence_after = $((10#$fence_after))"
        [ $allow_insecure -eq 0 ] || echo "insecure = true"
    else
        echo "# Written by install.sh; see docs/install.md."
        echo "[control]"
        printf 'listen = ['
        local sep=""
        for l in "${listen[@]}"; do
            printf '%s"%s"' "$sep" "$l"
            sep=", "
        done
        printf ']\n'
        echo "data_dir = \"$ZWRM_LIB/control\""
        [ $allow_insecure -eq 0 ] || echo "insecure_listen = true"
        cat <<EOF

[health]
check_interval = 15
offline_after = 30

[scheduler]
strategy = "spread"
EOF
    fi
}

# The CLI's settings on the control-plane host, so that `zwrm host list` works as printed.
render_cli_config() {
    local cli_url
    if [ -n "$url" ]; then
        cli_url=$url
    else
        cli_url="ws://127.0.0.1:$port/ws"
    fi
    cat <<EOF
# Written by install.sh: the zwrm CLI's settings for root on this host (docs/install.md).
# A user's ~/.zwrm/config.toml wins over this file.
url = "$cli_url"
ca_file = "$pki_dir/ca.pem"
token_file = "$ZWRM_LIB/control/operator.token"
EOF
}

# The kernel settings of --network=bridge (docs/networking.md, "What the agent needs").
render_sysctl() {
    cat <<EOF
# Written by install.sh for zwrm-agent with --network=bridge (docs/networking.md). The
# agent's unit may not change kernel settings (ProtectKernelTunables=yes), so they are here.
# Guests' traffic to the outside is routed (and NATed) by this host.
net.ipv4.ip_forward = 1
# Bridged guest frames are filtered by the agent's bridge rules only: with br_netfilter's
# default (1) they would also pass the IP forward hooks, where the agent's rules drop new
# connections into the cluster network (the overlay and the ingress between hosts).
net.bridge.bridge-nf-call-iptables = 0
EOF
}

token_path="$ZWRM_ETC/join-token"
cli_config="$ZWRM_ETC/cli.toml"
new_config=$(render_config)
new_cli_config=""
[ "$role" != control-plane ] || new_cli_config=$(render_cli_config)
new_sysctl=""
[ "$network" != bridge ] || new_sysctl=$(render_sysctl)

if [ $dry_run -eq 1 ]; then
    source_note=""
    [ ${#debs[@]} -eq 0 ] || source_note=" (from ${debs[*]})"
    [ -z "$apt_repo" ] || source_note=" (from $apt_repo)"
    echo "would install: zwrm $package$source_note"
    echo "would write $config:"
    echo "$new_config" | sed -e 's/^/    /'
    [ "$role" != agent ] || echo "would write the join token (zwrm1.${token:6:6}.<secret>.${token: -64}) to $token_path"
    if [ -n "$new_cli_config" ]; then
        echo "would write $cli_config:"
        echo "$new_cli_config" | sed -e 's/^/    /'
    fi
    if [ -n "$new_sysctl" ]; then
        echo "would write $SYSCTL_CONF and apply it:"
        echo "$new_sysctl" | sed -e 's/^/    /'
    fi
    if [ "$role" = control-plane ] && [ -n "$url_host" ] && [[ ${listen[0]} == ssl:* ]]; then
        echo "would create the CA and a server certificate for ${url_host} in $pki_dir"
    fi
    [ $start -eq 0 ] || echo "would enable and start $unit"
    exit 0
fi

# --- doing it ---------------------------------------------------------------------------

[ "$(id -u)" -eq 0 ] || die "must run as root (sudo bash -s -- ...)"
[ -r /etc/os-release ] && . /etc/os-release
[ "${ID:-}" = debian ] || [ "${ID_LIKE:-}" = debian ] || echo "$PROG: warning: made for Debian 12, this is ${PRETTY_NAME:-unknown}" >&2

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

export DEBIAN_FRONTEND=noninteractive
# Wait (bounded) for another apt or dpkg run to finish, e.g. unattended-upgrades at boot.
apt_get() {
    apt-get -o DPkg::Lock::Timeout=300 "$@"
}
if [ ${#debs[@]} -gt 0 ]; then
    files=()
    for d in "${debs[@]}"; do
        if [ -d "$d" ]; then
            for f in "$d"/zwrm_*.deb "$d"/"$package"_*.deb; do
                [ -e "$f" ] && files+=("$(realpath "$f")")
            done
        elif [ -f "$d" ]; then
            files+=("$(realpath "$d")")
        else
            die "--deb: $d does not exist"
        fi
    done
    [ ${#files[@]} -gt 0 ] || die "--deb: no zwrm .deb files in ${debs[*]}"
    echo "$PROG: installing ${files[*]##*/}"
    apt_get install -y -qq --no-install-recommends "${files[@]}" </dev/null >/dev/null \
        || die "installing the packages failed (see apt-get's messages above)"
elif [ -n "$apt_repo" ]; then
    # The repository's key goes to /etc/apt/keyrings and only this source trusts it.
    install -d -m 0755 /etc/apt/keyrings
    if grep -q -- '-----BEGIN PGP PUBLIC KEY BLOCK-----' "$apt_key"; then
        keyring=/etc/apt/keyrings/zwrm.asc
    else
        keyring=/etc/apt/keyrings/zwrm.gpg
    fi
    install -m 0644 "$apt_key" "$keyring"
    echo "deb [signed-by=$keyring] $apt_repo ${VERSION_CODENAME:-bookworm} main" >/etc/apt/sources.list.d/zwrm.list
    apt_get update -qq </dev/null || die "apt-get update failed for $apt_repo"
    apt_get install -y -qq --no-install-recommends zwrm "$package" </dev/null >/dev/null \
        || die "installing $package from $apt_repo failed"
elif ! installed "$package"; then
    apt_get install -y -qq --no-install-recommends zwrm "$package" </dev/null >/dev/null 2>&1 \
        || die "$package is not installed and no APT source has it: give --deb=PATH or --apt-repo=URL"
fi
installed "$package" || die "$package did not install"
getent group zwrm >/dev/null || die "the zwrm group is missing (the zwrm package's postinst did not run?)"

install -d -o root -g zwrm -m 0750 "$ZWRM_ETC"

if [ "$role" = control-plane ] && [[ ${listen[0]} == ssl:* ]]; then
    install -d -o zwrm -g zwrm -m 0750 "$ZWRM_LIB/control"
    names=("$url_host" localhost 127.0.0.1)
    fingerprint=$(runuser -u zwrm -- "$VENV/bin/python3" -m zwrm.pki init "$pki_dir" "${names[@]}") \
        || die "could not create the CA in $pki_dir"
fi

changed=0
# write_file PATH TEXT [MODE OWNER]: PATH (0640 root:zwrm unless told) holds TEXT; sets
# changed=1 if it did not.
write_file() {
    if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then
        echo "$PROG: $1 is unchanged"
    else
        tmp=$(mktemp "$(dirname "$1")/.install.XXXXXX")
        printf '%s\n' "$2" >"$tmp"
        chown "${4:-root:zwrm}" "$tmp"
        chmod "${3:-0640}" "$tmp"
        mv -f "$tmp" "$1"
        echo "$PROG: wrote $1"
        changed=1
    fi
}
[ "$role" != agent ] || write_file "$token_path" "$token"
write_file "$config" "$new_config"
if [ -n "$new_cli_config" ]; then
    # The CLI's settings do not change what the service runs: no restart for them.
    service_changed=$changed
    write_file "$cli_config" "$new_cli_config"
    changed=$service_changed
fi
if [ -n "$new_sysctl" ]; then
    # Kernel settings, applied here at once: no restart for them either.
    service_changed=$changed
    install -d -m 0755 "$(dirname "$SYSCTL_CONF")"
    write_file "$SYSCTL_CONF" "$new_sysctl" 0644 root:root
    changed=$service_changed
    # -e: a key the kernel lacks (br_netfilter not loaded: nothing to turn off) is no error.
    sysctl -q -e -p "$SYSCTL_CONF" >/dev/null || die "could not apply $SYSCTL_CONF (sysctl -p)"
    [ "$(sysctl -n net.ipv4.ip_forward)" = 1 ] \
        || die "net.ipv4.ip_forward is still 0 after applying $SYSCTL_CONF"
fi

if [ $start -eq 1 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable --quiet "$unit"
        if systemctl is-active --quiet "$unit"; then
            [ $changed -eq 0 ] || systemctl restart "$unit"
        else
            systemctl start "$unit"
        fi
        echo "$PROG: $unit is enabled and $(systemctl is-active "$unit")"
    else
        echo "$PROG: systemd is not running here; start the service by hand: systemctl enable --now $unit" >&2
    fi
fi

echo
if [ "$role" = agent ]; then
    cat <<EOF
The agent joins $agent_url (region $region, datacenter $datacenter).
Verify on the control plane:   zwrm host list
Follow the agent's log:        journalctl -u $unit -f
EOF
else
    [ -z "${fingerprint:-}" ] || echo "Control plane CA fingerprint: $fingerprint"
    cat <<EOF
The zwrm command's settings:      $cli_config (root; see docs/install.md for other users)
Create a join token for agents:   zwrm tokens create
Verify:                           zwrm host list
Follow the log:                   journalctl -u $unit -f
EOF
fi
exit 0
}

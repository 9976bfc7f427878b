#!/usr/bin/env bash
# An ssh server on 127.0.0.1 with two host aliases, for DeepSpeed's pdsh runner in
# tests/test_hostfile.py (and .ci/run).
#
#   tests/cluster/sshd.sh up       make a host key and a client key for the test, start sshd
#   tests/cluster/sshd.sh down     stop the sshd this script started
#   tests/cluster/sshd.sh status   exit 0 when `ssh imagen-host-1 true` works
#
# Everything lives in $IMAGEN_TRAIN_SSHD_DIR (default /tmp/imagen-train-sshd): keys, sshd_config,
# the pid file, and ssh_config, which names the hosts imagen-host-1 and imagen-host-2 (both
# 127.0.0.1, on the port sshd listens on). Clients use it with `ssh -F $dir/ssh_config`; pdsh
# with PDSH_SSH_ARGS_APPEND="-F $dir/ssh_config". Nothing under /etc/ssh or ~/.ssh is touched.
# Needs root and Debian's openssh-server (plus pdsh for the runner).
set -euo pipefail

D=${IMAGEN_TRAIN_SSHD_DIR:-/tmp/imagen-train-sshd}
HOSTS="imagen-host-1 imagen-host-2"

reachable() {
  [[ -f $D/ssh_config ]] && ssh -F "$D/ssh_config" -o BatchMode=yes -o ConnectTimeout=5 imagen-host-1 true 2>/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

up() {
  [[ -x /usr/sbin/sshd ]] || { echo "sshd.sh: /usr/sbin/sshd not found (apt-get install openssh-server)" >&2; exit 3; }
  if reachable; then echo "sshd.sh: already up"; return 0; fi
  down quiet
  mkdir -p "$D" /run/sshd
  chmod 700 "$D"
  [[ -f $D/host_key ]] || ssh-keygen -q -t ed25519 -N '' -f "$D/host_key"
  [[ -f $D/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -f "$D/id_ed25519" -C imagen-train-test
  cp "$D/id_ed25519.pub" "$D/authorized_keys"
  local port
  port=$(free_port)
  cat > "$D/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $port
HostKey $D/host_key
PidFile $D/sshd.pid
AuthorizedKeysFile $D/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AcceptEnv LANG LC_*
MaxStartups 50
CONF
  cat > "$D/ssh_config" <<CONF
Host $HOSTS
  HostName 127.0.0.1
  Port $port
  User root
  IdentityFile $D/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
CONF
  /usr/sbin/sshd -f "$D/sshd_config" -E "$D/sshd.log"
  for _ in $(seq 50); do
    reachable && { echo "sshd.sh: up on 127.0.0.1:$port ($D/ssh_config)"; return 0; }
    sleep 0.2
  done
  echo "sshd.sh: sshd did not answer; log in $D/sshd.log" >&2
  exit 1
}

down() {
  local pid
  if [[ -s $D/sshd.pid ]]; then
    pid=$(cat "$D/sshd.pid")
    # Only our sshd: a stale pid file may name a reused pid.
    if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == sshd ]] && kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$D/sshd.pid"
  fi
  [[ ${1:-} == quiet ]] || echo "sshd.sh: down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) reachable ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

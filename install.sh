#!/bin/sh
# Installs, upgrades or removes voicectl as a systemd service on this machine.
#
#   sudo sh install.sh --domain voice.example.com [--email ops@example.com]   first install
#   sudo sh install.sh                                                        upgrade (keeps config and data)
#   sudo sh install.sh --uninstall [--purge]                                  remove
#   sh install.sh --destdir /tmp/stage --no-start --binary target/release/voicectl --domain d
#                                                           stage into a directory, touch nothing else
#
# Safe to re-run: every step checks what is already there. An existing config is never
# overwritten; the unit file is always the one shipped next to this script.
set -eu
umask 022

SERVICE=voicectl
BIN_PATH=/usr/local/bin/voicectl
CONF_DIR=/etc/voicectl
CONF_FILE=$CONF_DIR/voicectl.toml
DATA_DIR=/var/lib/voicectl
UNIT_PATH=/etc/systemd/system/voicectl.service

say() { printf '%s\n' "$*"; }
err() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}
need_cmd() {
    command -v "$1" >/dev/null 2>&1 || err "need '$1', which is not in PATH"
}

usage() {
    cat <<'EOF'
Usage: install.sh [options]

  --binary PATH    install this prebuilt voicectl instead of building one
                   (default: cargo build --release --locked in this checkout)
  --domain NAME    public host name, for the first install's config (voicectl init)
  --email ADDR     ACME contact, for the first install's config
  --no-start       install, but do not enable or (re)start the service
  --destdir DIR    stage the install under DIR; never touches users, owners or systemd
  --uninstall      stop and remove the service and binary; keeps config and data
  --purge          with --uninstall: also delete /etc/voicectl, /var/lib/voicectl and the
                   voicectl user
  -h, --help       this text
EOF
}

DESTDIR=
BINARY=
DOMAIN=
EMAIL=
START=1
ACTION=install
PURGE=0

need_arg() {
    [ "$2" -ge 2 ] || err "$1 needs a value"
}

while [ $# -gt 0 ]; do
    case $1 in
        --destdir) need_arg "$1" $#; DESTDIR=$2; shift 2 ;;
        --destdir=*) DESTDIR=${1#*=}; shift ;;
        --binary) need_arg "$1" $#; BINARY=$2; shift 2 ;;
        --binary=*) BINARY=${1#*=}; shift ;;
        --domain) need_arg "$1" $#; DOMAIN=$2; shift 2 ;;
        --domain=*) DOMAIN=${1#*=}; shift ;;
        --email) need_arg "$1" $#; EMAIL=$2; shift 2 ;;
        --email=*) EMAIL=${1#*=}; shift ;;
        --no-start) START=0; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) err "unknown option: $1 (see --help)" ;;
    esac
done

[ "$PURGE" -eq 0 ] || [ "$ACTION" = uninstall ] || err "--purge only goes with --uninstall"

SRC_DIR=$(cd "$(dirname "$0")" && pwd)

STAGING=0
if [ -n "$DESTDIR" ]; then
    STAGING=1
    START=0
    case $DESTDIR in
        /*) ;;
        *) DESTDIR=$(pwd)/$DESTDIR ;;
    esac
    DESTDIR=${DESTDIR%/}
    [ -n "$DESTDIR" ] || err "--destdir / is the real system; leave --destdir out instead"
    mkdir -p "$DESTDIR"
else
    [ "$(id -u)" -eq 0 ] || err "run as root (sudo sh install.sh ...), or stage with --destdir DIR"
fi

# systemd is running (not merely installed), so systemctl can act.
SYSTEMD=0
if [ "$STAGING" -eq 0 ] && [ -d /run/systemd/system ]; then
    need_cmd systemctl
    SYSTEMD=1
fi

# Records the intended mode and owner of PATH (relative to the real root), applying the owner
# only on a real install: staging never asks for users that may not exist.
set_owner() {
    say "  $1 $2 $3"
    if [ "$STAGING" -eq 0 ]; then
        chown "$2" "$3"
    fi
}

# System directories that normally exist (/usr/local/bin, /etc/systemd/system): created when
# missing (staging), never re-moded or re-owned.
ensure_dir() {
    [ -d "$DESTDIR$1" ] || install -d -m 0755 "$DESTDIR$1"
}

install_dir() { # MODE OWNER PATH
    install -d -m "$1" "$DESTDIR$3"
    set_owner "$1" "$2" "$3"
}

install_file() { # MODE OWNER SRC PATH
    # Copy then rename, so a running binary is replaced atomically, never rewritten in place.
    install -m "$1" "$3" "$DESTDIR$4.new"
    mv -f "$DESTDIR$4.new" "$DESTDIR$4"
    set_owner "$1" "$2" "$4"
}

do_uninstall() {
    if [ "$SYSTEMD" -eq 1 ]; then
        systemctl disable --now "$SERVICE.service" 2>/dev/null || true
    fi
    rm -f "$DESTDIR$UNIT_PATH" "$DESTDIR$BIN_PATH"
    if [ "$SYSTEMD" -eq 1 ]; then
        systemctl daemon-reload
    fi
    say "Removed $BIN_PATH and $UNIT_PATH."
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$DESTDIR$CONF_DIR" "$DESTDIR$DATA_DIR"
        if [ "$STAGING" -eq 0 ] && getent passwd "$SERVICE" >/dev/null 2>&1; then
            userdel "$SERVICE" 2>/dev/null || say "note: could not remove the $SERVICE user"
        fi
        say "Purged $CONF_DIR, $DATA_DIR and the $SERVICE user."
    else
        say "Kept $CONF_DIR (config) and $DATA_DIR (database, keys, certificates)."
        say "Reinstall keeps using them; delete them with: sh install.sh --uninstall --purge"
    fi
}

if [ "$ACTION" = uninstall ]; then
    do_uninstall
    exit 0
fi

# --- Check everything before changing anything. -------------------------------------------
UNIT_SRC=$SRC_DIR/systemd/voicectl.service
[ -f "$UNIT_SRC" ] || err "missing $UNIT_SRC; run install.sh from the source tree or release archive"
need_cmd install

FRESH_CONFIG=0
if [ ! -e "$DESTDIR$CONF_FILE" ]; then
    FRESH_CONFIG=1
    [ -n "$DOMAIN" ] || err "first install: pass --domain NAME (the public host name Twilio will call, e.g. voice.example.com)"
fi

if [ -z "$BINARY" ]; then
    [ -f "$SRC_DIR/Cargo.toml" ] || err "no --binary given and $SRC_DIR is not a source checkout"
    command -v cargo >/dev/null 2>&1 ||
        err "cargo not found; build as your own user first (cargo build --release --locked) and pass --binary target/release/voicectl"
    say "Building voicectl (cargo build --release --locked)..."
    (cd "$SRC_DIR" && cargo build --release --locked)
    BINARY=$SRC_DIR/target/release/voicectl
fi
if [ ! -f "$BINARY" ] || [ ! -x "$BINARY" ]; then
    err "$BINARY is not an executable file"
fi
VERSION=$("$BINARY" --version 2>/dev/null) || err "$BINARY does not run on this machine"

UPGRADE=0
[ -e "$DESTDIR$BIN_PATH" ] && UPGRADE=1

if [ "$STAGING" -eq 1 ]; then
    say "Staging $VERSION into $DESTDIR (no users, owners or services are touched)."
else
    say "Installing $VERSION."
fi

# --- The service account. ------------------------------------------------------------------
if [ "$STAGING" -eq 0 ] && ! getent passwd "$SERVICE" >/dev/null 2>&1; then
    need_cmd useradd
    NOLOGIN=$(command -v nologin || echo /usr/sbin/nologin)
    useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home \
        --shell "$NOLOGIN" --comment "voicectl service" "$SERVICE"
    say "Created system user $SERVICE."
fi

# --- Files, with explicit modes and owners. ------------------------------------------------
say "Paths (mode owner path):"
ensure_dir /usr/local/bin
install_file 0755 root:root "$BINARY" "$BIN_PATH"
ensure_dir /etc/systemd/system
install_file 0644 root:root "$UNIT_SRC" "$UNIT_PATH"
# The service reads its config through the group; only root may change it.
install_dir 0750 "root:$SERVICE" "$CONF_DIR"
install_dir 0700 "$SERVICE:$SERVICE" "$DATA_DIR"

if [ "$FRESH_CONFIG" -eq 1 ]; then
    set -- --config "$DESTDIR$CONF_FILE" init --domain "$DOMAIN" --data-dir "$DESTDIR$DATA_DIR"
    if [ -n "$EMAIL" ]; then
        set -- "$@" --email "$EMAIL"
    fi
    "$DESTDIR$BIN_PATH" "$@"
    if [ "$STAGING" -eq 1 ]; then
        # init wrote the staging path; the installed config must name the real one.
        sed "s#^data_dir = .*#data_dir = \"$DATA_DIR\"#" "$DESTDIR$CONF_FILE" >"$DESTDIR$CONF_FILE.new"
        mv -f "$DESTDIR$CONF_FILE.new" "$DESTDIR$CONF_FILE"
    fi
else
    say "Keeping the existing $CONF_FILE."
fi
chmod 0640 "$DESTDIR$CONF_FILE"
set_owner 0640 "root:$SERVICE" "$CONF_FILE"
# Everything in the data dir belongs to the service, including files a root-run CLI command
# may have created (which would lock the service out of its own database).
if [ "$STAGING" -eq 0 ]; then
    chown -R "$SERVICE:$SERVICE" "$DATA_DIR"
fi

# --- systemd. --------------------------------------------------------------------------------
if [ "$SYSTEMD" -eq 1 ]; then
    systemctl daemon-reload
    if command -v systemd-analyze >/dev/null 2>&1; then
        systemd-analyze verify "$UNIT_PATH" || say "warning: systemd-analyze verify reported problems (above)"
    fi
    if [ "$START" -eq 1 ]; then
        if [ "$UPGRADE" -eq 1 ]; then
            # Restart only if it was running: a service stopped on purpose stays stopped.
            systemctl try-restart "$SERVICE.service"
            say "Upgraded; restarted $SERVICE if it was running."
        else
            systemctl enable --now "$SERVICE.service"
            say "Enabled and started $SERVICE."
        fi
    fi
elif [ "$STAGING" -eq 0 ]; then
    say "systemd is not running here: start the server yourself with"
    say "  runuser -u $SERVICE -- $BIN_PATH --config $CONF_FILE serve"
fi

cat <<EOF

Useful commands:
  sudo $BIN_PATH doctor          check config, permissions, DNS, ports, Twilio, clock, disk
  sudo $BIN_PATH status          is it up: version, uptime, calls
  journalctl -u $SERVICE -f           follow the logs
  sudoedit $CONF_FILE   then: sudo systemctl restart $SERVICE
EOF

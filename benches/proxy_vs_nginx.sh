#!/usr/bin/env bash
# Proxied requests/s through voicectl's [[proxy]] vs Debian's nginx as a reverse proxy, both in
# front of the same upstream (nginx serving a static 1 KiB file), measured with wrk.
#
#   benches/proxy_vs_nginx.sh            # needs: cargo, nginx, wrk, curl (apt-get install nginx wrk)
#
# Environment: DURATION (10s), THREADS (2), CONNECTIONS (64), ROUNDS (3: the targets are
# measured in turn, ROUNDS times, and the median of each is printed, so a burst of other load
# on the machine does not land on one target only), and the loopback ports
# UPSTREAM_PORT (28081), VOICECTL_PORT (28082), NGINX_PORT (28083).
# Both proxies log every request to a file (voicectl's JSON request log, nginx's access log)
# and keep pooled keep-alive connections to the upstream. Load generator, proxies and
# upstream share the machine's cores, so the figures are relative, not absolute.
set -euo pipefail

DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-3}
UPSTREAM_PORT=${UPSTREAM_PORT:-28081}
VOICECTL_PORT=${VOICECTL_PORT:-28082}
NGINX_PORT=${NGINX_PORT:-28083}

for tool in cargo nginx wrk curl; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
# nginx workers run as nobody when started by root; they must read the docroot.
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "building voicectl (release)..." >&2
(cd "$repo" && cargo build --release --quiet)
bin="$repo/target/release/voicectl"

mkdir -p "$work/www" "$work/data" "$work/tmp"
head -c 1024 /dev/zero | tr '\0' 'x' >"$work/www/index.html"

common="
    client_body_temp_path $work/tmp/body;
    proxy_temp_path $work/tmp/proxy;
    fastcgi_temp_path $work/tmp/fastcgi;
    uwsgi_temp_path $work/tmp/uwsgi;
    scgi_temp_path $work/tmp/scgi;
"

cat >"$work/upstream.conf" <<EOF
worker_processes 1;
pid $work/upstream.pid;
error_log $work/upstream-error.log;
events { worker_connections 4096; }
http {
    $common
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        root $work/www;
        location / { try_files /index.html =404; }
    }
}
EOF

cat >"$work/proxy.conf" <<EOF
worker_processes auto;
pid $work/proxy.pid;
error_log $work/proxy-error.log;
events { worker_connections 4096; }
http {
    $common
    access_log $work/proxy-access.log;
    keepalive_requests 1000000;
    upstream app {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$host;
        }
    }
}
EOF

cat >"$work/voicectl.toml" <<EOF
[server]
domain = "localhost"
data_dir = "$work/data"
listen = "127.0.0.1:$VOICECTL_PORT"
http_listen = ""
https_listen = ""

[tls]
mode = "off"

[twilio]
simulate = true

[[proxy]]
path = "/"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
EOF

nginx -p "$work" -c "$work/upstream.conf" -g 'daemon off;' &
pids+=($!)
nginx -p "$work" -c "$work/proxy.conf" -g 'daemon off;' &
pids+=($!)
env -u VOICECTL_CONFIG "$bin" --config "$work/voicectl.toml" serve >"$work/voicectl.log" 2>&1 &
pids+=($!)

wait_up() {
    for _ in $(seq 100); do
        if curl -fsS -o /dev/null "$1"; then
            return 0
        fi
        sleep 0.1
    done
    echo "not answering: $1" >&2
    exit 1
}

# Prints "<requests/s> <p99>" for one URL.
measure() {
    wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "$1" >/dev/null # warm-up: pools, caches
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$1" >"$work/wrk.out"
    if grep -q "Non-2xx" "$work/wrk.out"; then
        echo "non-2xx answers from $1:" >&2
        cat "$work/wrk.out" >&2
        exit 1
    fi
    awk '/Requests\/sec:/ { rps = $2 } $1 == "99%" { p99 = $2 } END { print rps, p99 }' \
        "$work/wrk.out"
}

for url in "http://127.0.0.1:$UPSTREAM_PORT/" "http://127.0.0.1:$VOICECTL_PORT/" \
    "http://127.0.0.1:$NGINX_PORT/"; do
    wait_up "$url"
done

targets=(direct voicectl nginx)
declare -A url=(
    [direct]="http://127.0.0.1:$UPSTREAM_PORT/"
    [voicectl]="http://127.0.0.1:$VOICECTL_PORT/"
    [nginx]="http://127.0.0.1:$NGINX_PORT/"
)
for round in $(seq "$ROUNDS"); do
    for t in "${targets[@]}"; do
        measure "${url[$t]}" >>"$work/$t.results"
        echo "round $round $t: $(tail -n1 "$work/$t.results")" >&2
    done
done

# The median line (by requests/s) of a target's rounds: "<requests/s> <p99>".
median() {
    sort -n "$work/$1.results" | awk '{ l[NR] = $0 } END { print l[int((NR + 1) / 2)] }'
}

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, 1 KiB response, $(nproc) cores, median of $ROUNDS"
printf '%-22s %12s %10s\n' "target" "requests/s" "p99"
for t in "${targets[@]}"; do
    read -r rps p99 < <(median "$t")
    printf '%-22s %12s %10s\n' "$t" "$rps" "$p99"
done
read -r voicectl_rps _ < <(median voicectl)
read -r nginx_rps _ < <(median nginx)
awk -v v="$voicectl_rps" -v n="$nginx_rps" \
    'BEGIN { printf "voicectl / nginx: %.2f\n", v / n }'

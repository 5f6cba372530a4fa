# Shared pieces of the macro benchmarks (sourced). Everything runs on loopback in $WORK.

# debian_rootfs [PKG,...]: path of a cached debootstrap minbase tree (with packages), built once.
debian_rootfs() {
  local pkgs=${1:-} name=debian-bookworm-minbase
  [ -n "$pkgs" ] && name="$name+${pkgs//,/+}"
  local dir=${CLIP_TESTKIT_CACHE:-/tmp/clip-testkit-cache}/$name
  if [ ! -e "$dir/etc/debian_version" ]; then
    mkdir -p "$(dirname "$dir")"
    local mirror
    mirror=$(python3 "$(dirname "${BASH_SOURCE[0]}")/apt-mirror.py")
    rm -rf "$dir.tmp"
    debootstrap --variant=minbase ${pkgs:+--include=$pkgs} bookworm "$dir.tmp" "${mirror:-http://deb.debian.org/debian}" >/dev/null
    rm -f "$dir.tmp"/var/cache/apt/archives/*.deb
    mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

# free_port: a free loopback TCP port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT: waits (up to 10 s) until something accepts connections on 127.0.0.1:PORT.
wait_port() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on port $1" >&2; return 1
}

# start_s3 BUCKET...: an S3 API server (s3s-fs) on a random loopback port storing under
# $WORK/s3, with the buckets made; sets S3PORT, S3_PID, S3_KEY and S3_SECRET.
start_s3() {
  S3PORT=$(free_port); S3_KEY=CLIPBENCH; S3_SECRET=clip-bench-secret
  for b in "$@"; do mkdir -p "$WORK/s3/$b"; done
  s3s-fs --host 127.0.0.1 --port "$S3PORT" --access-key "$S3_KEY" --secret-key "$S3_SECRET" "$WORK/s3" > "$WORK/s3.log" 2>&1 & S3_PID=$!
  wait_port "$S3PORT"
}

# start_registry: a distribution registry on a random loopback port; sets PORT and REG_PID.
start_registry() {
  PORT=$(free_port)
  mkdir -p "$WORK/registry"
  printf 'version: 0.1\nlog: {level: warn}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' "$WORK/registry" "$PORT" > "$WORK/reg.yml"
  docker-registry serve "$WORK/reg.yml" > "$WORK/reg.log" 2>&1 & REG_PID=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/v2/" >/dev/null && return 0; sleep 0.1; done
  echo "registry did not start" >&2; return 1
}

# buildah with its storage in $WORK.
bah() { buildah --root="$WORK/b/root" --runroot="$WORK/b/run" --storage-driver=vfs "$@"; }

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
spread() { tr ' ' '\n' | grep -v '^$' | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }
machine() { echo "$(nproc) cores $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -m), $(. /etc/os-release; echo "$PRETTY_NAME")"; }

# start_shaped_registry RATE_MBIT RTT_MS: a registry on loopback reached through a proxy that models
# a remote link (benches/macro/shape.py: RTT latency and one shared bandwidth limit per
# direction); sets PORT, REG_PID, SHAPE_PID and REG_HOST (the proxy's 127.0.0.1:PORT).
# The kernel here has no netem qdisc, so the link is modelled in userspace.
start_shaped_registry() {
  local mbit=$1 rtt=$2
  start_registry
  local inner=$PORT
  PORT=$(free_port)
  python3 "$(dirname "${BASH_SOURCE[0]}")/shape.py" "$PORT" "$inner" "$mbit" "$rtt" & SHAPE_PID=$!
  REG_HOST=127.0.0.1:$PORT
  for _ in $(seq 100); do curl -fs "http://$REG_HOST/v2/" >/dev/null && return 0; sleep 0.1; done
  echo "shaping proxy did not start" >&2; return 1
}

stop_shaped_registry() {
  [ -n "${SHAPE_PID:-}" ] && kill "$SHAPE_PID" 2>/dev/null
  return 0
}

# split_numpy_layers DIR: writes DIR/base.tar, DIR/mid.tar and DIR/top.tar, the three layers of a
# Debian + python3 + numpy image as a Dockerfile would make them: (1) debootstrap minbase, (2)
# what installing python3 added or changed, (3) numpy and its BLAS/LAPACK/Fortran libraries
# (benches/macro/layers.py splits the trees by dpkg ownership).
split_numpy_layers() {
  local dir=$1 base full
  base=$(debian_rootfs); full=$(debian_rootfs python3-numpy)
  mkdir -p "$dir"
  python3 "$(dirname "${BASH_SOURCE[0]}")/layers.py" "$base" "$full" "$dir" \
    python3-numpy,libblas3,liblapack3,libgfortran5,libquadmath0 2>/dev/null
  tar --numeric-owner --xattrs --xattrs-include='*' -C "$base" -cf "$dir/base.tar" .
  for l in mid top; do
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$full" --no-recursion -cf "$dir/$l.tar" -T "$dir/$l.list"
  done
}

# build_numpy_layered NAME: commits localhost/NAME, the three layers of split_numpy_layers as a
# gzip image built by buildah in $WORK.
build_numpy_layered() {
  local name=$1
  split_numpy_layers "$WORK/split"
  local ctr
  ctr=$(bah from scratch)
  bah config --cmd /usr/bin/python3 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  bah add "$ctr" "$WORK/split/base.tar" / >/dev/null
  bah commit --quiet --format oci "$ctr" "localhost/$name-l1" >/dev/null
  ctr=$(bah from "localhost/$name-l1")
  bah add "$ctr" "$WORK/split/mid.tar" / >/dev/null
  bah commit --quiet --format oci "$ctr" "localhost/$name-l2" >/dev/null
  ctr=$(bah from "localhost/$name-l2")
  bah add "$ctr" "$WORK/split/top.tar" / >/dev/null
  bah commit --quiet --format oci "$ctr" "localhost/$name" >/dev/null
  rm -rf "$WORK/split"
}

# mount_log MOUNTPOINT CACHE_DIR: the log of a background `clip mount` server (CACHE_DIR/logs/;
# builds before the private log directory wrote to /tmp/clip-mount-logs/).
mount_log() {
  local name; name="$(echo "$1" | sed 's|^/||; s|/|_|g').log"
  if [ -e "$2/logs/$name" ]; then echo "$2/logs/$name"; else echo "/tmp/clip-mount-logs/$name"; fi
}

# umount_wait MOUNTPOINT CACHE_DIR: `clip umount` (with $CLIP), then waits (up to 20 s: a mount
# with a span store drains its uploads first) for the server's new exit line; prints it.
umount_wait() {
  local log before
  log=$(mount_log "$1" "$2")
  before=$(stopped_lines "$log")
  "$CLIP" umount "$1"
  for _ in $(seq 400); do [ "$(stopped_lines "$log")" -gt "$before" ] && break; sleep 0.05; done
  grep 'stopped' "$log" | tail -1
}
stopped_lines() { if [ -e "$1" ]; then awk '/stopped/ { n++ } END { print n + 0 }' "$1"; else echo 0; fi; }
